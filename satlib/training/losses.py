"""Outer losses of the defences (Chapters 1, 2 and 5), computed from logits the trainer already has.

- ``adversarial_ce``: PGD-AT / SAT, CE on adversarial inputs (Eq. 1 and 10);
- ``trades_loss``: CE(clean) + beta KL(p(x) || p(x')) (Zhang et al. 2019; errata appendix, ``release-trades``);
- ``mart_loss``: boosted CE on adversarial inputs + beta KL weighted by 1 - p_y(x) (Wang et al. 2020);
- ``cluster_loss``: L_Cluster (Eq. 8/10), per-class per-dimension standard deviation of features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def adversarial_ce(logits_adv: torch.Tensor, logits_clean: torch.Tensor | None, y: torch.Tensor, **_) -> dict:
    """Mean CE on the (adversarial) logits."""
    return {"ce": F.cross_entropy(logits_adv.float(), y)}


def trades_loss(logits_adv, logits_clean, y, *, trades_beta: float, **_) -> dict:
    """TRADES: CE(f(x), y) + beta * KL(p(x) || p(x')) averaged over the batch (``batchmean``).

    The clean distribution enters as log-probabilities (``log_target``): the same value as the
    reference's ``KLDivLoss(log_softmax(adv), softmax(clean))``, but its gradient stays finite when a
    clean probability underflows to 0 (logit gaps above ~100), where the reference's is NaN.
    """
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    log_p_clean = F.log_softmax(logits_clean.float(), dim=1)
    return {"ce": F.cross_entropy(logits_clean.float(), y),
            "kl": trades_beta * F.kl_div(log_p_adv, log_p_clean, reduction="batchmean", log_target=True)}


def mart_loss(logits_adv, logits_clean, y, *, mart_beta: float, **_) -> dict:
    """MART: BCE(x') + beta * mean_i KL(p(x_i) || p(x'_i)) (1 - p_y(x_i)), as in the authors' code.

    BCE = CE(x') - log(1 - max_{j != y} p_j(x')): it also pushes down the strongest wrong class.
    """
    p_adv = F.softmax(logits_adv.float(), dim=1)
    top2 = p_adv.argsort(dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(logits_adv.float(), y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), runner_up)
    p_clean = F.softmax(logits_clean.float(), dim=1)
    p_true = p_clean.gather(1, y[:, None]).squeeze(1)
    kl = (p_clean * (torch.log(p_clean + 1e-12) - torch.log(p_adv + 1e-12))).sum(1)
    return {"bce": bce, "kl": mart_beta * (kl * (1.0000001 - p_true)).mean()}


def cluster_loss(features: list[torch.Tensor], y: torch.Tensor, num_classes: int, eps: float = 1e-8,
                 form: str = "paper") -> torch.Tensor:
    """L_Cluster (Eq. 8/10): mean over layers and over the batch's classes of sum_k sqrt(Sigma^i_kk + eps).

    The centroid of class i is its batch mean (Sec. 5.2); the standard deviation uses the class size n_i
    as denominator. Classes with fewer than two samples in the batch are skipped (their spread is
    undefined); ``eps`` keeps the square root's gradient finite at zero variance (the book's errata
    appendix, ``errata-eq8-sqrt``).

    ``form="code"`` is the released code's variant (errata appendix, ``release-cluster-loss``), which
    Chapter 5 compares with Eq. 10: per class the L2 norm of the vector of per-dimension unbiased
    variances, sqrt(sum_k sigma_k^4), averaged over the samples (a class weighs by its size n_i)
    instead of over the classes.
    """
    if form not in ("paper", "code"):
        raise ValueError(f"form must be 'paper' or 'code', got {form!r}")
    onehot = F.one_hot(y, num_classes).float()                      # [B, C]
    counts = onehot.sum(0)                                          # [C]
    present = counts >= 2
    denom = counts.clamp(min=1)[:, None]
    per_layer = []
    for feat in features:
        f = feat.float().flatten(1)                                 # [B, d]
        mu = onehot.T @ f / denom                                   # [C, d]
        var = onehot.T @ (f - mu[y]).square() / denom               # [C, d]
        if form == "paper":
            spread = torch.sqrt(var + eps).sum(1)                   # [C]
            per_layer.append((spread * present).sum() / present.sum().clamp(min=1))
        else:
            unbiased = var * (counts / (counts - 1).clamp(min=1))[:, None]
            spread = torch.sqrt(unbiased.square().sum(1) + eps)     # [C]
            weight = counts * present
            per_layer.append((spread * weight).sum() / weight.sum().clamp(min=1))
    return torch.stack(per_layer).mean()


OUTER_LOSSES = {"ce": adversarial_ce, "trades": trades_loss, "mart": mart_loss}
