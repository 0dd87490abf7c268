"""Is the robustness real? Named pass/fail checks for gradient masking (Chapter 5, "Checks for gradient masking").

A defence can look robust because it breaks the attacker's gradients rather than because it resists
perturbations (Athalye et al. 2018). Five symptoms would show it, each checked here by name, in the
spirit of the official AutoAttack's ``checks`` module:

- ``eps-zero``: PGD with eps = 0 changes no prediction (its accuracy equals the clean accuracy);
- ``vanishes``: accuracy falls to at most ``vanish`` at the largest radius of the sweep (3 eps);
- ``monotone``: accuracy never grows with eps by more than ``noise``;
- ``iterative``: BIM and PGD do better than FGSM (at least as well for a model near chance);
- ``transfer``: PGD crafted on another model (a surrogate) does worse than white-box PGD on the model
  itself (at least ``noise`` worse for a model near chance).

A model near chance (clean accuracy at most twice chance) has no robustness to fake, and its accuracy
barely moves under any attack: ``vanishes`` is then skipped and the two strict comparisons are relaxed.
``masking_checks`` decides the checks from accuracies already measured; ``gradient_masking`` measures
them on a model (every number in fp32, ``satlib.evaluation.correct_mask``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..attacks import BIM, FGSM, PGD
from ..data import ArrayDataset
from ..batching import batches
from ..evaluation import correct_mask, evaluation_batch_size
from ..precision import exact_fp32

EPS_FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)      # the sweep's radii, in multiples of the threat model's eps
VERDICTS = ("pass", "fail", "skipped")


def _accuracy(model: nn.Module, data: ArrayDataset, attack=None, *, seed: int, batch_size: int | None) -> float:
    torch.manual_seed(seed)
    return correct_mask(model, data, attack, batch_size=batch_size).float().mean().item()


def eps_sweep(model: nn.Module, data: ArrayDataset, eps: float, *, factors: Sequence[float] = EPS_FACTORS,
              steps: int = 10, seed: int = 0, batch_size: int | None = None) -> pd.DataFrame:
    """Accuracy under PGD-``steps`` at each radius ``factor * eps`` (capped at 1): columns ``eps``, ``accuracy``.

    Ten steps suffice at the large radii, where the checks look for the trend, not the exact value.
    """
    rows = [{"eps": f * eps, "accuracy": _accuracy(model, data, PGD(min(f * eps, 1.0), steps=steps), seed=seed,
                                                   batch_size=batch_size)} for f in factors]
    return pd.DataFrame(rows)


def transfer_accuracy(model: nn.Module, surrogate: nn.Module, data: ArrayDataset, *, eps: float, steps: int,
                      seed: int = 0, batch_size: int | None = None) -> float:
    """Accuracy of ``model`` on PGD examples crafted on ``surrogate`` (a black-box transfer attack)."""
    device = next(surrogate.parameters()).device
    size = batch_size or evaluation_batch_size(surrogate, data.x)
    pgd = PGD(eps, steps=steps)
    torch.manual_seed(seed)
    with exact_fp32(device):
        x_adv = torch.cat([pgd(surrogate, x, y) for x, y in batches(data.to(device), size, shuffle=False)])
    moved = ArrayDataset(x_adv, data.y.to(device), data.num_classes, data.name)
    return _accuracy(model, moved.to(next(model.parameters()).device), seed=seed, batch_size=batch_size)


def masking_checks(*, clean: float, sweep: pd.DataFrame, fgsm: float, bim: float, pgd: float,
                   transfer: float | None = None, num_classes: int = 10, noise: float = 0.01,
                   vanish: float = 0.05) -> pd.DataFrame:
    """The five checks from measured accuracies (fractions in [0, 1]): one row each, columns ``check``,
    ``verdict`` (``pass``, ``fail`` or ``skipped``), ``measured`` and ``requirement``.

    ``sweep``: an ``eps_sweep`` frame whose first radius is 0 and whose last is the largest (3 eps);
    ``fgsm``, ``bim``, ``pgd``: accuracies at the threat model's eps; ``transfer``: accuracy under a
    transfer attack (``transfer_accuracy``), or None to skip that check.
    """
    sweep = sweep.sort_values("eps")
    acc = sweep["accuracy"].to_numpy(dtype=float)
    classifies = clean > 2.0 / num_classes
    grows = float(np.diff(acc).max()) if len(acc) > 1 else 0.0
    iterative = max(bim, pgd)
    rows = [
        ("eps-zero", bool(acc[0] == clean) if sweep["eps"].iloc[0] == 0 else None,
         f"PGD at eps 0: {acc[0]:.4f}, clean {clean:.4f}", "PGD with eps = 0 leaves every prediction as it is"),
        ("vanishes", bool(acc[-1] <= vanish) if classifies else None,
         f"{acc[-1]:.4f} at eps {sweep['eps'].iloc[-1]:.4g}",
         f"accuracy at most {vanish:g} at the largest radius (model near chance: skipped)"),
        ("monotone", bool(grows <= noise), f"largest rise {max(grows, 0.0):+.4f}",
         f"accuracy never grows with eps by more than {noise:g}"),
        ("iterative", iterative < fgsm if classifies else iterative <= fgsm,
         f"BIM {bim:.4f}, PGD {pgd:.4f}, FGSM {fgsm:.4f}",
         "BIM and PGD below FGSM (at most FGSM for a model near chance)"),
        ("transfer", None if transfer is None else (transfer > pgd if classifies else transfer >= pgd - noise),
         "no surrogate" if transfer is None else f"transfer {transfer:.4f}, white-box PGD {pgd:.4f}",
         f"a transfer attack does worse than white-box PGD (within {noise:g} for a model near chance)"),
    ]
    return pd.DataFrame([{"check": name, "verdict": "skipped" if ok is None else ("pass" if ok else "fail"),
                          "measured": measured, "requirement": requirement}
                         for name, ok, measured, requirement in rows])


def gradient_masking(model: nn.Module, data: ArrayDataset, *, eps: float, steps: int = 100, sweep_steps: int = 10,
                     surrogate: nn.Module | None = None, seed: int = 0, batch_size: int | None = None) -> pd.DataFrame:
    """Measure and decide the five checks on ``model`` (``masking_checks``): FGSM, BIM-``steps`` and
    PGD-``steps`` at ``eps``, the PGD sweep over ``EPS_FACTORS`` and, with a ``surrogate``, a transfer attack."""
    options = dict(seed=seed, batch_size=batch_size)
    return masking_checks(
        clean=_accuracy(model, data, **options),
        sweep=eps_sweep(model, data, eps, steps=sweep_steps, **options),
        fgsm=_accuracy(model, data, FGSM(eps), **options),
        bim=_accuracy(model, data, BIM(eps, steps=steps), **options),
        pgd=_accuracy(model, data, PGD(eps, steps=steps), **options),
        transfer=None if surrogate is None else transfer_accuracy(model, surrogate, data, eps=eps, steps=steps,
                                                                  **options),
        num_classes=data.num_classes)
