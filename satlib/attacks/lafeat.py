"""LAFEAT: an attack that also reads the model's latent features (Yu, Gao & Xu, CVPR 2021; Chapter 4).

An output-layer attack (OLA: FGSM, PGD, AutoAttack) follows the gradient of a loss on the logits only.
LAFEAT, the intermediate-layer attack (ILA) of the paper's Section 4, first fits small *heads*
``g_l`` on the frozen model's intermediate features ``f^l(x)`` so that ``g_l(f^l(x))`` predicts the
model's own label, then attacks the mixed, margin-normalised logits (Chapter 4, eq-ch4-mix)

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
evaluation the SAT release effectively ran (NOTES E8); Chapter 4 compares the two.

Faithful to the authors' public code where their paper is silent (NOTES E9): head = global average
pooling + two linear layers of width C (no non-linearity) on the output of the penultimate residual
block, Adam (lr 1e-3, cosine-annealed to 1e-5, no weight decay), 100 epochs, batch 128. Two choices
differ and are options: the heads learn the model's *own* labels (``target="model"``; the released
training script fits the dataset labels, ``target="labels"``), and the training data is used as
given (the released script augments with crop + flip).
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import batches
from ..models import FeatureTap, residual_blocks
from .base import Attack, attack_mode, autocast, project
from .objectives import margin

# The authors' beta schedule: 0, 0.1, ..., 0.9 visited from the middle outwards (0.4, 0.5, 0.3, ...).
AUTHORS_BETAS = (0.4, 0.5, 0.3, 0.6, 0.2, 0.7, 0.1, 0.8, 0.0, 0.9)
# Head shape and training of the authors' code (NOTES E9); ``lafeat_for`` keys its cache on these.
HEAD_DEFAULTS = dict(epochs=100, lr=1e-3, min_lr=1e-5, batch_size=128, weight_decay=0.0, hidden=None,
                     pool="avg", activation=False, target="model")
POOLS = ("avg", "none")
TARGETS = ("model", "labels")
STARTS = ("uniform", "none")


def default_layers(model: nn.Module) -> list[str]:
    """The authors' head position: the output of the penultimate residual block (``layer4.0`` of ResNet-18)."""
    blocks = residual_blocks(model)
    if len(blocks) < 2:
        raise ValueError("the model has fewer than two residual blocks; pass the head layers explicitly")
    return [blocks[-2]]


def make_head(in_shape: Sequence[int], num_classes: int, *, hidden: int | None = None, pool: str = "avg",
              activation: bool = False) -> nn.Sequential:
    """A LAFEAT head for features of shape ``in_shape`` = (C, H, W) (or (d,) for flat features).

    ``pool="avg"``: global average pooling, then ``Linear(C, hidden)`` and ``Linear(hidden, classes)``
    (the authors' head; ``hidden`` defaults to C). ``pool="none"``: the flattened map feeds the first
    linear layer (the SAT release's ResNet head, there with ``hidden=256`` and a ReLU). ``activation``
    puts a ReLU between the two linear layers; without it the head is a linear map of the features.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    shape = tuple(int(s) for s in in_shape)
    if pool == "avg" and len(shape) == 3:
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        width = shape[0]
    else:
        layers = [nn.Flatten()]
        width = math.prod(shape)
    hidden = width if hidden is None else int(hidden)
    if hidden < 1:
        raise ValueError(f"hidden must be a positive width, got {hidden}")
    layers.append(nn.Linear(width, hidden))
    if activation:
        layers.append(nn.ReLU())
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


def feature_shapes(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each layer's output for inputs like ``x`` (one forward pass on ``x[:1]``)."""
    with attack_mode(model), torch.no_grad(), FeatureTap(model, list(layers)) as tap:
        model(x[:1])
        return {l: tuple(tap[l].shape[1:]) for l in layers}


def make_heads(model: nn.Module, x: torch.Tensor, layers: Sequence[str], num_classes: int, *,
               hidden: int | None = None, pool: str = "avg", activation: bool = False) -> dict[str, nn.Module]:
    """Fresh (untrained) heads for ``layers``, sized from one forward pass on ``x[:1]``, on the model's device."""
    device = next(model.parameters()).device
    shapes = feature_shapes(model, x.to(device), layers)
    return {l: make_head(shapes[l], num_classes, hidden=hidden, pool=pool, activation=activation).to(device)
            for l in layers}


def heads_state(heads: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """All heads' parameters in one flat dict (``"<layer>/<param>"``), e.g. for ``Run.cached_tensors``."""
    return {f"{layer}/{k}": v.detach().cpu() for layer, head in heads.items() for k, v in head.state_dict().items()}


def load_heads_state(heads: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Fill ``heads`` (from ``make_heads``) with a ``heads_state`` dict; returns them in eval mode."""
    for layer, head in heads.items():
        prefix = f"{layer}/"
        head.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        head.eval()
    return dict(heads)


def _model_labels(model: nn.Module, data, batch_size: int = 500) -> torch.Tensor:
    with attack_mode(model), torch.no_grad():
        return torch.cat([model(x).argmax(1) for x, _ in batches(data, batch_size, shuffle=False)])


def _features(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    with attack_mode(model), torch.no_grad(), FeatureTap(model, list(layers)) as tap:
        model(x)
        return {l: tap[l].float() for l in layers}


def train_heads(model: nn.Module, data, layers: Sequence[str] | None = None, *, epochs: int = 100,
                lr: float = 1e-3, min_lr: float = 1e-5, batch_size: int = 128, weight_decay: float = 0.0,
                hidden: int | None = None, pool: str = "avg", activation: bool = False, target: str = "model",
                seed: int = 0, cache_bytes: int = 2 ** 31, progress: bool = False) -> dict[str, nn.Module]:
    """Fit one LAFEAT head per layer on the frozen ``model``'s features of ``data`` (Chapter 4).

    The heads learn to predict the model's own labels (``target="model"``: arg max of its logits on
    the clean inputs) or the dataset's (``target="labels"``). All heads train jointly on the sum of
    their cross-entropies with Adam (``lr`` cosine-annealed to ``min_lr`` over ``epochs``), as in the
    authors' code. The model is never changed: it stays frozen, in eval mode, and its mode and
    ``requires_grad`` flags are restored. Features are computed once and kept on the device when
    they fit in ``cache_bytes``; otherwise every epoch recomputes them batch by batch.
    Returns ``{layer: head}`` in eval mode, on the model's device.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")
    layers = default_layers(model) if layers is None else list(layers)
    device = next(model.parameters()).device
    data = data.to(device)
    x_all = data.x
    labels = _model_labels(model, data) if target == "model" else data.y
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = make_heads(model, x_all, layers, data.num_classes, hidden=hidden, pool=pool, activation=activation)
    shapes = feature_shapes(model, x_all, layers)
    size = 4 * len(x_all) * sum(math.prod(s) for s in shapes.values())
    cached = None
    if size <= cache_bytes:
        parts = [_features(model, x, layers) for x, _ in batches(data, 500, shuffle=False)]
        cached = {l: torch.cat([p[l] for p in parts]) for l in layers}
    params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=min_lr)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    try:
        for h in heads.values():
            h.train()
        for _ in tqdm(range(epochs), desc="LAFEAT heads", disable=not progress):
            for idx in torch.randperm(len(x_all), generator=gen).to(device).split(batch_size):
                if cached is not None:
                    feats = {l: cached[l][idx] for l in layers}
                else:
                    feats = _features(model, x_all[idx], layers)
                loss = sum(F.cross_entropy(heads[l](feats[l]), labels[idx]) for l in layers)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    finally:
        model.train(was_training)
    opt.zero_grad(set_to_none=True)
    for h in heads.values():
        h.eval()
    return heads


def head_agreement(model: nn.Module, heads: Mapping[str, nn.Module], data, *, batch_size: int = 500,
                   target: str = "model") -> dict[str, float]:
    """Fraction of ``data`` on which each head predicts the model's own label (or the true one, ``target="labels"``)."""
    device = next(model.parameters()).device
    hits = {l: 0 for l in heads}
    with attack_mode(model), attack_mode(nn.ModuleList(heads.values())), torch.no_grad(), \
            FeatureTap(model, list(heads)) as tap:
        for x, y in batches(data, batch_size, shuffle=False):
            pred = model(x.to(device)).argmax(1)
            ref = pred if target == "model" else y.to(device)
            for l, head in heads.items():
                hits[l] += (head(tap[l].float()).argmax(1) == ref).sum().item()
    return {l: h / len(data) for l, h in hits.items()}


def _fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str:
    """Identify (model weights, batch): parameter version counters and sums, and the bytes of x and y."""
    params = list(model.parameters())
    digest = hashlib.sha256(repr((id(model), [p._version for p in params])).encode())
    with torch.no_grad():
        digest.update(torch.stack([p.detach().double().sum() for p in params]).cpu().numpy().tobytes())
    digest.update(x.detach().cpu().numpy().tobytes())
    digest.update(y.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


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

    ``heads`` maps layer names of the model to head modules (``train_heads``; the chapter's
    ``lafeat_for`` caches them per run). ``steps`` iterations per restart; step size
    ``step_scale * eps * (1 + cos(pi i / steps)) / 2``; ``momentum`` is APGD's alpha, the weight of
    the new step (``1 - momentum`` goes to the previous displacement); ``start`` ``uniform`` (a
    uniform point of the eps-ball, drawn from a generator seeded by ``seed`` and the restart's
    ``beta``, so a ``betas=(0.0,)`` attack replays the ``beta = 0`` restart of the full schedule
    exactly) or ``none``. Each sample is frozen at its first misclassified iterate; samples that no
    restart breaks return the final iterate with the largest margin loss. With no heads every
    restart runs the output-only objective (the betas then act as seeded random restarts).

    The attack is deterministic, so with ``memo`` > 0 it remembers its results for that many
    batches: a second call with the same model weights, inputs and labels (an accuracy table, then
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
        key = _fingerprint(model, x, y) if self.memo > 0 else None
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key].clone()
        with attack_mode(model), attack_mode(self._head_modules):
            x_adv = self.perturb(model, x.detach(), y.detach()).detach()
        if key is not None:
            self._memo[key] = x_adv.clone()
            while len(self._memo) > self.memo:
                self._memo.popitem(last=False)
        return x_adv

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
