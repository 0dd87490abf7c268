"""Check every page of a built book as ``tests/test_book.py`` checks the first chapter in CI.

    .venv/bin/python tests/check_built_book.py [_build/html]

after ``jupyter-book build . --config book.yml --toc toc.yml``. For each chapter and appendix page,
in headless Chromium at 1366 px: mathematics typeset offline, figures and tables present, no stderr,
progress bar, warning, object repr or machine path in an output, no table wider than the text
column, no code line cut, an ``.ipynb`` download; then the ledger page. CI builds only the first
chapter (the whole book trains every model), so this is the check to run on a full build. Prints one
line per page and exits non-zero if any page fails.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_book import (ROOT, _expected_outputs, _Server, chapter_sources, check_ledger,  # noqa: E402
                       check_nothing_overflows, check_offers_notebook, check_rendered_page)


def check_page(html: Path, server: _Server, source: Path, profile: Path) -> None:
    docname = source.relative_to(ROOT).with_suffix("").as_posix()
    page = f"{docname}.html"
    executed = html.parent / "jupyter_execute" / f"{docname}.ipynb"
    images, tables = _expected_outputs(executed) if executed.exists() else (0, 0)
    found = check_rendered_page(html, server, page, profile / "page", min_images=images, min_tables=tables,
                                needs_math="$" in source.read_text(encoding="utf8"))
    check_offers_notebook(found["soup"], page)
    check_nothing_overflows(html, server, page, profile / "width")


def main(argv: list[str]) -> int:
    html = Path(argv[1]) if len(argv) > 1 else ROOT / "_build" / "html"
    if not (html / "index.html").is_file():
        print(f"{html} holds no built book; build it first (see the README)", file=sys.stderr)
        return 2
    failed = 0
    with tempfile.TemporaryDirectory() as tmp, _Server(html) as server:
        for source in chapter_sources():
            docname = source.relative_to(ROOT).with_suffix("").as_posix()
            try:
                check_page(html, server, source, Path(tmp) / source.stem)
                print(f"ok      {docname}")
            except AssertionError as err:
                failed += 1
                print(f"FAILED  {docname}: {err}")
        try:
            check_ledger(html, server, Path(tmp) / "ledger")
            print("ok      the ledger lists its claims with links and statuses")
        except AssertionError as err:
            failed += 1
            print(f"FAILED  ledger: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
