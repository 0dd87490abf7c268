"""``satlib audit``: the book's whole evaluation of one model, as a report (Chapters 1, 2, 4, 5 and 6).

``audit(model, dataset)`` measures robust accuracy under the book's attacks with the per-sample worst
case, clustering accuracy per residual block clean and under PGD and LAFEAT, the feature margin with
certified and empirical radii, and the gradient-masking checks (``measures``), and with ``out`` keeps
every part as it is computed and writes the report there (``report``). ``python -m satlib audit``
loads a checkpoint for it (``loading``). A model the book trained is audited the same way as any
other: its numbers equal ``satlib evaluate``'s for the same attacks, steps, restarts and seed.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import nn

from ..artifacts import Artifacts
from ..attacks import ATTACKS, fingerprint
from ..data import ArrayDataset, holdout, load
from ..evaluation import evaluation_batch_size
from . import measures
from .loading import AuditError, load_weights, normalize

RADIUS_SAMPLES = 100   # test samples whose radii are bisected (the most expensive measure after AutoAttack)


@dataclass
class AuditResult:
    """Every table of an audit; ``notes`` says what was skipped and why."""

    settings: dict
    accuracy: pd.DataFrame
    correct: pd.DataFrame
    clustering: pd.DataFrame | None = None
    radii: pd.DataFrame | None = None
    sweep: pd.DataFrame | None = None
    checks: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def audit(model: nn.Module, dataset: str, *, eps: float | None = None, n: int | None = None,
          steps: int | None = None, restarts: int | None = None, attacks: Sequence[str] = ATTACKS, seed: int = 0,
          normalization: tuple[Sequence[float], Sequence[float]] | None = None, train: ArrayDataset | None = None,
          head_epochs: int | None = None, radius_samples: int = RADIUS_SAMPLES, out: str | Path | None = None,
          about: dict | None = None, progress: bool = False) -> AuditResult:
    """Audit ``model`` on the test split of ``dataset`` (its first ``n`` samples; all by default).

    ``eps``, ``steps`` and ``restarts`` (of PGD and CW-inf) default to the dataset's preset (digits:
    ``quick``, 50 steps and one restart, as ``satlib evaluate``; else the paper's, 100 steps and five
    restarts); ``seed`` seeds every attack as ``satlib evaluate`` seeds a run's. ``normalization`` =
    (mean, std) per channel for a model that expects normalised inputs: the audit feeds it
    ``(x - mean) / std`` and attacks in [0, 1] pixel space. LAFEAT's heads learn on
    ``train`` (default: the training split less the preset's validation images, the images the
    book's runs train on) for ``head_epochs`` (default: the authors' 100). Radii are
    bisected on the first ``radius_samples`` test samples. With ``out``, every part is kept in
    ``out/cache/<model hash>`` as soon as it is computed (a rerun reads it) and the report is written
    to ``out``; ``about`` adds lines to its settings (the checkpoint, say). The model is evaluated in
    eval mode.

    The robust accuracies come from ``satlib.evaluation.correctness`` and ``summarize``, the very
    functions behind ``satlib.evaluation.evaluate`` (and so Chapter 5's Table 1 and ``satlib
    evaluate``), with the attacks built by ``satlib.attacks.make_attack`` and seeded the same way: the
    book and the audit cannot drift apart (``tests/test_audit.py`` checks the numbers are equal).
    """
    model.eval()
    device = next(model.parameters()).device
    preset = measures.defaults(dataset)
    eps, steps = preset["eps"] if eps is None else eps, preset["steps"] if steps is None else steps
    restarts = preset["restarts"] if restarts is None else restarts
    test = load(dataset, "test")
    test = (test.subset(n) if n else test).to(device)
    settings = dict(about or {}, dataset=dataset, eps=eps, steps=steps, restarts=restarts, seed=seed, n=len(test),
                    attacks=list(attacks), normalization=normalization, radius_samples=radius_samples)

    def train_split() -> ArrayDataset:
        return (holdout(load(dataset, "train"), preset["val_size"])[0] if train is None else train).to(device)

    handle, stretch = (None, 1.0) if normalization is None else normalize(model, *normalization)
    try:
        store = None if out is None else Artifacts(Path(out) / "cache" / _model_key(model, dataset, normalization))
        result = _measure(model, test, train_split, settings, store=store, stretch=stretch, head_epochs=head_epochs,
                          progress=progress)
    finally:
        if handle is not None:
            handle.remove()
    if out is not None:
        from .report import write_report
        write_report(result, Path(out))
    return result


def _measure(model: nn.Module, test: ArrayDataset, train, settings: dict, *, store, stretch: float,
             head_epochs: int | None, progress: bool) -> AuditResult:
    eps, seed = settings["eps"], settings["seed"]
    size = evaluation_batch_size(model, test.x)
    heads = measures.heads_for(model, train, seed=seed, store=store, epochs=head_epochs)
    attacks = measures.book_attacks(settings["attacks"], eps=eps, steps=settings["steps"],
                                    restarts=settings["restarts"], seed=seed, heads=heads, store=store)
    table, correct = measures.robust_accuracy(model, test, attacks, seed=seed, store=store, batch_size=size,
                                              progress=progress)
    result = AuditResult(settings, table, correct)
    if measures.has_blocks(model):
        under = {"clean": None, **{a: attacks[a] for a in measures.UNDER if a in attacks}}
        result.clustering = measures.clustering(model, train, test, under, store=store, batch_size=size)
    else:
        result.notes.append("clustering accuracy skipped: satlib cannot name the layers of this architecture "
                            "(it knows the residual blocks of ResNet-18 and WRN-28-10)")
    if measures.has_linear_head(model):
        result.radii = _radii(model, test.subset(settings["radius_samples"]), result.notes, eps=eps, seed=seed,
                              stretch=stretch, store=store)
    else:
        result.notes.append("feature margin and radii skipped: the model has no last linear layer named 'linear' "
                            "(Theorem 2, Chapter 6)")
    if {"FGSM", "BIM", "PGD"} <= set(table["attack"]):
        result.sweep, result.checks = measures.checks(model, test, table, eps=eps, seed=seed, store=store,
                                                      batch_size=size)
        result.notes.append("the transfer check of gradient masking needs a second model; it is skipped")
    else:
        result.notes.append("gradient-masking checks skipped: they need the FGSM, BIM and PGD columns")
    return result


def _radii(model: nn.Module, data: ArrayDataset, notes: list[str], *, eps: float, seed: int, stretch: float,
           store) -> pd.DataFrame:
    try:
        lip = measures.lipschitz(model, tuple(data.x.shape[1:]), stretch=stretch)
    except (TypeError, ValueError) as err:
        lip = None
        notes.append(f"certified radii skipped: the Lipschitz rules of satlib.bound do not cover this model ({err})")

    def compute() -> pd.DataFrame:
        return measures.radii(model, data, eps=eps, lip=lip, seed=seed)

    name = f"radii-{measures.key(eps, seed, data.name, len(data), lip and lip.inf_to_2)}"
    return compute() if store is None else store.cached_frame(name, compute, columns=("rho", "empirical"))


def _model_key(model: nn.Module, dataset: str, normalization) -> str:
    """The identity of what is audited: the architecture, every weight, the normalisation and the dataset."""
    nothing = torch.zeros(0)
    return fingerprint(model, nothing, nothing, repr((str(model), dataset, normalization)))


class _CallableModule(types.ModuleType):
    """Lets ``satlib.audit(model, dataset, ...)`` call ``audit`` while ``satlib.audit.loading`` stays a module."""

    def __call__(self, *args, **kwargs) -> AuditResult:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["AuditError", "AuditResult", "audit", "load_weights"]
