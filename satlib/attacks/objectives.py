"""Per-sample objectives that an iterative attack maximises (the inner problem of Eq. 1, Chapter 1).

An objective is called as ``objective(model, x_adv, y, ctx)`` and returns one value per sample;
``objective.prepare(model, x, y)`` computes what it needs from the clean input once per attack
(the clean probabilities for TRADES' KL, the clean features for SAT's Eq. 7).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn


class Objective(ABC):
    """Base: no clean-input context; subclasses define ``__call__``."""

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        return None

    @abstractmethod
    def __call__(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, ctx) -> torch.Tensor:
        """One value per sample, to be maximised."""


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 at least: bf16 ones from autocast are upcast, float64 ones (Chapter 6) kept."""
    return logits if logits.dtype == torch.float64 else logits.float()


class CrossEntropy(Objective):
    """L_CE(f(x + r), y): the objective of FGSM, BIM, PGD and PGD-AT (Eq. 1)."""

    def __call__(self, model, x_adv, y, ctx):
        return F.cross_entropy(full_precision(model(x_adv)), y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y: positive exactly when the sample is misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(1) - z_y


class CWMargin(Objective):
    """Carlini-Wagner margin loss, clipped at ``kappa`` (CW-inf = PGD on this objective; Carlini & Wagner 2017)."""

    def __init__(self, kappa: float = 50.0):
        self.kappa = kappa

    def __call__(self, model, x_adv, y, ctx):
        return margin(full_precision(model(x_adv)), y).clamp(max=self.kappa)


class KLDivergence(Objective):
    """KL(p(x) || p(x + r)) summed over classes: TRADES' inner objective (Zhang et al. 2019; Chapter 5)."""

    def prepare(self, model, x, y):
        with torch.no_grad():
            return F.softmax(full_precision(model(x)), dim=1)

    def __call__(self, model, x_adv, y, ctx):
        log_p_adv = F.log_softmax(full_precision(model(x_adv)), dim=1)
        return F.kl_div(log_p_adv, ctx, reduction="none").sum(1)
