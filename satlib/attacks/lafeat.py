"""LAFEAT: an attack that also reads the model's latent features (Yu, Gao & Xu, CVPR 2021; Chapter 4).

An output-layer attack (OLA: FGSM, PGD, AutoAttack) follows the gradient of a loss on the logits only.
LAFEAT, the intermediate-layer attack (ILA) of the paper's Section 4, first fits small *heads*
``g_l`` on the frozen model's intermediate features ``f^l(x)`` so that ``g_l(f^l(x))`` predicts the
model's own label (``satlib.attacks.lafeat_heads``), then attacks the mixed, margin-normalised logits
(Chapter 4, eq-ch4-mix)

    z_mix = beta * m * z_l / s_l + (1 - beta * m) * z / s

with ``z`` the model's logits, ``z_l = g_l(f^l(x))`` the head's logits, ``s`` and ``s_l`` their
detached top-1 minus top-2 gaps (so both enter the loss at the same scale) and ``m = 1`` while the
head (and the model) still predict the label ``y``, ``0`` once the head is fooled. It maximises
``CE(z_mix, y)`` with the APGD-style update of Croce & Hein (2020): sign steps whose size follows a
cosine schedule from ``2 eps`` to 0, and momentum ``alpha = 0.75`` (weight of the new step against
the previous displacement). A sample is frozen at the first iterate the model misclassifies. The
attack restarts once per ``beta`` of the authors' schedule, each restart on the samples that are still
classified correctly, and keeps the first restart that succeeds.

``beta = 0`` (or no heads) leaves an APGD-style CE attack on margin-normalised final logits: the
evaluation the SAT release effectively ran (the book's errata appendix, ``release-lafeat``); Chapter 4
compares the two.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import FeatureTap
from .base import Attack, attack_mode, autocast, fingerprint, project
from .lafeat_heads import head_agreement  # noqa: F401  (Chapter 4 imports it from here)
from .objectives import margin

# The authors' beta schedule: 0, 0.1, ..., 0.9 visited from the middle outwards (0.4, 0.5, 0.3, ...).
AUTHORS_BETAS = (0.4, 0.5, 0.3, 0.6, 0.2, 0.7, 0.1, 0.8, 0.0, 0.9)
STARTS = ("uniform", "none")


def _gap(logits: torch.Tensor) -> torch.Tensor:
    """Detached top-1 minus top-2 logit, as a column; floored so a tie cannot divide by zero."""
    top = logits.detach().topk(2, dim=1).values
    return (top[:, :1] - top[:, 1:]).clamp_min(1e-8)


def mixed_logits(logits: torch.Tensor, head_logits: Sequence[torch.Tensor], y: torch.Tensor,
                 beta: float) -> torch.Tensor:
    """Chapter 4's eq-ch4-mix: ``beta m z_l / s_l + (1 - beta m) z / s``, ``beta`` shared equally by the heads.

    ``m`` is 1 for a sample while its head's prediction (and the model's) is still ``y``. With one head
    this is the authors' loss input; with none, or ``beta = 0``, it is ``z / s``.
    """
    still = logits.detach().argmax(1) == y
    mixed = torch.zeros_like(logits)
    rest = torch.ones_like(logits[:, :1])
    for z_l in head_logits:
        w = (beta / len(head_logits)) * (still & (z_l.detach().argmax(1) == y)).to(logits.dtype)[:, None]
        mixed = mixed + w * z_l / _gap(z_l)
        rest = rest - w
    return mixed + rest * logits / _gap(logits)


class LAFEAT(Attack):
    """LAFEAT (Yu et al. 2021), L-inf: restarts over ``betas``, each an APGD-style ascent of CE(mixed logits).

    ``heads`` maps layer names of the model to head modules (``satlib.attacks.fit_heads``; ``{}``
    for the output-only variant). ``steps`` iterations per restart; step size
    ``step_scale * eps * (1 + cos(pi i / steps)) / 2``; ``momentum`` is APGD's alpha, the weight of
    the new step (``1 - momentum`` goes to the previous displacement); ``start`` ``uniform`` (a
    uniform point of the eps-ball, drawn from a generator seeded by ``seed`` and the restart's
    ``beta``, so a ``betas=(0.0,)`` attack replays the ``beta = 0`` restart of the full schedule
    exactly) or ``none``. Each sample is frozen at its first misclassified iterate; samples that no
    restart breaks return the final iterate with the largest margin loss. With no heads every
    restart runs the output-only objective (the betas then act as seeded random restarts).

    The attack is deterministic and costly, so its results can be kept: with ``memo`` > 0 it
    remembers them for that many batches in this object; ``keep_results(store)`` keeps them across
    objects and processes (``satlib.experiments.lafeat_for`` keeps them in the run's artifacts). Either
    way a second call with the same model weights, inputs and labels (an accuracy table, then
    clustering accuracy, then feature shifts of the same test set) returns them without recomputing.
    """

    name = "LAFEAT"

    def __init__(self, eps: float, heads: Mapping[str, nn.Module] | None = None, *, steps: int = 100,
                 betas: Sequence[float] = AUTHORS_BETAS, momentum: float = 0.75, step_scale: float = 2.0,
                 start: str = "uniform", seed: int = 0, amp: bool = False, memo: int = 0):
        super().__init__(eps)
        betas = tuple(float(b) for b in betas)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not betas or not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"betas must be a non-empty list of numbers in [0, 1], got {betas!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum (APGD's alpha) must lie in (0, 1], got {momentum!r}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
        self.heads = dict(heads or {})
        self._head_modules = nn.ModuleList(self.heads.values())
        self.steps, self.betas, self.momentum, self.step_scale = steps, betas, float(momentum), float(step_scale)
        self.start, self.seed, self.amp = start, int(seed), amp
        self.memo, self._memo = int(memo), OrderedDict()
        digest = hashlib.sha256()
        for layer, head in sorted(self.heads.items()):
            digest.update(layer.encode())
            for k, v in head.state_dict().items():
                digest.update(k.encode())
                digest.update(v.detach().float().cpu().numpy().tobytes())
        self.heads_digest = digest.hexdigest()[:10] if self.heads else "none"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.memo <= 0:
            return super().__call__(model, x, y)
        key = fingerprint(model, x, y, repr(self))
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key].clone()
        x_adv = super().__call__(model, x, y)
        self._memo[key] = x_adv.clone()
        while len(self._memo) > self.memo:
            self._memo.popitem(last=False)
        return x_adv

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with attack_mode(self._head_modules):
            return super()._attack(model, x, y)

    def step_sizes(self) -> list[float]:
        """The cosine schedule ``step_scale * eps * (1 + cos(pi i / steps)) / 2``, i = 0 .. steps - 1."""
        return [self.step_scale * self.eps * (1 + math.cos(math.pi * i / self.steps)) / 2 for i in range(self.steps)]

    def _start_noise(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        gen = torch.Generator(device=x.device).manual_seed(self.seed * 1000 + round(beta * 1000))
        return torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for head in self._head_modules:
            head.to(x.device)
        with torch.no_grad(), autocast(x, self.amp):
            robust = model(x).argmax(1) == y          # misclassified clean samples stay as they are
        x_out = x.clone()
        best = torch.full(y.shape, float("-inf"), device=x.device)
        with FeatureTap(model, list(self.heads)) as tap:
            for beta in self.betas:
                idx = robust.nonzero().squeeze(1)      # one host sync per restart, none inside the steps
                if idx.numel() == 0:
                    break
                noise = self._start_noise(x, beta)[idx]
                x_r, fooled, loss = self._ascend(model, tap, x[idx], y[idx], noise, beta)
                keep = fooled | (loss > best[idx])
                x_out[idx] = torch.where(keep[:, None, None, None], x_r, x_out[idx])
                best[idx] = torch.where(keep, loss, best[idx])
                robust[idx] = ~fooled
        return x_out

    def _logits(self, model, tap, x_adv):
        with autocast(x_adv, self.amp):
            logits = model(x_adv)
            heads = [self.heads[l](tap[l]) for l in self.heads]
        return logits.float(), [h.float() for h in heads]

    def _ascend(self, model, tap, x, y, noise, beta):
        eps = self.eps
        x_adv = project(x + eps * noise, x, eps) if self.start == "uniform" else x.clone()
        x_prev = x_adv.clone()
        done = torch.zeros_like(y, dtype=torch.bool)
        for i, eta in enumerate(self.step_sizes()):
            x_adv.requires_grad_(True)
            logits, head_logits = self._logits(model, tap, x_adv)
            done = done | (logits.detach().argmax(1) != y)   # freeze at the first misclassified iterate
            loss = F.cross_entropy(mixed_logits(logits, head_logits, y, beta), y, reduction="sum")
            grad, = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv.detach()
                alpha = 1.0 if i == 0 else self.momentum
                z = project(x_adv + eta * grad.sign(), x, eps)
                x_new = project(x_adv + alpha * (z - x_adv) + (1 - alpha) * (x_adv - x_prev), x, eps)
                frozen = done[:, None, None, None]
                x_prev = torch.where(frozen, x_prev, x_adv)
                x_adv = torch.where(frozen, x_adv, x_new)
        with torch.no_grad(), autocast(x, self.amp):
            logits = model(x_adv).float()
        done = done | (logits.argmax(1) != y)
        return x_adv, done, margin(logits, y)

    def __repr__(self) -> str:
        return (f"LAFEAT(eps={self.eps:.4g}, layers={list(self.heads)}, heads={self.heads_digest}, "
                f"steps={self.steps}, betas={list(self.betas)}, momentum={self.momentum:.4g}, "
                f"step_scale={self.step_scale:.4g}, start={self.start!r}, seed={self.seed})")
