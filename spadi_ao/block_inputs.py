"""The decoder blocks' inputs in a block-by-block run: captured before the first block for every calibration
sample, produced by each block for the next, and held by ``InputStore`` on the host or, once they would not
fit, in memory-mapped temporary files.

Apart from the walk (``spadi_ao.sequential``) because where hidden states wait is a memory policy of its own:
it decides how large a model and calibration set a host can compress, not which block comes next.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable, Optional

import torch
from torch import nn

__all__ = ["InputStore", "available_memory_bytes", "capture_block_inputs", "input_device", "run_block", "to_device"]


class _StopForward(Exception):
    pass


def input_device(model: nn.Module) -> torch.device:
    """Where the calibration batches go: the first materialised parameter's device (offloaded ones are on meta)."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def available_memory_bytes() -> int:
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


class InputStore:
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
        self.budget = available_memory_bytes() // 4
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


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: Iterable[Any], store: InputStore
) -> list[tuple[tuple, dict]]:
    """Run the model up to the first block for each batch; keep that block's (args, kwargs) on the host."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        captured.append(((store.keep(args[0]),) + to_device(args[1:], "cpu"), to_device(kwargs, "cpu")))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = input_device(model)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    if isinstance(batch, dict):
                        model(**to_device(batch, device), use_cache=False)
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


def to_device(value: Any, device: Any) -> Any:
    """``value``'s tensors (in tuples, lists and dicts too) on ``device``; everything else as it is."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def run_block(
    block: nn.Module,
    inputs: list[tuple[tuple, dict]],
    device: torch.device,
    store: Optional[InputStore],
    new_block: bool = True,
) -> Optional[list[tuple[tuple, dict]]]:
    """The block's outputs for every sample, kept by ``store`` as the next block's inputs; with no store the
    block runs for its hooks only (the Gram pass of compressed propagation) and nothing is kept.

    ``new_block=False``: the store already holds outputs of this block (the dense stream's, in a corrected run),
    and these count beside them."""
    outputs: Optional[list[tuple[tuple, dict]]] = None
    if store is not None:
        if new_block:
            store.next_block()
        outputs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            result = block(*to_device(args, device), **to_device(kwargs, device))
            if outputs is not None:
                hidden = result[0] if isinstance(result, tuple) else result
                outputs.append(((store.keep(hidden),) + tuple(args[1:]), kwargs))
    return outputs
