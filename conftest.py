"""Test-session set-up shared by the unit tests and the notebook (nbval) tests.

Every session gets its own empty run store, so the chapters train from scratch exactly as they do
on a fresh clone; the repository's `runs/` is never read or written by the tests. The variable is
set before any notebook kernel starts, so the kernels inherit it. Set SATLIB_TEST_KEEP_STORE=1 to
run against the store SATLIB_RUNS already names (for example to reuse paper-scale runs).
"""
from __future__ import annotations

import os
import shutil
import tempfile

_created: list[str] = []


def pytest_configure(config):
    if "SATLIB_TEST_KEEP_STORE" not in os.environ:
        root = tempfile.mkdtemp(prefix="satlib-test-runs-")
        _created.append(root)
        os.environ["SATLIB_RUNS"] = root


def pytest_unconfigure(config):
    for root in _created:
        shutil.rmtree(root, ignore_errors=True)
