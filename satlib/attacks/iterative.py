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
loop with a different objective; it runs whole batches with no host synchronisation inside. It is the
library's one sign-gradient loop: Figure 1 follows its iterates (``satlib.shift``) and Chapter 6 runs
it with a radius per sample and keeps the best iterate (``satlib.bound``).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .base import Attack, attack_mode, autocast, describe, per_sample, project
from .objectives import CrossEntropy, CWMargin, Objective

STARTS = ("none", "uniform", "normal")


class SignGradientAttack(Attack):
    """Projected sign-gradient ascent of ``objective`` (Madry et al. 2018), with restarts.

    ``start``: ``none`` (begin at x), ``uniform`` (uniform in the eps-ball) or ``normal``
    (x + 0.001 N(0, 1), TRADES' start), drawn from ``generator`` (default: the global one). With
    ``restarts`` > 1, each sample keeps the first restart's result that is misclassified, else the
    last restart's. ``eps`` may be a tensor [B] of per-sample radii; the default step size is then
    ``eps / 4`` per sample too. Besides ``attack(model, x, y)``: ``maximise`` keeps the iterate of
    largest objective (Chapter 6's radius searches) and ``iterates`` yields the path (Figure 1).
    """

    name = "sign-gradient"
    per_sample_eps = True

    def __init__(self, eps: float | torch.Tensor, *, steps: int = 10, step_size: float | torch.Tensor | None = None,
                 start: str = "uniform", restarts: int = 1, objective: Objective | None = None, amp: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__(eps)
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
        self.steps, self.start, self.restarts, self.amp, self.generator = steps, start, restarts, amp, generator
        self.step_size = self.eps / 4 if step_size is None else step_size
        if not isinstance(self.step_size, torch.Tensor):
            self.step_size = float(self.step_size)
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

    def maximise(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_best, value)``: per sample, the iterate (start included) of largest objective over all
        steps and restarts, and that value. ``y`` goes to the objective (None where it needs no labels)."""
        with attack_mode(model):
            x = x.detach()
            ctx = self.objective.prepare(model, x, y)
            best_x, best = x.clone(), torch.full((len(x),), float("-inf"), dtype=x.dtype, device=x.device)
            for _ in range(self.restarts):
                for x_adv, value in self._path(model, x, y, ctx):
                    if value is None:          # the last iterate: no gradient step follows it
                        with torch.no_grad(), autocast(x, self.amp):
                            value = self.objective(model, x_adv, y, ctx)
                    better = value > best
                    best = torch.where(better, value, best)
                    best_x = torch.where(better.reshape(-1, *[1] * (x.dim() - 1)), x_adv, best_x)
        return best_x, best

    def iterates(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the iterates x_1, ..., x_steps of one ascent (one restart), to measure along the path."""
        with attack_mode(model):
            x, y = x.detach(), y.detach()
            path = self._path(model, x, y, self.objective.prepare(model, x, y))
            next(path)                          # the start x_0
            for x_adv, _ in path:
                yield x_adv

    def _ascend(self, model, x, y, ctx) -> torch.Tensor:
        for x_adv, _ in self._path(model, x, y, ctx):
            pass
        return x_adv

    def _path(self, model, x, y, ctx) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One ascent from a fresh start: ``(x_t, objective at x_t)`` for t < steps, then ``(x_steps, None)``."""
        step = per_sample(self.step_size, x)
        x_adv = self._start(x)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with autocast(x, self.amp):
                value = self.objective(model, x_adv, y, ctx)
                loss = value.sum()
            grad, = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach()
            yield x_adv, value.detach()
            x_adv = project(x_adv + step * grad.sign(), x, self.eps)
        yield x_adv, None

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        eps = per_sample(self.eps, x)
        if self.start == "uniform":
            if isinstance(eps, torch.Tensor):          # per-sample radii scale one draw from [-1, 1]
                noise = eps * torch.empty_like(x).uniform_(-1, 1, generator=self.generator)
            else:
                noise = torch.empty_like(x).uniform_(-eps, eps, generator=self.generator)
            return project(x + noise, x, self.eps)
        if self.start == "normal":
            return project(x + 0.001 * torch.empty_like(x).normal_(generator=self.generator), x, self.eps)
        return x.clone()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={describe(self.eps)}, steps={self.steps}, "
                f"step_size={describe(self.step_size)}, start={self.start!r}, restarts={self.restarts})")


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
