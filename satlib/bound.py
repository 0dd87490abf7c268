"""The robustness bound of Theorem 2 (Eq. 11 of the paper, corrected; NOTES E5), Chapter 6.

Write the network as ``z = W h(x) + b``: ``h`` is the *feature map* (everything up to the input of the
last linear layer, ``model.linear`` for both models of the book) and ``z`` the logits. For the label
``y`` predicted at ``x``, Hoelder's inequality (``1/u + 1/v = 1``) gives, for every perturbation ``r``
and class ``j != y``,

    z_y(x+r) - z_j(x+r) >= z_y(x) - z_j(x) - ||W_y - W_j||_u ||h(x+r) - h(x)||_v,

so the label cannot change while the feature shift stays below the *feature margin*

    rho(x) = min_{j != y} (z_y(x) - z_j(x)) / ||W_y - W_j||_u          (``feature_margin``).

Two computable radii bracket ``Delta(x) = min(eps, inf{||r||_inf : ||h(x+r) - h(x)||_v >= rho(x)})``:

* a **certified lower bound** ``min(eps, rho(x) / Lip(h))`` (``certified_radius``), where ``Lip(h)``
  bounds the Lipschitz constant of ``h`` from the L-inf input norm (the threat model) to the v-norm of
  the features (``lipschitz_bound``: exact or provably upper-bounding operator norms of every
  conv-BatchNorm pair, ReLU 1-Lipschitz, residual blocks as main path + shortcut, the average pooling's
  norm and the norm conversions);
* an **empirical upper estimate** (``empirical_radius``): the smallest eps, found by per-sample
  bisection, at which a PGD attack *maximising the feature shift* reaches ``rho(x)``. Each returned
  radius comes with a perturbation that reaches ``rho(x)``, so ``Delta(x)`` is at most it; it is an
  estimate of ``Delta(x)`` from above, not a certificate of anything.

``flip_radius`` bisects the same way for the smallest eps at which a margin attack changes the label:
an upper estimate of the distance to the decision boundary, which ``Delta(x)`` bounds from below.
All attacks here take a per-sample radius (a tensor), so a whole batch is bisected at once.

Chapter 6 uses three per-sample tables: ``certify`` (rho, the certified radius, and an attack inside
it that must never change the label; float64), ``estimate_radii`` (the two bisected estimates) and
``shift_and_spread`` (the feature shift under an attack and the distances to the class centroids
``feature_centroids``, whose sum bounds it by the triangle inequality: the paper's link to L_Cluster).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .attacks import attack_mode
from .data import ArrayDataset
from .models import ResNet18, WideResNet
from .models.resnet import BasicBlock
from .models.wrn import WideBlock

INF = float("inf")
NORMS = (1.0, 2.0, INF)
DENSE_LIMIT = 1 << 22       # most entries (outputs x inputs) of a conv matrix built for an exact norm (32 MB)


# -- norms ----------------------------------------------------------------------------------------
def _norm_value(p: float | int | str) -> float:
    """Accept 1, 2, inf (also as "inf", "l1", "l2", "linf") and return it as a float."""
    names = {"l1": 1.0, "l2": 2.0, "linf": INF, "inf": INF}
    value = names.get(p.lower(), None) if isinstance(p, str) else float(p)
    if value not in NORMS:
        raise ValueError(f"norm must be one of 1, 2, inf, got {p!r}")
    return value


def dual_norm(p: float | int | str) -> float:
    """The exponent q with 1/p + 1/q = 1 (1 <-> inf, 2 <-> 2)."""
    p = _norm_value(p)
    return {1.0: INF, 2.0: 2.0, INF: 1.0}[p]


def norm_conversion(dim: int, *, src: float, dst: float) -> float:
    """The smallest c with ||a||_dst <= c ||a||_src for all a in R^dim (p-norms with p in {1, 2, inf})."""
    src, dst = _norm_value(src), _norm_value(dst)
    if dst >= src:                       # norms decrease with the exponent
        return 1.0
    inv = lambda p: 0.0 if p == INF else 1.0 / p  # noqa: E731
    return float(dim) ** (inv(dst) - inv(src))


# -- features, logits and the feature margin (Theorem 2) -----------------------------------------
def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last linear layer (``model.linear`` for ResNet-18 and WideResNet)."""
    layer = getattr(model, "linear", None)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no last linear layer named 'linear'")
    return layer


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, z)``: the input of the last linear layer (flattened, [B, K]) and the logits ([B, C]).

    ``h`` is read with a forward pre-hook, so it is part of the autograd graph when ``x`` is.
    """
    store: dict[str, torch.Tensor] = {}
    handle = last_linear(model).register_forward_pre_hook(lambda m, args: store.__setitem__("h", args[0]))
    try:
        z = model(x)
    finally:
        handle.remove()
    return store["h"].flatten(1), z


def feature_margin(logits: torch.Tensor, weight: torch.Tensor, label: torch.Tensor | None = None, *,
                   u: float | int | str = 2) -> torch.Tensor:
    """rho(x) = min_{j != y} (z_y - z_j) / ||W_y - W_j||_u per sample (Theorem 2, Chapter 6).

    ``logits`` [B, C], ``weight`` the last layer's [C, K] matrix, ``label`` the class whose region is
    protected (default: the predicted one, which makes rho >= 0). The feature shift that can flip the
    label must reach rho(x) in the dual norm v of u.
    """
    u = _norm_value(u)
    label = logits.argmax(1) if label is None else label
    w = weight.to(logits.dtype)
    diff_norm = torch.linalg.vector_norm(w[label][:, None, :] - w[None, :, :], ord=u, dim=2)   # [B, C]
    gap = logits.gather(1, label[:, None]) - logits                                            # [B, C]
    ratio = gap / diff_norm
    ratio = ratio.scatter(1, label[:, None], INF)        # j = y is excluded (0 / 0)
    return ratio.amin(1)


# -- Lipschitz constants of the feature map -------------------------------------------------------
def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BatchNorm is x -> s * x + t per channel with s = gamma / sqrt(var + eps)."""
    if bn.running_var is None:
        raise ValueError("BatchNorm without running statistics has no fixed eval-mode scale")
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    return (gamma / torch.sqrt(bn.running_var + bn.eps)).detach().double()


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
    """The conv's weight with a following BatchNorm's per-output-channel scale folded in (float64)."""
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError("only dense, undilated convolutions are supported")
    w = conv.weight.detach().double()
    return w if bn is None else w * _bn_scale(bn)[:, None, None, None]


def conv_matrix(weight: torch.Tensor, in_hw: tuple[int, int], *, stride: int | tuple = 1,
                padding: int | tuple = 0) -> torch.Tensor:
    """The dense matrix [out_dim, in_dim] of a zero-padded convolution on inputs of size ``in_hw``."""
    c_in = weight.shape[1]
    n = c_in * in_hw[0] * in_hw[1]
    basis = torch.eye(n, dtype=weight.dtype, device=weight.device).reshape(n, c_in, *in_hw)
    return F.conv2d(basis, weight, stride=stride, padding=padding).reshape(n, -1).T


def conv_norm_dense(weight: torch.Tensor, in_hw: tuple[int, int], *, stride=1, padding=0) -> float:
    """Exact spectral norm of the convolution at its true input size (from its matrix, float64).

    The largest eigenvalue of the smaller Gram matrix: the same value as the largest singular value.
    """
    m = conv_matrix(weight.double(), in_hw, stride=stride, padding=padding)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).max().clamp_min(0).sqrt().item()


def conv_norm_fft(weight: torch.Tensor, in_hw: tuple[int, int], *, padding=0) -> float:
    """A provable upper bound on the spectral norm of a zero-padded convolution, at any stride.

    The zero-padded convolution on an ``H x W`` input equals a circular convolution on the padded
    ``(H + 2p) x (W + 2p)`` image, restricted to the valid outputs (a stride keeps a subset of them):
    an isometric embedding, a circular convolution and a coordinate restriction. The circular one is
    block-diagonalised by the 2-D DFT, so its norm is the largest singular value of the c_out x c_in
    matrices ``sum_ab w[:, :, a, b] exp(-2 pi i (a k / N_h + b l / N_w))`` (Sedghi et al. 2019).
    """
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    kh, kw = weight.shape[2:]
    n_h, n_w = max(in_hw[0] + 2 * ph, kh), max(in_hw[1] + 2 * pw, kw)
    spectrum = torch.fft.fft2(weight.double(), s=(n_h, n_w))               # [c_out, c_in, N_h, N_w]
    return torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max().item()


def conv_norm_power(weight: torch.Tensor, in_hw: tuple[int, int], *, stride=1, padding=0, iters: int = 100,
                    generator: torch.Generator | None = None) -> float:
    """Power iteration on A^T A of the convolution at its true input size: converges to the norm *from below*.

    ``A^T`` is applied by autograd (the vector-Jacobian product of the linear map), so stride and
    padding are handled exactly. The result is an estimate, never larger than the true norm.
    """
    w = weight.double()
    v = torch.randn(1, w.shape[1], *in_hw, dtype=w.dtype, device=w.device, generator=generator)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        v.requires_grad_(True)
        out = F.conv2d(v, w, stride=stride, padding=padding)
        grad, = torch.autograd.grad(out, v, grad_outputs=out.detach())      # A^T A v
        sigma = out.detach().norm().item()
        v = grad.detach() / grad.norm().clamp_min(1e-300)
    return sigma


def first_layer_inf_to_2(weight: torch.Tensor, in_hw: tuple[int, int], *, stride=1, padding=0) -> float:
    """An upper bound on max ||A r||_2 over ||r||_inf <= 1 for the first (affine) layer's linear part A.

    Each output i obeys |(A r)_i| <= ||a_i||_1 ||r||_inf, so ||A r||_2 <= || |A| 1 ||_2 ||r||_inf: one
    convolution of an all-ones image with |W|. Often far below the generic sqrt(n) ||A||_2.
    """
    ones = torch.ones(1, weight.shape[1], *in_hw, dtype=torch.float64, device=weight.device)
    return F.conv2d(ones, weight.double().abs(), stride=stride, padding=padding).norm().item()


@dataclass
class LipschitzBound:
    """An upper bound on the Lipschitz constant of the feature map ``h`` (input of the last linear layer).

    ``l2`` bounds it from the input's L2 norm to the features' L2 norm (the product of the layers'
    operator norms); ``inf_to_2`` from the input's L-inf norm (the threat model) to the features' L2 norm.
    ``value(v)`` converts to the v-norm of the features. ``certified`` is True when every layer norm
    is exact or a proven upper bound (``method="sound"``); with ``method="power"`` the layer norms are
    power-iteration estimates times ``safety`` and the result is labelled an estimate.
    ``layers`` lists every operator with its input shape and the norms computed for it.
    """

    l2: float
    inf_to_2: float
    input_dim: int
    feature_dim: int
    method: str
    certified: bool
    layers: pd.DataFrame = field(repr=False)

    def value(self, v: float | int | str = 2) -> float:
        """Lip(h) from the input's L-inf norm to the features' v-norm."""
        return self.inf_to_2 * norm_conversion(self.feature_dim, src=2.0, dst=v)

    @property
    def input_conversion(self) -> float:
        """sqrt(n): ||r||_2 <= sqrt(n) ||r||_inf, the generic cost of the L-inf threat model."""
        return math.sqrt(self.input_dim)


class _Collector:
    """Builds the per-operator table and the running product of ``lipschitz_bound``."""

    def __init__(self, in_hw: dict[nn.Module, tuple[int, int]], method: str, iters: int, safety: float,
                 generator: torch.Generator):
        self.in_hw, self.method, self.iters, self.safety, self.generator = in_hw, method, iters, safety, generator
        self.rows: list[dict] = []

    def conv(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> float:
        w = _folded(conv, bn)
        hw = self.in_hw[conv]
        stride, padding = conv.stride, conv.padding
        in_dim = w.shape[1] * hw[0] * hw[1]
        out_hw = [(hw[i] + 2 * padding[i] - w.shape[2 + i]) // stride[i] + 1 for i in (0, 1)]
        small = in_dim * w.shape[0] * out_hw[0] * out_hw[1] <= DENSE_LIMIT
        nan = float("nan")
        power = nan if self.iters == 0 else conv_norm_power(w, hw, stride=stride, padding=padding, iters=self.iters,
                                                            generator=self.generator)
        if self.method == "power":
            fft = dense = nan
            used = power * self.safety
        else:      # the exact norm where the matrix fits in memory, else the FFT bound (+ a rounding margin)
            fft = conv_norm_fft(w, hw, padding=padding)
            dense = conv_norm_dense(w, hw, stride=stride, padding=padding) if small else nan
            used = (min(dense, fft) if small else fft) * (1 + 1e-9)
        self.rows.append({"operator": name, "kind": "conv+bn" if bn is not None else "conv",
                          "input": f"{w.shape[1]}x{hw[0]}x{hw[1]}", "power": power, "exact": dense, "fft": fft,
                          "used": used})
        return used

    def scale(self, name: str, bn: nn.BatchNorm2d) -> float:
        return self.note(name, "bn", _bn_scale(bn).abs().max().item())

    def note(self, name: str, kind: str, value: float) -> float:
        nan = float("nan")
        self.rows.append({"operator": name, "kind": kind, "input": "", "power": nan, "exact": nan, "fft": nan,
                          "used": value})
        return value


def _input_sizes(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[nn.Module, tuple[int, int]]:
    """Spatial input size of every conv of ``model``, from one dummy forward pass."""
    sizes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: sizes.__setitem__(mod, tuple(args[0].shape[2:])))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    param = next(model.parameters())
    try:
        with attack_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def lipschitz_bound(model: nn.Module, input_shape: tuple[int, int, int], *, method: str = "sound",
                    power_iters: int = 50, safety: float = 1.05, seed: int = 0) -> LipschitzBound:
    """Upper bound on the Lipschitz constant of the feature map (Chapter 6), composed from layer norms.

    ``input_shape`` is (channels, height, width) of one input: convolution norms depend on it.
    Rules: conv + eval-mode BatchNorm as one linear map (BN's per-channel scale folded into the
    kernel); a lone BatchNorm as its largest |scale|; ReLU 1-Lipschitz; a residual block as
    Lip(main path) + Lip(shortcut); global average pooling over an H x W map as 1 / sqrt(HW).
    The first layer is measured from L-inf to L2 directly, as the smaller of sqrt(n) ||A||_2 and
    || |A| 1 ||_2 (``first_layer_inf_to_2``). ``method="sound"`` (default): exact norms from the
    conv's matrix where it has at most ``DENSE_LIMIT`` entries, else the FFT upper bound; the result is
    certified; ``power_iters`` > 0 adds power-iteration estimates to the table as a cross-check (they
    approach each norm from below). ``method="power"``: power-iteration estimates times ``safety``
    only, not certified. Supports the book's ``ResNet18`` and ``WideResNet``.
    """
    if method not in ("sound", "power"):
        raise ValueError(f"method must be 'sound' or 'power', got {method!r}")
    if power_iters < (1 if method == "power" else 0):
        raise ValueError(f"power_iters must be >= 1 with method='power' (>= 0 otherwise), got {power_iters}")
    if not isinstance(model, (ResNet18, WideResNet)):
        raise TypeError(f"lipschitz_bound knows ResNet18 and WideResNet, not {type(model).__name__}")
    c, hgt, wid = input_shape
    sizes = _input_sizes(model, (c, hgt, wid))
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    col = _Collector(sizes, method, power_iters, safety, gen)
    n = c * hgt * wid

    if isinstance(model, ResNet18):
        stem_w = _folded(model.conv1, model.bn1)
        stem = col.conv("conv1+bn1", model.conv1, model.bn1)
        blocks = [(f"layer{i}.{j}", b) for i in range(1, 5) for j, b in enumerate(getattr(model, f"layer{i}"))]
        rest = 1.0
        for name, block in blocks:
            assert isinstance(block, BasicBlock)
            main = col.conv(f"{name}.conv1+bn1", block.conv1, block.bn1) * \
                col.conv(f"{name}.conv2+bn2", block.conv2, block.bn2)
            if len(block.shortcut):
                short = col.conv(f"{name}.shortcut", block.shortcut[0], block.shortcut[1])
            else:
                short = col.note(f"{name}.shortcut", "identity", 1.0)
            rest *= col.note(name, "block: main + shortcut", main + short)
        last_conv = model.layer4[-1].conv2
    else:
        stem_w = _folded(model.conv1)
        stem = col.conv("conv1", model.conv1)
        rest = 1.0
        for i in (1, 2, 3):
            for j, block in enumerate(getattr(model, f"block{i}")):
                assert isinstance(block, WideBlock)
                name = f"block{i}.{j}"
                pre = col.scale(f"{name}.bn1", block.bn1)
                main = col.conv(f"{name}.conv1+bn2", block.conv1, block.bn2) * col.conv(f"{name}.conv2", block.conv2)
                if block.shortcut is None:
                    lip = main * pre + col.note(f"{name}.shortcut", "identity", 1.0)
                else:
                    lip = (main + col.conv(f"{name}.shortcut", block.shortcut)) * pre
                rest *= col.note(name, "block: main + shortcut", lip)
        rest *= col.scale("bn", model.bn)
        last_conv = model.block3[-1].conv2

    # the last block keeps its conv's spatial size (stride 1): that is the map the pooling averages
    pool_hw = sizes[last_conv]
    pool = col.note(f"avg-pool {pool_hw[0]}x{pool_hw[1]}", "pool", 1.0 / math.sqrt(pool_hw[0] * pool_hw[1]))
    first_conv = model.conv1
    rows_bound = first_layer_inf_to_2(stem_w, sizes[first_conv], stride=first_conv.stride, padding=first_conv.padding)
    col.note("first layer L-inf -> L2 via rows", "inf->2", rows_bound)
    col.note("first layer L-inf -> L2 via sqrt(n)", "inf->2", math.sqrt(n) * stem)
    l2 = stem * rest * pool
    inf_to_2 = min(rows_bound, math.sqrt(n) * stem) * rest * pool
    return LipschitzBound(l2=l2, inf_to_2=inf_to_2, input_dim=n, feature_dim=last_linear(model).in_features,
                          method=method, certified=method == "sound", layers=pd.DataFrame(col.rows))


def certified_radius(rho: torch.Tensor, lip: LipschitzBound, *, eps: float, v: float | int | str = 2) -> torch.Tensor:
    """min(eps, rho(x) / Lip(h)): a certified L-inf radius when ``lip.certified`` and rho uses u = dual(v).

    Within it, ||h(x + r) - h(x)||_v <= Lip ||r||_inf < rho(x), so Theorem 2 keeps the label.
    """
    return (rho / lip.value(v)).clamp(max=eps)


# -- attacks with a per-sample radius --------------------------------------------------------------
def project_per_sample(x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Projection onto the L-inf balls of per-sample radii ``eps`` [B] intersected with [0, 1]."""
    e = eps.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return torch.minimum(torch.maximum(x_adv, x - e), x + e).clamp(0.0, 1.0)


def pgd_per_sample(objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: torch.Tensor, *,
                   steps: int = 20, step_fraction: float = 0.25, restarts: int = 2,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign-gradient ascent of a per-sample ``objective`` inside per-sample L-inf balls, with restarts.

    Starts uniformly in each ball, steps of ``step_fraction * eps`` per sample, and keeps the best
    iterate of all steps and restarts. Returns ``(x_best, best_value)``. The caller sets eval mode and
    freezes parameters (``satlib.attacks.attack_mode``).
    """
    eps = eps.to(x.dtype).reshape(-1)
    e = eps.reshape(-1, *([1] * (x.dim() - 1)))
    best_x, best = x.clone(), torch.full((len(x),), -INF, dtype=x.dtype, device=x.device)
    for _ in range(restarts):
        noise = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator) * 2 - 1
        x_adv = project_per_sample(x + e * noise, x, eps)
        for step in range(steps + 1):
            x_adv.requires_grad_(True)
            value = objective(x_adv)
            better = value.detach() > best
            best = torch.where(better, value.detach(), best)
            best_x = torch.where(better.reshape(-1, *([1] * (x.dim() - 1))), x_adv.detach(), best_x)
            if step == steps:
                break
            grad, = torch.autograd.grad(value.sum(), x_adv)
            x_adv = project_per_sample(x_adv.detach() + step_fraction * e * grad.sign(), x, eps)
    return best_x, best


def feature_shift_attack(model: nn.Module, x: torch.Tensor, eps: torch.Tensor, *, v: float | int | str = 2,
                         steps: int = 20, restarts: int = 2, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD maximising ||h(x + r) - h(x)||_v over ||r||_inf <= eps (per sample): ``(x_adv, shift)``."""
    v = _norm_value(v)
    with attack_mode(model):
        with torch.no_grad():
            h0, _ = features_and_logits(model, x)

        def objective(xa: torch.Tensor) -> torch.Tensor:
            return torch.linalg.vector_norm(features_and_logits(model, xa)[0] - h0, ord=v, dim=1)
        x_adv, shift = pgd_per_sample(objective, x, eps, steps=steps, restarts=restarts, generator=generator)
    return x_adv.detach(), shift


def margin_attack(model: nn.Module, x: torch.Tensor, label: torch.Tensor, eps: torch.Tensor, *, steps: int = 20,
                  restarts: int = 2, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD maximising max_{j != label} z_j - z_label (per-sample eps): ``(x_adv, flipped)``."""
    def objective(xa):
        z = model(xa)
        others = z.scatter(1, label[:, None], -INF)
        return others.amax(1) - z.gather(1, label[:, None]).squeeze(1)
    with attack_mode(model):
        x_adv, _ = pgd_per_sample(objective, x, eps, steps=steps, restarts=restarts, generator=generator)
        with torch.no_grad():
            flipped = model(x_adv).argmax(1) != label
    return x_adv.detach(), flipped


def bisect_radius(reaches: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], lo: torch.Tensor,
                  hi: torch.Tensor, *, iters: int = 10, geometric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample bisection for the smallest radius at which ``reaches`` holds.

    ``reaches(eps, idx) -> bool`` answers for the samples ``idx`` (a 1-D index tensor) at their radii
    ``eps`` (same length). First tests ``hi``; samples that do not reach there get radius ``hi`` and
    ``reached = False`` and are not tested again. For the others the bracket [lo, hi] shrinks
    ``iters`` times (at the geometric mean where ``geometric`` and lo > 0, else the arithmetic mean),
    keeping the invariant that ``reaches`` held at the upper end. Returns ``(radius, reached)``:
    ``radius`` is that upper end.
    """
    lo, hi = lo.clone(), hi.clone()
    reached = reaches(hi, torch.arange(len(hi), device=hi.device))
    idx = torch.nonzero(reached).flatten()
    for _ in range(iters if len(idx) else 0):
        a, b = lo[idx], hi[idx]
        mid = torch.where((a > 0) & geometric, torch.sqrt(a * b), (a + b) / 2)
        ok = reaches(mid, idx)
        hi[idx] = torch.where(ok, mid, b)
        lo[idx] = torch.where(ok, a, mid)
    return hi, reached


def empirical_radius(model: nn.Module, x: torch.Tensor, rho: torch.Tensor, *, eps: float, v: float | int | str = 2,
                     lo: torch.Tensor | None = None, iters: int = 10, steps: int = 20, restarts: int = 2,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper estimate of Delta(x): the smallest eps at which the feature-shift PGD reaches rho(x).

    Bisection per sample between ``lo`` (default eps / 1000; pass the certified radius, below which no
    attack can reach rho) and ``eps``. Returns ``(radius, reached)``; where the attack never reaches
    rho within ``eps``, radius = eps (Delta is capped at eps). Not a certificate: a stronger attack
    could only lower it.
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)
    lo = torch.full_like(rho, eps / 1000) if lo is None else lo.to(rho.dtype).clamp(max=eps)
    hi = torch.full_like(rho, eps)

    def reaches(r: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        _, shift = feature_shift_attack(model, x[idx], r, v=v, steps=steps, restarts=restarts, generator=gen)
        return shift >= rho[idx]
    return bisect_radius(reaches, lo, hi, iters=iters)


def flip_radius(model: nn.Module, x: torch.Tensor, label: torch.Tensor, *, eps: float,
                lo: torch.Tensor | None = None, iters: int = 10, steps: int = 20, restarts: int = 2,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper estimate of the distance to the decision boundary: the smallest eps at which margin PGD
    changes ``label`` (bisected per sample as in ``empirical_radius``). Returns ``(radius, flipped)``."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    lo = torch.full(label.shape, eps / 1000, dtype=x.dtype, device=x.device) if lo is None else lo.to(x.dtype)
    hi = torch.full(label.shape, eps, dtype=x.dtype, device=x.device)
    return bisect_radius(lambda r, idx: margin_attack(model, x[idx], label[idx], r, steps=steps, restarts=restarts,
                                                      generator=gen)[1], lo.clamp(max=eps), hi, iters=iters)


# -- the per-sample tables of Chapter 6 ----------------------------------------------------------
def _batches(data: ArrayDataset, batch_size: int, device: torch.device):
    for start in range(0, len(data), batch_size):
        yield start, data.x[start:start + batch_size].to(device), data.y[start:start + batch_size].to(device)


def certify(model: nn.Module, data: ArrayDataset, *, eps: float, lip: LipschitzBound | None = None,
            v: float | int | str = 2, check_steps: int = 10, check_restarts: int = 1, batch_size: int = 500,
            seed: int = 0) -> pd.DataFrame:
    """Certified radii of every sample, and an attack that tries to break them (Chapter 6).

    Works in float64 on a copy of ``model``: certified radii are far below float32's resolution of a
    pixel value, so only double precision can test them. One row per sample: ``sample, label, pred,
    correct, rho`` (feature margin for u = dual(v)), ``certified`` (min(eps, rho / Lip)), ``violated``
    (margin PGD inside the certified radius changed the predicted label: must never be True) and
    ``feature_shift`` (||h(x + r) - h(x)||_v of that attack's perturbation, which must stay below rho).
    """
    import copy
    device = next(model.parameters()).device
    m64 = copy.deepcopy(model).double().eval()
    lip = lipschitz_bound(m64, tuple(data.x.shape[1:])) if lip is None else lip
    u, vv = dual_norm(v), _norm_value(v)
    weight = last_linear(m64).weight.detach()
    gen = torch.Generator(device=device).manual_seed(seed)
    frames = []
    for start, x, y in _batches(data, batch_size, device):
        x = x.double()
        with torch.no_grad():
            h0, z = features_and_logits(m64, x)
        pred = z.argmax(1)
        rho = feature_margin(z, weight, pred, u=u)
        cert = certified_radius(rho, lip, eps=eps, v=v)
        x_adv, violated = margin_attack(m64, x, pred, cert, steps=check_steps, restarts=check_restarts, generator=gen)
        with torch.no_grad():
            shift = torch.linalg.vector_norm(features_and_logits(m64, x_adv)[0] - h0, ord=vv, dim=1)
        cols = {"sample": torch.arange(start, start + len(y)), "label": y, "pred": pred, "correct": pred == y,
                "rho": rho, "certified": cert, "violated": violated, "feature_shift": shift}
        frames.append(pd.DataFrame({k: t.detach().cpu().numpy() for k, t in cols.items()}))
    return pd.concat(frames, ignore_index=True)


def estimate_radii(model: nn.Module, data: ArrayDataset, rho: torch.Tensor, *, eps: float,
                   lo: torch.Tensor | None = None, v: float | int | str = 2, iters: int = 8, steps: int = 10,
                   restarts: int = 1, flip: bool = True, batch_size: int = 500, seed: int = 0) -> pd.DataFrame:
    """Attack-based upper estimates per sample (Chapter 6): ``empirical`` (Delta, ``empirical_radius``)
    with ``reached``, and with ``flip`` the label-flip radius ``flip`` (``flip_radius``) with ``flipped``.

    ``rho`` (and ``lo``, e.g. the certified radii) are per-sample tensors aligned with ``data``; the
    label protected by the flip search is the prediction at x. Runs in the model's own precision.
    """
    device = next(model.parameters()).device
    model.eval()
    frames = []
    for start, x, _ in _batches(data, batch_size, device):
        x = x.to(next(model.parameters()).dtype)
        r = rho[start:start + len(x)].to(device, x.dtype)
        low = None if lo is None else lo[start:start + len(x)].to(device, x.dtype)
        with torch.no_grad():
            pred = model(x).argmax(1)
        emp, reached = empirical_radius(model, x, r, eps=eps, v=v, lo=low, iters=iters, steps=steps,
                                        restarts=restarts, seed=seed + start)
        cols = {"sample": torch.arange(start, start + len(x)), "empirical": emp, "reached": reached}
        if flip:
            cols["flip"], cols["flipped"] = flip_radius(model, x, pred, eps=eps, lo=low, iters=iters, steps=steps,
                                                        restarts=restarts, seed=seed + start)
        frames.append(pd.DataFrame({k: t.detach().cpu().numpy() for k, t in cols.items()}))
    return pd.concat(frames, ignore_index=True)


# -- the link to L_Cluster (triangle inequality) --------------------------------------------------
def feature_centroids(model: nn.Module, data: ArrayDataset, *, batch_size: int = 500) -> torch.Tensor:
    """Class means [C, K] of the features h (input of the last linear layer) over ``data``: mu_y of Chapter 6."""
    device = next(model.parameters()).device
    sums = counts = None
    with attack_mode(model), torch.no_grad():
        for _, x, y in _batches(data, batch_size, device):
            h, _ = features_and_logits(model, x)
            onehot = F.one_hot(y, data.num_classes).double()
            part = onehot.T @ h.double()
            sums = part if sums is None else sums + part
            counts = onehot.sum(0) if counts is None else counts + onehot.sum(0)
    if (counts == 0).any():
        raise ValueError("some classes have no samples in the data; their centroids are undefined")
    return (sums / counts[:, None]).float()


def shift_and_spread(model: nn.Module, data: ArrayDataset, attack, centroids: torch.Tensor, *,
                     v: float | int | str = 2, batch_size: int = 500) -> pd.DataFrame:
    """Per sample under ``attack``: the feature shift ||h(x+r) - h(x)||_v and the distances of h(x) and
    h(x + r) to the centroid of the true class, whose sum bounds the shift (triangle inequality).

    Columns ``sample, label, correct`` (under the attack), ``feature_shift``, ``dist_clean``, ``dist_adv``.
    """
    device = next(model.parameters()).device
    vv = _norm_value(v)
    frames = []
    for start, x, y in _batches(data, batch_size, device):
        x_adv = attack(model, x, y)
        with attack_mode(model), torch.no_grad():
            h0, _ = features_and_logits(model, x)
            h1, z1 = features_and_logits(model, x_adv)
        mu = centroids.to(device)[y]
        norm = lambda a: torch.linalg.vector_norm(a.double(), ord=vv, dim=1)  # noqa: E731
        cols = {"sample": torch.arange(start, start + len(y)), "label": y, "correct": z1.argmax(1) == y,
                "feature_shift": norm(h1 - h0), "dist_clean": norm(h0 - mu), "dist_adv": norm(h1 - mu)}
        frames.append(pd.DataFrame({k: t.cpu().numpy() for k, t in cols.items()}))
    return pd.concat(frames, ignore_index=True)
