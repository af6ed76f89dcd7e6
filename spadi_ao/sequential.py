"""Block-by-block compression: one decoder block in memory at a time, resumable, split across ranks.

GPTQ's sequential loop, on the same per-layer engine (``layer.compress_weight``): capture the first
block's inputs for every calibration sample, then for each block gather its Linears' Grams from those
inputs, compress them, and run the block to produce the next block's inputs, either with the dense
weights (``propagate="dense"``: every Gram equals the one-shot transform's) or with the compressed ones
(``propagate="compressed"``: later layers see and correct the error of earlier ones).

Each finished layer can be checkpointed (write-then-rename); a run restarted with the same arguments
loads finished layers instead of solving them and ends bit-identical. Inside an initialised
``torch.distributed`` process group the solves of a block are dealt to the ranks by estimated cost
(longest first, to the least-loaded rank) and the results exchanged, so every rank ends with the full
compressed model.

A whole-model allocation (the knapsack, ``GlobalAllocation``) adds a first pass: the loss sensitivities
from one backward per calibration batch with each block recomputed in the backward (activation
checkpointing: one block's activations at a time), then block by block with dense propagation each
unit's small table of candidate sizes and errors, dealt to ranks like the solves. The ratios are chosen
once from all tables, and the compress pass follows. Tables and sensitivities are checkpointed too.

Memory stays near the model's own: block inputs wait on the host between blocks (in memory-mapped
temporary files when they would not fit, see ``_InputStore``), one block's Grams exist at a time (each
freed, widest first, once its last reader is solved, and whitened in its own memory; the rest wait in
temporary files while the widest is solved), and a block's dense weights go once the block is done.
``device`` moves one block at a time to an accelerator and back; a model dispatched by accelerate (CPU
or disk offload included) is compressed where its hooks run it, through ``spadi_ao.offload``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from spadi_ao.allocation import output_sensitivity
from spadi_ao.calibration import GramCollector
from spadi_ao.grouping import share_dictionary
from spadi_ao.layer import LayerReport
from spadi_ao.offload import WeightSwap, dense_weight, execution_device, install_weight, is_dispatched

__all__ = ["run_sequential", "decoder_blocks", "blockwise_sensitivity", "GlobalAllocation", "CheckpointMismatchError"]

SolveFn = Callable[
    [str, list[str], list[torch.Tensor], GramCollector, Optional[float]], list[tuple[torch.Tensor, LayerReport]]
]
"""``solve(unit, members, their dense weights on the compute device, collector, ratio)``: one ``(weight, report)``
per member. A unit is one Linear or a group sharing a dictionary; ``ratio`` is the one the global allocation
chose (None: the config's). It reads the Grams from ``collector`` (``take`` / ``gram``, then ``release``)."""
SurveyFn = Callable[[str, list[str], list[torch.Tensor], GramCollector, dict[str, torch.Tensor]], dict]
"""``survey(unit, members, dense weights, collector, sensitivity)``: the unit's allocation table, small and
JSON-able (e.g. each candidate's ratio, stored bytes and error)."""
MANIFEST = "manifest.json"
SENSITIVITY = "sensitivity.safetensors"


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


class UnitShape(NamedTuple):
    """A solve's size for dealing it: a group is one solve of its stacked outputs."""

    out_features: int
    in_features: int


class CheckpointMismatchError(ValueError):
    """The checkpoint directory belongs to a run with other arguments, or is corrupted."""


class _StopForward(Exception):
    pass


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


def _input_device(model: nn.Module) -> torch.device:
    """Where the calibration batches go: the first materialised parameter's device (offloaded ones are on meta)."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def _available_memory_bytes() -> int:
    """Host memory available to this process now (Linux ``MemAvailable``; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


class _InputStore:
    """Where the calibration samples' hidden states wait between blocks: on the host while one block's worth
    fits in a quarter of the memory available at the start, in temporary files past that.

    A spilled tensor is written, memory-mapped back and its file unlinked at once (the mapping keeps the
    data): the OS pages it in while a block reads it and can drop it again, and nothing is left on disk
    when the run ends or dies. Two blocks' worth (inputs and outputs) exist at a time, so the host holds
    at most half the memory that was available.
    """

    def __init__(self, directory: Optional[str | os.PathLike] = None) -> None:
        """``directory``: where spilled inputs go (sequential mode passes ``checkpoint_dir``; default: the
        system's temporary directory)."""
        self.budget = _available_memory_bytes() // 4
        self.directory = directory
        self.held = 0
        self.spilled = 0

    def next_block(self) -> None:
        """The block in flight starts producing the next block's inputs."""
        self.held = 0

    def keep(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to("cpu")
        size = hidden.numel() * hidden.element_size()
        if self.held + size <= self.budget:
            self.held += size
            return hidden
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
        handle, path = tempfile.mkstemp(prefix="spadi-ao-inputs-", suffix=".pt", dir=self.directory)
        os.close(handle)
        try:
            torch.save(hidden, path)
            mapped = torch.load(path, mmap=True, weights_only=True)
        finally:
            os.unlink(path)
        self.spilled += 1
        return mapped


def _capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: Iterable[Any], store: _InputStore
) -> list[tuple[tuple, dict]]:
    """Run the model up to the first block for each batch; keep that block's (args, kwargs) on the host."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        captured.append(((store.keep(args[0]),) + _to(args[1:], "cpu"), _to(kwargs, "cpu")))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = _input_device(model)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    if isinstance(batch, dict):
                        model(**_to(batch, device), use_cache=False)
                    else:
                        batch = batch if batch.dim() == 2 else batch.unsqueeze(0)
                        model(batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("calibration is empty: pass at least one batch of input ids")
    return captured


def _to(value: Any, device: Any) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _run_block(
    block: nn.Module, inputs: list[tuple[tuple, dict]], device: torch.device, store: Optional[_InputStore]
) -> Optional[list[tuple[tuple, dict]]]:
    """The block's outputs for every sample, kept by ``store`` as the next block's inputs; with no store the
    block runs for its hooks only (the Gram pass of compressed propagation) and nothing is kept."""
    outputs: Optional[list[tuple[tuple, dict]]] = None
    if store is not None:
        store.next_block()
        outputs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            result = block(*_to(args, device), **_to(kwargs, device))
            if outputs is not None:
                hidden = result[0] if isinstance(result, tuple) else result
                outputs.append(((store.keep(hidden),) + tuple(args[1:]), kwargs))
    return outputs


class _Checkpoint:
    """One safetensors file per finished layer plus a manifest, each written then renamed."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / MANIFEST
        if manifest.exists():
            try:
                state = json.loads(manifest.read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointMismatchError(
                    f"{manifest} is corrupted ({exc}); delete the directory to start over"
                ) from None
            if state.get("fingerprint") != fingerprint:
                raise CheckpointMismatchError(
                    f"checkpoint_dir {directory} was written by a run with different arguments "
                    "(model, config, layers or calibration); use a new directory or the original arguments"
                )
            self.done: dict[str, dict] = state["layers"]
            self.tables: dict[str, dict] = state.get("tables", {})
            self.has_sensitivity: bool = state.get("sensitivity", False)
        else:
            self.done, self.tables, self.has_sensitivity = {}, {}, False
        self.fingerprint = fingerprint
        self._write_manifest()

    def _atomic_write(self, path: Path, write: Callable[[str], None]) -> None:
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.")
        os.close(handle)
        try:
            write(temporary)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _write_manifest(self) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "layers": self.done,
            "tables": self.tables,
            "sensitivity": self.has_sensitivity,
        }
        payload = json.dumps(state, indent=1)
        self._atomic_write(self.directory / MANIFEST, lambda p: Path(p).write_text(payload))

    def load(self, name: str) -> Optional[tuple[torch.Tensor, LayerReport]]:
        entry = self.done.get(name)
        if entry is None:
            return None
        from safetensors.torch import load_file

        from spadi_ao.serialization import unflatten_state_dict

        try:
            tensors = load_file(str(self.directory / entry["file"]))
        except Exception as exc:
            raise CheckpointMismatchError(
                f"checkpoint file for {name} cannot be read ({exc}); delete it to recompute"
            ) from None
        weight = unflatten_state_dict(tensors, entry["manifest"])["weight"]
        return weight, LayerReport(**entry["report"])

    def save(self, name: str, weight: torch.Tensor, report: LayerReport) -> None:
        from safetensors.torch import save_file

        from spadi_ao.serialization import flatten_state_dict

        tensors, manifest = flatten_state_dict({"weight": weight})
        file = f"{name}.safetensors"
        self._atomic_write(self.directory / file, lambda p: save_file(tensors, p))
        self.done[name] = {"file": file, "manifest": manifest, "report": report.to_dict()}
        self._write_manifest()

    def save_tables(self, tables: dict[str, dict]) -> None:
        """The first pass's tables of some units (JSON keeps every float exactly)."""
        self.tables.update(tables)
        self._write_manifest()

    def load_sensitivity(self) -> Optional[dict[str, torch.Tensor]]:
        if not self.has_sensitivity:
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(self.directory / SENSITIVITY))
        except Exception as exc:
            raise CheckpointMismatchError(
                f"{SENSITIVITY} cannot be read ({exc}); delete the checkpoint directory to recompute"
            ) from None

    def save_sensitivity(self, sensitivity: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {name: value.contiguous() for name, value in sensitivity.items()}
        self._atomic_write(self.directory / SENSITIVITY, lambda p: save_file(tensors, p))
        self.has_sensitivity = True
        self._write_manifest()


def run_fingerprint(
    model: nn.Module, config: Any, targets: dict[str, nn.Linear], inputs: list[tuple[tuple, dict]], propagate: str
) -> str:
    """Hash of everything that determines the result: config, layer names and shapes, first-block inputs."""
    digest = hashlib.sha256()
    digest.update(repr(config).encode())
    digest.update(propagate.encode())
    for name, module in targets.items():
        digest.update(f"{name}{tuple(module.weight.shape)}{module.weight.dtype}".encode())
        digest.update(dense_weight(module).float().sum().item().hex().encode())
    for args, _ in inputs:
        digest.update(args[0].float().sum().item().hex().encode())
        digest.update(str(tuple(args[0].shape)).encode())
    return digest.hexdigest()


def _exchange(
    results: dict[str, tuple[torch.Tensor, LayerReport]], names: list[str]
) -> dict[str, tuple[torch.Tensor, LayerReport]]:
    """Every rank contributes the layers it solved; every rank receives them all.

    Each layer's layout (serialization manifest, inner shapes and dtypes, report) goes round as one small
    object exchange; the inner tensors are then broadcast from the rank that solved them, never pickled:
    for a 1B block's ~110 MiB of compressed weights, 0.05 s instead of 0.45 s with ``all_gather_object``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return results
    from spadi_ao.serialization import flatten_state_dict, unflatten_state_dict

    rank = dist.get_rank()
    wire = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local, layouts = {}, {}
    for name, (weight, report) in results.items():
        local[name], manifest = flatten_state_dict({"weight": weight.cpu()})
        layouts[name] = (manifest, report, {key: (tuple(t.shape), t.dtype) for key, t in local[name].items()})
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, layouts)
    owner_of = {name: owner for owner, part in enumerate(gathered) for name in part}
    missing = set(names) - set(owner_of)
    if missing:
        raise RuntimeError(f"distributed solve lost layers {sorted(missing)}")
    merged: dict[str, tuple[torch.Tensor, LayerReport]] = {}
    for name in names:  # the same order on every rank: the broadcasts pair up
        owner = owner_of[name]
        manifest, report, specs = gathered[owner][name]
        tensors = {}
        for key, (shape, dtype) in sorted(specs.items()):
            tensor = local[name][key].to(wire) if owner == rank else torch.empty(shape, dtype=dtype, device=wire)
            dist.broadcast(tensor, src=owner)
            tensors[key] = tensor.cpu()
        merged[name] = results[name] if owner == rank else (unflatten_state_dict(tensors, manifest)["weight"], report)
    return merged


def _exchange_tables(tables: dict[str, dict], labels: list[str]) -> dict[str, dict]:
    """Every rank contributes the tables it computed (a few floats per candidate); every rank receives them all."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tables
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, tables)
    merged = {label: table for part in gathered for label, table in part.items()}
    missing = set(labels) - set(merged)
    if missing:
        raise RuntimeError(f"distributed allocation survey lost units {sorted(missing)}")
    return {label: merged[label] for label in labels}


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def solve_cost(linear: nn.Linear) -> float:
    """A FLOP count of one Linear's solve, to balance ranks before anything is measured: the whitening's
    float64 Cholesky and ``U W^T`` (``in^3 / 3 + 2 in^2 out``), plus ``4 max min^2 + 8 min^3`` for the
    solve on the whitened ``in x out`` weight: its smaller Gram and the coding GEMMs (``2 max min^2`` each,
    with ``k`` near ``min / 2``) and that Gram's eigendecomposition (``~8 min^3``)."""
    width, height = linear.in_features, linear.out_features
    small, large = sorted((width, height))
    return 4 * large * small**2 + 8 * small**3 + width**3 / 3 + 2 * width**2 * height


def solve_costs(linears: list[nn.Linear | UnitShape], measured: dict[tuple[int, int], float]) -> list[float]:
    """Seconds an earlier block took for the same shapes when all of them have been seen (a decoder repeats
    its blocks; the float64/float32 speed ratio of the machine is in them), else :func:`solve_cost`."""
    shapes = [(linear.out_features, linear.in_features) for linear in linears]
    if all(shape in measured for shape in shapes):
        return [measured[shape] for shape in shapes]
    return [solve_cost(linear) for linear in linears]


def deal_solves(costs: list[float], world: int) -> list[int]:
    """The rank of each job: longest first, each to the least-loaded rank (ties: earlier job, lower rank).

    Deterministic, so every rank computes the same assignment without talking. Round-robin would give a
    Llama block's three equal MLP solves two to one rank out of two; this pairs gate/up against down plus
    attention (measured in ``benchmarks/scale.py --parts speedup``).
    """
    loads = [0.0] * world
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[job] = rank
        loads[rank] += costs[job]
    return owners


@dataclass
class _Blockwise:
    """One sequential run's fixed context; :meth:`compress_block` does one block, all or nothing."""

    targets: dict[str, nn.Linear]
    solve: SolveFn
    propagate: str
    checkpoint: Optional[_Checkpoint]
    device: Optional[torch.device]
    dispatched: bool
    rank: int = 0
    world: int = 1
    store: _InputStore = field(default_factory=_InputStore)
    measured: dict[tuple[int, int], float] = field(default_factory=dict)
    """Solve seconds per unit shape ``(outputs, in)``, from the exchanged reports: the same on every rank."""
    gram_bytes: int = 0
    """The most bytes of Grams held at once (one block's)."""

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
        if todo:
            sensitivity = allocation.sensitivity or self._sensitivity(model, blocks, batches)
            for index in tqdm(range(todo[-1] + 1), desc="allocation survey", disable=not progress):
                pending = [label for label in units[index] if label not in tables]

                def job(label, members, weights, collector):
                    return allocation.survey(label, members, weights, collector, sensitivity)

                with self._on_compute(blocks[index]) as compute:
                    mine, inputs = self._run_units(
                        blocks[index], units[index], pending, inputs, compute, index < todo[-1], job
                    )
                found = _exchange_tables(mine, pending)
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
        with self._on_compute(block) as compute:
            try:
                results, next_inputs = self._solve_block(block, units, inputs, compute, ratios, keep_outputs=not last)
                for name in names:
                    swaps.append(install_weight(self.targets[name], results[name][0], name))
                if self.propagate == "compressed" and not last:
                    next_inputs = _run_block(block, inputs, compute, self.store)
            except BaseException:
                for swap in reversed(swaps):
                    swap.undo()
                raise
        for swap in swaps:
            swap.release()
        return [results[name][1] for name in names], next_inputs

    @contextmanager
    def _on_compute(self, block: nn.Module) -> Iterator[torch.device]:
        """The block on its compute device while inside (moved there and back when ``device`` was given)."""
        home = None if self.dispatched or self.device is None else next(block.parameters()).device
        compute = (
            (execution_device(block) or _input_device(block))
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
        job: Callable[[str, list[str], list[torch.Tensor], GramCollector], Any],
    ) -> tuple[dict[str, Any], Optional[list[tuple[tuple, dict]]]]:
        """Run the block over ``inputs`` (keeping its outputs when asked) while gathering the Grams of the
        ``pending`` units, then ``job`` each of this rank's share of them, widest inputs first, with every
        other Gram parked in a file. Each Gram is freed as soon as its last reader is done."""
        keep = self.store if keep_outputs else None
        if not pending:
            return {}, _run_block(block, inputs, compute, keep) if keep is not None else None
        names = [name for label in pending for name in units[label]]
        with GramCollector({name: self.targets[name] for name in names}) as collector:
            next_inputs = _run_block(block, inputs, compute, keep)
        self.gram_bytes = max(self.gram_bytes, collector.memory_bytes)
        # Widest inputs first: the largest Gram (512 MiB at 8192 inputs) is solved, and freed, before the rest.
        pending = sorted(pending, key=lambda label: -self.targets[units[label][0]].in_features)
        shapes = [
            UnitShape(
                sum(self.targets[name].out_features for name in units[label]), self.targets[units[label][0]].in_features
            )
            for label in pending
        ]
        owners = deal_solves(solve_costs(shapes, self.measured), self.world)
        mine = [label for label, owner in zip(pending, owners) if owner == self.rank]
        for label in set(pending) - set(mine):
            for name in units[label]:
                collector.release(name)
        done = {}
        with tempfile.TemporaryDirectory(prefix="spadi-ao-grams-") as parking:
            if mine:
                collector.park(parking, keep=units[mine[0]][0])  # the widest solve runs beside no other Gram
            for label in mine:
                weights = [dense_weight(self.targets[name]).to(compute) for name in units[label]]
                done[label] = job(label, units[label], weights, collector)
        return done, next_inputs

    def _solve_block(
        self,
        block: nn.Module,
        units: dict[str, list[str]],
        inputs: list[tuple[tuple, dict]],
        compute: torch.device,
        ratios: dict[str, float],
        keep_outputs: bool,
    ) -> tuple[dict[str, tuple[torch.Tensor, LayerReport]], Optional[list[tuple[tuple, dict]]]]:
        """Each Linear's compressed weight (from the checkpoint, or solved on this rank or another) and, with
        dense propagation and ``keep_outputs``, the next block's inputs."""
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
        keep = self.propagate == "dense" and keep_outputs

        def job(label, members, weights, collector):
            return self.solve(label, members, weights, collector, ratios.get(label))

        mine, next_inputs = self._run_units(block, units, pending, inputs, compute, keep, job)
        solved = {
            name: result for label, unit_results in mine.items() for name, result in zip(units[label], unit_results)
        }
        pending_names = [name for label in pending for name in units[label]]
        solved = _exchange(solved, pending_names)
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
    if propagate not in ("dense", "compressed"):
        raise ValueError(f"propagate must be 'dense' or 'compressed', got {propagate!r}")
    dispatched = is_dispatched(model)
    if dispatched and device is not None:
        raise ValueError(
            "device= moves each block itself, but this model is dispatched by accelerate (device_map, cpu_offload or "
            "disk_offload), whose hooks decide where each block runs: pass device=None"
        )
    block_prefix, blocks = decoder_blocks(model, targets)
    block_units = units_by_block(units or {name: [name] for name in targets}, block_prefix, len(blocks))
    batches = list(batches)
    store = _InputStore(checkpoint_dir)
    inputs = _capture_block_inputs(model, blocks[0], batches, store)
    checkpoint = (
        _Checkpoint(Path(checkpoint_dir), run_fingerprint(model, config, targets, inputs, propagate))
        if checkpoint_dir
        else None
    )
    rank, world = _rank_and_world()
    compute = torch.device(device) if device is not None else None
    run = _Blockwise(targets, solve, propagate, checkpoint, compute, dispatched, rank, world, store)
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
