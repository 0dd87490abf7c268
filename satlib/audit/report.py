"""The audit's report: one folder with ``report.md``, ``report.html``, figures, CSVs and ``summary.json``.

Each section of the report is a table with a figure beside it, written twice from the same content:
Markdown for reading in a terminal or a repository, HTML (tables and embedded-by-link PNG figures) for
a browser. Every per-sample column goes to a CSV (``per_sample.csv``: correctness under each attack
and the worst case; ``radii.csv``: margins and radii), and the headline numbers to ``summary.json``.
Figures are drawn with matplotlib's object interface and the Agg canvas, whatever the session's backend.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..storage import atomic_write_text


def _figure(path: Path, draw, size=(6.0, 3.4)) -> str:
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    draw(fig.add_subplot())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def _accuracy(ax, table: pd.DataFrame) -> None:
    ax.bar(table["attack"], table["accuracy"], color="tab:blue")
    ax.set(ylabel="accuracy", ylim=(0, 1), title="accuracy by attack")
    ax.tick_params(axis="x", rotation=30)


def _sweep(ax, sweep: pd.DataFrame, eps: float) -> None:
    ax.plot(sweep["eps"], sweep["accuracy"], "o-")
    ax.axvline(eps, color="gray", linestyle="--")
    ax.set(xlabel="eps", ylabel="accuracy under PGD-10", ylim=(0, 1), title="accuracy against eps")


def _clustering(ax, frame: pd.DataFrame) -> None:
    for (name, part), color in zip(frame.groupby("attack", sort=False), ("tab:green", "tab:blue", "tab:red")):
        ax.plot(part["depth"], part["clu_acc"], "o-", color=color, label=f"{name}: clustering")
        ax.axhline(part["acc"].iloc[0], color=color, linestyle=":", label=f"{name}: classification")
    ax.set(xlabel="residual block", ylabel="accuracy", ylim=(0, 1), title="clustering accuracy by layer")
    ax.legend(fontsize=7)


def _radii(ax, radii: pd.DataFrame) -> None:
    columns = [c for c in ("certified", "empirical", "flip") if c in radii]
    values = [radii[c].to_numpy(dtype=float) for c in columns]
    top = max(float(v.max()) for v in values)
    ax.hist(values, bins=np.linspace(0, top if top > 0 else 1, 20), label=columns)
    ax.set(xlabel="L-inf radius", ylabel="samples", title="radius distributions")
    ax.legend(fontsize=7)


def _sections(result, out: Path) -> list[tuple[str, str, pd.DataFrame | None, str | None]]:
    """``(title, text, table, figure file)`` for every part the audit measured."""
    s = result.settings
    restarts = f"{s['restarts']} restart{'s' * (s['restarts'] != 1)}"
    sections = [("Accuracy", f"Clean accuracy and accuracy under each attack at eps = {s['eps']:.4g} "
                 f"({s['steps']} steps, {restarts} of PGD and CW-inf); the worst case counts a "
                 "sample as robust only if no attack breaks it.", result.accuracy,
                 _figure(out / "accuracy_by_attack.png", lambda ax: _accuracy(ax, result.accuracy)))]
    if result.checks is not None:
        sections.append(("Gradient-masking checks", "Named pass/fail checks (Chapter 5): a masked gradient fails "
                         "at least one of them.", result.checks,
                         _figure(out / "accuracy_vs_eps.png", lambda ax: _sweep(ax, result.sweep, s["eps"]))))
    if result.clustering is not None:
        wide = result.clustering.pivot(index=["layer", "depth"], columns="attack", values="clu_acc")
        sections.append(("Clustering accuracy by layer", "Share of test samples whose features are nearest to "
                         "their class's centroid of clean training features (Definition 1, Chapter 2), clean and "
                         "under the attacks; dotted: classification accuracy.",
                         wide.sort_index(level="depth").reset_index(),
                         _figure(out / "clustering_by_layer.png", lambda ax: _clustering(ax, result.clustering))))
    if result.radii is not None:
        described = result.radii.drop(columns=["sample", "label", "pred"], errors="ignore").describe().T
        sections.append(("Feature margin and radii", "Feature margin rho and L-inf radii (Theorem 2, Chapter 6): "
                         "the certified radius is a proven lower bound, the empirical and flip radii attack-based "
                         "upper estimates.", described[["mean", "min", "50%", "max"]].reset_index(),
                         _figure(out / "radii.png", lambda ax: _radii(ax, result.radii))))
    return sections


def _markdown(result, sections) -> str:
    lines = ["# Audit report", "", *[f"- {k}: {v}" for k, v in result.settings.items()], ""]
    lines += [f"> {note}" for note in result.notes] + [""]
    for title, text, table, figure in sections:
        lines += [f"## {title}", "", text, ""]
        if table is not None:
            lines += [table.to_markdown(index=False, floatfmt=".4g"), ""]
        if figure:
            lines += [f"![{title}]({figure})", ""]
    return "\n".join(lines)


def _html(result, sections) -> str:
    body = ["<h1>Audit report</h1>", "<ul>", *[f"<li>{html.escape(f'{k}: {v}')}</li>" for k, v in
                                               result.settings.items()], "</ul>"]
    body += [f"<p><em>{html.escape(note)}</em></p>" for note in result.notes]
    for title, text, table, figure in sections:
        body += [f"<h2>{html.escape(title)}</h2>", f"<p>{html.escape(text)}</p>"]
        if table is not None:
            body.append(table.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0))
        if figure:
            body.append(f'<img src="{figure}" alt="{html.escape(title)}">')
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Audit report</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:auto}td,th{padding:0 .6em;text-align:right}"
            "</style></head><body>" + "\n".join(body) + "</body></html>\n")


def summary(result) -> dict:
    """The headline numbers as plain JSON values."""
    data = {"settings": {k: v for k, v in result.settings.items()},
            "accuracy": dict(zip(result.accuracy["attack"], result.accuracy["accuracy"].astype(float))),
            "notes": list(result.notes)}
    if result.checks is not None:
        data["checks"] = dict(zip(result.checks["check"], result.checks["verdict"]))
    if result.clustering is not None:
        last = result.clustering.loc[result.clustering.groupby("attack", sort=False)["depth"].idxmax()]
        data["clustering_last_layer"] = dict(zip(last["attack"], last["clu_acc"].astype(float)))
    if result.radii is not None:
        data["median_radius"] = {c: float(result.radii[c].median()) for c in ("certified", "empirical", "flip")
                                 if c in result.radii}
    return data


def write_report(result, out: Path) -> Path:
    """Write the report folder ``out`` (``report.md``, ``report.html``, PNG figures, CSVs, ``summary.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    sections = _sections(result, out)
    per_sample = result.correct.copy()
    per_sample.insert(0, "sample", range(len(per_sample)))
    tables = {"accuracy": result.accuracy, "per_sample": per_sample, "clustering": result.clustering,
              "radii": result.radii, "sweep": result.sweep, "checks": result.checks}
    for name, table in tables.items():
        if table is not None:
            atomic_write_text(out / f"{name}.csv", table.to_csv(index=False))
    atomic_write_text(out / "summary.json", json.dumps(summary(result), indent=1, default=str))
    atomic_write_text(out / "report.md", _markdown(result, sections))
    atomic_write_text(out / "report.html", _html(result, sections))
    return out / "report.md"
