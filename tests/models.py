"""Tiny random-init models for tests: no download, seconds to build."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def reference_gram(model: torch.nn.Module, name: str, batches: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``X^T X / T`` (float64) of ``name``'s input over ``batches`` and the token count ``T``, from the inputs a
    plain hook captures (dense math, independent of the library's Gram collection)."""
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    x = torch.cat(captured).double()
    return x.T @ x / x.shape[0], x.shape[0]


def token_batches(count: int, length: int, vocab: int = 256, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=generator) for _ in range(count)]
