"""Table 1 of the book: per-seed accuracies, their mean and spread, and SAT-versus-baseline verdicts (Chapter 5).

``per_seed`` turns the evaluation frames of many runs into one row per (method, seed) with one column
per attack, in percent. ``summary`` gives the mean and standard deviation over seeds and the number
of seeds per cell; ``formatted`` writes each cell as "mean ± sd" on one line (non-breaking spaces).
``verdicts`` compares one method with each baseline by the paired interval of
``satlib.report.stats.paired_difference`` on the seeds the two share.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

from .stats import paired_difference

NBSP = "\u00a0"


def per_seed(frames: Mapping[tuple[str, int], pd.DataFrame]) -> pd.DataFrame:
    """One row per (method, seed) from ``evaluate``-style frames (``attack``, ``accuracy``), accuracies in %."""
    rows = [{"method": method, "seed": seed, **(frame.set_index("attack")["accuracy"] * 100).to_dict()}
            for (method, seed), frame in frames.items()]
    return pd.DataFrame(rows)


def summary(results: pd.DataFrame, columns: Sequence[str], order: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """``{"mean", "sd", "n"}`` frames (method x column) over the seeds of ``results`` (``per_seed`` rows)."""
    grouped = results.groupby("method", sort=False)[list(columns)]
    out = {"mean": grouped.mean(), "sd": grouped.std(), "n": grouped.count()}
    return {k: v.reindex(order) if order is not None else v for k, v in out.items()}


def formatted(results: pd.DataFrame, columns: Sequence[str], order: Sequence[str] | None = None) -> pd.DataFrame:
    """Cells "mean ± sd" (one decimal; a single run shows its value, a missing cell "-")."""
    s = summary(results, columns, order)

    def cell(mean: float, sd: float, n: int) -> str:
        if n == 0:
            return "-"
        return f"{mean:.1f}" if n == 1 else f"{mean:.1f}{NBSP}±{NBSP}{sd:.1f}"

    return pd.DataFrame({c: [cell(s["mean"].loc[m, c], s["sd"].loc[m, c], s["n"].loc[m, c]) for m in s["mean"].index]
                         for c in columns}, index=s["mean"].index)


def verdicts(results: pd.DataFrame, method: str, baselines: Sequence[str], columns: Sequence[str], *,
             level: float = 0.95) -> pd.DataFrame:
    """``method`` minus each baseline per column, over the seeds both have: the paired interval and its verdict.

    One row per (baseline, column): ``difference`` (mean and interval, in points), ``seeds`` and
    ``verdict`` ("ahead", "behind" or "not resolved" for ``method``).
    """
    table = results.set_index(["method", "seed"])
    rows = []
    for base in baselines:
        seeds = sorted(set(table.loc[method].index) & set(table.loc[base].index))
        for column in columns:
            d = paired_difference(table.loc[method].loc[seeds, column], table.loc[base].loc[seeds, column],
                                  level=level)
            rows.append({"baseline": base, "column": column, "difference": str(d), "mean": d.mean, "low": d.low,
                         "high": d.high, "seeds": d.n, "verdict": d.verdict})
    return pd.DataFrame(rows)
