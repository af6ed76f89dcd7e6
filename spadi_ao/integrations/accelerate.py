"""accelerate's offloading for compressed weights (imported only when a model carries accelerate hooks).

accelerate's own ``AlignDevicesHook`` would reload the dense value on every forward and rebuilds each weight
through ``type(weight)(value)``, which a tensor subclass does not support; a compressed Linear gets the hook
below instead, and its dense values are dropped from an in-memory offload map once the swap is final.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, send_to_device
from torch import nn

from spadi_ao.offload import WeightSwap

__all__ = ["CompressedOffloadHook", "install_offloaded"]


class CompressedOffloadHook(ModelHook):
    """accelerate's offloading for a compressed Linear: its tensors stay on the CPU and visit the execution
    device for each forward."""

    def __init__(self, execution_device: Any, home: dict[str, nn.Parameter]) -> None:
        self.execution_device = torch.device(execution_device) if execution_device is not None else None
        self.home = home

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.execution_device is None:
            return args, kwargs
        for name, value in self.home.items():
            if value.device != self.execution_device:
                module._parameters[name] = nn.Parameter(value.to(self.execution_device), requires_grad=False)
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        module._parameters.update(self.home)
        return output


def install_offloaded(module: nn.Linear, weight: torch.Tensor, hook: AlignDevicesHook) -> WeightSwap:
    original = dict(module._parameters)
    home = {
        name: nn.Parameter(hook.weights_map[name].to("cpu", copy=True), requires_grad=False)
        for name, value in original.items()
        if value is not None and name != "weight"
    }
    home["weight"] = nn.Parameter(weight.to("cpu"), requires_grad=False)
    module._parameters.update(home)
    add_hook_to_module(module, CompressedOffloadHook(hook.execution_device, home))

    def undo() -> None:
        module._parameters.update(original)
        module._hf_hook = (
            hook  # re-attached as it was: add_hook_to_module would re-run its init on the restored weights
        )

    return WeightSwap(undo=undo, release=lambda: _forget(hook.weights_map, list(original)))


def _forget(weights_map: Any, names: list[str]) -> None:
    """Drop the dense values of a compressed Linear from an in-memory offload map (disk maps hold no memory)."""
    prefix = ""
    while isinstance(weights_map, PrefixedDataset):
        prefix, weights_map = weights_map.prefix + prefix, weights_map.dataset
    if isinstance(weights_map, OffloadedWeightsLoader):
        weights_map = weights_map.state_dict
    if isinstance(weights_map, dict):
        for name in names:
            weights_map.pop(prefix + name, None)
