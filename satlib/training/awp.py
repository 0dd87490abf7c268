"""Adversarial Weight Perturbation (Wu et al. 2020), as a wrapper around any training loss (Chapter 5).

Before the descent step each weight matrix ``w_l`` (parameters with more than one dimension; BN and
biases are skipped) is moved by ``gamma * ||w_l|| * g_l / ||g_l||`` with ``g_l`` the gradient of the
training loss; the step's gradient is taken there and the perturbation is removed after the step.
The reference code finds the direction with one SGD step of a proxy copy of the model; with a
plain SGD proxy that step is proportional to the gradient and the per-layer normalisation removes
the proxy learning rate, so one backward pass on the model itself gives the same direction. BN
running statistics are frozen during that pass (the proxy's would not touch the model's). Under
data-parallel training the gradients are averaged over the processes first, so every process applies
the same perturbation (as one process would on the whole batch) and the weights stay identical.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


class AWP:
    """Compute, apply and remove the weight perturbation of size ``gamma`` relative to each layer's norm."""

    def __init__(self, gamma: float):
        self.gamma = float(gamma)

    def perturb(self, model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Apply the perturbation that increases ``loss_fn()`` most (to first order); return it for ``restore``."""
        params = [p for p in model.parameters() if p.ndim > 1 and p.requires_grad]
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [bn.momentum for bn in bns]
        tracked = [None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone() for bn in bns]
        try:
            for bn in bns:
                bn.momentum = 0.0               # running = (1 - 0) * running: statistics untouched
            grads = torch.autograd.grad(loss_fn(), params)
        finally:
            for bn, m, n in zip(bns, momenta, tracked):
                bn.momentum = m
                if n is not None:               # the batch counter too: the state is exactly as before
                    bn.num_batches_tracked.copy_(n)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
        applied = []
        with torch.no_grad():
            for p, g in zip(params, grads):
                diff = self.gamma * p.norm() * g / (g.norm() + 1e-20)
                p.add_(diff)
                applied.append((p, diff))
        return applied

    @staticmethod
    def restore(applied: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        """Remove a perturbation returned by ``perturb``."""
        with torch.no_grad():
            for p, diff in applied:
                p.sub_(diff)
