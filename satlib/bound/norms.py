"""Vector p-norms and the operator norms of convolutions that the bound of Theorem 2 composes (Chapter 6).

The exponents 1, 2 and inf with their duals and conversion constants (Hoelder's step needs the pair
u, v with 1/u + 1/v = 1); the spectral norm of a zero-padded convolution at its true input size,
exactly from its matrix, as a provable upper bound from the FFT, or estimated from below by power
iteration; and the L-inf -> L2 norm of the first layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INF = float("inf")
NORMS = (1.0, 2.0, INF)


def norm_value(p: float | int | str) -> float:
    """Accept 1, 2, inf (also as "inf", "l1", "l2", "linf") and return it as a float."""
    names = {"l1": 1.0, "l2": 2.0, "linf": INF, "inf": INF}
    value = names.get(p.lower(), None) if isinstance(p, str) else float(p)
    if value not in NORMS:
        raise ValueError(f"norm must be one of 1, 2, inf, got {p!r}")
    return value


def dual_norm(p: float | int | str) -> float:
    """The exponent q with 1/p + 1/q = 1 (1 <-> inf, 2 <-> 2)."""
    p = norm_value(p)
    return {1.0: INF, 2.0: 2.0, INF: 1.0}[p]


def norm_conversion(dim: int, *, src: float, dst: float) -> float:
    """The smallest c with ||a||_dst <= c ||a||_src for all a in R^dim (p-norms with p in {1, 2, inf})."""
    src, dst = norm_value(src), norm_value(dst)
    if dst >= src:                       # norms decrease with the exponent
        return 1.0
    inv = lambda p: 0.0 if p == INF else 1.0 / p  # noqa: E731
    return float(dim) ** (inv(dst) - inv(src))


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


