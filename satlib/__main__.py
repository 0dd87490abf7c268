"""Command line: ``python -m satlib train | evaluate | runs | audit`` (see ``--help``)."""
from __future__ import annotations

import argparse
import ast
import os
import sys
import warnings

import torch

from .attacks import ATTACKS, OUTPUT_ATTACKS
from .catalog import METHODS
from .config import PRESETS, Config, ConfigError, resolve
from .errors import SatlibError
from .runs import RunStore, runs_root

EXAMPLES = """examples:
  python -m satlib train --preset quick --method pgd-at            # a few minutes on a laptop CPU
  python -m satlib train --preset quick --method sat --epochs 30 --seed 1
  python -m satlib train --preset paper --method sat                # CIFAR-10, 200 epochs, GPU
  torchrun --nproc_per_node=4 -m satlib train --preset paper --method sat-trades
  python -m satlib evaluate --preset quick --method pgd-at --attacks fgsm,pgd,autoattack
  python -m satlib evaluate --preset quick --method pgd-at --attacks pgd,lafeat   # heads trained once, cached
  python -m satlib runs                                            # what the run store holds
  python -m satlib audit --checkpoint model.pt --model resnet18 --dataset digits --n 200   # a report folder
"""


def _override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KNOB=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name.strip(), value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit status 2), like every other error here."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help).\n")


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


def _config(args: argparse.Namespace) -> Config:
    knobs = dict(args.overrides)
    for name in ("method", "epochs", "seed", "eps", "device"):
        if getattr(args, name) is not None:
            knobs[name] = getattr(args, name)
    cfg = resolve(args.preset, **knobs)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but this machine has no usable CUDA device; use --device auto "
                          "or --device cpu.")
    return cfg


def _attacks(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a.lower() not in ATTACKS]
    if unknown or not names:
        problem = f"unknown attack(s) {unknown}" if unknown else f"--attacks {text!r} names no attack"
        raise ConfigError(f"{problem}; choose from {', '.join(ATTACKS)}.")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m satlib", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Train and evaluate the models of satbook. Runs are stored under runs/ (or $SATLIB_RUNS), "
                    "keyed by their configuration: training an existing run loads it, an interrupted one resumes. "
                    "Errors are one line on stderr and exit status 2.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,runs,audit}")
    p_train = sub.add_parser("train", help="train a model (or resume / reuse its stored run)",
                             description="Train one model into the run store, resuming it if it was interrupted.")
    _add_run_options(p_train)
    p_eval = sub.add_parser("evaluate", help="robust accuracy of a trained run under a list of attacks",
                            description="Evaluate a run (training it first if the store lacks it).")
    _add_run_options(p_eval)
    p_eval.add_argument("--attacks", default=",".join(OUTPUT_ATTACKS),
                        help=f"comma-separated attacks among {', '.join(ATTACKS)} (default: all but lafeat, whose "
                             f"heads take a while to train)")
    p_eval.add_argument("--steps", type=_positive,
                        help="iterations of BIM, PGD, CW and each LAFEAT restart (default: the preset's eval_steps)")
    p_eval.add_argument("--restarts", type=_positive, default=1, help="random restarts of PGD and CW (default 1)")
    p_eval.add_argument("--n", type=_positive, help="evaluate on the first N >= 1 test samples (default: the "
                        "eval_size knob, whose 0 means all of them)")
    sub.add_parser("runs", help="list the runs in the store",
                   description="List the runs in the run store: their state (running, interrupted, finished), the "
                               "knobs that set each apart from its preset, and their last accuracies.")
    _add_audit_parser(sub)
    return parser


def _add_audit_parser(sub) -> None:
    from .audit.measures import PRESET_OF
    p = sub.add_parser("audit", help="the book's whole evaluation of any checkpoint, as a report folder",
                       description="Audit a model's weights file: robust accuracy under the book's attacks, clustering "
                                   "accuracy by layer, feature margin and radii, gradient-masking checks. Every part is "
                                   "cached in OUT/cache, so an interrupted audit resumes when run again.")
    p.add_argument("--checkpoint", required=True, help="a state_dict saved with torch.save (it may be nested under "
                   "'state_dict' or 'model' and prefixed by 'module.' or '_orig_mod.')")
    p.add_argument("--model", required=True, help="resnet18, wrn-28-10, or package.module:factory (a function that "
                   "returns the nn.Module)")
    p.add_argument("--dataset", required=True, choices=list(PRESET_OF), help="the test split audited")
    p.add_argument("--normalize", metavar="MEAN,STD", help="the model expects (x - mean) / std; attacks still work "
                   "in [0, 1] pixel space (one MEAN,STD pair, or C means then C standard deviations)")
    p.add_argument("--eps", type=float, help="L-inf radius in [0, 1] pixel units (default: digits 0.2, else 8/255)")
    p.add_argument("--n", type=_positive, help="audit the first N test samples (default: all)")
    p.add_argument("--out", help="report folder (default: audit-<checkpoint name>)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated attacks among {', '.join(ATTACKS)}")
    p.add_argument("--steps", type=_positive, help="iterations of BIM, PGD, CW and LAFEAT (default: digits 50, else 100)")
    p.add_argument("--restarts", type=_positive, help="random restarts of PGD and CW (default: digits 1, as "
                   "satlib evaluate, else 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of every attack, as satlib evaluate's --seed (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto")


def _audit(args: argparse.Namespace) -> int:
    from .audit import audit
    from .audit.loading import file_digest, load_model, parse_normalize
    from .catalog import DATASETS
    from .training import resolve_device
    info = DATASETS[args.dataset]
    normalization = None if args.normalize is None else parse_normalize(args.normalize, info.channels)
    attacks = _attacks(args.attacks)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but this machine has no usable CUDA device; use --device auto.")
    model = load_model(args.checkpoint, args.model, info).to(resolve_device(args.device))
    out = args.out or f"audit-{os.path.splitext(os.path.basename(args.checkpoint))[0]}"
    about = {"checkpoint": args.checkpoint, "sha256": file_digest(args.checkpoint), "model": args.model}
    audit(model, args.dataset, eps=args.eps, n=args.n, steps=args.steps, restarts=args.restarts, attacks=attacks,
          seed=args.seed, normalization=normalization, out=out, about=about, progress=True)
    print(f"report written to {os.path.join(out, 'report.md')} (and report.html, CSVs, summary.json)")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return _run(args)
        except SatlibError as err:
            print(f"error: {err}", file=sys.stderr)
        except RuntimeError as err:                 # weights of another architecture in the run's files
            if "state_dict" not in str(err):
                raise
            text = str(err).lower()
            kinds = ", ".join(k for k in ("missing key(s)", "unexpected key(s)", "size mismatch") if k in text)
            cfg = _config(args)
            print(f"error: the weights stored for run {cfg.run_id()} in {runs_root() / cfg.run_id()} do not fit "
                  f"its {cfg.model} model ({kinds or 'state_dict mismatch'}); move that folder away to train the run "
                  f"again.", file=sys.stderr)
        except OSError as err:
            print(f"error: {err}.", file=sys.stderr)
        except KeyboardInterrupt:
            print("error: interrupted; run the same command again to resume from the last checkpoint.",
                  file=sys.stderr)
            return 130
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "runs":
        store = RunStore()
        table = store.list()
        print(table.to_string(index=False) if len(table) else f"no runs under {store.root}")
        return 0
    if args.command == "audit":
        return _audit(args)
    cfg = _config(args)
    attacks = _attacks(args.attacks) if args.command == "evaluate" else []
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


if __name__ == "__main__":
    sys.exit(main())
