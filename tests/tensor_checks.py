"""Checks shared by the compressed tensor classes, after torchao's own test helpers for vLLM-style loading."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _parts(weight: torch.Tensor) -> list[torch.Tensor]:
    names, _ = weight.__tensor_flatten__()
    return [getattr(weight, name) for name in names]


def check_slice_and_copy_like_vllm(make: Callable[[int], nn.Linear], dim: int, shards: int = 2) -> None:
    """vLLM's tensor-parallel loader (``vllm/model_executor/layers/linear.py``, as torchao's
    ``_test_slice_and_copy_similar_to_vllm`` replays it): for each rank, ``param.data.narrow(dim, start, size)``
    of the model's weight gets ``copy_`` of the same narrow of the checkpoint's weight. The narrow must be a view:
    once every shard is copied, the model's weight is the checkpoint's.

    ``make(seed)`` builds a compressed Linear; two seeds give weights with the same layout and different values.
    """
    target, loaded = make(0), make(1)
    param, source = target.weight, loaded.weight
    size = param.shape[dim] // shards
    for rank in range(shards):
        start = rank * size
        param_data = param.data.narrow(dim, start, size)
        loaded_shard = source.narrow(dim, start, size)
        assert type(param_data) is type(param) and param_data.shape[dim] == size
        assert not all(torch.equal(a, b) for a, b in zip(_parts(param_data), _parts(loaded_shard)))
        param_data.copy_(loaded_shard)
        assert all(torch.equal(a, b) for a, b in zip(_parts(param_data), _parts(loaded_shard)))
        torch.testing.assert_close(param_data.dequantize(), loaded_shard.dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(param.dequantize(), source.dequantize(), rtol=0, atol=0)
