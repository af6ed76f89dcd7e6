"""spadi-ao: calibration-guided sparse dictionary compression (CoSpaDi) for PyTorch models."""

from spadi_ao import kernels as _kernels  # noqa: F401  (registers torch.ops.spadi_ao.*)
from spadi_ao.api import CompressionReport, compression_stats, prepare_calibration, sparsify_dictionary_
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.integrations.torchao import quantize_dictionary_  # also makes torchao's quantize_ compose with our weights
from spadi_ao.integrations.transformers import SpadiAoConfig, attach_quantizer  # registers the "spadi_ao" HF quantizer
from spadi_ao.tensor import DictionaryTensor, LowRankTensor
from spadi_ao import transform as _transform  # noqa: F401  (registers the configs' handlers for torchao's quantize_)

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
