"""spadi-ao: calibration-guided sparse dictionary compression (CoSpaDi) for PyTorch models.

``import spadi_ao`` registers what using and loading a compressed model needs: the ``torch.ops.spadi_ao``
kernels, the tensor types (also as ``torch.load`` safe globals) and torchao's ``quantize_`` handlers. It needs
torch and torchao only: the ``"spadi_ao"`` transformers quantizer behind ``save_pretrained`` /
``from_pretrained`` is registered when transformers is imported, before or after this package, and accelerate
is imported only for models it dispatched. The command line (``spadi-ao``, ``python -m spadi_ao``) defers all of
it to the subcommand that needs it, so that ``--help`` imports no torch.
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

_TRANSFORMERS_NAMES = ("SpadiAoConfig", "attach_quantizer")
_imported = False


def _register_transformers_quantizer() -> None:
    import spadi_ao.integrations.transformers  # noqa: F401  (registers the "spadi_ao" quantizer)


def import_all() -> None:
    """Import the library and make its registrations (what ``import spadi_ao`` does outside the command line)."""
    global _imported
    if _imported:
        return
    from spadi_ao import (
        kernels,  # noqa: F401  (registers torch.ops.spadi_ao.*)
        transform,  # noqa: F401  (registers the configs' handlers for torchao's quantize_)
    )
    from spadi_ao.api import prepare_calibration, sparsify_dictionary_
    from spadi_ao.configs import DictionaryConfig, LowRankConfig
    from spadi_ao.integrations.after_import import call_after_import
    from spadi_ao.integrations.torchao import quantize_dictionary_
    from spadi_ao.report import CompressionReport, compression_stats
    from spadi_ao.tensor import DictionaryTensor, LowRankTensor

    globals().update(
        CompressionReport=CompressionReport,
        compression_stats=compression_stats,
        prepare_calibration=prepare_calibration,
        sparsify_dictionary_=sparsify_dictionary_,
        DictionaryConfig=DictionaryConfig,
        LowRankConfig=LowRankConfig,
        quantize_dictionary_=quantize_dictionary_,
        DictionaryTensor=DictionaryTensor,
        LowRankTensor=LowRankTensor,
    )
    _imported = True
    call_after_import("transformers", _register_transformers_quantizer)


def __getattr__(name: str):
    if name in _TRANSFORMERS_NAMES:
        import_all()
        from spadi_ao.integrations import transformers

        return getattr(transformers, name)
    if name in __all__:
        import_all()
        return globals()[name]
    raise AttributeError(f"module 'spadi_ao' has no attribute {name!r}")


def _launched_as_cli() -> bool:
    """``python -m spadi_ao`` (argv[0] is ``-m`` while the package is located) or the ``spadi-ao`` script."""
    return _sys.argv[:1] == ["-m"] or _os.path.basename(_sys.argv[0] if _sys.argv else "").startswith("spadi-ao")


if not _launched_as_cli():
    import_all()
