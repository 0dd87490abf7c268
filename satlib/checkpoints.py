"""Reading weights files safely: ``torch.load(weights_only=True)`` with one-sentence errors (Chapter 1, "run store").

A file that is cut short, damaged, not a torch file, or that holds pickled Python objects (a whole
model saved with ``torch.save(model)``) is refused with a ``CheckpointError`` that says which file and
why, never with a traceback. The run store reads every checkpoint through here, and so does
``satlib.audit`` for checkpoints from elsewhere.
"""
from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import SatlibError

__all__ = ["CheckpointError", "safe_load", "state_dict_of"]


class CheckpointError(SatlibError, RuntimeError):
    """No readable checkpoint although one was written; the message says which files and what to do."""


def safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` that turns any unreadable file into a one-sentence ``CheckpointError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, refused pickles: all mean "unreadable"
        raise CheckpointError(f"{path} cannot be read: {_load_problem(err)}") from None


def _load_problem(err: Exception) -> str:
    """Why ``torch.load`` failed, in a few words (torch's own text advises turning the safe loader off)."""
    text = str(err)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return f"it holds Python objects ({refused.group(1)}) that a weights-only load refuses"
    if isinstance(err, (pickle.UnpicklingError, EOFError)) or "PytorchStreamReader" in text:
        return "it is damaged, cut short or not a torch file"
    first = text.split("\n")[0].split(". ")[0][:160]
    return f"{type(err).__name__}: {first}" if first and "weights_only" not in first else type(err).__name__


def state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """``obj`` if it is model weights (a non-empty dict of named tensors), else ``CheckpointError``."""
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        return dict(obj)
    raise CheckpointError(f"{path} does not hold model weights (a dict of named tensors)")
