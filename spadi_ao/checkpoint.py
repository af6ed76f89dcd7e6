"""Resumable block-by-block runs: each finished layer (and the first pass's tables and loss sensitivities)
on disk, tied to the run that wrote it.

A run restarted with the same arguments and ``checkpoint_dir`` loads what it finished instead of computing
it again and ends bit-identical. Every file is written under a temporary name, then renamed, so a crash
never leaves half a file; a fingerprint of the arguments (:func:`run_fingerprint`) keeps a directory from
being resumed by a different run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from spadi_ao.layer import LayerReport
from spadi_ao.offload import dense_weight

__all__ = ["Checkpoint", "CheckpointMismatchError", "run_fingerprint"]

MANIFEST = "manifest.json"
SENSITIVITY = "sensitivity.safetensors"


class CheckpointMismatchError(ValueError):
    """The checkpoint directory belongs to a run with other arguments, or is corrupted."""


class Checkpoint:
    """One safetensors file per finished layer plus a manifest, each written then renamed."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / MANIFEST
        if manifest.exists():
            try:
                state = json.loads(manifest.read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointMismatchError(
                    f"{manifest} is corrupted ({exc}); delete the directory to start over"
                ) from None
            if state.get("fingerprint") != fingerprint:
                raise CheckpointMismatchError(
                    f"checkpoint_dir {directory} was written by a run with different arguments "
                    "(model, config, layers or calibration); use a new directory or the original arguments"
                )
            self.done: dict[str, dict] = state["layers"]
            self.tables: dict[str, dict] = state.get("tables", {})
            self.has_sensitivity: bool = state.get("sensitivity", False)
        else:
            self.done, self.tables, self.has_sensitivity = {}, {}, False
        self.fingerprint = fingerprint
        self._write_manifest()

    def _atomic_write(self, path: Path, write: Callable[[str], None]) -> None:
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.")
        os.close(handle)
        try:
            write(temporary)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _write_manifest(self) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "layers": self.done,
            "tables": self.tables,
            "sensitivity": self.has_sensitivity,
        }
        payload = json.dumps(state, indent=1)
        self._atomic_write(self.directory / MANIFEST, lambda p: Path(p).write_text(payload))

    def load(self, name: str) -> Optional[tuple[torch.Tensor, LayerReport]]:
        entry = self.done.get(name)
        if entry is None:
            return None
        from safetensors.torch import load_file

        from spadi_ao.serialization import unflatten_state_dict

        try:
            tensors = load_file(str(self.directory / entry["file"]))
        except Exception as exc:
            raise CheckpointMismatchError(
                f"checkpoint file for {name} cannot be read ({exc}); delete it to recompute"
            ) from None
        weight = unflatten_state_dict(tensors, entry["manifest"])["weight"]
        return weight, LayerReport(**entry["report"])

    def save(self, name: str, weight: torch.Tensor, report: LayerReport) -> None:
        from safetensors.torch import save_file

        from spadi_ao.serialization import flatten_state_dict

        tensors, manifest = flatten_state_dict({"weight": weight})
        file = f"{name}.safetensors"
        self._atomic_write(self.directory / file, lambda p: save_file(tensors, p))
        self.done[name] = {"file": file, "manifest": manifest, "report": report.to_dict()}
        self._write_manifest()

    def save_tables(self, tables: dict[str, dict]) -> None:
        """The first pass's tables of some units (JSON keeps every float exactly)."""
        self.tables.update(tables)
        self._write_manifest()

    def load_sensitivity(self) -> Optional[dict[str, torch.Tensor]]:
        if not self.has_sensitivity:
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(self.directory / SENSITIVITY))
        except Exception as exc:
            raise CheckpointMismatchError(
                f"{SENSITIVITY} cannot be read ({exc}); delete the checkpoint directory to recompute"
            ) from None

    def save_sensitivity(self, sensitivity: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {name: value.contiguous() for name, value in sensitivity.items()}
        self._atomic_write(self.directory / SENSITIVITY, lambda p: save_file(tensors, p))
        self.has_sensitivity = True
        self._write_manifest()


def run_fingerprint(
    model: nn.Module, config: Any, targets: dict[str, nn.Linear], inputs: list[tuple[tuple, dict]], propagate: str
) -> str:
    """Hash of everything that determines the result: config, layer names and shapes, first-block inputs."""
    digest = hashlib.sha256()
    digest.update(repr(config).encode())
    digest.update(propagate.encode())
    for name, module in targets.items():
        digest.update(f"{name}{tuple(module.weight.shape)}{module.weight.dtype}".encode())
        digest.update(dense_weight(module).float().sum().item().hex().encode())
    for args, _ in inputs:
        digest.update(args[0].float().sum().item().hex().encode())
        digest.update(str(tuple(args[0].shape)).encode())
    return digest.hexdigest()
