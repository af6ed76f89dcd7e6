"""Where a Linear's weight lives: in the module, or offloaded by accelerate; swapping it for a compressed one.

A model dispatched with accelerate (``cpu_offload``, ``disk_offload``, a ``device_map`` that offloads to
"cpu" or "disk") keeps offloaded weights on the meta device: an ``AlignDevicesHook`` on each module loads
them from its ``weights_map`` (host memory or memory-mapped files) onto its execution device for every
forward, and puts them back on meta after. Sequential mode reads a dense weight from that map, one layer
at a time, and installs the compressed weight with a hook of its own: accelerate's hook would reload the
dense value on every forward, and rebuilds each weight through ``type(weight)(value)``, which a tensor
subclass does not support. The compressed weight lives on the CPU in the module (it is small and
``compression_stats`` / saving read it there) and visits the execution device for each forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, send_to_device
from torch import nn

__all__ = ["WeightSwap", "dense_weight", "execution_device", "install_weight", "is_dispatched", "offload_hook"]


def offload_hook(module: nn.Module) -> Optional[AlignDevicesHook]:
    """The accelerate hook that offloads ``module``'s own weights, or None."""
    hook = getattr(module, "_hf_hook", None)
    return hook if isinstance(hook, AlignDevicesHook) and hook.offload else None


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks place ``model``'s modules (``dispatch_model``, ``cpu_offload``, ...)."""
    return any(hasattr(module, "_hf_hook") for module in model.modules())


def execution_device(block: nn.Module) -> Optional[torch.device]:
    """The device accelerate runs ``block`` on (None: no hook in it names one)."""
    for module in block.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def dense_weight(module: nn.Linear) -> torch.Tensor:
    """The weight's values: the module's own, or the offloaded copy accelerate would load for a forward."""
    hook = offload_hook(module)
    if hook is None or not module.weight.is_meta:
        return module.weight.detach()
    return hook.weights_map["weight"]


@dataclass
class WeightSwap:
    """A compressed weight put in place of a dense one: ``undo`` puts the dense one back; ``release`` frees
    it for good once the swap is final (dropping the swap is enough, except for offloaded weights)."""

    undo: Callable[[], None]
    release: Callable[[], None] = lambda: None


def install_weight(module: nn.Linear, weight: torch.Tensor, name: str) -> WeightSwap:
    """Give ``module`` the (compressed) ``weight``: in the module itself, or under accelerate's offload."""
    hook = offload_hook(module)
    if hook is not None:
        return _install_offloaded(module, weight, hook)
    if module.weight.is_meta:
        raise ValueError(
            f"{name}.weight is on the meta device without an accelerate offload hook on the Linear itself "
            "(e.g. preload_module_classes offloads a whole parent module); this placement is not supported: "
            "dispatch the model without it"
        )
    original = module.weight
    module.weight = nn.Parameter(weight.to(original.device), requires_grad=False)
    return WeightSwap(undo=lambda: setattr(module, "weight", original))


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


def _install_offloaded(module: nn.Linear, weight: torch.Tensor, hook: AlignDevicesHook) -> WeightSwap:
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
        module._hf_hook = hook  # re-attached as it was: add_hook_to_module would re-run its init on the restored weights

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
