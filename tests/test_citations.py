"""The book is self-contained: code, tests and chapters cite chapters, equations and the errata appendix,
never the private reading notes or design memos that are not part of the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# spelled in pieces, so that this file does not match itself
PRIVATE = re.compile(r"\b(" + "NO" + "TES" + "|" + "DE" + "SIGN" + r")\b")
LABEL = re.compile(r"``((?:errata|release)-[a-z0-9-]+)``")


def _sources():
    for folder in ("satlib", "chapters", "tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".ipynb") and ".ipynb_checkpoints" not in path.parts:
                yield path


def test_no_file_cites_the_private_notes():
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}"
            for path in _sources() for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if PRIVATE.search(line)]
    assert not hits, "cite a chapter, an equation label or the book's errata appendix instead:\n" + "\n".join(hits)


def test_every_cited_erratum_has_an_entry_in_the_appendix():
    appendix = next((ROOT / "chapters").glob("appendix*errata*.md")).read_text(encoding="utf-8")
    defined = set(re.findall(r"^\(((?:errata|release)-[a-z0-9-]+)\)=", appendix, flags=re.M))
    cited = {(label, path.name) for path in _sources() if path.suffix == ".py"
             for label in LABEL.findall(path.read_text(encoding="utf-8"))}
    assert cited, "no docstring cites the errata appendix"
    missing = sorted(f"{label} ({name})" for label, name in cited if label not in defined)
    assert not missing, f"labels cited but not defined in the errata appendix: {missing}"
