"""Class centroids of intermediate features and clustering accuracy (Definition 1 / Eq. 2, Chapter 2).

The clustered label of a sample at layer ``l`` is the class whose training centroid ``mu_k^l`` is
*nearest* to ``f^l(x)`` (arg min; the paper prints arg max, NOTES E1). Centroids come from clean
training features; the evaluated sample may be clean or attacked. Features of the early layers are
large (65,536 dimensions for ResNet-18's first stage on CIFAR-10), so centroids are accumulated as
per-class sums over batches (memory O(classes x dims), never O(samples x dims)) and distances are
computed batch by batch.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from torch import nn

from .attacks import Attack, attack_mode
from .data import ArrayDataset
from .models import FeatureTap

NORMS = {"l1": 1.0, "l2": 2.0, "linf": float("inf")}


def class_centroids(model: nn.Module, data: ArrayDataset, layers: Sequence[str], *,
                    batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Per-layer [classes, d_l] centroids of clean features over ``data``, streamed batch by batch."""
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(data.num_classes, device=device, dtype=torch.float64)
    with attack_mode(model), torch.no_grad(), FeatureTap(model, layers) as tap:
        for start in range(0, len(data), batch_size):
            x = data.x[start:start + batch_size].to(device)
            y = data.y[start:start + batch_size].to(device)
            model(x)
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
        for start in range(0, len(data), batch_size):
            x = data.x[start:start + batch_size].to(device)
            y = data.y[start:start + batch_size].to(device)
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
