"""Shared fixtures: a tiny tokenizer trained in memory and a tiny random-init Llama that matches it."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB = 384


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: real-model or long-running checks (run by CI as well)")


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other jobs share the cores
    (a 64x64 GEMM went from 0.01 ms to 11 ms with 2 OpenMP threads on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def stdlib_text() -> str:
    """The pipeline's offline default text (Python's pydoc topics); plenty for any tiny test."""
    from spadi_ao.pipeline import load_text

    return load_text("stdlib")


@pytest.fixture(scope="session")
def tiny_tokenizer(stdlib_text: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, offsets map back to characters) with TINY_VOCAB entries."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator([stdlib_text[:50_000]], trainer=trainer)
    assert tokenizer.get_vocab_size() == TINY_VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", model_max_length=256)


@pytest.fixture
def tiny_llama(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Fresh per test (tests may modify it): 2 layers, hidden 64, GQA 4 heads / 2 kv heads, 256 positions."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()
