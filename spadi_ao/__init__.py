"""spadi-ao: calibration-guided sparse dictionary compression (CoSpaDi) for PyTorch models.

``import spadi_ao`` registers what loading a compressed model needs (the ``"spadi_ao"`` transformers
quantizer, the ``torch.ops.spadi_ao`` kernels, torchao's handler and ``torch.load`` safe globals), so it
comes before ``from_pretrained``. Only the command line (``spadi-ao``, ``python -m spadi_ao``) defers this
to its subcommand, so that ``--help`` needs neither torch nor transformers.
"""

import os as _os
import sys as _sys

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


def import_all() -> None:
    """Import the library and make its registrations (what ``import spadi_ao`` does outside the command line)."""
    from spadi_ao import kernels  # noqa: F401  (registers torch.ops.spadi_ao.*)
    from spadi_ao.api import CompressionReport, compression_stats, prepare_calibration, sparsify_dictionary_
    from spadi_ao.configs import DictionaryConfig, LowRankConfig
    from spadi_ao.integrations.torchao import quantize_dictionary_  # also makes torchao's quantize_ handle our weights
    from spadi_ao.integrations.transformers import SpadiAoConfig, attach_quantizer  # registers the "spadi_ao" HF quantizer
    from spadi_ao.tensor import DictionaryTensor, LowRankTensor

    globals().update(
        CompressionReport=CompressionReport, compression_stats=compression_stats, prepare_calibration=prepare_calibration,
        sparsify_dictionary_=sparsify_dictionary_, DictionaryConfig=DictionaryConfig, LowRankConfig=LowRankConfig,
        quantize_dictionary_=quantize_dictionary_, SpadiAoConfig=SpadiAoConfig, attach_quantizer=attach_quantizer,
        DictionaryTensor=DictionaryTensor, LowRankTensor=LowRankTensor,
    )


def __getattr__(name: str):
    if name in __all__:
        import_all()
        return globals()[name]
    raise AttributeError(f"module 'spadi_ao' has no attribute {name!r}")


def _launched_as_cli() -> bool:
    """``python -m spadi_ao`` (argv[0] is ``-m`` while the package is located) or the ``spadi-ao`` script."""
    return _sys.argv[:1] == ["-m"] or _os.path.basename(_sys.argv[0] if _sys.argv else "").startswith("spadi-ao")


if not _launched_as_cli():
    import_all()
