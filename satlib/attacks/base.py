"""The attack calling convention, the L-inf projection, and the model state every attack restores (Chapter 1).

Every attack is an object configured once (``PGD(eps=8/255, steps=100)``) and called as
``x_adv = attack(model, x, y)``. During the call the model is in eval mode and its parameters do not
require gradients (no weight-gradient work, no memory for it); both are restored afterwards. An
attack can keep its results in a store (``Attack.keep_results``), so that an accuracy table,
clustering accuracy and feature shifts of one test set share one attack run, in any process.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Callable, Protocol

import torch
from torch import nn


class TensorStore(Protocol):
    """Where results are kept: a run of the store, or ``satlib.artifacts.Artifacts``."""

    def cached_tensors(self, name: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ...


@contextmanager
def attack_mode(model: nn.Module, *, eval_mode: bool = True):
    """Put ``model`` in eval mode with frozen parameters; restore mode and ``requires_grad`` on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def per_sample(value: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """A float as it is; a per-sample tensor [B] (a radius or a step size) shaped [B, 1, ..., 1] to broadcast over x."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.shape != (len(x),):
        raise ValueError(f"a per-sample radius needs shape [{len(x)}] for this batch, got {tuple(value.shape)}")
    return value.to(x.device, x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Project onto the L-inf ball of radius ``eps`` around ``x`` intersected with the pixel range [0, 1].

    ``eps`` is one radius (a float) or one per sample (a tensor [B]): Eq. (eq-ch1-project), Chapter 1.
    """
    eps = per_sample(eps, x)
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def check_eps(eps: float | torch.Tensor, *, allow_tensor: bool) -> float | torch.Tensor:
    """``eps`` as a float in [0, 1] or, where ``allow_tensor``, a 1-D tensor of per-sample radii in [0, 1]."""
    if isinstance(eps, torch.Tensor) and eps.dim() == 1 and allow_tensor:
        if ((eps < 0) | (eps > 1)).any():
            raise ValueError("per-sample eps are in pixel units of [0, 1] and must all lie in [0, 1]")
        return eps
    if isinstance(eps, torch.Tensor) and eps.numel() != 1:
        raise ValueError(f"this attack takes one radius eps (a float), got a tensor of shape {tuple(eps.shape)}")
    if not 0 <= eps <= 1:
        raise ValueError(f"eps is in pixel units of [0, 1] and must lie in [0, 1], got {eps!r}")
    return float(eps)


def describe(value: float | torch.Tensor) -> str:
    """A radius or step size for ``repr``: the number, or ``per-sample[B]`` for a tensor of them."""
    return f"per-sample[{len(value)}]" if isinstance(value, torch.Tensor) else f"{value:.4g}"


def autocast(x: torch.Tensor, enabled: bool):
    """bf16 autocast on the device of ``x`` when ``enabled`` (the trainer's attack, on CUDA only).

    Its cast cache stays off, so that the attack can be recorded inside a CUDA graph of the training step.
    """
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, description: str) -> str:
    """Identify (attack, model weights, batch) by content, the same in every process: a hash of
    ``description``, of every tensor of the model's ``state_dict`` and of the bytes of x and y."""
    digest = hashlib.sha256(description.encode())
    for t in [*model.state_dict().values(), x, y]:
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class Attack(ABC):
    """Base class: subclasses implement ``perturb(model, x, y)``; ``__call__`` wraps it in ``attack_mode``.

    ``eps`` is one radius; an attack with ``per_sample_eps`` also takes a tensor [B] of radii, one per
    sample of the batches it is called on (Chapter 6 bisects a radius per sample).
    """

    name = "attack"
    per_sample_eps = False
    store: TensorStore | None = None

    def __init__(self, eps: float | torch.Tensor):
        self.eps = check_eps(eps, allow_tensor=self.per_sample_eps)

    @abstractmethod
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The adversarial examples for ``x``: every attack defines its own search."""

    def keep_results(self, store: TensorStore | None) -> "Attack":
        """Keep the adversarial examples in ``store`` (a run, ``satlib.artifacts.Artifacts``) and read them back.

        A call with the same attack (``repr``), model weights and batch (``fingerprint``) then returns
        the kept examples without attacking again, in any process. A random start is drawn only for
        the batches computed, so a column resumed half-way may differ from one computed in one go.
        Returns the attack itself; ``None`` keeps nothing.
        """
        self.store = store
        return self

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.store is None:
            return self._attack(model, x, y)
        name = f"adversarial-{self.name.lower()}-{fingerprint(model, x, y, repr(self))}"
        kept = self.store.cached_tensors(name, lambda: {"x_adv": self._attack(model, x, y).cpu()})
        return kept["x_adv"].to(x.device)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with attack_mode(model):
            return self.perturb(model, x.detach(), y.detach()).detach()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={describe(self.eps)})"
