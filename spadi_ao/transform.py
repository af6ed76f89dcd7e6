"""torchao's own entry point: ``quantize_(model, DictionaryConfig())`` compresses each selected Linear.

The observe / convert idiom of torchao's GPTQ and AWQ configs: ``spadi_ao.prepare_calibration(model)``
hooks the Linears, forward passes gather their Grams, and ``quantize_`` converts each Linear with its own
Gram, freeing a Gram once every Linear reading it is converted. On a prepared model ``quantize_`` converts
exactly the Linears the prepare step selected (the output head and embedding-tied Linears stay dense, as in
``sparsify_dictionary_``). Without prepared Grams each selected weight is fitted in weight space, with a
one-line warning; torchao's default ``filter_fn`` then selects every Linear, the output head included.

Each layer goes through ``spadi_ao.layer.compress_linear``, the step ``sparsify_dictionary_`` runs too, so
the same layer, Gram and config give the same tensor bit for bit. What needs the whole model stays with
``sparsify_dictionary_``: ``allocation`` (every layer here is at ``compression_ratio``), ``grouping`` (every
layer keeps its own dictionary) and sequential mode. Per-layer settings: torchao's ``FqnToConfig``, or
``layer_overrides``, which match names and so need a prepared model (``quantize_`` gives handlers the module
alone; the prepare step records the names).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchao.quantization.transform_module import register_quantize_module_handler

from spadi_ao.calibration import observation
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.layer import compress_linear
from spadi_ao.validation import check_budget, check_dense_weight

__all__: list[str] = []

WEIGHT_SPACE_WARNING = (
    "quantize_ with a spadi_ao config on a model without prepared Grams: fitting weights in plain Frobenius "
    "norm (data-free); call spadi_ao.prepare_calibration(model) and run calibration batches first"
)


@register_quantize_module_handler(DictionaryConfig)
@register_quantize_module_handler(LowRankConfig)
def _compress_linear_transform(
    module: nn.Module, config: DictionaryConfig | LowRankConfig, *, parameter_name: str = "weight"
) -> nn.Module:
    """Replace ``module.weight`` by its Dictionary/LowRank tensor; everything is checked before it changes."""
    if not isinstance(module, nn.Linear) or parameter_name != "weight":
        raise ValueError(
            f"{type(config).__name__} compresses nn.Linear weights, got {type(module).__name__}.{parameter_name}"
        )
    observed = observation(module)
    collector, name, selected = observed if observed is not None else (None, None, True)
    if not selected:
        return module  # the prepare step left it out (output head, embedding-tied): as sparsify_dictionary_ does
    label = (
        name if name is not None else f"Linear(in_features={module.in_features}, out_features={module.out_features})"
    )
    if name is None and config.layer_overrides:
        raise ValueError(
            "layer_overrides match module names, which quantize_ does not give to handlers: call "
            "spadi_ao.prepare_calibration(model) first (it records them), or give per-layer configs with FqnToConfig"
        )
    layer_config = config.for_layer(name) if name is not None else config
    check_dense_weight(label, module.weight)
    check_budget(label, module.weight, layer_config)
    if collector is None:
        warnings.warn(WEIGHT_SPACE_WARNING, stacklevel=2)
    with torch.no_grad():
        tensor, _ = compress_linear(label, module.weight.detach(), layer_config, collector)
    if collector is not None:
        collector.detach(name)
        collector.release(name)  # the Gram goes once every Linear reading it is converted
    module.weight = nn.Parameter(tensor, requires_grad=False)
    return module
