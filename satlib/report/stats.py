"""Is one defence ahead of another? Intervals for differences over seeds (Chapter 5, Table 1).

Runs of two methods with the same seed share their initial weights and the order of their training
data, so their difference is paired: ``paired_difference`` gives the mean of the per-seed
differences with a Student-t confidence interval (``scipy.stats``), and a verdict that says "ahead"
or "behind" only when the interval excludes zero. With three seeds the interval is wide (the t
quantile with two degrees of freedom is 4.3): only large, consistent differences are resolved.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

VERDICTS = ("ahead", "behind", "not resolved")


@dataclass(frozen=True)
class Difference:
    """Mean of ``a - b`` over paired seeds, its ``level`` confidence interval, and the verdict on ``a``."""

    mean: float
    low: float
    high: float
    n: int
    level: float

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return "ahead"
        if self.high < 0:
            return "behind"
        return "not resolved"

    def __str__(self) -> str:
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def paired_difference(a, b, *, level: float = 0.95) -> Difference:
    """The paired-t interval of ``mean(a - b)``; ``a`` and ``b`` are per-seed values in the same seed order.

    Needs at least two pairs; with identical differences the interval shrinks to the point.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need two 1-D arrays of the same length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        raise ValueError(f"a confidence interval needs at least two seeds, got {len(a)}")
    d = a - b
    mean, sem = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    half = float(stats.t.ppf(0.5 + level / 2, df=len(d) - 1)) * sem
    return Difference(mean, mean - half, mean + half, len(d), level)
