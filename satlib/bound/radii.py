"""Radii of Theorem 2 (Chapter 6): the certified lower bound and two attack-based upper estimates.

Two computable radii bracket ``Delta(x) = min(eps, inf{||r||_inf : ||h(x+r) - h(x)||_v >= rho(x)})``:

* a **certified lower bound** ``min(eps, rho(x) / Lip(h))`` (``certified_radius``);
* an **empirical upper estimate** (``empirical_radius``): the smallest eps, found by per-sample
  bisection, at which a PGD attack *maximising the feature shift* reaches ``rho(x)``. Each returned
  radius comes with a perturbation that reaches ``rho(x)``, so ``Delta(x)`` is at most it; it is an
  estimate of ``Delta(x)`` from above, not a certificate of anything.

``flip_radius`` bisects the same way for the smallest eps at which a margin attack changes the label:
an upper estimate of the distance to the decision boundary, which ``Delta(x)`` bounds from below.
The attacks are the library's sign-gradient loop (``satlib.attacks.SignGradientAttack``) with one
radius per sample, keeping the best iterate, so a whole batch is bisected at once.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..attacks import CWMargin, Objective, SignGradientAttack, attack_mode
from .lipschitz import LipschitzBound
from .margin import features_and_logits
from .norms import INF, norm_value


def certified_radius(rho: torch.Tensor, lip: LipschitzBound, *, eps: float, v: float | int | str = 2) -> torch.Tensor:
    """min(eps, rho(x) / Lip(h)): a certified L-inf radius when ``lip.certified`` and rho uses u = dual(v).

    Within it, ||h(x + r) - h(x)||_v <= Lip ||r||_inf < rho(x), so Theorem 2 keeps the label.
    """
    return (rho / lip.value(v)).clamp(max=eps)



class FeatureShift(Objective):
    """||h(x + r) - h(x)||_v per sample: what the empirical radius's attack maximises (Chapter 6)."""

    def __init__(self, v: float | int | str = 2):
        self.v = norm_value(v)

    def prepare(self, model, x, y):
        with torch.no_grad():
            return features_and_logits(model, x)[0]

    def __call__(self, model, x_adv, y, ctx):
        return torch.linalg.vector_norm(features_and_logits(model, x_adv)[0] - ctx, ord=self.v, dim=1)


def feature_shift_attack(model: nn.Module, x: torch.Tensor, eps: torch.Tensor, *, v: float | int | str = 2,
                         steps: int = 20, restarts: int = 2, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD maximising ||h(x + r) - h(x)||_v over ||r||_inf <= eps (per sample): ``(x_adv, shift)``.

    Uniform starts in each ball, steps of eps / 4 per sample, the best iterate of all steps and restarts.
    """
    attack = SignGradientAttack(eps, steps=steps, restarts=restarts, objective=FeatureShift(v), generator=generator)
    return attack.maximise(model, x)


def margin_attack(model: nn.Module, x: torch.Tensor, label: torch.Tensor, eps: torch.Tensor, *, steps: int = 20,
                  restarts: int = 2, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD maximising the margin max_{j != label} z_j - z_label (per-sample eps): ``(x_adv, flipped)``."""
    attack = SignGradientAttack(eps, steps=steps, restarts=restarts, objective=CWMargin(kappa=INF),
                                generator=generator)
    x_adv, _ = attack.maximise(model, x, label)
    with attack_mode(model), torch.no_grad():
        flipped = model(x_adv).argmax(1) != label
    return x_adv, flipped


def bisect_radius(reaches: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], lo: torch.Tensor,
                  hi: torch.Tensor, *, iters: int = 10, geometric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample bisection for the smallest radius at which ``reaches`` holds.

    ``reaches(eps, idx) -> bool`` answers for the samples ``idx`` (a 1-D index tensor) at their radii
    ``eps`` (same length). First tests ``hi``; samples that do not reach there get radius ``hi`` and
    ``reached = False`` and are not tested again. For the others the bracket [lo, hi] shrinks
    ``iters`` times (at the geometric mean where ``geometric`` and lo > 0, else the arithmetic mean),
    keeping the invariant that ``reaches`` held at the upper end. Returns ``(radius, reached)``:
    ``radius`` is that upper end.
    """
    lo, hi = lo.clone(), hi.clone()
    reached = reaches(hi, torch.arange(len(hi), device=hi.device))
    idx = torch.nonzero(reached).flatten()
    for _ in range(iters if len(idx) else 0):
        a, b = lo[idx], hi[idx]
        mid = torch.where((a > 0) & geometric, torch.sqrt(a * b), (a + b) / 2)
        ok = reaches(mid, idx)
        hi[idx] = torch.where(ok, mid, b)
        lo[idx] = torch.where(ok, a, mid)
    return hi, reached


def empirical_radius(model: nn.Module, x: torch.Tensor, rho: torch.Tensor, *, eps: float, v: float | int | str = 2,
                     lo: torch.Tensor | None = None, iters: int = 10, steps: int = 20, restarts: int = 2,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper estimate of Delta(x): the smallest eps at which the feature-shift PGD reaches rho(x).

    Bisection per sample between ``lo`` (default eps / 1000; pass the certified radius, below which no
    attack can reach rho) and ``eps``. Returns ``(radius, reached)``; where the attack never reaches
    rho within ``eps``, radius = eps (Delta is capped at eps). Not a certificate: a stronger attack
    could only lower it.
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)
    lo = torch.full_like(rho, eps / 1000) if lo is None else lo.to(rho.dtype).clamp(max=eps)
    hi = torch.full_like(rho, eps)

    def reaches(r: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        _, shift = feature_shift_attack(model, x[idx], r, v=v, steps=steps, restarts=restarts, generator=gen)
        return shift >= rho[idx]
    return bisect_radius(reaches, lo, hi, iters=iters)


def flip_radius(model: nn.Module, x: torch.Tensor, label: torch.Tensor, *, eps: float,
                lo: torch.Tensor | None = None, iters: int = 10, steps: int = 20, restarts: int = 2,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper estimate of the distance to the decision boundary: the smallest eps at which margin PGD
    changes ``label`` (bisected per sample as in ``empirical_radius``). Returns ``(radius, flipped)``."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    lo = torch.full(label.shape, eps / 1000, dtype=x.dtype, device=x.device) if lo is None else lo.to(x.dtype)
    hi = torch.full(label.shape, eps, dtype=x.dtype, device=x.device)
    return bisect_radius(lambda r, idx: margin_attack(model, x[idx], label[idx], r, steps=steps, restarts=restarts,
                                                      generator=gen)[1], lo.clamp(max=eps), hi, iters=iters)

