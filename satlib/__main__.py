"""Command line: ``python -m satlib train | evaluate | runs`` (see ``--help``)."""
from __future__ import annotations

import argparse
import ast
import os
import sys

from .attacks import ATTACKS
from .config import METHODS, PRESETS, ConfigError, resolve

EXAMPLES = """examples:
  python -m satlib train --preset quick --method pgd-at            # a few minutes on a laptop CPU
  python -m satlib train --preset quick --method sat --epochs 30 --seed 1
  python -m satlib train --preset paper --method sat                # CIFAR-10, 200 epochs, GPU
  torchrun --nproc_per_node=4 -m satlib train --preset paper --method sat-trades
  python -m satlib evaluate --preset quick --method pgd-at --attacks fgsm,pgd,autoattack
  python -m satlib evaluate --preset quick --method pgd-at --attacks pgd,lafeat   # heads trained once, cached
  python -m satlib runs                                            # what the run store holds
"""


def _override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KNOB=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name.strip(), value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quick", help=f"starting configuration: {', '.join(PRESETS)} (default quick: "
                   "the bundled digits on the CPU)")
    p.add_argument("--method", default="pgd-at", help=f"training method: {', '.join(METHODS)} (default pgd-at)")
    p.add_argument("--epochs", type=int, help="number of training epochs (default: the preset's)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--eps", type=float, help="L-inf radius in [0, 1] pixel units (quick 0.2, paper 8/255)")
    p.add_argument("--device", help="auto, cpu or cuda (default auto)")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KNOB=VALUE",
                   help="any other configuration knob, e.g. --set batch_size=256 --set sat_lambda=0.05")


def _config(args: argparse.Namespace):
    knobs = dict(args.overrides)
    for name in ("method", "epochs", "seed", "eps", "device"):
        if getattr(args, name) is not None:
            knobs[name] = getattr(args, name)
    return resolve(args.preset, **knobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m satlib", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Train and evaluate the models of satbook. Runs are stored under runs/ (or $SATLIB_RUNS), "
                    "keyed by their configuration: training an existing run loads it, an interrupted one resumes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,runs}")
    p_train = sub.add_parser("train", help="train a model (or resume / reuse its stored run)",
                             description="Train one model into the run store, resuming it if it was interrupted.")
    _add_run_options(p_train)
    p_eval = sub.add_parser("evaluate", help="robust accuracy of a trained run under a list of attacks",
                            description="Evaluate a run (training it first if the store lacks it).")
    _add_run_options(p_eval)
    p_eval.add_argument("--attacks", default=",".join(ATTACKS),
                        help=f"comma-separated attacks among {', '.join(ATTACKS)}, lafeat (default: all but lafeat)")
    p_eval.add_argument("--steps", type=int,
                        help="iterations of BIM, PGD, CW and each LAFEAT restart (default: the preset's eval_steps)")
    p_eval.add_argument("--restarts", type=int, default=1, help="random restarts of PGD and CW (default 1)")
    p_eval.add_argument("--n", type=int, help="evaluate on the first N test samples (default: all)")
    sub.add_parser("runs", help="list the runs in the store", description="List the runs in the run store.")
    args = parser.parse_args(argv)

    from .data import DatasetUnavailable
    from .runs import CheckpointError, RunLocked, RunStore
    from .training import TrainingDiverged
    try:
        if args.command == "runs":
            table = RunStore().list()
            print(table.to_string(index=False) if len(table) else f"no runs under {RunStore().root}")
            return 0
        cfg = _config(args)
        if args.command == "evaluate":
            attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
            unknown = [a for a in attacks if a.lower() not in (*ATTACKS, "lafeat")]
            if unknown:
                raise ConfigError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}, lafeat.")
        from .experiments import evaluate_run, load_or_train
        trained = load_or_train(cfg)
        if os.environ.get("RANK", "0") != "0":        # under torchrun only rank 0 reports
            return 0
        if args.command == "train":
            print(trained.run.metrics().tail(1).to_string(index=False))
            print(f"run {trained.run.id} stored in {trained.run.dir}")
            return 0
        table = evaluate_run(trained, attacks, n=args.n, steps=args.steps, restarts=args.restarts, progress=True)
        print(f"run {trained.run.id} ({cfg.method}, eps={cfg.eps:.4g})")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return 0
    except (ConfigError, DatasetUnavailable, CheckpointError, RunLocked, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
