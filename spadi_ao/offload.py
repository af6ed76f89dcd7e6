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

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["WeightSwap", "dense_weight", "execution_device", "install_weight", "is_dispatched", "offload_hook"]


def offload_hook(module: nn.Module) -> Optional[Any]:
    """The accelerate ``AlignDevicesHook`` that offloads ``module``'s own weights, or None.

    Only accelerate attaches such hooks, so accelerate is never imported here for a model it did not dispatch.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None or "accelerate" not in sys.modules:
        return None
    from accelerate.hooks import AlignDevicesHook

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
        from spadi_ao.integrations.accelerate import install_offloaded

        return install_offloaded(module, weight, hook)
    if module.weight.is_meta:
        raise ValueError(
            f"{name}.weight is on the meta device without an accelerate offload hook on the Linear itself "
            "(e.g. preload_module_classes offloads a whole parent module); this placement is not supported: "
            "dispatch the model without it"
        )
    original = module.weight
    module.weight = nn.Parameter(weight.to(original.device), requires_grad=False)
    return WeightSwap(undo=lambda: setattr(module, "weight", original))
