"""What the tutorials share: the model they run on, the stdlib text they calibrate and evaluate on, and sizes.

``--tiny`` (or ``SPADI_AO_TUTORIAL_TINY=1``) swaps the embedded SmolLM2-135M-Instruct for a 2-layer random-init
Llama and a byte-level BPE tokenizer trained on the same text in about a second, so each tutorial runs the
same code in seconds (its numbers then only show that the code runs, not what compression does to a real LM).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from spadi_ao.pipeline import calibration_batches, load_model, load_text, split_text

TINY_ENV = "SPADI_AO_TUTORIAL_TINY"


@dataclass(frozen=True)
class Sizes:
    calibration_samples: int
    seq_len: int
    eval_windows: int


DEFAULT = Sizes(calibration_samples=16, seq_len=256, eval_windows=8)
TINY = Sizes(calibration_samples=4, seq_len=64, eval_windows=4)


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tiny",
        action="store_true",
        default=os.environ.get(TINY_ENV) == "1",
        help=f"tiny random model (or {TINY_ENV}=1)",
    )
    return parser


def _tiny_model_and_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator([text[:50_000]], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: object
    calibration: list[torch.Tensor]
    eval_text: str
    sizes: Sizes


def setup(tiny: bool) -> Setup:
    """Model, tokenizer, calibration batches from the stdlib docs, and the held-out evaluation text."""
    if tiny:
        torch.set_num_threads(1)  # a 64-wide model is fastest on one thread, far faster than on busy shared cores
    calibration_text, eval_text = split_text(load_text("stdlib"))
    model, tokenizer = _tiny_model_and_tokenizer(calibration_text) if tiny else load_model(None)
    sizes = TINY if tiny else DEFAULT
    batches = calibration_batches(tokenizer, calibration_text, sizes.calibration_samples, sizes.seq_len)
    return Setup(model, tokenizer, batches, eval_text, sizes)
