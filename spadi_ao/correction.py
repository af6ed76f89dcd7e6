"""Error correction for block-by-block compression: each Linear fitted to the dense model's outputs.

With compressed propagation a Linear sees ``X_c``, the inputs the compressed blocks before it produce, and
is fitted to its own dense weight on them, ``||X_c (W_hat - W)^T||``: the error of the earlier blocks is
inherited, not undone. The dense model's outputs for the same tokens, ``Y = X_d W^T`` (``X_d``: the inputs
the dense model gives the Linear), are the target that undoes it, and the usual whitened solve minimises
it when run on a corrected weight instead of ``W``::

    (1 - a) ||X_c W_hat^T - Y||^2 / n + ||(W_hat - W) diag(r)^(1/2)||^2 = ||U (W_hat - W_c)^T||^2 + const
    W_c = ((1 - a) P + W diag(r)) G_r^-1,   P = Y^T X_c / n,   G_r = U^T U = (1 - a) G + diag(r)

``G = X_c^T X_c / n`` is the Gram the solve whitens with, shrunk by ``a`` toward its diagonal and damped
by ``d`` times its mean diagonal, so ``r = a diag(G) + d mean(diag(G))``: the regularisation the whitening
already applies pulls the corrected weight toward the dense one, and ``W_c = W`` when ``X_c = X_d``. The
solve needs only the whitened ``U W_c^T = U^-T ((1 - a) P + W diag(r))^T``: one triangular solve with the
factor the whitening has made anyway (:func:`corrected_whitened_weight`), no second in x in matrix.

A sequential run keeps two streams of block inputs (``spadi_ao.sequential``): the compressed model's, on
which the Grams are gathered, and the dense model's. Each calibration batch runs through the block with its
dense weights on its dense-stream input (the target Linears' outputs recorded), then with the weights of
the stages solved so far on its compressed-stream input (each Linear's ``P`` accumulated against the
recording), one batch at a time, so only one batch's outputs are held.

Inside a block the Linears are solved in stages, in the order the block reads their inputs (q/k/v, then
o, then gate/up, then down in a Llama block; :func:`input_stages`), each stage's compressed weights in
place before the next stage's statistics are gathered. A Linear's ``X_c`` is then what it will really read,
and its correction does not undo again what the stages before it already corrected.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from spadi_ao.block_inputs import InputStore, to_device
from spadi_ao.calibration import GramCollector
from spadi_ao.solvers import BLOCK_ELEMENTS
from spadi_ao.solvers.whitening import BLOCK_ROWS, Whitening

__all__ = ["ReferenceOutputs", "correction_ridge", "corrected_whitened_weight", "input_stages", "run_paired"]


@contextmanager
def _removed_after(handles: list) -> Iterator[None]:
    """The hooks behind ``handles`` live while inside."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ReferenceOutputs:
    """Per Linear, the running ``Y^T X_c`` (float64, out x in) of the dense stream's outputs against the
    compressed stream's inputs of the same tokens, built one batch at a time (:meth:`recording`, then
    :meth:`pairing`)."""

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self._modules = modules
        self._recorded: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        """While inside, each Linear's output is kept (the dense stream's forward of one batch)."""
        self._recorded.clear()

        def record(name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                self._recorded[name] = output.detach()

            return hook

        with _removed_after([module.register_forward_hook(record(name)) for name, module in self._modules.items()]):
            yield

    @contextmanager
    def pairing(self) -> Iterator[None]:
        """While inside, each Linear's input is multiplied into its sum against the recorded output (the
        compressed stream's forward of the same batch); the recording is dropped at the end."""

        def pair(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                self._add(name, self._recorded.pop(name), args[0].detach())

            return hook

        try:
            with _removed_after(
                [module.register_forward_pre_hook(pair(name)) for name, module in self._modules.items()]
            ):
                yield
        finally:
            self._recorded.clear()

    def _add(self, name: str, outputs: torch.Tensor, inputs: torch.Tensor) -> None:
        if outputs.shape[:-1] != inputs.shape[:-1]:
            raise ValueError(
                f"{name}: the dense stream's output {tuple(outputs.shape)} and the compressed stream's input "
                f"{tuple(inputs.shape)} do not cover the same tokens"
            )
        outputs = outputs.reshape(-1, outputs.shape[-1]).to(torch.float32)
        inputs = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
        width = outputs.shape[1]
        if name not in self._sums:
            self._sums[name] = torch.zeros(width, inputs.shape[1], dtype=torch.float64, device=inputs.device)
        # float32 products into a float64 sum, a block of rows at a time: the Gram's own recipe and accuracy
        for start in range(0, width, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, width)
            self._sums[name][start:stop].add_((outputs[:, start:stop].T @ inputs).to(torch.float64))
        self._tokens[name] = self._tokens.get(name, 0) + inputs.shape[0]

    def take(self, name: str) -> Optional[torch.Tensor]:
        """``P = Y^T X_c / tokens`` of ``name`` in float32 (None if it never ran), handed over and forgotten: a
        target's rounding, at half the memory of the float64 sum (64 MiB for a 2048 x 8192 ``down_proj``)."""
        total = self._sums.pop(name, None)
        return None if total is None else total.div_(self._tokens.pop(name)).to(torch.float32)

    @property
    def memory_bytes(self) -> int:
        return sum(total.numel() * total.element_size() for total in self._sums.values())


def run_paired(
    block: nn.Module,
    dense_weights: Callable[[], AbstractContextManager],
    inputs: list[tuple[tuple, dict]],
    reference_inputs: list[tuple[tuple, dict]],
    device: torch.device,
    store: Optional[InputStore],
    collector: GramCollector,
    reference: ReferenceOutputs,
) -> Optional[list[tuple[tuple, dict]]]:
    """Each batch through ``block`` on its dense-stream input inside ``dense_weights()`` (the block's dense
    weights in place), then on its compressed-stream input as it stands: the Grams gather the compressed
    stream only, ``reference`` pairs the two. Returns the dense stream's outputs, kept by ``store`` as the next
    block's dense-stream inputs (None without a store)."""
    if len(inputs) != len(reference_inputs):
        raise ValueError(f"{len(inputs)} compressed-stream batches against {len(reference_inputs)} dense-stream ones")
    outputs: Optional[list[tuple[tuple, dict]]] = None
    if store is not None:
        store.next_block()
        outputs = []
    with torch.no_grad():
        for (args, kwargs), (dense_args, dense_kwargs) in zip(inputs, reference_inputs):
            with collector.paused(), reference.recording(), dense_weights():
                result = block(*to_device(dense_args, device), **to_device(dense_kwargs, device))
            if outputs is not None:
                hidden = result[0] if isinstance(result, tuple) else result
                outputs.append(((store.keep(hidden),) + tuple(dense_args[1:]), dense_kwargs))
            with reference.pairing():
                block(*to_device(args, device), **to_device(kwargs, device))
    return outputs


def input_stages(
    block: nn.Module,
    units: dict[str, list[str]],
    modules: dict[str, nn.Linear],
    sample: tuple[tuple, dict],
    device: Any,
) -> list[dict[str, list[str]]]:
    """``units`` in stages, in the order ``block`` reads their inputs on ``sample`` (one calibration batch):
    Linears reading the same tensor share a stage, and a unit sits in its latest member's stage, so every
    Linear whose output can reach a unit's input is solved in an earlier stage."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        module.register_forward_pre_hook(lambda module, args, name=name: calls.append((name, args[0])))
        for name, module in modules.items()
    ]
    with _removed_after(handles), torch.no_grad():
        block(*to_device(sample[0], device), **to_device(sample[1], device))
    stage_of: dict[str, int] = {}
    stage, previous = -1, None
    for name, tensor in calls:
        if tensor is not previous:
            stage, previous = stage + 1, tensor
        stage_of.setdefault(name, stage)
    missing = sorted(name for members in units.values() for name in members if name not in stage_of)
    if missing:
        raise ValueError(f"propagate='corrected': the block never called {missing[:3]} on a calibration batch")
    stages: list[dict[str, list[str]]] = [{} for _ in range(stage + 1)]
    for label, members in units.items():
        stages[max(stage_of[name] for name in members)][label] = members
    return [units_of_stage for units_of_stage in stages if units_of_stage]


def correction_ridge(gram: torch.Tensor, shrinkage: float, damping: float) -> torch.Tensor:
    """``r = a diag(G) + d mean(diag(G))`` (float64, in): what the whitening adds to ``(1 - a) G``. Taken
    before the whitening factors ``gram`` in place."""
    diagonal = gram.diagonal().to(torch.float64)
    return shrinkage * diagonal + damping * diagonal.mean().clamp_min(torch.finfo(torch.float64).tiny)


def corrected_whitened_weight(
    whitening: Whitening,
    weights: Sequence[torch.Tensor],
    crosses: Sequence[torch.Tensor],
    ridge: torch.Tensor,
    shrinkage: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``U [W_c1; W_c2; ...]^T`` (in x sum of outs, ``dtype``): the members' corrected weights, whitened, from
    their dense ``weights`` and ``crosses = Y^T X_c / n``, with ``U^T U = (1 - a) G + diag(ridge)``.

    ``U W_c^T = U^-T ((1 - a) P + W diag(r))^T``, a block of outputs at a time in float64, so neither ``W_c``
    nor a float64 copy of ``P`` is made next to the result."""
    in_features = weights[0].shape[1]
    rows = max(1, BLOCK_ELEMENTS // (4 * in_features))
    whitened = torch.empty(in_features, sum(w.shape[0] for w in weights), dtype=dtype, device=weights[0].device)
    ridge = ridge.to(weights[0].device)
    column = 0
    for weight, cross in zip(weights, crosses):
        for start in range(0, weight.shape[0], rows):
            target = cross[start : start + rows].to(torch.float64).mul_(1.0 - shrinkage)
            target.addcmul_(weight[start : start + rows].to(torch.float64), ridge)
            whitened[:, column : column + target.shape[0]] = whitening.apply_inverse_transpose(target.T)
            column += target.shape[0]
    return whitened
