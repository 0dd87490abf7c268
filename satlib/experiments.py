"""One orchestration layer shared by the chapters and the CLI: load a finished run or train it, evaluate it.

``load_or_train(cfg)`` returns a ``Trained`` bundle: the run (its folder, metrics, cached artifacts),
the model in eval mode on the chosen device, and the test set. ``evaluate_run`` computes the book's
robust-accuracy table once and caches it in the run's artifacts.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from torch import nn

from .attacks import OUTPUT_ATTACKS, Attack, fit_heads, make_attack
from .attacks.lafeat_heads import HEAD_DEFAULTS
from .config import Config
from .data import ArrayDataset, load
from .evaluation import evaluate
from .progress import bar
from .runs import Run, RunStore
from .training import model_for, resolve_device, train
from .training.trainer import training_data


GPU_WORKERS = 4      # processes that train or evaluate small runs side by side on one GPU


@dataclass
class Trained:
    """A finished run with its model loaded: the last epoch's weights, or the best epoch's by validation
    PGD accuracy (``weights="best"``; Chapter 5, "Robust overfitting")."""

    cfg: Config
    run: Run
    model: nn.Module
    device: torch.device
    weights: str = "last"

    def test_set(self, n: int | None = None) -> ArrayDataset:
        """The test split (its first ``n`` samples; default ``cfg.eval_size``, 0 meaning all) on the device."""
        n = self.cfg.eval_size if n is None else n
        data = load(self.cfg.dataset, "test")
        return (data.subset(n) if n else data).to(self.device)

    def train_set(self) -> ArrayDataset:
        """The images the model was trained on (the training split less the validation images)."""
        return training_data(self.cfg)[0].to(self.device)

    def val_set(self) -> ArrayDataset:
        """The validation images held out of the training split (``cfg.val_size``)."""
        return training_data(self.cfg)[1].to(self.device)

    def snapshot(self, epoch: int) -> nn.Module:
        """The model as it was after ``epoch`` (from the run's snapshots), in eval mode."""
        model = model_for(self.cfg, self.device)
        model.load_state_dict(self.run.load_snapshot(epoch))
        return model.eval()


def load_or_train(cfg: Config, *, store: RunStore | None = None, progress: bool = True,
                  weights: str = "last") -> Trained:
    """The finished run of ``cfg``: loaded from the store, or trained (and resumed) now.

    ``weights``: ``"last"`` (the final epoch's) or ``"best"`` (the epoch with the best validation PGD accuracy).
    """
    run = train(cfg, store=store, progress=progress)
    device = resolve_device(cfg.device)
    model = model_for(cfg, device)
    model.load_state_dict(run.load_model_state(weights))
    if cfg.channels_last and device.type == "cuda":       # faster convolutions for every attack on it
        model = model.to(memory_format=torch.channels_last)
    return Trained(cfg, run, model.eval(), device, weights)


def load_or_train_many(cfgs: Sequence[Config], *, store: RunStore | None = None, workers: int | None = None,
                       progress: bool = True) -> list[Trained]:
    """``load_or_train`` for several configurations, training the missing ones in parallel processes.

    On a CPU the small models of the ``quick`` preset are bound by per-operation overhead, so two
    single-threaded processes train about 1.6x faster than one process with two threads (measured on
    2 cores). A small model leaves a GPU mostly idle too, so up to ``GPU_WORKERS`` processes share one.
    """
    store = store or RunStore()
    missing = [c for c in cfgs if not store.run(c).finished]
    if workers is None:
        on_gpu = any(resolve_device(c.device).type == "cuda" for c in missing)
        workers = min(len(missing), GPU_WORKERS if on_gpu else os.cpu_count() or 1)
    if len(missing) > 1 and workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            jobs = [pool.submit(_train_quietly, c, str(store.root)) for c in missing]
            for job in bar(jobs, desc="training runs", enabled=progress):
                job.result()
    return [load_or_train(c, store=store, progress=progress) for c in cfgs]


def _train_quietly(cfg: Config, root: str) -> str:
    return train(cfg, store=RunStore(root), progress=False).id


def evaluate_many(trained: Sequence[Trained], attacks: Sequence[str] | Sequence[Sequence[str]] = OUTPUT_ATTACKS, *,
                  n: int | None = None, steps: int | None = None, restarts: int = 1, workers: int | None = None,
                  progress: bool = True) -> list[pd.DataFrame]:
    """``evaluate_run`` for several runs (Chapter 5's Table 1), computed in parallel processes on a CPU.

    ``attacks`` is one list of attack names for every run, or one list per run. Each attack is
    seeded with its run's seed, so a cached column does not depend on which process computed it or
    in which order. Workers find finished evaluations in the runs' caches and skip them; with
    ``workers`` = 1 the runs are evaluated one after the other in this process.
    """
    per_run = ([list(attacks)] * len(trained) if not attacks or isinstance(attacks[0], str)
               else [list(a) for a in attacks])
    if len(per_run) != len(trained):
        raise ValueError(f"got {len(per_run)} attack lists for {len(trained)} runs")
    if workers is None:
        on_gpu = any(t.device.type == "cuda" for t in trained)
        workers = min(len(trained), GPU_WORKERS if on_gpu else os.cpu_count() or 1)
    if len(trained) > 1 and workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        order = sorted(range(len(trained)), key=lambda i: ("autoattack" not in per_run[i], -len(per_run[i])))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            jobs = [pool.submit(_evaluate_quietly, trained[i].cfg, str(trained[i].run.dir.parent), per_run[i], n,
                                steps, restarts) for i in order]
            for job in bar(jobs, desc="evaluating runs", enabled=progress):
                job.result()
    return [evaluate_run(t, names, n=n, steps=steps, restarts=restarts) for t, names in zip(trained, per_run)]


def _evaluate_quietly(cfg: Config, root: str, attacks: list[str], n: int | None, steps: int | None,
                      restarts: int) -> None:
    evaluate_run(load_or_train(cfg, store=RunStore(root), progress=False), attacks, n=n, steps=steps,
                 restarts=restarts)


def evaluate_run(trained: Trained, attacks: Sequence[str] = OUTPUT_ATTACKS, *, n: int | None = None,
                 steps: int | None = None, restarts: int = 1, progress: bool = False) -> pd.DataFrame:
    """Table-1 row of a run: clean, each attack and the worst case; each attack seeded with the run's
    seed and its per-sample results cached in the run's artifacts (``satlib.evaluation.evaluate``)."""
    cfg = trained.cfg
    steps = cfg.eval_steps if steps is None else steps
    built = {a.name: a for a in (attack_for(trained, name, steps=steps, restarts=restarts) for name in attacks)}
    return evaluate(trained.model, trained.test_set(n), built, progress=progress, seed=cfg.seed, tag=trained.weights,
                    cache=trained.run)


def attack_for(trained: Trained, name: str, *, steps: int | None = None, restarts: int = 1, **options) -> Attack:
    """The attack ``name`` (``satlib.attacks.ATTACKS``) on a run, with the run's eps and seed (``make_attack``).

    LAFEAT gets the run's heads and keeps its adversarial examples in the run's artifacts, so that an
    accuracy table, clustering accuracy and feature shifts of one test set share one attack run, in
    any process (``lafeat_for`` says which ``options`` it takes). ``steps`` defaults to ``cfg.eval_steps``.
    """
    cfg = trained.cfg
    steps = cfg.eval_steps if steps is None else steps
    if name.lower() == "lafeat":
        options = _lafeat_inputs(trained, **options)
    return make_attack(name, eps=cfg.eps, steps=steps, restarts=restarts, seed=cfg.seed, **options)


def _lafeat_inputs(trained: Trained, layers: Sequence[str] | None = None, **options) -> dict:
    """LAFEAT's options for a run: its heads, fitted on the run's training set, and its adversarial examples,
    both kept in the run's artifacts."""
    suffix = "" if trained.weights == "last" else f"-{trained.weights}"      # the best epoch's heads kept apart
    head_options = {k: options.pop(k) for k in list(options) if k in HEAD_DEFAULTS}

    def heads():
        return fit_heads(trained.model, trained.train_set, layers, seed=trained.cfg.seed, **head_options,
                         cache=lambda name, compute: trained.run.cached_tensors(name + suffix, compute))

    return {**options, "heads": heads, "store": trained.run}


def lafeat_for(trained: Trained, *, steps: int | None = None, layers: Sequence[str] | None = None,
               **options) -> Attack:
    """LAFEAT (Chapter 4) on a run: its heads trained once on the run's training set and cached in its artifacts.

    ``layers`` (default: the penultimate residual block, the authors' choice) and the head options of
    ``satlib.attacks.fit_heads`` (``epochs``, ``lr``, ``min_lr``, ``batch_size``, ``weight_decay``,
    ``hidden``, ``pool``, ``activation``, ``target``; the authors' values by default) name the cached
    heads; the remaining ``options`` go to ``LAFEAT`` (``betas``, ``momentum``, ``step_scale``,
    ``start``, ``memo``). ``steps`` defaults to ``cfg.eval_steps``. Its adversarial examples are kept in
    the run's artifacts too, so every attack object built with the same arguments shares them.
    """
    return attack_for(trained, "lafeat", steps=steps, layers=layers, **options)
