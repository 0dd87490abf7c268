"""Results computed once and kept in a folder, so that a chapter, a later build or a resumed audit reads
them instead of computing them again (Chapter 1, "run store").

``Artifacts(folder)`` keeps DataFrames as ``<name>.csv`` and dicts of tensors as ``<name>.pt``, each
written atomically (``storage``) the moment it is computed, so an interrupted job loses at most the
result it was computing. A copy that cannot be read, or a frame that lacks a required column, is
computed again with a warning; a folder that cannot take a result only earns a warning, and the
result is still returned. A run's ``artifacts/`` folder is one of these (``Run.cached_frame``).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch

from .checkpoints import CheckpointError, safe_load
from .storage import StorageError, atomic_save, atomic_write_text, make_folder

__all__ = ["Artifacts", "keep"]


def keep(path: Path, write: Callable[[Path], None], *, prepare: Callable[[], object] | None = None) -> None:
    """Write a result that can be computed again (``prepare`` first, e.g. to create its run's folder); a store
    that cannot take it only earns a warning."""
    try:
        if prepare is not None:
            prepare()
        make_folder(path.parent)
        write(path)
    except StorageError as err:
        warnings.warn(f"{path.name} is used but not kept: {err}", stacklevel=3)


class Artifacts:
    """Named results kept in ``folder``; ``prepare`` runs before the first write (a run creates its folder)."""

    def __init__(self, folder: str | Path, *, prepare: Callable[[], object] | None = None):
        self.folder, self._prepare = Path(folder), prepare

    def path(self, name: str, suffix: str) -> Path:
        return self.folder / f"{name}{suffix}"

    def cached_frame(self, name: str, compute: Callable[[], pd.DataFrame], columns: Sequence[str] = ()) -> pd.DataFrame:
        """The DataFrame kept as ``<name>.csv``, or ``compute()`` kept there now.

        ``columns`` names the columns a kept copy must have: one that cannot be read or lacks one of
        them is computed again, with a warning.
        """
        path = self.path(name, ".csv")
        if path.exists():
            try:
                frame = pd.read_csv(path)
                missing = [c for c in columns if c not in frame.columns]
                if not missing:
                    return frame
                problem = f"lacks the column(s) {', '.join(missing)}"
            except (ValueError, OSError) as err:      # bad bytes, an empty file, broken rows
                problem = f"cannot be read ({type(err).__name__})"
            warnings.warn(f"the cached {path} {problem}; computing it again.", stacklevel=3)
        frame = compute()
        keep(path, lambda p: atomic_write_text(p, frame.to_csv(index=False)), prepare=self._prepare)
        return frame

    def cached_tensors(self, name: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The dict of tensors kept as ``<name>.pt``, or ``compute()`` kept there now."""
        path = self.path(name, ".pt")
        if path.exists():
            try:
                return safe_load(path)
            except CheckpointError as err:
                warnings.warn(f"{err}; computing it again.", stacklevel=3)
        value = compute()
        keep(path, lambda p: atomic_save(value, p), prepare=self._prepare)
        return value
