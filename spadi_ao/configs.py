"""Dataclass configs for ``sparsify_dictionary_`` and torchao's ``quantize_``; validated on construction,
before any weight moves.

Both derive from torchao's ``AOBaseConfig``: ``spadi_ao.transform`` registers their module handlers, so
``torchao.quantization.quantize_(model, DictionaryConfig())`` compresses each selected Linear on its own.
``DictionaryConfig()`` is the measured best (Procrustes solver with least-squares refits, loss-weighted knapsack,
shared-input dictionaries); ``DictionaryConfig.paper()`` is the CoSpaDi paper's setting.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from torchao.core.config import AOBaseConfig
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig

from spadi_ao.grouping import GROUPINGS, Grouping

__all__ = ["DictionaryConfig", "LowRankConfig", "CompressionConfig"]

GramShrinkage = Union[float, str]
DEFAULT_CANDIDATES = tuple(round(0.05 * step, 2) for step in range(1, 19))
"""0.05, 0.10, ..., 0.90: the knapsack's menu of per-layer compression ratios."""


DICTIONARY_CONFIGS: tuple[type[AOBaseConfig], ...] = (
    Int8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    IntxWeightOnlyConfig,
)
"""torchao configs accepted for the dictionary (all run on CPU in torchao 0.18)."""

VALUES_DTYPES = ("bfloat16", "int8")


def check_dictionary_quantization(config: Optional[AOBaseConfig]) -> None:
    if config is not None and not isinstance(config, DICTIONARY_CONFIGS):
        allowed = ", ".join(cls.__name__ for cls in DICTIONARY_CONFIGS)
        raise ValueError(f"dictionary_quantization must be None or a torchao {allowed}, got {config!r}")


def check_values_dtype(values_dtype: Optional[str]) -> None:
    if values_dtype is not None and values_dtype not in VALUES_DTYPES:
        raise ValueError(f"values_dtype must be None (the weight dtype), 'bfloat16' or 'int8', got {values_dtype!r}")


def _check_ratio(name: str, value: float) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0.0 < value < 1.0
    ):
        raise ValueError(f"{name} must be a number in the open interval (0, 1), got {value!r}")


def _check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_gram_shrinkage(value: GramShrinkage) -> None:
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"gram_shrinkage must be a float in [0, 1] or 'auto', got {value!r}")
        return
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0.0 <= value <= 1.0
    ):
        raise ValueError(f"gram_shrinkage must be a float in [0, 1] or 'auto', got {value!r}")


@dataclass(frozen=True)
class _BaseConfig(AOBaseConfig):
    """Fields every compression method shares."""

    compression_ratio: float = 0.3
    """Fraction of the dense weight bytes removed: 0.3 keeps 70 % of each layer's bytes."""
    damping: float = 1e-2
    """Ridge added to the calibration Gram, relative to its mean diagonal (GPTQ's percdamp)."""
    gram_shrinkage: GramShrinkage = "auto"
    """Shrink the Gram toward its diagonal: 0 is the activation-aware objective, 1 weight-space fitting;
    ``"auto"`` estimates it per layer from the calibration sequences alone (0 when there are none)."""
    layer_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Regex on the module's qualified name -> field overrides, e.g.
    ``{r"\\.down_proj$": {"compression_ratio": 0.2}}``."""
    allocation: str = "uniform"
    """``"uniform"``: every layer at ``compression_ratio``. ``"knapsack"``: per-layer ratios from
    ``allocation_candidates`` minimising the loss-weighted error under the whole-model byte budget (see
    ``spadi_ao.allocation``); layers whose ``layer_overrides`` set a ratio keep it. A whole-model feature of
    ``sparsify_dictionary_``: torchao's ``quantize_`` compresses each layer at ``compression_ratio``."""
    allocation_candidates: tuple[float, ...] = DEFAULT_CANDIDATES
    """The ratios the knapsack may give a layer (or a group sharing a dictionary)."""
    seed: int = 42
    version: int = 1

    def __post_init__(self) -> None:
        _check_ratio("compression_ratio", self.compression_ratio)
        if self.allocation not in ("uniform", "knapsack"):
            raise ValueError(f"allocation must be 'uniform' or 'knapsack', got {self.allocation!r}")
        if not isinstance(self.allocation_candidates, tuple) or not self.allocation_candidates:
            raise ValueError(
                "allocation_candidates must be a non-empty tuple of ratios in (0, 1), got "
                f"{self.allocation_candidates!r}"
            )
        for candidate in self.allocation_candidates:
            _check_ratio("allocation_candidates", candidate)
        if self.allocation == "knapsack" and self.compression_ratio > max(self.allocation_candidates):
            raise ValueError(
                f"compression_ratio {self.compression_ratio} is above the largest of allocation_candidates "
                f"({max(self.allocation_candidates)}): the knapsack cannot meet it; add larger candidates or use "
                "allocation='uniform'"
            )
        if not isinstance(self.damping, (int, float)) or not math.isfinite(self.damping) or self.damping < 0:
            raise ValueError(f"damping must be a finite float >= 0, got {self.damping!r}")
        _check_gram_shrinkage(self.gram_shrinkage)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        names = {f.name for f in dataclasses.fields(self)} - {
            "layer_overrides",
            "version",
            "allocation",
            "allocation_candidates",
            "grouping",
        }
        for pattern, overrides in dict(self.layer_overrides).items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"layer_overrides key {pattern!r} is not a valid regex: {exc}") from None
            unknown = set(overrides) - names
            if unknown:
                raise ValueError(
                    f"layer_overrides[{pattern!r}] has unknown fields {sorted(unknown)}; allowed: {sorted(names)}"
                )
            dataclasses.replace(self, layer_overrides={}, **overrides)  # validates the overridden values

    def overrides_for(self, fqn: str) -> dict[str, Any]:
        """The fields ``layer_overrides`` sets for ``fqn``: every matching entry, in insertion order."""
        updates: dict[str, Any] = {}
        for pattern, overrides in self.layer_overrides.items():
            if re.search(pattern, fqn):
                updates.update(overrides)
        return updates

    def for_layer(self, fqn: str) -> "_BaseConfig":
        """The config one layer sees: every matching override applied in insertion order."""
        updates = self.overrides_for(fqn)
        return dataclasses.replace(self, **updates) if updates else self


@dataclass(frozen=True)
class DictionaryConfig(_BaseConfig):
    """CoSpaDi: calibration-whitened sparse dictionaries; ``rho = k / s`` atoms per non-zero.

    The defaults are the measured best (`docs/results.md`): the Procrustes solver followed by least-squares
    refits on its supports, the loss-weighted knapsack allocation and dictionaries shared by the Linears that
    read the same input.
    :meth:`paper` gives the paper's own setting.
    """

    allocation: str = "knapsack"
    gram_shrinkage: GramShrinkage = 0.3
    """As in ``LowRankConfig``; 0.3 is chosen on validation text (``benchmarks/select_defaults.py``): the
    lowest geometric-mean perplexity over in- and out-of-domain calibration and two validation texts."""
    rho: float = 2.0
    """Dictionary size over non-zeros per column (the paper's k/s); >= 1. 2 is chosen on validation text against
    1.5, 3 and 4 (``benchmarks/select_defaults.py``, rule 5)."""
    iterations: int = 20
    """Rounds of the iterative solvers: Procrustes / thresholding rounds (``solver="procrustes"``, which stops
    earlier once its supports settle) or K-SVD iterations (``solver="ksvd"``; the paper's T is 60)."""
    power_iterations: int = 8
    """Power iterations of each rank-1 atom update (``solver="ksvd"`` only)."""
    atoms_per_step: int = 1
    """Atoms OMP adds per step (``solver="ksvd"`` only): 1 is exact OMP; more is generalised OMP, faster
    and slightly worse."""
    init: str = "svd"
    """Initial K-SVD dictionary: ``"svd"`` (leading left singular vectors of the whitened weight; converges
    in far fewer iterations) or ``"random-columns"`` (the paper's: random whitened columns, ``seed``)."""
    solver: str = "procrustes"
    """``"procrustes"`` (COMPOT-style, chosen on validation text by ``benchmarks/select_defaults.py``):
    orthonormal atoms (``k`` capped at ``in_features``), up to ``iterations`` alternating Procrustes /
    hard-thresholding updates (``spadi_ao.solvers.procrustes``), then ``fast_steps`` refits; ``"fast"``: SVD
    atoms and one-shot supports, then ``fast_steps`` refits (``spadi_ao.solvers.fast``; about 2.5x quicker, a
    few per cent worse); or ``"ksvd"`` (the paper's: ``iterations`` of K-SVD with OMP)."""
    fast_steps: int = 8
    """Least-squares dictionary / code refits on the final supports (``spadi_ao.solvers.refit``), after the
    Procrustes rounds or the fast solver's one-shot supports; 8 after Procrustes is chosen on validation text
    against none (rule 7). 0 keeps Procrustes' orthonormal atoms (COMPOT's form) and the fast solver's one-shot
    SVD solution."""
    output_weighting: str = "loss"
    """``"loss"``: the solve weighs each output's whitened error by its loss sensitivity (the diagonal output
    Fisher the knapsack already weighs errors with; ``spadi_ao.allocation.output_weights``), so the outputs the
    loss depends on are fitted first; chosen on validation text (``docs/results.md``). It needs a sensitivity:
    knapsack runs compute one, a uniform run uses ``sparsify_dictionary_``'s ``sensitivity`` when given;
    otherwise, and in torchao's per-layer ``quantize_``, every output weighs alike. ``"none"``: every output
    weighs alike (the paper's objective)."""
    grouping: Grouping = "inputs"
    """Layers sharing one dictionary (``spadi_ao.grouping``): None (per layer), ``"paper"`` (blocks 2i, 2i+1
    share q/k/v/up/gate), ``"inputs"`` (a block's q/k/v and its gate/up) or a callable fqn -> key (None: alone).
    A whole-model feature of ``sparsify_dictionary_``: torchao's ``quantize_`` gives each layer its own."""
    dictionary_quantization: Optional[AOBaseConfig] = None
    """torchao config applied to the dictionary after the solve (``Int8WeightOnlyConfig``,
    ``Int8DynamicActivationInt8WeightConfig`` or ``IntxWeightOnlyConfig``; see ``spadi_ao.integrations.torchao``).
    The budget still sizes ``k`` and ``s`` in the weight dtype, so the stored bytes shrink below the target."""
    values_dtype: Optional[str] = None
    """Code values: None keeps the weight dtype, ``"bfloat16"``, or ``"int8"`` (symmetric, one scale per output row)."""

    @classmethod
    def paper(cls, **overrides: Any) -> "DictionaryConfig":
        """The CoSpaDi paper's setting: every layer on its own at ``compression_ratio``, whitened by its plain
        calibration Gram (no shrinkage), K-SVD from random whitened columns, 60 iterations of exact OMP and
        8 power iterations per atom, seed 42. ``overrides`` replace any field, e.g.
        ``DictionaryConfig.paper(compression_ratio=0.4)``."""
        fields = dict(
            allocation="uniform",
            grouping=None,
            gram_shrinkage=0.0,
            solver="ksvd",
            init="random-columns",
            iterations=60,
            atoms_per_step=1,
            power_iterations=8,
            output_weighting="none",
            seed=42,
        )
        return cls(**(fields | overrides))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rho, (int, float)) or not math.isfinite(self.rho) or self.rho < 1.0:
            raise ValueError(f"rho must be a float >= 1 (dictionary atoms per non-zero), got {self.rho!r}")
        _check_positive_int("iterations", self.iterations, minimum=0)
        _check_positive_int("power_iterations", self.power_iterations)
        _check_positive_int("atoms_per_step", self.atoms_per_step)
        if self.init not in ("svd", "random-columns"):
            raise ValueError(f"init must be 'svd' or 'random-columns', got {self.init!r}")
        if self.solver not in ("ksvd", "fast", "procrustes"):
            raise ValueError(f"solver must be 'ksvd', 'fast' or 'procrustes', got {self.solver!r}")
        _check_positive_int("fast_steps", self.fast_steps, minimum=0)
        if self.output_weighting not in ("loss", "none"):
            raise ValueError(f"output_weighting must be 'loss' or 'none', got {self.output_weighting!r}")
        if not (self.grouping is None or self.grouping in GROUPINGS or callable(self.grouping)):
            raise ValueError(
                f"grouping must be None, one of {sorted(GROUPINGS)} or a callable fqn -> group key, got "
                f"{self.grouping!r}"
            )
        check_dictionary_quantization(self.dictionary_quantization)
        check_values_dtype(self.values_dtype)


@dataclass(frozen=True)
class LowRankConfig(_BaseConfig):
    """SVD-LLM: truncated SVD of the whitened weight, rank from the same honest byte budget."""


CompressionConfig = Union[DictionaryConfig, LowRankConfig]
