"""Adversarial attacks under one calling convention: ``x_adv = attack(model, x, y)`` (Chapters 1 and 4)."""
from __future__ import annotations

from typing import Callable, Mapping

from torch import nn

from .autoattack import AutoAttack
from .base import Attack, TensorStore, attack_mode, fingerprint, project
from .iterative import BIM, FGSM, PGD, CWInf, SignGradientAttack
from .lafeat import LAFEAT
from .lafeat_heads import fit_heads, head_agreement, train_heads
from .objectives import CrossEntropy, CWMargin, KLDivergence, Objective, margin

# The output-layer attacks, which need nothing but the model: the default lists of an evaluation.
OUTPUT_ATTACKS = ("fgsm", "bim", "pgd", "cw", "autoattack")
# Every evaluation attack by name (the columns of the paper's Table 1); LAFEAT needs trained heads.
ATTACKS = (*OUTPUT_ATTACKS, "lafeat")

Heads = Mapping[str, nn.Module]


def make_attack(name: str, *, eps: float, steps: int = 100, step_size: float | None = None, restarts: int = 1,
                amp: bool = False, seed: int = 0, heads: Heads | Callable[[], Heads] | None = None,
                store: TensorStore | None = None, **lafeat_options) -> Attack:
    """Build an evaluation attack by name (``ATTACKS``; the columns of the paper's Table 1).

    ``heads``: LAFEAT's trained heads (``fit_heads``), or a function that returns them, called only
    when LAFEAT is built, so that one call site can build every attack; the other attacks ignore it.
    ``store``: keep the adversarial examples there (``Attack.keep_results``). ``lafeat_options`` go to
    ``LAFEAT`` (``betas``, ``momentum``, ``step_scale``, ``start``, ``memo``). LAFEAT's step sizes
    follow its own schedule and its restarts are its betas, so it ignores ``step_size`` and ``restarts``.
    """
    key = name.lower()
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    if lafeat_options and key != "lafeat":
        raise ValueError(f"the options {', '.join(lafeat_options)} are LAFEAT's; {name} takes none of them")
    if key == "fgsm":
        attack: Attack = FGSM(eps, amp=amp)
    elif key == "bim":
        attack = BIM(eps, steps=steps, step_size=step_size, amp=amp)
    elif key == "pgd":
        attack = PGD(eps, steps=steps, step_size=step_size, restarts=restarts, amp=amp)
    elif key == "cw":
        attack = CWInf(eps, steps=steps, step_size=step_size, restarts=restarts, amp=amp)
    elif key == "autoattack":
        attack = AutoAttack(eps, seed=seed)
    elif heads is None:
        raise ValueError("LAFEAT needs trained heads: pass heads= (from satlib.attacks.fit_heads, or {} for its "
                         "output-only variant).")
    else:
        attack = LAFEAT(eps, heads() if callable(heads) else heads, steps=steps, seed=seed, amp=amp, **lafeat_options)
    return attack.keep_results(store)


__all__ = ["ATTACKS", "Attack", "AutoAttack", "BIM", "CWInf", "CWMargin", "CrossEntropy", "FGSM", "KLDivergence",
           "LAFEAT", "OUTPUT_ATTACKS", "Objective", "PGD", "SignGradientAttack", "TensorStore", "attack_mode",
           "fingerprint", "fit_heads", "head_agreement", "make_attack", "margin", "project", "train_heads"]
