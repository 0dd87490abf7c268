"""Class centroids of intermediate features and clustering accuracy (Definition 1 / Eq. 2, Chapter 2).

The clustered label of a sample at layer ``l`` is the class whose training centroid ``mu_k^l`` is
*nearest* to ``f^l(x)`` (arg min; the paper prints arg max: the book's errata appendix,
``errata-argmin``). Centroids come from clean training features; the evaluated sample may be clean or
attacked. Features of the early layers are large (65,536 dimensions for ResNet-18's first stage on
CIFAR-10), so centroids are accumulated as per-class sums over batches (memory O(classes x dims),
never O(samples x dims)) and distances are computed batch by batch.

Per-epoch analyses (the bars of Figure 2 at several epochs): ``clustering_by_epoch`` works on a
finished run's weight snapshots and caches centroids and accuracies in the run store;
``clustering_callback`` records the same numbers while training, as a trainer callback.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from .attacks import Attack, attack_mode
from .data import ArrayDataset
from .batching import batches
from .models import FeatureTap, conv_layers
from .progress import bar

NORMS = {"l1": 1.0, "l2": 2.0, "linf": float("inf")}


def class_centroids(model: nn.Module, data: ArrayDataset, layers: Sequence[str], *,
                    batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Per-layer [classes, d_l] centroids of clean features over ``data``, streamed batch by batch.

    ``layers`` are ``FeatureTap`` names: ``"linear:input"`` gives the class means of the features the
    last linear layer reads (mu_y of Chapter 6).
    """
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(data.num_classes, device=device, dtype=torch.float64)
    with attack_mode(model), torch.no_grad(), FeatureTap(model, layers) as tap:
        for x, y in batches(data, batch_size, shuffle=False):
            y = y.to(device)
            model(x.to(device))
            onehot = torch.nn.functional.one_hot(y, data.num_classes).double()
            counts += onehot.sum(0)
            for l in layers:
                part = onehot.T @ tap.flat(l).double()
                sums[l] = part if l not in sums else sums[l] + part
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no samples in the data; their centroids are undefined")
    return {l: (s / counts[:, None]).float() for l, s in sums.items()}


def clustered_labels(features: torch.Tensor, centroids: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """arg min_k ||f - mu_k||_p for each row of ``features`` [B, d] (Eq. 2 with arg min)."""
    return torch.cdist(features.float(), centroids.float(), p=NORMS[norm]).argmin(1)


def clustering_accuracy(model: nn.Module, data: ArrayDataset, centroids: dict[str, torch.Tensor], *,
                        attack: Attack | None = None, norms: Sequence[str] = ("l2",),
                        batch_size: int = 500) -> pd.DataFrame:
    """Clustering accuracy of every layer in ``centroids`` (all at once), clean or under ``attack``.

    Returns a tidy frame: ``layer``, ``norm``, ``clu_acc``, plus ``acc`` (the classification accuracy
    on the same, possibly attacked, inputs) so the two can be plotted together (Figure 2).
    """
    device = next(model.parameters()).device
    layers = list(centroids)
    hits = {(l, n): 0 for l in layers for n in norms}
    correct = 0
    with FeatureTap(model, layers) as tap:
        for x, y in batches(data, batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            if attack is not None:
                x = attack(model, x, y)
            with attack_mode(model), torch.no_grad():
                correct += (model(x).argmax(1) == y).sum().item()
                for l in layers:
                    for n in norms:
                        hits[(l, n)] += (clustered_labels(tap.flat(l), centroids[l].to(device), n) == y).sum().item()
    total = len(data)
    return pd.DataFrame([{"layer": l, "norm": n, "clu_acc": hits[(l, n)] / total, "acc": correct / total}
                         for l in layers for n in norms])


def stage_of(layer: str) -> str:
    """The stage a layer belongs to, for colouring Figure 2: ``layer2.1.conv1`` -> ``layer2``; ``conv1`` -> ``stem``."""
    return layer.split(".", 1)[0] if "." in layer else "stem"


def clustering_report(model: nn.Module, train: ArrayDataset, test: ArrayDataset, layers: Sequence[str] | None = None,
                      *, attack: Attack | None = None, norms: Sequence[str] = ("l2",), batch_size: int = 500,
                      centroids: dict[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """Definition 1 end to end: centroids of clean ``train`` features, clustering accuracy on ``test``.

    ``layers`` defaults to every conv layer (``conv_layers(model)``, the x-axis of Figure 2). Returns the
    tidy frame of ``clustering_accuracy`` with ``depth`` (1-based position of the layer) and ``stage``.
    Pass ``centroids`` to reuse ones computed before.
    """
    layers = list(conv_layers(model) if layers is None else layers)
    if centroids is None:
        centroids = class_centroids(model, train, layers, batch_size=batch_size)
    frame = clustering_accuracy(model, test, {l: centroids[l] for l in layers}, attack=attack, norms=norms,
                                batch_size=batch_size)
    frame.insert(1, "depth", frame["layer"].map({l: i + 1 for i, l in enumerate(layers)}))
    frame.insert(2, "stage", frame["layer"].map(stage_of))
    return frame


def _key(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10]


def clustering_by_epoch(trained, epochs: Sequence[int] | None = None, *, layers: Sequence[str] | None = None,
                        attack: Attack | None = None, attack_name: str | None = None,
                        norms: Sequence[str] = ("l2",), n: int | None = None, batch_size: int = 500,
                        progress: bool = False) -> pd.DataFrame:
    """Centroids and clustering accuracy of a run after each chosen epoch (Figure 2), cached in the run store.

    ``trained`` is a finished run with its model, as ``satlib.experiments.load_or_train`` returns it
    (anything with ``.run``, ``.cfg``, ``.model``, ``.snapshot(epoch)``, ``.train_set()`` and
    ``.test_set(n)``). ``epochs`` defaults to the run's weight snapshots (the config knob
    ``snapshot_epochs``); the last epoch is always available from the final weights. For each epoch the
    centroids of clean training features are kept as ``artifacts/centroids-...pt`` and the accuracies as
    ``artifacts/clustering-...csv``, keyed by every parameter of the analysis, so a second call (another
    chapter, the book build) reads them instead of recomputing. Attacks draw their random starts from a
    generator seeded with the run's seed, so the cached numbers are reproducible.

    Returns a tidy frame: ``epoch``, ``layer``, ``depth``, ``stage``, ``norm``, ``clu_acc``, ``acc``
    (classification accuracy of that epoch's model on the same inputs) and ``attack`` (``clean`` or
    the attack's name).
    """
    run, cfg = trained.run, trained.cfg
    available = sorted(set(run.snapshot_epochs()) | {cfg.epochs})
    epochs = available if epochs is None else [int(e) for e in epochs]
    missing = [e for e in epochs if e not in available]
    if missing:
        raise ValueError(f"run {run.id} kept no weights after epoch(s) {missing}; available epochs are {available} "
                         f"(the config knob snapshot_epochs chooses them).")
    layers = list(conv_layers(trained.model) if layers is None else layers)
    norms = list(norms)
    name = "clean" if attack is None else (attack_name or attack.name)
    train, test = trained.train_set(), trained.test_set(n)
    centroid_key = _key(layers, len(train))
    frame_key = _key(layers, norms, repr(attack), name, len(train), len(test), cfg.seed)
    frames = []
    for epoch in bar(epochs, desc=f"clustering {run.id}", enabled=progress):
        model = trained.model if epoch == cfg.epochs else trained.snapshot(epoch)

        def centroids(model=model):
            return class_centroids(model, train, layers, batch_size=batch_size)

        def compute(model=model, epoch=epoch):
            mus = run.cached_tensors(f"centroids-epoch{epoch:03d}-{len(layers)}layers-n{len(train)}-{centroid_key}",
                                     centroids)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                frame = clustering_report(model, train, test, layers, attack=attack, norms=norms,
                                          batch_size=batch_size, centroids=mus)
            frame.insert(0, "epoch", epoch)
            frame["attack"] = name
            return frame

        label = f"{name}-{'+'.join(norms)}-{len(layers)}layers-n{len(test)}"
        frames.append(run.cached_frame(f"clustering-epoch{epoch:03d}-{label}-{frame_key}", compute))
    return pd.concat(frames, ignore_index=True)


def clustering_callback(train: ArrayDataset, *, epochs: Sequence[int] | None = None,
                        layers: Sequence[str] | None = None, norms: Sequence[str] = ("l2",),
                        test: ArrayDataset | None = None, attack: Attack | None = None, batch_size: int = 500):
    """A trainer callback (``train(cfg, callbacks=[...])``) recording clustering accuracy during training.

    After each of ``epochs`` (default: every epoch) it computes centroids on ``train`` and clustering
    accuracy on ``test`` (default: the trainer's validation images) and returns them as extra per-epoch
    metrics named ``clu_acc/<layer>/<norm>``, stored in the run's ``metrics.json``. The callback only
    reads ``epoch``, ``model`` and ``test`` from what the trainer passes (``satlib.training.EpochEnd``).
    """
    chosen = None if epochs is None else {int(e) for e in epochs}

    def callback(end) -> dict[str, float] | None:
        if chosen is not None and end.epoch not in chosen:
            return None
        frame = clustering_report(end.model, train, end.val if test is None else test, layers, attack=attack,
                                  norms=norms, batch_size=batch_size)
        return {f"clu_acc/{r.layer}/{r.norm}": float(r.clu_acc) for r in frame.itertuples()}

    return callback
