"""spadi-ao: calibration-guided sparse dictionary compression (CoSpaDi) for PyTorch models.

The core needs torch and torchao only. The transformers integration (the ``"spadi_ao"`` quantizer behind
``save_pretrained`` / ``from_pretrained``) is registered when transformers is imported, before or after this
package; accelerate is imported only for models it dispatched.
"""

from spadi_ao import kernels as _kernels  # noqa: F401  (registers torch.ops.spadi_ao.*)
from spadi_ao.api import CompressionReport, compression_stats, prepare_calibration, sparsify_dictionary_
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.integrations.after_import import call_after_import
from spadi_ao.integrations.torchao import quantize_dictionary_
from spadi_ao.tensor import DictionaryTensor, LowRankTensor

__all__ = [
    "sparsify_dictionary_",
    "prepare_calibration",
    "compression_stats",
    "quantize_dictionary_",
    "attach_quantizer",
    "CompressionReport",
    "DictionaryConfig",
    "LowRankConfig",
    "SpadiAoConfig",
    "DictionaryTensor",
    "LowRankTensor",
]

__version__ = "0.1.0"

_TRANSFORMERS_NAMES = ("SpadiAoConfig", "attach_quantizer")


def _register_transformers_quantizer() -> None:
    import spadi_ao.integrations.transformers  # noqa: F401  (registers the "spadi_ao" quantizer)


def __getattr__(name: str):
    if name in _TRANSFORMERS_NAMES:
        from spadi_ao.integrations import transformers

        return getattr(transformers, name)
    raise AttributeError(f"module 'spadi_ao' has no attribute {name!r}")


call_after_import("transformers", _register_transformers_quantizer)
