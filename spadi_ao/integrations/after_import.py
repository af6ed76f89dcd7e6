"""Run a registration once a third-party package is imported, without importing it ourselves.

``import spadi_ao`` must not pull in transformers (seconds of import time, and not every user has it), yet
``from_pretrained`` of a compressed checkpoint needs the ``"spadi_ao"`` quantizer registered in transformers,
in whichever order the two packages are imported. :func:`call_after_import` registers at once when the
package is already imported, and otherwise right after its first import finishes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Callable, Optional, Sequence

__all__ = ["call_after_import"]


class _NotifyingLoader(importlib.abc.Loader):
    """The package's own loader, then ``callback``; the module keeps the original loader afterwards."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader
        self._callback()


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it asks the other finders for ``name`` and wraps the loader they return."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self._name = name
        self._callback = callback

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target=None):
        if fullname != self._name:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding this finder again
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _NotifyingLoader(spec.loader, self._callback)
                return spec
        return None


def call_after_import(name: str, callback: Callable[[], None]) -> None:
    """``callback()`` now if the top-level package ``name`` is imported, else right after its import.

    A failing callback warns instead of raising: it must never break the user's own import of ``name``.
    """

    def guarded() -> None:
        try:
            callback()
        except Exception as exc:  # noqa: BLE001 - any failure of an optional integration is reported, not raised
            warnings.warn(f"spadi_ao: the {name} integration could not be registered: {exc}", stacklevel=2)

    if name in sys.modules:
        guarded()
    else:
        sys.meta_path.insert(0, _AfterImportFinder(name, guarded))
