"""Adversarial attacks under one calling convention: ``x_adv = attack(model, x, y)`` (Chapters 1 and 4)."""
from __future__ import annotations

from .autoattack import AutoAttack
from .base import Attack, attack_mode, project
from .iterative import BIM, FGSM, PGD, CWInf, SignGradientAttack
from .lafeat import LAFEAT, train_heads
from .objectives import CrossEntropy, CWMargin, KLDivergence, Objective, margin

ATTACKS = ("fgsm", "bim", "pgd", "cw", "autoattack")


def make_attack(name: str, *, eps: float, steps: int = 100, step_size: float | None = None, restarts: int = 1,
                amp: bool = False, seed: int = 0) -> Attack:
    """Build an evaluation attack by name (the columns of the paper's Table 1)."""
    key = name.lower()
    if key == "fgsm":
        return FGSM(eps, amp=amp)
    if key == "bim":
        return BIM(eps, steps=steps, step_size=step_size, amp=amp)
    if key == "pgd":
        return PGD(eps, steps=steps, step_size=step_size, restarts=restarts, amp=amp)
    if key in ("cw", "cw-inf"):
        return CWInf(eps, steps=steps, step_size=step_size, restarts=restarts, amp=amp)
    if key == "autoattack":
        return AutoAttack(eps, seed=seed)
    raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")


__all__ = ["ATTACKS", "Attack", "AutoAttack", "BIM", "CWInf", "CWMargin", "CrossEntropy", "FGSM", "KLDivergence",
           "LAFEAT", "Objective", "PGD", "SignGradientAttack", "attack_mode", "make_attack", "margin", "project",
           "train_heads"]
