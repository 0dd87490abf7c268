"""Tests of the book machinery: paired notebooks in sync, and rendered pages in a real browser.

(a) Every chapter is a MyST markdown file (the source of truth) paired by jupytext with an
    output-free notebook (what papermill and nbval run). The pair must agree cell by cell.
(b) The book must render offline: built with the repository's ``book.yml``, served on localhost
    and opened in headless Chromium, a page must show typeset mathematics (vendored MathJax),
    its figures and its tables. One test uses a fixed smoke page (``tests/fixtures``), one the
    first chapter of the book.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHROMIUM = Path("/usr/bin/chromium")

# Cell metadata that jupytext deliberately keeps out of the text file (it stays in the .ipynb
# only), so it cannot be compared (see jupytext.cell_metadata._IGNORE_CELL_METADATA).
IGNORED_CELL_METADATA = {
    "autoscroll",
    "collapsed",
    "scrolled",
    "trusted",
    "execution",
    "ExecuteTime",
    "cell_marker",
    "lines_to_next_cell",
    "lines_to_end_of_cell_marker",
}


# --------------------------------------------------------------------------------------------
# (a) jupytext pairing
# --------------------------------------------------------------------------------------------


def _jupytext_to_notebook(md_path: Path, out_dir: Path) -> nbformat.NotebookNode:
    """Convert ``md_path`` with the jupytext command line into ``out_dir``; read the result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (Path(md_path).stem + ".ipynb")
    subprocess.run(
        [sys.executable, "-m", "jupytext", "--to", "ipynb", "--output", str(out), str(md_path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return nbformat.read(out, as_version=4)


def _cell_signature(cell) -> tuple[str, str, str]:
    metadata = {k: v for k, v in cell.get("metadata", {}).items() if k not in IGNORED_CELL_METADATA}
    return (cell["cell_type"], cell["source"], json.dumps(metadata, sort_keys=True))


def notebook_matches_markdown(md_path, ipynb_path, work_dir=None) -> bool:
    """True when ``jupytext --to ipynb md_path`` gives the cells of the notebook ``ipynb_path``.

    Cells are compared by type, source and metadata (tags included), ignoring only the metadata
    jupytext never writes to the text file. Cell ids and outputs are not compared.
    """
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        converted = _jupytext_to_notebook(Path(md_path), Path(tmp))
    committed = nbformat.read(Path(ipynb_path), as_version=4)
    return [_cell_signature(c) for c in converted.cells] == [
        _cell_signature(c) for c in committed.cells
    ]


def chapter_sources() -> list[Path]:
    """The chapters' MyST sources: chapters/NN_name.md and the appendices."""
    return sorted(p for p in CHAPTERS.glob("*.md"))


MAX_CODE_LINE = 88        # characters: what the page's code box shows without cutting
MAX_CODE_CELL = 25        # lines: a longer cell is a program, not a step of the argument


def test_chapter_code_reads_on_the_page():
    """Code lines fit the code box, cells stay short, and every check is folded (tag hide-input)."""
    problems = []
    for md in chapter_sources():
        nb = nbformat.read(md.with_suffix(".ipynb"), as_version=4)
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            where = f"{md.name}, cell {index}"
            lines = cell.source.splitlines()
            long = [line for line in lines if len(line) > MAX_CODE_LINE]
            if long:
                problems.append(f"{where}: {len(long)} line(s) over {MAX_CODE_LINE} characters: {long[0]!r}")
            if len(lines) > MAX_CODE_CELL:
                problems.append(f"{where}: {len(lines)} lines (at most {MAX_CODE_CELL})")
            tags = set(cell.metadata.get("tags", []))
            if lines and lines[0].startswith("# check") and not tags & {"hide-input", "remove-cell"}:
                problems.append(f"{where}: a check cell that is not folded (tag it hide-input)")
    assert not problems, "\n".join(problems)


def test_chapter_sources_are_jupytext_notebooks():
    """Without the jupytext header Jupyter Book renders code cells without running them."""
    problems = []
    for md in chapter_sources():
        head = md.read_text(encoding="utf8").split("\n---", 1)[0]
        if not (head.startswith("---\n") and "jupytext:" in head and "kernelspec:" in head
                and "format_name: myst" in head):
            problems.append(f"{md.relative_to(ROOT)}: missing the jupytext/kernelspec header")
    assert not problems, "\n".join(problems)


def test_chapter_notebooks_are_paired_and_in_sync(tmp_path):
    problems = []
    for md in chapter_sources():
        ipynb = md.with_suffix(".ipynb")
        rel_md = md.relative_to(ROOT)
        if not ipynb.exists():
            problems.append(f"{ipynb.relative_to(ROOT)} is missing (run `jupytext --sync {rel_md}`)")
        elif not notebook_matches_markdown(md, ipynb, work_dir=tmp_path):
            problems.append(
                f"{rel_md} and {ipynb.relative_to(ROOT)} differ "
                f"(edit the .md, then run `jupytext --sync {rel_md}`)"
            )
    for ipynb in sorted(CHAPTERS.glob("*.ipynb")):
        if not ipynb.with_suffix(".md").exists():
            problems.append(f"{ipynb.relative_to(ROOT)} has no paired .md source")
    assert not problems, "\n".join(problems)


def test_committed_notebooks_have_no_outputs():
    problems = []
    for ipynb in sorted(CHAPTERS.glob("*.ipynb")):
        nb = nbformat.read(ipynb, as_version=4)
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if cell.get("outputs"):
                problems.append(f"{ipynb.name}, cell {index}: has outputs")
            if cell.get("execution_count") is not None:
                problems.append(f"{ipynb.name}, cell {index}: has an execution count")
    assert not problems, "clear outputs before committing:\n" + "\n".join(problems)


def test_sync_check_detects_an_edit_of_the_markdown_alone(tmp_path):
    md = tmp_path / "chapter.md"
    shutil.copy(FIXTURES / "book_smoke.md", md)
    ipynb = _jupytext_to_notebook(md, tmp_path / "committed")
    ipynb_path = tmp_path / "committed" / "chapter.ipynb"
    assert ipynb_path.exists() and len(ipynb.cells) > 3
    assert notebook_matches_markdown(md, ipynb_path, work_dir=tmp_path)

    # A changed sentence in a markdown cell.
    md.write_text(
        md.read_text(encoding="utf8").replace("shows a curve", "shows a parabola"), encoding="utf8"
    )
    assert not notebook_matches_markdown(md, ipynb_path, work_dir=tmp_path)

    # A changed tag only (the parameters cell loses its tag).
    shutil.copy(FIXTURES / "book_smoke.md", md)
    assert notebook_matches_markdown(md, ipynb_path, work_dir=tmp_path)
    md.write_text(
        md.read_text(encoding="utf8").replace(":tags: [parameters]\n", "", 1), encoding="utf8"
    )
    assert not notebook_matches_markdown(md, ipynb_path, work_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# (b) build, serve, render in headless Chromium
# --------------------------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless browser test needs Debian's Chromium at /usr/bin/chromium "
    "(apt-get install -y chromium)",
)


def _jupyter_book() -> str:
    candidate = Path(sys.executable).parent / "jupyter-book"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("jupyter-book")
    assert found, "jupyter-book (version 1) is not installed: pip install -e '.[book]'"
    return found


def _write_toc(path: Path, chapter_docnames: list[str]) -> Path:
    lines = ["format: jb-book", "root: intro", "parts:", "  - caption: Chapters",
             "    numbered: true", "    chapters:"]
    lines += [f"      - file: {name}" for name in chapter_docnames]
    path.write_text("\n".join(lines) + "\n", encoding="utf8")
    return path


ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Warnings about references into chapters left out of a small build. A chapter that links to
# another one (Chapter 2, its Eq. 3, its Theorem 1) is fine in the full book; the full build
# (`jupyter-book build ... -W`) is where such links are checked.
CROSS_CHAPTER_REFERENCE_WARNINGS = [
    re.compile(p)
    for p in (
        r"WARNING: unknown document: ",
        r"WARNING: undefined label: ",
        r"WARNING: equation not found: ",
        r"WARNING: label '[^']*' not found\.",
        r"WARNING: 'myst' cross-reference target not found: ",
    )
]


def build_book(source: Path, toc: Path, out: Path, timeout: float,
               allowed_warnings: list[re.Pattern] | None = None) -> Path:
    """Build ``source`` with the repository's book.yml and ``toc`` into ``out``; return html dir.

    With ``allowed_warnings`` None the build runs with ``-W`` (any warning fails it); otherwise
    warnings are collected and each must match one of the patterns. A failing notebook cell
    fails the build either way (book.yml sets ``allow_errors: false, raise_on_error: true``).
    """
    env = os.environ.copy()
    # Notebooks must render figures inline: a non-interactive backend would swallow them.
    env.pop("MPLBACKEND", None)
    cmd = [_jupyter_book(), "build", str(source), "--config", str(source / "book.yml"),
           "--toc", str(toc), "--path-output", str(out), "--keep-going"]
    if allowed_warnings is None:
        cmd.append("-W")
    result = subprocess.run(cmd, cwd=source, env=env, capture_output=True, text=True,
                            timeout=timeout)
    log = ANSI.sub("", result.stdout + result.stderr)
    assert result.returncode == 0, f"book build failed ({' '.join(cmd)}):\n{log[-8000:]}"
    if allowed_warnings is not None:
        warnings = [line for line in log.splitlines() if "WARNING: " in line]
        unexpected = [w for w in warnings if not any(p.search(w) for p in allowed_warnings)]
        assert not unexpected, "book build warnings:\n" + "\n".join(unexpected)
    html = out / "_build" / "html"
    assert (html / "index.html").exists(), log[-4000:]
    return html


class _Server:
    """http.server on an ephemeral localhost port, in a thread, recording every request."""

    def __init__(self, directory: Path):
        self.requests: list[tuple[str, int]] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_request(self, code="-", size="-"):
                requests.append((urlsplit(self.path).path, int(getattr(code, "value", code))))

            def log_message(self, *args):
                pass

        handler = functools.partial(Handler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def render_dom(url: str, profile_dir: Path) -> str:
    """The page's DOM after its scripts ran (MathJax included), from headless Chromium."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-extensions", f"--user-data-dir={profile_dir}",
           "--window-size=1366,900", "--virtual-time-budget=20000", "--dump-dom", url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-4000:]
    return result.stdout


def _visible_text(soup) -> str:
    """Page text outside code, scripts and typeset math."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(str(soup), "html.parser")
    for tag in soup(["script", "style", "pre", "code", "mjx-container", "noscript", "textarea"]):
        tag.decompose()
    return soup.get_text(" ")


RAW_INLINE_TEX = re.compile(r"\$[^$\n]*[\\^_{}][^$\n]*\$")


def check_rendered_page(html_dir: Path, server: _Server, page: str, profile_dir: Path,
                        min_images: int, min_tables: int, needs_math: bool = True) -> dict:
    """Open ``page`` in Chromium and check its math (if its source has any), figures and tables;
    return counts."""
    from bs4 import BeautifulSoup

    page_url = urljoin(server.url, page)
    dom = render_dom(page_url, profile_dir)
    soup = BeautifulSoup(dom, "html.parser")
    article = soup.select_one("article") or soup.select_one("main") or soup

    # Nothing on the page may come from the network: no external scripts, styles or images.
    external = [
        tag.get("src") or tag.get("href")
        for tag in soup.select("script[src], link[rel~=stylesheet][href], img[src]")
        if re.match(r"^(https?:)?//", tag.get("src") or tag.get("href") or "")
    ]
    assert not external, f"{page} loads resources from the network: {external}"

    # Mathematics: every math element typeset by MathJax, no TeX left as text.
    math_nodes = article.select(".math")
    assert math_nodes or not needs_math, f"{page}: no math elements in the page"
    untypeset = [m.get_text()[:80] for m in math_nodes if not m.find("mjx-container")]
    assert not untypeset, f"{page}: math not typeset by MathJax: {untypeset[:5]}"
    assert article.find("mjx-container") or not needs_math, f"{page}: no MathJax output (mjx-container)"
    text = _visible_text(article)
    assert "$$" not in text, f"{page}: raw $$ left in the text"
    leftover = RAW_INLINE_TEX.findall(text)
    assert not leftover, f"{page}: raw inline TeX left in the text: {leftover[:5]}"
    for marker in ("\\begin{", "\\[", "\\("):
        assert marker not in text, f"{page}: raw TeX ({marker}) left in the text"

    # MathJax, its fonts and every other resource were served locally, none missing.
    paths = [p for p, _ in server.requests]
    assert any(p.endswith("/mathjax/tex-chtml-full.js") for p in paths), paths
    assert not needs_math or any("/mathjax/output/chtml/fonts/woff-v2/" in p for p in paths), (
        f"{page}: MathJax fonts were not loaded from the vendored copy"
    )
    missing = [(p, c) for p, c in server.requests if c >= 400 and not p.endswith("favicon.ico")]
    assert not missing, f"{page}: requests failed: {missing}"

    # Figures: every image in the article is a non-empty PNG or SVG file of the build.
    images = []
    for img in article.select("img[src]"):
        src = urlsplit(urljoin(page_url, img["src"])).path
        file = html_dir / unquote(src).lstrip("/")
        assert file.is_file(), f"{page}: image {img['src']} is missing ({file})"
        data = file.read_bytes()
        is_png = data.startswith(b"\x89PNG\r\n\x1a\n")
        is_svg = file.suffix == ".svg" and b"<svg" in data[:4096]
        assert data and (is_png or is_svg), f"{page}: {img['src']} is not a non-empty PNG/SVG"
        images.append(file)
    assert len(images) >= min_images, f"{page}: {len(images)} images, expected >= {min_images}"

    # Tables: DataFrames rendered as HTML tables with a header and a body.
    tables = article.select("table.dataframe")
    for table in tables:
        assert table.select("th") and table.select("tbody tr"), f"{page}: empty table"
    assert len(tables) >= min_tables, f"{page}: {len(tables)} tables, expected >= {min_tables}"

    check_quiet_outputs(article, page)
    return {"math": len(math_nodes), "images": len(images), "tables": len(tables), "soup": soup}


# What must never appear in a cell's output on a page: progress bars, warnings, object reprs
# and paths of the machine that built the book.
NOISE = {
    "a progress bar": re.compile(r"\d+%\|| it/s\]|s/it\]"),
    "a warning": re.compile(r"\b\w*Warning\b"),
    "an object repr": re.compile(r"<[\w.]+ (object )?at 0x[0-9a-f]+>"),
    "a machine path": re.compile(r"(?<![\w.])/(tmp|home|root|work|usr|var)/"),
}


def check_quiet_outputs(article, page: str) -> None:
    """No stderr box, and no progress bar, warning, repr or machine path in any cell output."""
    stderr = article.select(".output.stderr, .stderr")
    assert not stderr, f"{page}: {len(stderr)} stderr output(s): {stderr[0].get_text()[:200]!r}"
    for output in article.select(".cell_output"):
        text = output.get_text(" ")
        for what, pattern in NOISE.items():
            found = pattern.search(text)
            assert not found, f"{page}: an output shows {what}: ...{text[max(found.start() - 60, 0):found.end() + 60]!r}"


# Run in the page after it loaded (MathJax included): every table and code block whose content is
# wider than the page's text column, recorded on <body data-overflow> for --dump-dom to carry out.
MEASURE_OVERFLOW = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var column = document.querySelector("article"), out = [];
  column.querySelectorAll("table").forEach(function (t) {
    var w = t.getBoundingClientRect().width;
    if (w > column.clientWidth + 1) out.push("table " + Math.round(w) + " px in a "
      + column.clientWidth + " px column: " + t.innerText.slice(0, 80));
  });
  column.querySelectorAll("pre").forEach(function (p) {
    if (p.scrollWidth > p.clientWidth + 1) out.push("code " + p.scrollWidth + " px in a "
      + p.clientWidth + " px box: " + p.innerText.slice(0, 80));
  });
  document.body.setAttribute("data-overflow", JSON.stringify(out));
}, 3000); });
</script>"""


def check_nothing_overflows(html_dir: Path, server: _Server, page: str, profile_dir: Path) -> None:
    """In Chromium at a laptop's window size, no table is wider than the text column and no code
    line is cut: the page is measured through a copy of it that runs ``MEASURE_OVERFLOW``."""
    from bs4 import BeautifulSoup

    source = html_dir / page
    probe = source.with_name(source.stem + ".measure.html")
    probe.write_text(source.read_text(encoding="utf8").replace("</body>", MEASURE_OVERFLOW + "</body>"),
                     encoding="utf8")
    soup = BeautifulSoup(render_dom(urljoin(server.url, probe.relative_to(html_dir).as_posix()),
                                    profile_dir), "html.parser")
    measured = soup.body.get("data-overflow")
    assert measured is not None, f"{page}: the width probe did not run"
    assert not json.loads(measured), f"{page}: too wide for the page:\n" + "\n".join(json.loads(measured))


def check_offers_notebook(soup, page: str) -> None:
    """The page's download menu links its .ipynb."""
    links = [a.get("href", "") for a in soup.select("a[href]")]
    assert any(href.endswith(".ipynb") for href in links), f"{page}: no .ipynb download link"


def _expected_outputs(executed: Path) -> tuple[int, int]:
    """Images and DataFrame tables the executed notebook displays (cells not hidden)."""
    nb = nbformat.read(executed, as_version=4)
    images = tables = 0
    for cell in nb.cells:
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell.cell_type != "code" or tags & {"remove-output", "remove-cell"}:
            continue
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data or "image/svg+xml" in data:
                images += 1
            if 'class="dataframe' in "".join(data.get("text/html", "")):
                tables += 1
    return images, tables


@needs_chromium
def test_smoke_page_renders_offline(tmp_path):
    """The machinery itself: book.yml, vendored MathJax, extensions, on a fixed tiny page."""
    book = tmp_path / "book"
    (book / "chapters").mkdir(parents=True)
    for name in ("book.yml", "intro.md", "references.bib"):
        shutil.copy(ROOT / name, book / name)
    shutil.copytree(ROOT / "_vendor", book / "_vendor")
    # The book builds chapters from their notebooks (book.yml), so the page goes in as one.
    _jupytext_to_notebook(FIXTURES / "book_smoke.md", book / "chapters")
    toc = _write_toc(tmp_path / "toc.yml", ["chapters/book_smoke"])

    html = build_book(book, toc, tmp_path / "out", timeout=900)
    assert (html / "_static" / "mathjax" / "tex-chtml-full.js").stat().st_size > 100_000
    with _Server(html) as server:
        found = check_rendered_page(html, server, "chapters/book_smoke.html",
                                    tmp_path / "profile", min_images=1, min_tables=1)
        soup = found["soup"]
        check_offers_notebook(soup, "chapters/book_smoke.html")
        check_nothing_overflows(html, server, "chapters/book_smoke.html", tmp_path / "profile-w")
        # Labelled equation numbered; theorem, exercise and a folded solution present.
        assert soup.select(".math .eqno, .eqno"), "labelled equation has no number"
        assert soup.select(".proof.theorem, div.theorem"), "prf:theorem not rendered"
        assert soup.select(".exercise"), "exercise not rendered"
        solutions = soup.select(".solution")
        assert solutions and all("dropdown" in s.get("class", []) for s in solutions)
        assert all("toggle-hidden" in s.get("class", []) for s in solutions), (
            "solutions are not folded by default"
        )
        assert soup.select(".admonition.warning"), "Erratum admonition not rendered"
        assert soup.select(".bibtex-citation a[href]"), "citations not rendered as links"
        assert soup.select("div.citation"), "bibliography list not rendered"
        # The intro page renders too (its notation section is pure mathematics).
        check_rendered_page(html, server, "intro.html", tmp_path / "profile-intro",
                            min_images=0, min_tables=0)


def _first_chapter() -> Path | None:
    preferred = CHAPTERS / "01_adversarial_training.md"
    if preferred.exists():
        return preferred
    sources = chapter_sources()
    return sources[0] if sources else None


FIRST_CHAPTER = _first_chapter()

# Defined only once a chapter exists: with no chapter, nothing is collected.
if FIRST_CHAPTER is not None:

    @needs_chromium
    def test_first_chapter_renders_offline(tmp_path):
        """Intro + the first chapter, built from the repository root with a temporary toc.

        The chapter runs in its own folder, as in the full build; trained models come from the
        test session's run store (conftest.py), shared with the nbval run of the same chapter. Only the chapter is executed, so
        its links into other chapters cannot resolve: those warnings (and only those) are allowed.
        """
        docname = FIRST_CHAPTER.relative_to(ROOT).with_suffix("").as_posix()
        toc = _write_toc(tmp_path / "toc.yml", [docname, LEDGER])
        html = build_book(ROOT, toc, tmp_path / "out", timeout=3600,
                          allowed_warnings=CROSS_CHAPTER_REFERENCE_WARNINGS)
        executed = tmp_path / "out" / "_build" / "jupyter_execute" / f"{docname}.ipynb"
        images, tables = _expected_outputs(executed) if executed.exists() else (1, 0)
        with _Server(html) as server:
            found = check_rendered_page(html, server, f"{docname}.html", tmp_path / "profile",
                                        min_images=max(images, 1), min_tables=tables)
            check_offers_notebook(found["soup"], f"{docname}.html")
            check_nothing_overflows(html, server, f"{docname}.html", tmp_path / "profile-w")
            check_ledger(html, server, tmp_path / "profile-ledger")


LEDGER = "chapters/appendix_b_paper_checked"


def check_ledger(html_dir: Path, server: _Server, profile_dir: Path) -> None:
    """The appendix lists at least 15 of the paper's claims, each with a status and a link to the
    chapter that tests it (the chapters ran earlier in the session, so their verdicts are stored)."""
    from bs4 import BeautifulSoup

    page = f"{LEDGER}.html"
    soup = BeautifulSoup(render_dom(urljoin(server.url, page), profile_dir), "html.parser")
    article = soup.select_one("article") or soup
    check_quiet_outputs(article, page)
    rows = [tr for table in article.select("table") if "on the quick preset" in table.get_text()
            for tr in table.select("tbody tr")]
    assert len(rows) >= 15, f"{page}: {len(rows)} claims listed, expected at least 15"
    for tr in rows:
        cells = tr.select("td")
        assert cells[2].select_one("a[href$='.html']"), f"{page}: no link in {tr.get_text(' ')[:80]!r}"
        assert cells[3].get_text(strip=True), f"{page}: no status in {tr.get_text(' ')[:80]!r}"
