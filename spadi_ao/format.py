"""The packed storage of sparse codes: exactly ``s`` non-zeros per output row, positions as a bitmask.

A dictionary layer ``y = (x @ D~) @ C`` stores the codes ``C`` (``k x out``) row-major per *output*:

* ``values``  ``(out, s)`` - the non-zero coefficients of output ``j`` in increasing atom order;
* ``bitmask`` ``(out, ceil(k / 8))`` uint8 - bit ``b`` of byte ``i`` (little-endian within the byte)
  says whether atom ``8 * i + b`` is used by output ``j``. Exactly ``s`` bits are set per row.

One bit per dictionary slot per output is the paper's position encoding; at ``k / s = 2`` it costs
2 bits per non-zero, a quarter of an int8 index list and an eighth of int16.
"""

from __future__ import annotations

import torch

__all__ = ["bitmask_bytes", "check_bitmask", "pack_codes", "unpack_mask", "unpack_codes", "mask_to_indices"]

BLOCK_ELEMENTS = 1 << 22
"""Entries of ``(rows, s)`` or ``(rows, k)`` scratch :func:`pack_codes` works on at a time."""


def _bit_weights(device: torch.device) -> torch.Tensor:
    """``[1, 2, 4, ..., 128]`` as uint8, made per call so traced graphs (compiled backward) can build it."""
    return torch.bitwise_left_shift(
        torch.ones(8, dtype=torch.int32, device=device), torch.arange(8, dtype=torch.int32, device=device)
    ).to(torch.uint8)


def bitmask_bytes(k: int) -> int:
    """Bytes one output row's position bitmask occupies for a dictionary of ``k`` atoms."""
    return (k + 7) // 8


def pack_codes(indices: torch.Tensor, values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack per-output atom ``indices`` ``(out, s)`` and their ``values`` ``(out, s)``.

    Returns ``(values_sorted, bitmask)`` where ``values_sorted`` follows increasing atom index.
    Indices within a row must be distinct and lie in ``[0, k)``. Rows are packed a block at a time, so the
    sort's scratch is a block's, not several ``(out, s)`` int64 copies (a wide group's codes are 100s of MiB).
    """
    if indices.shape != values.shape or indices.dim() != 2:
        raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must be equal 2-D shapes")
    out, s = indices.shape
    if s > k:
        raise ValueError(f"s={s} non-zeros per row cannot exceed k={k} atoms")
    nbytes = bitmask_bytes(k)
    sorted_values = torch.empty_like(values)
    bitmask = torch.empty(out, nbytes, dtype=torch.uint8, device=indices.device)
    step = max(1, BLOCK_ELEMENTS // max(s, nbytes * 8))
    for start in range(0, out, step):
        rows = slice(start, min(start + step, out))
        sorted_values[rows], bitmask[rows] = _pack_rows(indices[rows], values[rows], k, nbytes)
    return sorted_values, bitmask


def _pack_rows(indices: torch.Tensor, values: torch.Tensor, k: int, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = indices.argsort(dim=1)
    sorted_idx = indices.gather(1, order).long()
    if indices.shape[1] > 1 and bool((sorted_idx[:, 1:] == sorted_idx[:, :-1]).any()):
        raise ValueError("atom indices within an output row must be distinct")
    if bool((sorted_idx < 0).any()) or bool((sorted_idx >= k).any()):
        raise ValueError(f"atom indices must lie in [0, {k})")
    rows = indices.shape[0]
    dense = torch.zeros(rows, nbytes * 8, dtype=torch.uint8, device=indices.device)
    dense.scatter_(1, sorted_idx, 1)
    bitmask = (dense.view(rows, nbytes, 8) * _bit_weights(indices.device)).sum(dim=2, dtype=torch.int32)
    return values.gather(1, order), bitmask.to(torch.uint8)


def unpack_mask(bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``(out, k)`` support of each output row."""
    weights = _bit_weights(bitmask.device)
    bits = (bitmask.unsqueeze(-1) & weights) != 0
    return bits.reshape(bitmask.shape[0], -1)[:, :k]


def check_bitmask(bitmask: torch.Tensor, k: int, s: int) -> None:
    """Raise ``ValueError`` unless every row sets exactly ``s`` of its ``k`` atom bits and no padding bit.

    Every kernel reads row ``r``'s values by counting set bits, so one malformed row would read another row's
    values (the native kernel checks rows as it runs; the Triton and torch routes do not). Loading checks it
    once, so a damaged checkpoint fails with this message on every route.
    """
    expected = (bitmask.shape[0], bitmask_bytes(k)) if bitmask.dim() == 2 else None
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != expected:
        raise ValueError(
            f"bitmask must be uint8 of shape (out, {bitmask_bytes(k)}) for k={k} atoms, got {bitmask.dtype} "
            f"{tuple(bitmask.shape)}"
        )
    bits = unpack_mask(bitmask, bitmask.shape[1] * 8)
    counts, padding = bits[:, :k].sum(1), bits[:, k:].any(1)
    bad = ((counts != s) | padding).nonzero()
    if bad.numel():
        row = int(bad[0])
        extra = " and padding bits past k" if bool(padding[row]) else ""
        raise ValueError(
            f"bitmask row {row} sets {int(counts[row])} atoms{extra}; every row must set exactly s={s} of its "
            f"k={k} atoms"
        )


def mask_to_indices(mask: torch.Tensor, s: int) -> torch.Tensor:
    """Atom indices ``(out, s)`` (increasing) of a boolean support with exactly ``s`` per row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    # Selected atoms keep their index, the rest sort to the end.
    keyed = torch.where(mask, positions, mask.shape[1])
    return keyed.sort(dim=1).values[:, :s]


def unpack_codes(values: torch.Tensor, bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """Dense codes ``(out, k)`` (``C^T``) from the packed form."""
    mask = unpack_mask(bitmask, k)
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    dense[mask] = values.reshape(-1)
    return dense
