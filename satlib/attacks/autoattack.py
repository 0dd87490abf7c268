"""Standard AutoAttack through the authors' package ``pyautoattack`` (Croce & Hein 2020; Chapter 1).

We call the official implementation rather than re-implementing it: APGD-CE, APGD-T, FAB-T and
Square with the standard settings. (The paper's "AutoAttack_100" is not the standard version: the
book's errata appendix, ``errata-autoattack100``; the book reports the standard one.)
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .base import Attack


class AutoAttack(Attack):
    """The official standard AutoAttack (L-inf); ``seed`` fixes its random restarts."""

    name = "AutoAttack"

    def __init__(self, eps: float, *, version: str = "standard", seed: int = 0, batch_size: int | None = None,
                 verbose: bool = False):
        super().__init__(eps)
        self.version, self.seed, self.batch_size, self.verbose = version, seed, batch_size, verbose

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from pyautoattack import AutoAttack as OfficialAutoAttack
        attack = OfficialAutoAttack(model, norm="Linf", eps=self.eps, version=self.version, seed=self.seed,
                                    device=x.device)
        attack.logger.setLevel(logging.INFO if self.verbose else logging.WARNING)
        # ``batch_size`` None: the whole batch at once (the evaluation already sized it to the device)
        x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=self.batch_size or len(x))
        return x_adv.to(x.device)

    def __repr__(self) -> str:
        return f"AutoAttack(eps={self.eps:.4g}, version={self.version!r})"
