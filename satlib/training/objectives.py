"""SAT's generalised inner objective L_Gen (Eq. 7 and 9, Chapter 5).

    L_Gen(x + r) = base(x + r) - Lambda * (1/n) sum_l ||f^l(x + r) - f^l(x)||_2 ,  Lambda ~ U(0, lambda)

``base`` is CE (SAT, SAT-AWP-AT) or TRADES' KL (SAT-TRADES). The shift is per sample, as the paper's
Eq. 7 writes it, so ``lambda`` is a per-sample weight; the released code takes one Frobenius norm over
the whole batch instead (``per_sample_lambda`` converts its lambda). Lambda is one scalar drawn afresh
at every attack step, shared by the batch, as in the released code.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..attacks.objectives import Objective
from ..models import FeatureTap


def per_sample_lambda(code_lambda: float, batch_size: int) -> float:
    """The per-sample weight of Eq. 7 that equals the released code's weight at ``batch_size`` (Chapter 5).

    The code maximises ``mean_i CE_i - lambda_code ||Delta||_F`` with ``Delta`` the batch's stacked
    feature shifts. Its gradient in sample j's shift is ``lambda_code Delta_j / ||Delta||_F``; when
    every sample's shift has the same norm s, ``||Delta||_F = sqrt(B) s``, so per sample (after the
    common factor 1/B of the mean) the shift term weighs ``lambda_code sqrt(B)`` against the sample's
    CE: the ascent direction of Eq. 7 with ``lambda = lambda_code * sqrt(B)``.
    """
    return code_lambda * math.sqrt(batch_size)


def feature_shift(adv: dict[str, torch.Tensor], clean: dict[str, torch.Tensor], layers: list[str]) -> torch.Tensor:
    """Per-sample mean over ``layers`` of ||f^l(x + r) - f^l(x)||_2, shape [B]."""
    shifts = [torch.linalg.vector_norm((adv[l].float() - clean[l].float()).flatten(1), dim=1) for l in layers]
    return torch.stack(shifts).mean(0)


class FeatureShiftObjective(Objective):
    """``base - Lambda * feature_shift`` with Lambda ~ U(0, ``lam``) redrawn at each call (one attack step).

    ``random=False`` keeps Lambda = ``lam`` fixed: Eq. 7 itself, as the lambda search of Sec. 6.1 uses it.
    ``relative=True`` (SAT-TRADES) weighs each sample's shift term by its base value over its shift,
    both held constant in the gradient: Lambda becomes a fraction of the base objective. TRADES' KL
    starts at 0 with no gradient, so an absolute shift term would steer the attack back to x and leave
    a training attack far weaker than TRADES' own (Chapter 5, "SAT-TRADES' training attack").
    """

    def __init__(self, base: Objective, layers: list[str], lam: float, *, random: bool = True,
                 relative: bool = False):
        if not layers:
            raise ValueError("FeatureShiftObjective needs at least one layer")
        self.base, self.layers, self.lam, self.random = base, list(layers), float(lam), bool(random)
        self.relative = bool(relative)

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        with torch.no_grad(), FeatureTap(model, self.layers) as tap:
            base_ctx = self.base.prepare(model, x, y)
            if not tap.features:          # the base objective needed no clean forward pass
                model(x)
            clean = {l: tap[l].detach() for l in self.layers}
        return base_ctx, clean

    def __call__(self, model, x_adv, y, ctx):
        base_ctx, clean = ctx
        with FeatureTap(model, self.layers) as tap:
            value = self.base(model, x_adv, y, base_ctx)
        lam = torch.rand((), device=x_adv.device) * self.lam if self.random else self.lam
        shift = feature_shift(tap.features, clean, self.layers)
        if self.relative:     # Lambda as a fraction of each sample's base value (the ratio is a constant)
            shift = shift * (value.detach() / shift.detach().clamp_min(1e-12))
        return value - lam * shift
