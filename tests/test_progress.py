"""Progress bars: drawn on a terminal or when asked for, never in a rendered page (satlib.progress)."""
from __future__ import annotations

import io
import re
from pathlib import Path

import satlib
from satlib.progress import bar, shown


def test_bars_follow_the_terminal_and_the_setting(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("SATLIB_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not shown()                                   # a notebook executed for a page
    monkeypatch.setattr("sys.stderr", Terminal())
    assert shown() and not shown(False)                  # the command line, unless the caller declines
    monkeypatch.setenv("SATLIB_PROGRESS", "0")
    assert not shown()
    monkeypatch.setenv("SATLIB_PROGRESS", "1")
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert shown() and not shown(False)
    assert list(bar(range(3), desc="x")) == [0, 1, 2]


def test_every_bar_of_the_library_goes_through_satlib_progress():
    root = Path(satlib.__file__).parent
    direct = [str(p.relative_to(root)) for p in root.rglob("*.py")
              if p.name != "progress.py" and re.search(r"\btqdm\(", p.read_text())]
    assert not direct, f"tqdm used directly (bars would show in rendered pages): {direct}"
