"""The feature map h, the logits and the feature margin rho(x) of Theorem 2 (Chapter 6).

Write the network as ``z = W h(x) + b``: ``h`` is everything up to the input of the last linear layer
(``model.linear`` for both models of the book) and ``z`` the logits. For the label ``y`` predicted at
``x`` the label cannot change while the feature shift stays below
``rho(x) = min_{j != y} (z_y(x) - z_j(x)) / ||W_y - W_j||_u`` in the dual norm v of u.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import FeatureTap
from .norms import INF, norm_value

FEATURES = "linear:input"   # the FeatureTap name of h: the input of the last linear layer


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last linear layer (``model.linear`` for ResNet-18 and WideResNet)."""
    layer = getattr(model, "linear", None)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no last linear layer named 'linear'")
    return layer


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, z)``: the input of the last linear layer (flattened, [B, K]) and the logits ([B, C]).

    ``h`` is read with a forward pre-hook (``FeatureTap`` name ``FEATURES``), so it is part of the
    autograd graph when ``x`` is.
    """
    last_linear(model)
    with FeatureTap(model, [FEATURES]) as tap:
        z = model(x)
    return tap.flat(FEATURES), z


def feature_margin(logits: torch.Tensor, weight: torch.Tensor, label: torch.Tensor | None = None, *,
                   u: float | int | str = 2) -> torch.Tensor:
    """rho(x) = min_{j != y} (z_y - z_j) / ||W_y - W_j||_u per sample (Theorem 2, Chapter 6).

    ``logits`` [B, C], ``weight`` the last layer's [C, K] matrix, ``label`` the class whose region is
    protected (default: the predicted one, which makes rho >= 0). The feature shift that can flip the
    label must reach rho(x) in the dual norm v of u.
    """
    u = norm_value(u)
    label = logits.argmax(1) if label is None else label
    w = weight.to(logits.dtype)
    diff_norm = torch.linalg.vector_norm(w[label][:, None, :] - w[None, :, :], ord=u, dim=2)   # [B, C]
    gap = logits.gather(1, label[:, None]) - logits                                            # [B, C]
    ratio = gap / diff_norm
    ratio = ratio.scatter(1, label[:, None], INF)        # j = y is excluded (0 / 0)
    return ratio.amin(1)
