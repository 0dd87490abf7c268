"""The fair comparison of Chapter 5: which runs it needs, trained at once, and Table 1 over them.

``Comparison(cfg, seeds)`` names every run of the chapter by a short key:

- ``(method, seed)`` for each defence of Table 1 on each seed, with the method's tuned values;
- ``("pgd-at (released steps)", seed)``: PGD-AT with 7/10 of the training attack's steps, the ratio
  of the released code (7 for PGD-AT against 10 for SAT), on every seed;
- ``("beta", form, value)``: SAT on the first seed with another clustering loss and weight;
- ``("sat, attack only", seed)`` (beta = 0) and ``("sat, L_Cluster only", seed)`` (lambda = 0).

``load_or_train`` trains whatever the run store lacks, in parallel processes; ``table`` evaluates a
list of runs with the same seeded attacks (``satlib.experiments.evaluate_many``) and returns the
per-seed rows of ``satlib.report.table1``.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import pandas as pd

from .config import Config
from .experiments import Trained, evaluate_many, load_or_train_many
from .report.table1 import per_seed

TABLE_METHODS = ("pgd-at", "trades", "mart", "awp-at", "sat", "sat-trades", "sat-awp-at")
RELEASED = "pgd-at (released steps)"
BASELINES = {"sat": "pgd-at", "sat-trades": "trades", "sat-awp-at": "awp-at"}
BETA_STUDY = (("paper", 0.1), ("code", 0.1), ("code", 1.0))
HALVES = {"sat, attack only": dict(sat_beta=0.0), "sat, L_Cluster only": dict(sat_lambda=0.0)}


def released_steps(cfg: Config) -> int:
    """PGD-AT's training-attack steps at the released code's ratio to SAT's (7 to 10)."""
    return max(1, round(cfg.attack_steps * 7 / 10))


class Comparison:
    """The runs of Chapter 5 around ``cfg`` on ``seeds`` (see the module docstring)."""

    def __init__(self, cfg: Config, seeds: Sequence[int]):
        self.cfg, self.seeds = cfg, list(seeds)
        s0 = self.seeds[0]
        self.cfgs: dict[Hashable, Config] = {(m, s): cfg.replace(method=m, seed=s) for m in TABLE_METHODS
                                             for s in self.seeds}
        self.cfgs.update({(RELEASED, s): cfg.replace(method="pgd-at", seed=s, attack_steps=released_steps(cfg))
                          for s in self.seeds})
        sat = self.cfgs[("sat", s0)]
        self.cfgs.update({("beta", form, beta): sat.replace(sat_cluster_form=form, sat_beta=beta)
                          for form, beta in BETA_STUDY})
        self.cfgs.update({(half, s): self.cfgs[("sat", s)].replace(**change) for half, change in HALVES.items()
                          for s in self.seeds})
        self.trained: dict[Hashable, Trained] = {}

    def load_or_train(self) -> dict[Hashable, Trained]:
        """Every run, trained where the store lacks it (in parallel processes on a CPU)."""
        self.trained = dict(zip(self.cfgs, load_or_train_many(list(self.cfgs.values()))))
        return self.trained

    def table_keys(self, *, released: bool = True, halves: bool = False) -> list[tuple[str, int]]:
        """The (row, seed) keys of Table 1, optionally with the released-steps row and SAT's halves."""
        rows = list(TABLE_METHODS) + ([RELEASED] if released else []) + (list(HALVES) if halves else [])
        return [(r, s) for r in rows for s in self.seeds]

    def table(self, keys: Sequence[tuple[str, int]], attacks: Sequence[str] | Sequence[Sequence[str]], *,
              steps: int | None = None) -> pd.DataFrame:
        """Per-seed accuracies (%) of ``keys`` under ``attacks`` (one list, or one list per key)."""
        frames = evaluate_many([self.trained[k] for k in keys], attacks, steps=steps)
        return per_seed(dict(zip(keys, frames)))
