"""The shift of intermediate features caused by a perturbation (Chapter 1, Figure 1; Chapter 4, Figure 4).

``f^l(x + r) - f^l(x)`` for the layers ``l`` of a model: its per-sample L2 size under any attack
(``feature_shifts``), and its direction compared with the intermediate-layer gradient of the CE loss
along the iterations of PGD (``shift_gradient_cosine``, the paper's Figure 1).
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .attacks import PGD, Attack, attack_mode
from .data import ArrayDataset
from .batching import batches
from .models import FeatureTap


def feature_shifts(model: nn.Module, data: ArrayDataset, attack: Attack, layers: Sequence[str], *,
                   batch_size: int = 500, attack_name: str | None = None) -> pd.DataFrame:
    """Tidy frame with one row per (sample, layer): ``sample``, ``layer``, ``shift`` = ||f^l(x+r) - f^l(x)||_2.

    Also ``correct`` (is the attacked sample still classified correctly) and ``attack`` (its name).
    """
    device = next(model.parameters()).device
    rows = []
    for i, (x, y) in enumerate(batches(data, batch_size, shuffle=False)):
        start, x, y = i * batch_size, x.to(device), y.to(device)
        x_adv = attack(model, x, y)
        with attack_mode(model), torch.no_grad(), FeatureTap(model, layers) as tap:
            model(x)
            clean = {l: tap.flat(l).float() for l in layers}
            correct = model(x_adv).argmax(1) == y
            for l in layers:
                shift = torch.linalg.vector_norm(tap.flat(l).float() - clean[l], dim=1)
                rows.append(pd.DataFrame({"sample": torch.arange(start, start + len(y)).numpy(), "layer": l,
                                          "shift": shift.cpu().numpy(), "correct": correct.cpu().numpy()}))
    frame = pd.concat(rows, ignore_index=True)
    frame["attack"] = attack_name or attack.name
    return frame


def shift_gradient_cosine(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: Sequence[str], *,
                          eps: float, steps: int = 100, step_size: float | None = None) -> pd.DataFrame:
    """Figure 1: cosine between f^l(x + r_t) - f^l(x) and grad_{f^l(x)} L_CE(f(x), y) along PGD.

    Follows the iterates ``r_t`` of ``satlib.attacks.PGD`` on CE (uniform start, ``steps`` iterations)
    and records, per layer, the mean over samples of the cosine similarity between the feature shift
    and the intermediate-layer gradient of CE taken at the clean input. Returns a tidy frame with columns
    ``step`` (1..steps), ``layer``, ``cosine`` (mean) and ``positive`` (fraction of samples with cosine > 0).
    """
    rows = []
    with attack_mode(model), FeatureTap(model, layers) as tap:
        x_req = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x_req), y, reduction="sum")
        feats = [tap[l] for l in layers]
        grads = torch.autograd.grad(loss, feats)
        clean = {l: f.detach().flatten(1) for l, f in zip(layers, feats)}
        grad = {l: g.flatten(1) for l, g in zip(layers, grads)}
        path = PGD(eps, steps=steps, step_size=step_size).iterates(model, x, y)
        for step, x_adv in enumerate(path, start=1):
            with torch.no_grad():
                model(x_adv)
                for l in layers:
                    cos = F.cosine_similarity(tap.flat(l) - clean[l], grad[l], dim=1)
                    rows.append((step, l, cos.mean().item(), (cos > 0).float().mean().item()))
    return pd.DataFrame(rows, columns=["step", "layer", "cosine", "positive"])
