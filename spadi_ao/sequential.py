"""Block-by-block compression: one decoder block in memory at a time, resumable, split across ranks.

GPTQ's sequential loop, on the same per-layer engine (``layer.compress_weight``): capture the first
block's inputs for every calibration sample, then for each block gather its Linears' Grams from those
inputs, compress them, and run the block to produce the next block's inputs, either with the dense
weights (``propagate="dense"``: every Gram equals the one-shot transform's) or with the compressed ones
(``propagate="compressed"``: later layers are whitened with the inputs they will see, but each is still
fitted to its own dense weight; ``propagate="corrected"``: the same inputs, and each Linear fitted to the
dense model's outputs, which a second stream of dense block inputs supplies, so the error of the earlier
blocks is undone rather than inherited, ``spadi_ao.correction``; ``propagate="blended"``: each Linear
whitened with the Gram of both streams, the dense one's and the compressed one's tokens pooled, and fitted
to its own dense weight: the whole-model objective and the compressed one, averaged).

Each finished layer can be checkpointed (``spadi_ao.checkpoint``); a run restarted with the same arguments
loads finished layers instead of solving them and ends bit-identical. Inside an initialised
``torch.distributed`` process group the solves of a block are dealt to the ranks by estimated cost
(longest first, to the least-loaded rank) and the results exchanged (``spadi_ao.distributed``), so every
rank ends with the full compressed model.

A whole-model allocation (the knapsack, ``GlobalAllocation``) adds a first pass: the loss sensitivities
from one backward per calibration batch with each block recomputed in the backward (activation
checkpointing: one block's activations at a time), then block by block with dense propagation each
unit's small table of candidate sizes and errors, dealt to ranks like the solves. The ratios are chosen
once from all tables, and the compress pass follows. Tables and sensitivities are checkpointed too.

Memory stays near the model's own: block inputs wait on the host between blocks (in memory-mapped
temporary files when they would not fit, see ``spadi_ao.block_inputs``), one block's Grams exist at a time (each
freed, widest first, once its last reader is solved, and whitened in its own memory; the rest wait in
temporary files while the widest is solved), and a block's dense weights go once the block is done.
Corrected and blended propagation add the dense stream's inputs (as many as the compressed stream's, held the
same way). Corrected propagation also holds, per Linear of the stage in flight, its cross products with the
dense outputs (out x in), and solves the block in stages (``spadi_ao.correction.input_stages``), each
stage's inputs gathered in forwards of their own. ``device`` moves one block at a time to an accelerator and
back; a model dispatched by accelerate (CPU or disk offload included) is compressed where its hooks run it,
through ``spadi_ao.offload``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from spadi_ao.allocation import output_sensitivity
from spadi_ao.block_inputs import InputStore, capture_block_inputs, input_device, run_block
from spadi_ao.calibration import GramCollector
from spadi_ao.checkpoint import Checkpoint, run_fingerprint
from spadi_ao.correction import ReferenceOutputs, input_stages, run_paired
from spadi_ao.distributed import UnitShape, deal_solves, exchange_layers, exchange_tables, rank_and_world, solve_costs
from spadi_ao.grouping import share_dictionary
from spadi_ao.layer import LayerReport
from spadi_ao.offload import WeightSwap, dense_weight, execution_device, install_weight, is_dispatched

__all__ = ["run_sequential", "decoder_blocks", "blockwise_sensitivity", "GlobalAllocation", "PROPAGATIONS"]

PROPAGATIONS = ("dense", "compressed", "corrected", "blended")
"""What the blocks after a compressed one see and fit (see the module docstring)."""
TWO_STREAMS = ("corrected", "blended")
"""The propagations that carry the dense model's block inputs beside the compressed model's."""

SolveFn = Callable[
    [
        str,
        list[str],
        list[torch.Tensor],
        GramCollector,
        Optional[float],
        Optional[dict[str, torch.Tensor]],
        Optional[list[torch.Tensor]],
    ],
    list[tuple[torch.Tensor, LayerReport]],
]
"""``solve(unit, members, their dense weights on the compute device, collector, ratio, sensitivity, crosses)``:
one ``(weight, report)`` per member. A unit is one Linear or a group sharing a dictionary; ``ratio`` is the one
the global allocation chose (None: the config's), ``sensitivity`` the loss sensitivities it used (None without
one). It reads the Grams from ``collector`` (``take`` / ``gram``, then ``release``). ``crosses``: with
``propagate="corrected"``, each member's dense outputs against its inputs, ``Y^T X_c / n`` (see
``spadi_ao.correction``); None otherwise."""
SurveyFn = Callable[[str, list[str], list[torch.Tensor], GramCollector, dict[str, torch.Tensor]], dict]
"""``survey(unit, members, dense weights, collector, sensitivity)``: the unit's allocation table, small and
JSON-able (e.g. each candidate's ratio, stored bytes and error)."""


@dataclass(frozen=True)
class GlobalAllocation:
    """A whole-model choice of per-unit ratios (the knapsack) made before anything is compressed.

    ``survey`` tabulates a unit from its Grams (dense propagation) and the loss sensitivities;
    ``choose`` maps every unit's table, in unit order, to its ratio. ``sensitivity``: given by the
    caller, else computed with :func:`blockwise_sensitivity`.
    """

    survey: SurveyFn
    choose: Callable[[dict[str, dict]], dict[str, float]]
    sensitivity: Optional[dict[str, torch.Tensor]] = None


def decoder_blocks(model: nn.Module, targets: dict[str, nn.Linear]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks that holds the target Linears (``model.layers`` in HF LMs)."""
    best: Optional[tuple[str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            prefix = f"{name}."
            if any(target.startswith(prefix) for target in targets):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise ValueError("sequential=True needs the target Linears inside a ModuleList of decoder blocks")
    outside = [t for t in targets if not t.startswith(f"{best[0]}.")]
    if outside:
        raise ValueError(f"sequential=True compresses only Linears inside {best[0]}; also selected: {outside[:3]}")
    return best


def units_by_block(units: dict[str, list[str]], block_prefix: str, count: int) -> list[dict[str, list[str]]]:
    """Each block's units (in unit order); a unit whose members sit in different blocks cannot be solved
    one block at a time."""
    blocks: list[dict[str, list[str]]] = [{} for _ in range(count)]
    for label, members in units.items():
        indices = {int(name[len(block_prefix) + 1 :].split(".", 1)[0]) for name in members}
        if len(indices) != 1:
            raise ValueError(
                f"grouping puts {members} in one group across decoder blocks {sorted(indices)}; sequential, "
                "checkpointed and distributed runs compress one block at a time and need groups inside one block "
                "(grouping='inputs'); use sequential=False (the whole model at once) for cross-block groups such as "
                "grouping='paper'"
            )
        blocks[indices.pop()][label] = members
    return blocks


@contextmanager
def _recomputed(blocks: nn.ModuleList) -> Iterator[None]:
    """Each block's forward under activation checkpointing while inside: a backward then holds one block's
    activations (plus every block's input) instead of every block's, and recomputes the same values."""
    from torch.utils.checkpoint import checkpoint

    saved = []
    for block in blocks:
        own = block.__dict__.get("forward")  # accelerate's hooks replace forward on the instance
        forward = block.forward
        saved.append(own)
        block.forward = lambda *args, _forward=forward, **kwargs: checkpoint(
            _forward, *args, use_reentrant=False, **kwargs
        )
    try:
        yield
    finally:
        for block, own in zip(blocks, saved):
            if own is None:
                del block.forward
            else:
                block.forward = own


def blockwise_sensitivity(
    model: nn.Module, blocks: nn.ModuleList, targets: dict[str, nn.Linear], batches: list[Any]
) -> dict[str, torch.Tensor]:
    """:func:`spadi_ao.allocation.output_sensitivity` with every decoder block recomputed in the backward:
    the same gradients, in the memory of one block's activations and the per-output sums."""
    with _recomputed(blocks), torch.enable_grad():
        return output_sensitivity(model, targets, batches)


@dataclass
class _Blockwise:
    """One sequential run's fixed context; :meth:`compress_block` does one block, all or nothing."""

    targets: dict[str, nn.Linear]
    solve: SolveFn
    propagate: str
    checkpoint: Optional[Checkpoint]
    device: Optional[torch.device]
    dispatched: bool
    rank: int = 0
    world: int = 1
    store: InputStore = field(default_factory=InputStore)
    measured: dict[tuple[int, int], float] = field(default_factory=dict)
    """Solve seconds per unit shape ``(outputs, in)``, from the exchanged reports: the same on every rank."""
    gram_bytes: int = 0
    """The most bytes of Grams held at once (one block's; with ``propagate="corrected"``, its cross products too)."""
    sensitivity: Optional[dict[str, torch.Tensor]] = None
    """The global allocation's loss sensitivities, handed to every solve."""
    reference: Optional[list[tuple[tuple, dict]]] = None
    """``propagate`` in ``TWO_STREAMS``: the dense model's inputs to the next block to compress (the dense stream)."""

    def survey(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        units: list[dict[str, list[str]]],
        inputs: list[tuple[tuple, dict]],
        batches: list[Any],
        allocation: GlobalAllocation,
        progress: bool,
    ) -> dict[str, dict]:
        """The first pass: every unit's table, in unit order (dense propagation; nothing is compressed)."""
        tables = dict(self.checkpoint.tables) if self.checkpoint is not None else {}
        todo = [index for index, block_units in enumerate(units) if set(block_units) - set(tables)]
        # before the tables: a resumed run whose tables are all saved still weighs its solves with it
        self.sensitivity = sensitivity = allocation.sensitivity or self._sensitivity(model, blocks, batches)
        if todo:
            for index in tqdm(range(todo[-1] + 1), desc="allocation survey", disable=not progress):
                pending = [label for label in units[index] if label not in tables]

                def job(label, members, weights, collector, crosses):
                    return allocation.survey(label, members, weights, collector, sensitivity)

                with self._on_compute(blocks[index]) as compute:
                    mine, inputs = self._run_units(
                        blocks[index], units[index], pending, inputs, compute, index < todo[-1], job
                    )
                found = exchange_tables(mine, pending)
                if self.checkpoint is not None and self.rank == 0:
                    self.checkpoint.save_tables(found)
                if self.checkpoint is not None and self.world > 1:
                    dist.barrier()
                tables.update(found)
        return {label: tables[label] for block_units in units for label in block_units}

    def _sensitivity(self, model: nn.Module, blocks: nn.ModuleList, batches: list[Any]) -> dict[str, torch.Tensor]:
        """Every rank computes it (its float64 sums are not split, so every rank's is bit-identical); checkpointed."""
        restored = self.checkpoint.load_sensitivity() if self.checkpoint is not None else None
        if restored is not None:
            return restored
        sensitivity = blockwise_sensitivity(model, blocks, self.targets, batches)
        if self.checkpoint is not None and self.rank == 0:
            self.checkpoint.save_sensitivity(sensitivity)
        if self.checkpoint is not None and self.world > 1:
            dist.barrier()
        return sensitivity

    def compress_block(
        self,
        block: nn.Module,
        units: dict[str, list[str]],
        inputs: list[tuple[tuple, dict]],
        ratios: dict[str, float],
        last: bool = False,
    ) -> tuple[list[LayerReport], Optional[list[tuple[tuple, dict]]]]:
        """Compress ``block``'s units (at ``ratios`` where given) and return their reports and the next block's
        inputs (none after the last).

        On the compute device only while it runs; on failure its dense weights are put back before it leaves.
        """
        names = [name for members in units.values() for name in members]
        swaps: list[WeightSwap] = []
        corrected = self.propagate == "corrected"
        two_streams = self.propagate in TWO_STREAMS
        with self._on_compute(block) as compute:
            try:
                if corrected:
                    results, kept = self._solve_in_stages(block, units, inputs, compute, ratios, not last, swaps)
                else:
                    results, kept = self._solve_block(block, units, inputs, compute, ratios, keep_outputs=not last)
                    for name in names:
                        swaps.append(install_weight(self.targets[name], results[name][0], name))
                next_inputs = kept
                if self.propagate != "dense" and not last:  # the dense stream's outputs, if kept, count beside
                    next_inputs = run_block(block, inputs, compute, self.store, new_block=not two_streams)
            except BaseException:
                for swap in reversed(swaps):
                    swap.undo()
                raise
        for swap in swaps:
            swap.release()
        if two_streams:
            self.reference = kept
        return [results[name][1] for name in names], next_inputs

    def _solve_in_stages(
        self,
        block: nn.Module,
        units: dict[str, list[str]],
        inputs: list[tuple[tuple, dict]],
        compute: torch.device,
        ratios: dict[str, float],
        keep_outputs: bool,
        swaps: list[WeightSwap],
    ) -> tuple[dict[str, tuple[torch.Tensor, LayerReport]], Optional[list[tuple[tuple, dict]]]]:
        """``propagate="corrected"``: the block's units stage by stage (``spadi_ao.correction.input_stages``),
        each stage's weights installed (into ``swaps``) before the next is gathered; the dense stream runs with
        the block's dense weights put back for each of its forwards. Returns the dense stream's outputs, kept
        from the first stage."""
        modules = {name: self.targets[name] for members in units.values() for name in members}
        dense = {name: module.weight for name, module in modules.items()}

        @contextmanager
        def dense_weights() -> Iterator[None]:
            current = {name: module.weight for name, module in modules.items()}
            for name, module in modules.items():
                module.weight = dense[name]
            try:
                yield
            finally:
                for name, module in modules.items():
                    module.weight = current[name]

        results: dict[str, tuple[torch.Tensor, LayerReport]] = {}
        kept = None
        for index, stage in enumerate(input_stages(block, units, modules, inputs[0], compute)):
            solved, outputs = self._solve_block(
                block, stage, inputs, compute, ratios, keep_outputs and index == 0, dense_weights
            )
            for members in stage.values():
                for name in members:
                    swaps.append(install_weight(self.targets[name], solved[name][0], name))
            results.update(solved)
            if index == 0:
                kept = outputs
        return results, kept

    @contextmanager
    def _on_compute(self, block: nn.Module) -> Iterator[torch.device]:
        """The block on its compute device while inside (moved there and back when ``device`` was given)."""
        home = None if self.dispatched or self.device is None else next(block.parameters()).device
        compute = (
            (execution_device(block) or input_device(block))
            if self.dispatched
            else self.device or next(block.parameters()).device
        )
        if home is not None:
            block.to(compute)
        try:
            yield compute
        finally:
            if home is not None:
                block.to(home)

    def _run_units(
        self,
        block: nn.Module,
        units: dict[str, list[str]],
        pending: list[str],
        inputs: list[tuple[tuple, dict]],
        compute: torch.device,
        keep_outputs: bool,
        job: Callable[[str, list[str], list[torch.Tensor], GramCollector, Optional[list[torch.Tensor]]], Any],
        reference: Optional[list[tuple[tuple, dict]]] = None,
        dense_weights: Optional[Callable[[], Any]] = None,
    ) -> tuple[dict[str, Any], Optional[list[tuple[tuple, dict]]]]:
        """Run the block over ``inputs`` (keeping its outputs when asked) while gathering the Grams of this
        rank's share of the ``pending`` units, then ``job`` each of them. Each Gram is freed as soon as its last
        reader is done.

        ``reference``: the dense stream's inputs (``propagate`` in ``TWO_STREAMS``, the compress pass only); the
        outputs kept are then the dense stream's. With ``dense_weights`` (``propagate="corrected"``: a context
        with the block's dense weights in place) each batch runs inside it on the dense stream first and the
        members' dense outputs are paired with their inputs into ``job``'s crosses; without (``"blended"``) the
        still dense block runs on the dense stream, then on the compressed one, both into the Grams.

        The units with the widest input are gathered and solved in a forward pass of their own, the rest in a
        second one: the widest Gram (512 MiB at 8192 inputs) and its solve never sit beside the block's other
        Grams, for the price of one more forward of the block (its outputs are kept from the first)."""
        keep = self.store if keep_outputs else None
        width = {label: self.targets[units[label][0]].in_features for label in pending}
        pending = sorted(pending, key=lambda label: -width[label])
        shapes = [
            UnitShape(sum(self.targets[name].out_features for name in units[label]), width[label]) for label in pending
        ]
        owners = deal_solves(solve_costs(shapes, self.measured), self.world)
        mine = [label for label, owner in zip(pending, owners) if owner == self.rank]
        widest = [label for label in mine if width[label] == width[mine[0]]]
        passes = [labels for labels in (widest, [label for label in mine if label not in widest]) if labels]
        blended = reference is not None and dense_weights is None
        if not passes:
            if keep is None:
                return {}, None
            if reference is None:
                return {}, run_block(block, inputs, compute, keep)
            with dense_weights() if dense_weights is not None else nullcontext():
                return {}, run_block(block, reference, compute, keep)
        done: dict[str, Any] = {}
        next_inputs = None
        for index, labels in enumerate(passes):
            names = [name for label in labels for name in units[label]]
            modules = {name: self.targets[name] for name in names}
            cross = ReferenceOutputs(modules) if dense_weights is not None else None
            with GramCollector(modules) as collector:
                store = keep if index == 0 else None
                if blended:
                    outputs = run_block(block, reference, compute, store)
                    run_block(block, inputs, compute, None)
                elif cross is None:
                    outputs = run_block(block, inputs, compute, store)
                else:
                    outputs = run_paired(block, dense_weights, inputs, reference, compute, store, collector, cross)
            if index == 0:  # the next block's inputs come from the first forward
                next_inputs = outputs
            cross_bytes = cross.memory_bytes if cross is not None else 0
            self.gram_bytes = max(self.gram_bytes, collector.memory_bytes + cross_bytes)
            for label in labels:
                weights = [dense_weight(self.targets[name]).to(compute) for name in units[label]]
                crosses = [cross.take(name) for name in units[label]] if cross is not None else None
                done[label] = job(label, units[label], weights, collector, crosses)
        return done, next_inputs

    def _solve_block(
        self,
        block: nn.Module,
        units: dict[str, list[str]],
        inputs: list[tuple[tuple, dict]],
        compute: torch.device,
        ratios: dict[str, float],
        keep_outputs: bool,
        dense_weights: Optional[Callable[[], Any]] = None,
    ) -> tuple[dict[str, tuple[torch.Tensor, LayerReport]], Optional[list[tuple[tuple, dict]]]]:
        """Each Linear's compressed weight (from the checkpoint, or solved on this rank or another) and, with
        ``keep_outputs``, the dense block's outputs: the next block's inputs with dense propagation, the next
        dense-stream inputs with corrected propagation (``dense_weights`` given, see :meth:`_run_units`)."""
        results: dict[str, tuple[torch.Tensor, LayerReport]] = {}
        pending = []
        for label, members in units.items():
            restored = [self.checkpoint.load(name) for name in members] if self.checkpoint is not None else [None]
            if all(entry is not None for entry in restored):
                results.update(zip(members, restored))
                share_dictionary([results[name][0] for name in members])
            else:
                pending.append(label)
        # Compressed propagation runs the compressed block after the solves instead: the dense outputs
        # (N x hidden floats, 256 MiB at 8B and 32 x 512 tokens) are not kept through them.
        keep = self.propagate in ("dense",) + TWO_STREAMS and keep_outputs

        def job(label, members, weights, collector, crosses):
            return self.solve(label, members, weights, collector, ratios.get(label), self.sensitivity, crosses)

        reference = self.reference if self.propagate in TWO_STREAMS else None
        mine, next_inputs = self._run_units(block, units, pending, inputs, compute, keep, job, reference, dense_weights)
        solved = {
            name: result for label, unit_results in mine.items() for name, result in zip(units[label], unit_results)
        }
        pending_names = [name for label in pending for name in units[label]]
        solved = exchange_layers(solved, pending_names)
        for label in pending:  # members solved on another rank arrive with a copy of the dictionary each
            share_dictionary([solved[name][0] for name in units[label]])
        if self.checkpoint is not None and self.rank == 0:
            for name in pending_names:
                weight, report = solved[name]
                self.checkpoint.save(name, weight.to("cpu"), report)
        if self.checkpoint is not None and self.world > 1:
            dist.barrier()
        results.update(solved)
        for members in units.values():
            shape = (sum(results[name][1].out_features for name in members), results[members[0]][1].in_features)
            self.measured[shape] = sum(results[name][1].seconds for name in members)
        return results, next_inputs


def run_sequential(
    model: nn.Module,
    config: Any,
    targets: dict[str, nn.Linear],
    batches: Iterable[Any],
    solve: SolveFn,
    *,
    units: Optional[dict[str, list[str]]] = None,
    allocation: Optional[GlobalAllocation] = None,
    propagate: str = "compressed",
    checkpoint_dir: Optional[str | os.PathLike] = None,
    device: Optional[str | torch.device] = None,
    progress: bool = True,
) -> tuple[list[LayerReport], int]:
    """Compress ``targets`` block by block, swapping each block's weights in as it finishes.

    ``units``: label -> the Linears solved together (sharing a dictionary), each inside one block (default:
    one per Linear). ``allocation``: a first pass that chooses every unit's ratio before any is compressed.
    Returns the layer reports and the most bytes of Grams held at once. Host memory stays near the model's
    own size: block inputs are kept on the CPU, one block's Grams exist at a time (each freed once its
    layers are solved), and a block's dense weights are released as soon as it is done. ``device`` (e.g.
    ``"cuda"``) is where each block runs and is solved; the block moves there and back. A model dispatched
    by accelerate (offloaded weights included) runs each block where its hooks say instead.

    On failure the block in flight gets its dense weights back; finished blocks keep their (working)
    compressed weights, the error says how many, and rerunning with ``checkpoint_dir`` on a freshly
    loaded model resumes instead of redoing them (and the first pass).
    """
    if propagate not in PROPAGATIONS:
        raise ValueError(f"propagate must be one of {PROPAGATIONS}, got {propagate!r}")
    dispatched = is_dispatched(model)
    if dispatched and propagate == "corrected":
        raise ValueError(
            "propagate='corrected' runs the dense stream with the dense weights of the block in flight swapped back "
            "in, which the offload hooks of a model dispatched by accelerate (device_map, cpu_offload or "
            "disk_offload) do not allow: use propagate='compressed'"
        )
    if dispatched and device is not None:
        raise ValueError(
            "device= moves each block itself, but this model is dispatched by accelerate (device_map, cpu_offload or "
            "disk_offload), whose hooks decide where each block runs: pass device=None"
        )
    block_prefix, blocks = decoder_blocks(model, targets)
    block_units = units_by_block(units or {name: [name] for name in targets}, block_prefix, len(blocks))
    batches = list(batches)
    store = InputStore(checkpoint_dir)
    inputs = capture_block_inputs(model, blocks[0], batches, store)
    checkpoint = (
        Checkpoint(Path(checkpoint_dir), run_fingerprint(model, config, targets, inputs, propagate))
        if checkpoint_dir
        else None
    )
    rank, world = rank_and_world()
    compute = torch.device(device) if device is not None else None
    run = _Blockwise(targets, solve, propagate, checkpoint, compute, dispatched, rank, world, store)
    if propagate in TWO_STREAMS:
        run.reference = inputs  # before the first block both streams are the captured inputs
    ratios: dict[str, float] = {}
    if allocation is not None:
        ratios = allocation.choose(run.survey(model, blocks, block_units, inputs, batches, allocation, progress))
    reports: list[LayerReport] = []
    finished = 0
    try:
        for index, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress)):
            block_reports, inputs = run.compress_block(
                block, block_units[index], inputs, ratios, last=index == len(blocks) - 1
            )
            reports.extend(block_reports)
            finished += 1
    except BaseException as exc:
        if finished:
            exc.add_note(
                f"spadi-ao: blocks 0-{finished - 1} of {len(blocks)} were compressed before the failure and keep "
                "their compressed weights; the block in flight was restored. Rerun on a freshly loaded model (with "
                "checkpoint_dir to skip finished layers)."
            )
        raise
    return reports, run.gram_bytes
