"""Tutorial 3: compose CoSpaDi with torchao quantisation, then save and reload three ways.

Compress SmolLM2-135M-Instruct once, quantise the dictionaries to int8 with torchao (and the code values to
int8 with per-row scales), compare bytes and perplexity, then save and reload the result with
``save_compressed``, with ``torch.save`` of the state dict (``weights_only`` load into a meta-built model),
and with transformers ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained``; each reload must give
bit-identical logits.

    python tutorials/03_quantize_and_save.py          # the embedded model, a few minutes on CPU
    python tutorials/03_quantize_and_save.py --tiny   # a tiny random model, seconds
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from _setup import parser, setup
from accelerate import init_empty_weights
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers import AutoModelForCausalLM

from spadi_ao import (
    DictionaryConfig,
    DictionaryTensor,
    attach_quantizer,
    compression_stats,
    quantize_dictionary_,
    sparsify_dictionary_,
)
from spadi_ao.pipeline import perplexity
from spadi_ao.serialization import load_compressed, save_compressed


def _compressed_linear(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and isinstance(module.weight, DictionaryTensor)


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument(
        "--output", type=Path, default=None, help="folder for the saved models (default: a temporary one)"
    )
    args = arguments.parse_args()
    run = setup(args.tiny)
    sizes = run.sizes
    compressed = run.model
    sparsify_dictionary_(compressed, DictionaryConfig(compression_ratio=0.3), calibration=run.calibration)

    # torchao's own quantize_ knows compressed weights: a supported config quantises their dictionaries.
    # (The filter keeps torchao off the output head, which SmolLM2 ties to its embedding.)
    int8 = copy.deepcopy(compressed)
    quantize_(int8, Int8WeightOnlyConfig(), filter_fn=_compressed_linear)
    # The code values are ours to quantise: symmetric int8, one scale per output row.
    quantize_dictionary_(int8, values_dtype="int8")
    # Equivalent in one go: DictionaryConfig(..., dictionary_quantization=Int8WeightOnlyConfig(), values_dtype="int8").

    ids = run.tokenizer("Compressed weights, quantised atoms.", return_tensors="pt")["input_ids"]
    print(f"{'model':<22} {'Linear MiB':>10} {'ratio':>7} {'ppl':>8}")
    for name, model in (("cospadi 0.3", compressed), ("  + int8 dict & codes", int8)):
        stats = compression_stats(model)
        ppl = perplexity(
            model, run.tokenizer, run.eval_text, seq_len=sizes.seq_len, max_windows=sizes.eval_windows, progress=False
        ).ppl
        print(
            f"{name:<22} {stats['compressed_stored_bytes'] / 2**20:>10.2f} "
            f"{stats['linear_compression_ratio']:>7.3f} {ppl:>8.2f}"
        )

    with torch.no_grad():
        expected = int8(ids).logits
    with tempfile.TemporaryDirectory() as scratch:
        out = args.output or Path(scratch)

        save_compressed(int8, out / "spadi", tokenizer=run.tokenizer, overwrite=True)
        reloaded, _ = load_compressed(out / "spadi")
        check("save_compressed / load_compressed", reloaded, ids, expected)

        torch.save(int8.state_dict(), out / "state.pt")
        with init_empty_weights(include_buffers=False):  # weights on meta, rotary buffers real
            skeleton = type(int8)(int8.config)
        skeleton.load_state_dict(torch.load(out / "state.pt", weights_only=True), assign=True)
        check("torch.save / torch.load(weights_only=True)", skeleton.eval(), ids, expected)

        attach_quantizer(int8)  # records each compressed weight's layout in config.json at save time
        int8.save_pretrained(out / "hf")
        run.tokenizer.save_pretrained(out / "hf")
        check("save_pretrained / from_pretrained", AutoModelForCausalLM.from_pretrained(out / "hf"), ids, expected)
        files = sorted(path.name for path in (out / "hf").iterdir())
        print(f"Hugging Face folder: {', '.join(files)}")


def check(name: str, model: torch.nn.Module, ids: torch.Tensor, expected: torch.Tensor) -> None:
    with torch.no_grad():
        identical = torch.equal(model(ids).logits, expected)
    if not identical:
        raise SystemExit(f"{name}: reloaded logits differ")
    print(f"{name}: reloaded, logits bit-identical")


if __name__ == "__main__":
    main()
