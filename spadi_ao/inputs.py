"""Calibration batches as users hold them, checked against the model before any forward pass.

Users hold a tokenizer's output (a ``BatchEncoding``, which is a ``Mapping``, often padded), a tensor of
ids of shape ``(seq,)`` or ``(batch, seq)``, or a list of either. :func:`calibration_batches` turns any of
these into model kwargs with 2-D integer ``input_ids`` (and the ``attention_mask`` when given), and
rejects what the model cannot run (float or out-of-vocabulary ids, too long sequences, text) with a
message naming the fix, before anything is computed, so a bad batch never leaves a half-done model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["calibration_batches", "eval_mode", "TOKENIZE_HINT"]

TOKENIZE_HINT = "tokenize it first: calibration=tokenizer(texts, return_tensors='pt', padding=True)"
_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def _vocab_size(model: nn.Module) -> Optional[int]:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _max_positions(model: nn.Module) -> Optional[tuple[str, int]]:
    config = getattr(model, "config", None)
    for attr in _POSITION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return attr, value
    return None


def _as_tensor(where: str, value: Any) -> torch.Tensor:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{where} is text ({type(value).__name__}); {TOKENIZE_HINT}")
    if not torch.is_tensor(value):
        raise TypeError(
            f"{where} is a {type(value).__name__}, not a tensor; ask the tokenizer for tensors (return_tensors='pt') "
            "or wrap the ids in torch.tensor(ids)"
        )
    return value


def _check_ids(
    where: str, ids: torch.Tensor, vocab: Optional[int], positions: Optional[tuple[str, int]]
) -> torch.Tensor:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"{where} must hold integer token ids, got dtype {ids.dtype}; pass the tokenizer's ids (torch.long) "
            "or ids.long()"
        )
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"{where} must have shape (seq,) or (batch, seq), got {ids.dim()}-D shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(
            f"{where} is empty (shape {tuple(ids.shape)}); every calibration batch needs at least one token"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(
            f"{where} holds ids in [{low}, {high}], outside the model's vocabulary [0, {vocab}); "
            "tokenize with the model's own tokenizer"
        )
    if positions is not None and ids.shape[1] > positions[1]:
        raise ValueError(
            f"{where} has sequences of {ids.shape[1]} tokens, longer than the model's {positions[0]}={positions[1]}; "
            f"cut them, e.g. tokenizer(texts, truncation=True, max_length={positions[1]}, return_tensors='pt')"
        )
    return ids


def _check_mask(where: str, mask: Any, ids: torch.Tensor) -> torch.Tensor:
    mask = _as_tensor(where, mask)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != ids.shape:
        raise ValueError(f"{where} has shape {tuple(mask.shape)}; it must match input_ids {tuple(ids.shape)}")
    if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"{where} must hold 0 (padding) and 1 (token) as integers or booleans, as tokenizers return it"
        )
    return mask


def _check_batch(
    index: int, batch: Any, vocab: Optional[int], positions: Optional[tuple[str, int]]
) -> dict[str, Any] | torch.Tensor:
    where = f"calibration[{index}]"
    if vocab is None and torch.is_tensor(batch):  # not a language model: the tensor is its input, as given
        return batch.unsqueeze(0) if batch.dim() == 1 else batch
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        if "input_ids" not in kwargs:
            raise ValueError(
                f"{where} is a mapping without 'input_ids' (keys: {sorted(kwargs)}); pass the tokenizer's output "
                "or {'input_ids': ids}"
            )
        kwargs["input_ids"] = _check_ids(
            f"{where}['input_ids']", _as_tensor(f"{where}['input_ids']", kwargs["input_ids"]), vocab, positions
        )
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = _check_mask(
                f"{where}['attention_mask']", kwargs["attention_mask"], kwargs["input_ids"]
            )
        return kwargs
    return {"input_ids": _check_ids(where, _as_tensor(where, batch), vocab, positions)}


def calibration_batches(calibration: Any, model: nn.Module) -> list[dict[str, Any] | torch.Tensor]:
    """Every calibration batch as model kwargs with ``input_ids`` of shape (batch, seq), checked against ``model``.

    ``calibration``: one batch or an iterable of batches; a batch is a tensor of ids ((seq,) or (batch, seq))
    or a mapping of model kwargs with ``input_ids`` (a tokenizer's ``BatchEncoding``), whose ``attention_mask``
    then marks the padding that calibration leaves out. A model without an input embedding (not a language
    model) takes its tensor batches as they are, as its positional input.
    """
    if isinstance(calibration, (str, bytes)) or (
        isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], (str, bytes))
    ):
        raise TypeError(f"calibration is text; {TOKENIZE_HINT}")
    if torch.is_tensor(calibration) or isinstance(calibration, Mapping):
        calibration = [calibration]
    try:
        items = list(calibration)
    except TypeError:
        raise TypeError(
            "calibration must be a tensor of token ids, a tokenizer's output or an iterable of them, got "
            f"{type(calibration).__name__}"
        ) from None
    if not items:
        raise ValueError("calibration is empty: pass at least one batch of input ids (or None for data-free fitting)")
    vocab, positions = _vocab_size(model), _max_positions(model)
    batches = [_check_batch(index, batch, vocab, positions) for index, batch in enumerate(items)]
    masks = [batch.get("attention_mask") for batch in batches if isinstance(batch, dict)]
    if masks and all(mask is not None and not bool(mask.any()) for mask in masks) and len(masks) == len(batches):
        raise ValueError("calibration's attention_mask masks every token: there is nothing to calibrate on")
    return batches


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Calibration forwards in eval mode (dropout off would otherwise corrupt the statistics); every
    module's own mode is restored afterwards, also a mix of train and eval."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
