"""Progress bars that show where a person watches, and stay out of rendered pages (Chapter 1's note on running).

``bar`` wraps ``tqdm``. A bar is drawn when the caller asks for one and standard error is a terminal
(the command line, a Python prompt); notebooks executed by Jupyter Book, papermill or nbval write
to no terminal, so their pages carry no bars. ``SATLIB_PROGRESS=1`` forces bars on (for example in
an interactive notebook), ``SATLIB_PROGRESS=0`` turns them off everywhere.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def shown(requested: bool = True) -> bool:
    """Whether a requested bar is drawn here (see the module docstring)."""
    setting = os.environ.get("SATLIB_PROGRESS", "")
    if setting in ("0", "1"):
        return requested and setting == "1"
    return requested and sys.stderr.isatty()


def bar(iterable: Iterable[T], *, desc: str, enabled: bool = True, **options) -> tqdm:
    """``tqdm(iterable, desc=desc, **options)``, disabled where ``shown(enabled)`` is False."""
    return tqdm(iterable, desc=desc, disable=not shown(enabled), **options)
