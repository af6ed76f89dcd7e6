"""Calibration: stream each Linear's input Gram ``X^T X`` through forward pre-hooks, never storing X.

The torchao prepare/convert idiom: ``spadi_ao.prepare_calibration`` attaches a :class:`GramCollector` to the
model, the user runs forward passes, and ``sparsify_dictionary_`` (the convert step) consumes it.
Linears that read the very same input tensor (q/k/v; gate/up) are detected on the first pass and
share one Gram, which is both exact and 3x / 2x cheaper.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from spadi_ao.inputs import calibration_batches, eval_mode
from spadi_ao.solvers.shrinkage import SequenceMoments, diagonal_shrinkage_intensity
from spadi_ao.solvers.whitening import BLOCK_ROWS

__all__ = ["GramCollector", "attach_collector", "observation", "run_calibration", "CALIBRATION_ATTR"]

CALIBRATION_ATTR = "_spadi_calibration"
"""Model attribute under which the prepare step leaves its collector for the convert step."""

# Linear -> (its prepared collector, its name in the model, whether the prepare step selected it): how a
# torchao ``quantize_`` handler, given the module alone, finds the Gram gathered for it and knows to leave the
# Linears the prepare step left out (the output head). Weak both ways: the model owns both.
_observed: "weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, str, bool]]" = weakref.WeakKeyDictionary()

FilterFn = Callable[[nn.Module, str], bool]


class GramCollector:
    """Accumulates ``sum_t x_t x_t^T`` per input tensor feeding the selected Linears.

    ``exact=True`` accumulates in float64; the default multiplies each batch in float32 and adds the
    batch's product into a float64 total, which keeps the sum over many batches accurate at float32
    GEMM speed.
    """

    def __init__(self, modules: dict[str, nn.Linear], exact: bool = False, model: Optional[nn.Module] = None) -> None:
        self.exact = exact
        self._mask: Optional[torch.Tensor] = None
        self._paused = False
        self._grams: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._moments: dict[str, SequenceMoments] = {}
        self._owner: dict[str, str] = {}
        self._recent: dict[int, tuple[weakref.ref, str]] = {}
        self._handles = {
            name: module.register_forward_pre_hook(self._make_hook(name)) for name, module in modules.items()
        }
        self._modules = {name: weakref.ref(module) for name, module in modules.items()}
        self._mask_handles = []
        if model is not None:
            self._mask_handles = [
                model.register_forward_pre_hook(self._take_mask, with_kwargs=True),
                model.register_forward_hook(self._drop_mask),
            ]
        self.module_names = list(modules)
        self._released: set[str] = set()

    def _take_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The forward's ``attention_mask`` (batch, seq): its zeros are padding, left out of every statistic."""
        mask = kwargs.get("attention_mask")
        self._mask = (
            mask.detach().bool() if torch.is_tensor(mask) and mask.dim() == 2 and not bool(mask.all()) else None
        )

    def _drop_mask(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._mask = None

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self._observe(name, args[0])

        return hook

    def _owner_of(self, name: str, x: torch.Tensor) -> str:
        owner = self._owner.get(name)
        if owner is None:
            seen = self._recent.get(id(x))
            owner = seen[1] if seen is not None and seen[0]() is x else name
            self._recent = {key: value for key, value in self._recent.items() if value[0]() is not None}
            self._recent[id(x)] = (weakref.ref(x), owner)
            self._owner[name] = owner
        return owner

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside add nothing (a corrected sequential run's dense-stream pass)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _observe(self, name: str, x: torch.Tensor) -> None:
        if self._paused or self._owner_of(name, x) != name:
            return
        dtype = torch.float64 if self.exact else torch.float32
        sequences = self._sequences(name, x.detach())
        for sequence in sequences:
            if sequence.shape[0]:
                self._add_sequence(name, sequence.to(dtype))
        self._tokens[name] = self._tokens.get(name, 0) + sum(sequence.shape[0] for sequence in sequences)

    def _sequences(self, name: str, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``'s sequences (tokens, width), each without its padded positions."""
        sequences = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.unsqueeze(0)
        if self._mask is None:
            return list(sequences)
        if tuple(x.shape[:-1]) != tuple(self._mask.shape):
            raise ValueError(
                f"{name} reads an input of shape {tuple(x.shape)} whose tokens the attention_mask "
                f"{tuple(self._mask.shape)} cannot select; calibrate this model on unpadded sequences"
            )
        mask = self._mask.to(x.device)
        return [sequence[keep] for sequence, keep in zip(sequences, mask)]

    def _add_sequence(self, name: str, sequence: torch.Tensor) -> None:
        """One sequence's ``X^T X`` into the float64 sum and its moments, a block of rows at a time: no
        full-size temporary next to a sum that is 512 MiB for an 8192-wide input."""
        tokens, width = sequence.shape
        if name not in self._grams:
            self._grams[name] = torch.zeros(width, width, dtype=torch.float64, device=sequence.device)
        squared_norm = squared_diagonal = torch.zeros((), dtype=torch.float64, device=sequence.device)
        for start in range(0, width, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, width)
            rows = (sequence[:, start:stop].T @ sequence).to(torch.float64)
            self._grams[name][start:stop].add_(rows)
            mean_rows = rows.div_(tokens)
            squared_diagonal = squared_diagonal + mean_rows[:, start:stop].diagonal().pow(2).sum()
            squared_norm = squared_norm + mean_rows.pow_(2).sum()
        self._moments.setdefault(name, SequenceMoments()).add_norms(float(squared_norm), float(squared_diagonal))

    def remove(self) -> None:
        """Detach the hooks and the prepared entries (see :func:`attach_collector`); the Grams stay available."""
        for name in list(self._handles):
            self.detach(name)
        for handle in self._mask_handles:
            handle.remove()
        self._mask_handles.clear()
        for module, entry in list(_observed.items()):
            if entry[0]() is self:
                del _observed[module]

    def detach(self, name: str) -> None:
        """Stop observing ``name`` (its hook and its prepared entry go); its Gram stays available."""
        handle = self._handles.pop(name, None)
        if handle is not None:
            handle.remove()
        module = self._modules[name]()
        entry = _observed.get(module) if module is not None else None
        if entry is not None and entry[0]() is self:
            del _observed[module]

    def __enter__(self) -> "GramCollector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def owner(self, name: str) -> str:
        return self._owner.get(name, name)

    def _has(self, owner: str) -> bool:
        return owner in self._grams

    def _sum(self, owner: str, pop: bool = False) -> torch.Tensor:
        """``owner``'s running sum (handed over and forgotten with ``pop``)."""
        return self._grams.pop(owner) if pop else self._grams[owner]

    def gram(self, name: str) -> Optional[torch.Tensor]:
        """The mean Gram ``X^T X / tokens`` (float64) of ``name``'s input, or None if it never ran."""
        owner = self.owner(name)
        if not self._has(owner):
            return None
        return self._sum(owner) / self._tokens[owner]

    def take(self, name: str) -> Optional[torch.Tensor]:
        """:meth:`gram` for a reader that needs it no more afterwards (a :meth:`release` too).

        The last reader of a Gram gets the running sum itself, turned into the mean in place: no copy of
        a matrix that is 512 MiB for one 8192-wide input.
        """
        return self.grams([name], take=True)[0]

    def grams(self, names: Sequence[str], take: bool = False) -> list[Optional[torch.Tensor]]:
        """The mean Grams of ``names``, one tensor per input they read: Linears reading the same input (q/k/v)
        get the same object, not a copy each. ``take``: as :meth:`take`, for all of ``names`` at once, so a
        group holding every reader of an input is handed its running sum itself."""
        if take:
            self._released.update(names)
        means: dict[str, Optional[torch.Tensor]] = {}
        for name in names:
            owner = self.owner(name)
            if owner in means:
                continue
            if take and self._has(owner) and self._all_released(owner):
                means[owner] = self._sum(owner, pop=True).div_(self._tokens[owner])
            else:
                means[owner] = self.gram(name)
        return [means[self.owner(name)] for name in names]

    def release(self, name: str) -> None:
        """``name`` needs its Gram no more: it is freed once every Linear sharing it is released."""
        self._released.add(name)
        owner = self.owner(name)
        if self._all_released(owner):
            self._grams.pop(owner, None)

    def _all_released(self, owner: str) -> bool:
        return all(name in self._released for name in self.module_names if self.owner(name) == owner)

    def tokens(self, name: str) -> int:
        return self._tokens.get(self.owner(name), 0)

    def sequences(self, name: str) -> int:
        moments = self._moments.get(self.owner(name))
        return moments.count if moments is not None else 0

    def shrinkage(self, name: str) -> float:
        """Data-only shrinkage intensity of ``name``'s Gram toward its diagonal (``gram_shrinkage="auto"``)."""
        owner = self.owner(name)
        if not self._has(owner):
            return 0.0
        return diagonal_shrinkage_intensity(self._sum(owner), self._moments[owner], divisor=self._tokens[owner])

    @property
    def groups(self) -> dict[str, list[str]]:
        """Owner name -> every Linear that shares its input Gram."""
        result: dict[str, list[str]] = {}
        for name in self.module_names:
            result.setdefault(self.owner(name), []).append(name)
        return result

    @property
    def memory_bytes(self) -> int:
        """Bytes of the Grams held in memory."""
        return sum(g.numel() * g.element_size() for g in self._grams.values())


def attach_collector(model: nn.Module, modules: dict[str, nn.Linear], exact: bool = False) -> GramCollector:
    """Attach a collector to ``model`` (the prepare step); ``sparsify_dictionary_`` or torchao's ``quantize_``
    converts with it. Forward passes given ``attention_mask=`` as a keyword leave its padded positions out."""
    existing = getattr(model, CALIBRATION_ATTR, None)
    if existing is not None:
        existing.remove()
    collector = GramCollector(modules, exact=exact, model=model)
    setattr(model, CALIBRATION_ATTR, collector)
    selected = {id(module) for module in modules.values()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            _observed[module] = (weakref.ref(collector), name, id(module) in selected)
    return collector


def observation(module: nn.Module) -> Optional[tuple[GramCollector, str, bool]]:
    """``(collector, name, selected)`` for a Linear of a prepared model: the collector :func:`attach_collector`
    left, the module's name in the model, and whether the prepare step selected it; None if not prepared."""
    entry = _observed.get(module)
    collector = entry[0]() if entry is not None else None
    return None if collector is None else (collector, entry[1], entry[2])


def run_calibration(model: nn.Module, batches: Iterable[Any], progress: bool = True) -> int:
    """Forward every batch (see ``spadi_ao.inputs.calibration_batches``) in eval mode; returns the batch count."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    count = 0
    with torch.inference_mode(), eval_mode(model):
        for batch in tqdm(calibration_batches(batches, model), desc="calibrating", disable=not progress, leave=False):
            if isinstance(batch, dict):
                model(**{key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()})
            else:
                model(batch.to(device))
            count += 1
    return count
