"""The two studies behind Chapter 5's comparison, run outside the book and committed as data.

``tuning``: every defence gets the same compute budget and the same small tuning budget. On the
quick preset each method trains for the preset's epochs with a cosine learning-rate schedule, on a
grid of learning rates and of the method's own weight (``GRID``); each point is scored by PGD
accuracy on the validation images held out of the training split, never on the test set. The
combinations take their base method's chosen weight (SAT-TRADES TRADES' beta, SAT-AWP-AT AWP's
gamma) and tune their own. SAT's lambda comes from the paper's greedy search on the chosen PGD-AT
model (``satlib.lambda_search``), before the SAT variants are tuned. The chosen values become
``satlib.config.TUNED``.

``long_training``: PGD-AT and SAT trained far longer (200 epochs) on several seeds, each evaluated
with its last weights and its best epoch's (by validation PGD accuracy), to test whether training
length, through robust overfitting, changes SAT's standing.

    python -m satlib.studies tuning --out data/tuning_quick.csv
    python -m satlib.studies long-training --epochs 200 --seeds 0 1 2 --out data/long_training_quick.csv
"""
from __future__ import annotations

import argparse
import itertools
from typing import Sequence

import pandas as pd
import torch

from .attacks import PGD
from .config import Config, resolve
from .evaluation import correct_mask
from .experiments import evaluate_many, lafeat_for, load_or_train, load_or_train_many
from .lambda_search import search_lambda

LEARNING_RATES = (0.02, 0.05, 0.1)
GRID: dict[str, dict[str, tuple[float, ...]]] = {
    "pgd-at": {},
    "trades": {"trades_beta": (1.0, 3.0, 6.0)},
    "mart": {"mart_beta": (1.0, 3.0, 5.0)},
    "awp-at": {"awp_gamma": (0.0025, 0.005, 0.01)},
    "sat": {"sat_beta": (0.001, 0.003, 0.01)},
    "sat-trades": {"sat_beta": (0.001, 0.003, 0.01)},
    "sat-awp-at": {"sat_beta": (0.001, 0.003, 0.01)},
}
INHERITS = {"sat-trades": ("trades", "trades_beta"), "sat-awp-at": ("awp-at", "awp_gamma")}
SCORE_STEPS = 10          # PGD iterations of the validation score
LONG_ATTACKS = ("pgd", "cw", "lafeat")


def validation_score(cfg: Config, trained) -> dict[str, float]:
    """Clean and PGD-``SCORE_STEPS`` accuracy of the final weights on the validation images (seeded)."""
    val = trained.val_set()
    torch.manual_seed(cfg.seed)
    return {"val_clean": correct_mask(trained.model, val).float().mean().item(),
            "val_pgd": correct_mask(trained.model, val, PGD(cfg.eps, steps=SCORE_STEPS)).float().mean().item()}


def grid_configs(base: Config, method: str, fixed: dict) -> list[Config]:
    """The grid points of ``method``: every learning rate times every value of its weight."""
    knobs = GRID[method]
    values = list(itertools.product(*knobs.values())) or [()]
    return [base.replace(method=method, schedule="cosine", lr=lr, **fixed, **dict(zip(knobs, v)))
            for lr in LEARNING_RATES for v in values]


def tuning(preset: str = "quick", *, seed: int = 0, methods: Sequence[str] = tuple(GRID), **overrides) -> pd.DataFrame:
    """Run the protocol of the module docstring; one row per grid point, the chosen ones flagged.

    ``overrides`` change the base configuration of every point (for a smaller smoke run).
    """
    base = resolve(preset, seed=seed, **overrides)
    rows, chosen = [], {}

    def run_grid(method: str, fixed: dict) -> None:
        cfgs = grid_configs(base, method, fixed)
        knob = next(iter(GRID[method]), "")
        points = [{"method": method, "lr": cfg.lr, "knob": knob, "value": getattr(cfg, knob) if knob else None,
                   **fixed, **validation_score(cfg, trained), "chosen": False}
                  for cfg, trained in zip(cfgs, load_or_train_many(cfgs, progress=False))]
        best = max(points, key=lambda p: p["val_pgd"])     # ties: the first, i.e. the smallest lr and weight
        best["chosen"] = True
        chosen[method] = {"schedule": "cosine", "lr": best["lr"], **fixed, **({knob: best["value"]} if knob else {})}
        rows.extend(points)

    for method in [m for m in methods if m in GRID and not GRID[m].keys() & {"sat_beta"}]:
        run_grid(method, {})
    if any(GRID[m].keys() & {"sat_beta"} for m in methods):
        pgd_at = load_or_train(base.replace(method="pgd-at", **chosen["pgd-at"]), progress=False)
        search, _ = search_lambda(pgd_at.model, pgd_at.val_set(), ola=PGD(base.eps, steps=base.eval_steps),
                                  ila=lafeat_for(pgd_at), eps=base.eps, steps=base.eval_steps, seed=seed)
        for method in [m for m in methods if GRID[m].keys() & {"sat_beta"}]:
            inherited = {knob: chosen[parent][knob] for parent, knob in [INHERITS[method]]} if method in INHERITS else {}
            run_grid(method, {"sat_lambda": search.lam, **inherited})
    return pd.DataFrame(rows)


def long_training(preset: str = "quick", *, seeds: Sequence[int] = (0, 1, 2),
                  methods: Sequence[str] = ("pgd-at", "sat"), **overrides) -> pd.DataFrame:
    """Per method, seed and weights (last, best): clean, PGD, CW-inf, LAFEAT and worst-case test accuracy.

    ``overrides`` (``epochs=200`` for the study) change every run's configuration.
    """
    cfgs = [resolve(preset, method=m, seed=s, **overrides) for m in methods for s in seeds]
    last = load_or_train_many(cfgs, progress=False)
    best = [load_or_train(c, weights="best", progress=False) for c in cfgs]
    frames = evaluate_many([*last, *best], list(LONG_ATTACKS))
    rows = []
    for trained, frame in zip([*last, *best], frames):
        acc = frame.set_index("attack")["accuracy"]
        rows.append({"method": trained.cfg.method, "seed": trained.cfg.seed, "weights": trained.weights,
                     "epochs": trained.cfg.epochs, "best_epoch": trained.run.status.get("best_epoch"), **acc.to_dict()})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m satlib.studies", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="study", required=True)
    p_tune = sub.add_parser("tuning", help="the tuning grid of every defence")
    p_long = sub.add_parser("long-training", help="PGD-AT and SAT trained for many epochs, last and best weights")
    p_long.add_argument("--epochs", type=int, default=200)
    p_long.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for p in (p_tune, p_long):
        p.add_argument("--preset", default="quick")
        p.add_argument("--out", required=True, help="CSV file to write")
    args = parser.parse_args(argv)
    frame = (tuning(args.preset) if args.study == "tuning"
             else long_training(args.preset, epochs=args.epochs, seeds=args.seeds))
    frame.to_csv(args.out, index=False, float_format="%.4f")
    print(frame.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
