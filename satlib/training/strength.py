"""How strong is each method's training attack? The CE and KL its perturbations reach (Chapter 5).

Methods differ in what their inner maximisation maximises, so their training attacks are not
equally strong; a defence trained on a weak attack is not compared fairly with one trained on a
strong one. ``attack_strength`` runs each method's own training attack (``build_step(cfg).attack``,
with its start, steps, step size and objective) on the same model and images, and measures what the
perturbations reach on two common scales: the cross-entropy of the true label and TRADES' KL
divergence from the clean prediction, both averaged over the images (``training_attack`` builds a
method's attack exactly as the trainer does).
"""
from __future__ import annotations

from typing import Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import Attack
from ..catalog import DATASETS
from ..config import Config
from ..precision import exact_fp32
from .methods import build_step


def reached(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Mean CE(f(x'), y) and mean KL(p(x) || p(x')) of perturbed images ``x_adv`` (eval mode, fp32)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), exact_fp32(x.device):
            log_clean, log_adv = F.log_softmax(model(x), 1), F.log_softmax(model(x_adv), 1)
    finally:
        model.train(was_training)
    kl = F.kl_div(log_adv, log_clean, reduction="none", log_target=True).sum(1)
    return {"CE": F.cross_entropy(log_adv, y).item(), "KL": kl.mean().item()}


def training_attack(cfg: Config, model: nn.Module) -> Attack | None:
    """The attack ``cfg.method`` trains on (None for standard training), built as the trainer builds it."""
    return build_step(cfg, model, DATASETS[cfg.dataset].num_classes).attack


def attack_strength(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Mapping[str, Attack | None], *,
                    seed: int = 0) -> pd.DataFrame:
    """One row per named attack (None: no attack): the CE and KL it reaches on ``model``, ``x``, ``y``.

    Each attack starts from the same random state.
    """
    rows = []
    for name, attack in attacks.items():
        torch.manual_seed(seed)
        x_adv = attack(model, x, y) if attack is not None else x
        rows.append({"attack": name, **reached(model, x, x_adv, y)})
    return pd.DataFrame(rows).set_index("attack")
