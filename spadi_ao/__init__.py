"""spadi-ao: calibration-guided sparse dictionary compression (CoSpaDi) for PyTorch models."""

from spadi_ao import kernels as _kernels  # noqa: F401  (registers torch.ops.spadi_ao.*)
from spadi_ao.api import CompressionReport, compression_stats, prepare_calibration, sparsify_dictionary_
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.tensor import DictionaryTensor, LowRankTensor

__all__ = [
    "sparsify_dictionary_",
    "prepare_calibration",
    "compression_stats",
    "CompressionReport",
    "DictionaryConfig",
    "LowRankConfig",
    "DictionaryTensor",
    "LowRankTensor",
]

__version__ = "0.1.0"
