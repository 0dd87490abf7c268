"""FGSM, BIM, PGD and CW-inf as one iterative sign-gradient method on an L-inf ball (Chapter 1).

All four are ``x <- Proj(x + alpha * sign(grad objective))`` and differ only in start, step count,
step size and objective:

=========  ===================  =====  =====================
attack     start                steps  objective
=========  ===================  =====  =====================
FGSM       x                    1      CE, alpha = eps
BIM        x                    n      CE
PGD        uniform in the ball  n      CE, optional restarts
CW-inf     uniform in the ball  n      CW margin
=========  ===================  =====  =====================

Written by hand because the loop *is* the subject of Chapter 1 and because SAT (Eq. 9) needs the same
loop with a different objective; it runs whole batches with no host synchronisation inside.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Attack, autocast, project
from .objectives import CrossEntropy, CWMargin, Objective

STARTS = ("none", "uniform", "normal")


class SignGradientAttack(Attack):
    """Projected sign-gradient ascent of ``objective`` (Madry et al. 2018), with restarts.

    ``start``: ``none`` (begin at x), ``uniform`` (uniform in the eps-ball) or ``normal``
    (x + 0.001 N(0, 1), TRADES' start). With ``restarts`` > 1, each sample keeps the first restart's
    result that is misclassified, else the last restart's.
    """

    name = "sign-gradient"

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, start: str = "uniform",
                 restarts: int = 1, objective: Objective | None = None, amp: bool = False):
        super().__init__(eps)
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
        self.steps, self.start, self.restarts, self.amp = steps, start, restarts, amp
        self.step_size = eps / 4 if step_size is None else float(step_size)
        self.objective = objective or CrossEntropy()

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx = self.objective.prepare(model, x, y)
        best = self._ascend(model, x, y, ctx)
        for _ in range(self.restarts - 1):
            with torch.no_grad(), autocast(x, self.amp):
                fooled = model(best).argmax(1) != y
            candidate = self._ascend(model, x, y, ctx)
            best = torch.where(fooled[:, None, None, None], best, candidate)
        return best

    def _ascend(self, model, x, y, ctx) -> torch.Tensor:
        if self.start == "uniform":
            x_adv = project(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
        elif self.start == "normal":
            x_adv = project(x + 0.001 * torch.randn_like(x), x, self.eps)
        else:
            x_adv = x.clone()
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with autocast(x, self.amp):
                loss = self.objective(model, x_adv, y, ctx).sum()
            grad, = torch.autograd.grad(loss, x_adv)
            x_adv = project(x_adv.detach() + self.step_size * grad.sign(), x, self.eps)
        return x_adv

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:.4g}, steps={self.steps}, step_size={self.step_size:.4g}, "
                f"start={self.start!r}, restarts={self.restarts})")


class FGSM(SignGradientAttack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of size eps from x."""

    name = "FGSM"

    def __init__(self, eps: float, *, amp: bool = False):
        super().__init__(eps, steps=1, step_size=eps, start="none", amp=amp)


class BIM(SignGradientAttack):
    """Basic Iterative Method (Kurakin et al. 2017): PGD without the random start."""

    name = "BIM"

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, amp: bool = False):
        super().__init__(eps, steps=steps, step_size=step_size, start="none", amp=amp)


class PGD(SignGradientAttack):
    """Projected Gradient Descent on CE with a uniform random start (Madry et al. 2018)."""

    name = "PGD"

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, restarts: int = 1,
                 objective: Objective | None = None, start: str = "uniform", amp: bool = False):
        super().__init__(eps, steps=steps, step_size=step_size, start=start, restarts=restarts,
                         objective=objective, amp=amp)


class CWInf(SignGradientAttack):
    """CW-inf: PGD on the Carlini-Wagner margin loss (as in the TRADES and MART evaluations)."""

    name = "CW-inf"

    def __init__(self, eps: float, *, steps: int = 10, step_size: float | None = None, restarts: int = 1,
                 amp: bool = False):
        super().__init__(eps, steps=steps, step_size=step_size, start="uniform", restarts=restarts,
                         objective=CWMargin(), amp=amp)
