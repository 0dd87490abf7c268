"""The per-sample tables of Chapter 6.

``certify`` (rho, the certified radius, and an attack inside it that must never change the label;
float64), ``estimate_radii`` (the two bisected estimates) and ``shift_and_spread`` (the feature shift
under an attack and the distances to the class centroids, whose sum bounds it by the triangle
inequality: the paper's link to L_Cluster; the centroids are ``satlib.clustering.class_centroids`` of
the ``FEATURES`` tap).
"""
from __future__ import annotations

import copy

import pandas as pd
import torch
from torch import nn

from ..attacks import attack_mode
from ..data import ArrayDataset
from ..batching import batches
from .lipschitz import LipschitzBound, lipschitz_bound
from .margin import feature_margin, features_and_logits, last_linear
from .norms import dual_norm, norm_value
from .radii import certified_radius, empirical_radius, flip_radius, margin_attack


def _batches(data: ArrayDataset, batch_size: int, device: torch.device):
    """``(index of the first sample, x, y)`` for consecutive batches of ``data``, moved to ``device``."""
    for i, (x, y) in enumerate(batches(data, batch_size, shuffle=False)):
        yield i * batch_size, x.to(device), y.to(device)


def certify(model: nn.Module, data: ArrayDataset, *, eps: float, lip: LipschitzBound | None = None,
            v: float | int | str = 2, check_steps: int = 10, check_restarts: int = 1, batch_size: int = 500,
            seed: int = 0) -> pd.DataFrame:
    """Certified radii of every sample, and an attack that tries to break them (Chapter 6).

    Works in float64 on a copy of ``model``: certified radii are far below float32's resolution of a
    pixel value, so only double precision can test them. One row per sample: ``sample, label, pred,
    correct, rho`` (feature margin for u = dual(v)), ``certified`` (min(eps, rho / Lip)), ``violated``
    (margin PGD inside the certified radius changed the predicted label: must never be True) and
    ``feature_shift`` (||h(x + r) - h(x)||_v of that attack's perturbation, which must stay below rho).
    """
    device = next(model.parameters()).device
    m64 = copy.deepcopy(model).double().eval()
    lip = lipschitz_bound(m64, tuple(data.x.shape[1:])) if lip is None else lip
    u, vv = dual_norm(v), norm_value(v)
    weight = last_linear(m64).weight.detach()
    gen = torch.Generator(device=device).manual_seed(seed)
    frames = []
    for start, x, y in _batches(data, batch_size, device):
        x = x.double()
        with torch.no_grad():
            h0, z = features_and_logits(m64, x)
        pred = z.argmax(1)
        rho = feature_margin(z, weight, pred, u=u)
        cert = certified_radius(rho, lip, eps=eps, v=v)
        x_adv, violated = margin_attack(m64, x, pred, cert, steps=check_steps, restarts=check_restarts, generator=gen)
        with torch.no_grad():
            shift = torch.linalg.vector_norm(features_and_logits(m64, x_adv)[0] - h0, ord=vv, dim=1)
        cols = {"sample": torch.arange(start, start + len(y)), "label": y, "pred": pred, "correct": pred == y,
                "rho": rho, "certified": cert, "violated": violated, "feature_shift": shift}
        frames.append(pd.DataFrame({k: t.detach().cpu().numpy() for k, t in cols.items()}))
    return pd.concat(frames, ignore_index=True)


def estimate_radii(model: nn.Module, data: ArrayDataset, rho: torch.Tensor, *, eps: float,
                   lo: torch.Tensor | None = None, v: float | int | str = 2, iters: int = 8, steps: int = 10,
                   restarts: int = 1, flip: bool = True, batch_size: int = 500, seed: int = 0) -> pd.DataFrame:
    """Attack-based upper estimates per sample (Chapter 6): ``empirical`` (Delta, ``empirical_radius``)
    with ``reached``, and with ``flip`` the label-flip radius ``flip`` (``flip_radius``) with ``flipped``.

    ``rho`` (and ``lo``, e.g. the certified radii) are per-sample tensors aligned with ``data``; the
    label protected by the flip search is the prediction at x. Runs in the model's own precision.
    """
    device = next(model.parameters()).device
    model.eval()
    frames = []
    for start, x, _ in _batches(data, batch_size, device):
        x = x.to(next(model.parameters()).dtype)
        r = rho[start:start + len(x)].to(device, x.dtype)
        low = None if lo is None else lo[start:start + len(x)].to(device, x.dtype)
        with torch.no_grad():
            pred = model(x).argmax(1)
        emp, reached = empirical_radius(model, x, r, eps=eps, v=v, lo=low, iters=iters, steps=steps,
                                        restarts=restarts, seed=seed + start)
        cols = {"sample": torch.arange(start, start + len(x)), "empirical": emp, "reached": reached}
        if flip:
            cols["flip"], cols["flipped"] = flip_radius(model, x, pred, eps=eps, lo=low, iters=iters, steps=steps,
                                                        restarts=restarts, seed=seed + start)
        frames.append(pd.DataFrame({k: t.detach().cpu().numpy() for k, t in cols.items()}))
    return pd.concat(frames, ignore_index=True)


def shift_and_spread(model: nn.Module, data: ArrayDataset, attack, centroids: torch.Tensor, *,
                     v: float | int | str = 2, batch_size: int = 500) -> pd.DataFrame:
    """Per sample under ``attack``: the feature shift ||h(x+r) - h(x)||_v and the distances of h(x) and
    h(x + r) to the centroid of the true class, whose sum bounds the shift (triangle inequality).

    Columns ``sample, label, correct`` (under the attack), ``feature_shift``, ``dist_clean``, ``dist_adv``.
    """
    device = next(model.parameters()).device
    vv = norm_value(v)
    frames = []
    for start, x, y in _batches(data, batch_size, device):
        x_adv = attack(model, x, y)
        with attack_mode(model), torch.no_grad():
            h0, _ = features_and_logits(model, x)
            h1, z1 = features_and_logits(model, x_adv)
        mu = centroids.to(device)[y]
        norm = lambda a: torch.linalg.vector_norm(a.double(), ord=vv, dim=1)  # noqa: E731
        cols = {"sample": torch.arange(start, start + len(y)), "label": y, "correct": z1.argmax(1) == y,
                "feature_shift": norm(h1 - h0), "dist_clean": norm(h0 - mu), "dist_adv": norm(h1 - mu)}
        frames.append(pd.DataFrame({k: t.cpu().numpy() for k, t in cols.items()}))
    return pd.concat(frames, ignore_index=True)
