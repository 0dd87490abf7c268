"""The constrained version of Theorem 1: problems (5) and (6) over C Gaussian classes (Chapter 3, notes E4).

Without constraints problem (5) is unbounded below and problem (6) has an unattained infimum; with
the means in a ball and the variances bounded below both have the evenly spread optimum, which
``solve_constrained`` finds by projected gradient descent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .inputs import as_float64


def _variance_matrix(variances: torch.Tensor, C: int, K: int) -> torch.Tensor:
    """Per-class variances as [C, K]: isotropic [C] values are repeated over dimensions."""
    if variances.ndim == 1 and variances.shape[0] == C:
        return variances[:, None].expand(C, K)
    if variances.shape == (C, K):
        return variances
    raise ValueError(
        f"variances must have shape [C] (isotropic) or [C, K] (diagonal) with C={C}, K={K}; "
        f"got {tuple(variances.shape)}."
    )


def _pairs(C: int):
    iu = torch.triu_indices(C, C, offset=1)
    return iu[0], iu[1]


def objective_distance(means: torch.Tensor, variances: torch.Tensor, lam: float) -> torch.Tensor:
    """Problem (5) of Theorem 1: ``-sum_{i<j} ||mu_i - mu_j||_2 + lam sum_i tr(Sigma_i)`` (Chapter 3).

    ``means`` [C, K]; ``variances`` [C] (isotropic, ``Sigma_i = v_i I``) or [C, K]
    (diagonal). Differentiable torch scalar. Unbounded below unless the means are
    constrained (notes E4), as :func:`solve_constrained` does.
    """
    C, K = means.shape
    V = _variance_matrix(variances, C, K)
    i, j = _pairs(C)
    dist = torch.linalg.vector_norm(means[i] - means[j], dim=-1)
    return -dist.sum() + lam * V.sum()


def objective_overlap(means: torch.Tensor, variances: torch.Tensor, lam: float) -> torch.Tensor:
    """Problem (6) of Theorem 1: ``sum_{i<j} int p_i p_j + lam sum_i tr(Sigma_i)`` (Chapter 3).

    For Gaussian classes with diagonal covariances the overlap is
    ``N(mu_i; mu_j, Sigma_i + Sigma_j)`` (see :func:`gaussian_overlap`), evaluated in the
    log domain. ``means`` [C, K]; ``variances`` [C] (isotropic) or [C, K] (diagonal).
    Its infimum without constraints is 0 and is not attained (notes E4).
    """
    C, K = means.shape
    V = _variance_matrix(variances, C, K)
    i, j = _pairs(C)
    Vs = V[i] + V[j]
    diff = means[i] - means[j]
    log_ov = -0.5 * (torch.log(2.0 * math.pi * Vs) + diff.pow(2) / Vs).sum(dim=-1)
    return log_ov.exp().sum() + lam * V.sum()


_OBJECTIVES: dict[str, Callable] = {"distance": objective_distance, "overlap": objective_overlap}


@dataclass(frozen=True)
class ConstrainedSolution:
    """Result of :func:`solve_constrained`: final means [C, K], variances [C] or [C, K],
    the objective value at every step, and the random starting point."""

    means: np.ndarray
    variances: np.ndarray
    objective_trace: np.ndarray
    initial_means: np.ndarray | None = None
    initial_variances: np.ndarray | None = None

    @property
    def objective(self) -> float:
        return float(self.objective_trace[-1])


def solve_constrained(
    objective: Callable | str,
    C: int = 3,
    K: int = 2,
    R: float = 1.0,
    s_min: float = 0.3,
    lam: float = 0.1,
    steps: int = 1500,
    lr: float = 0.05,
    seed: int = 0,
    diagonal: bool = False,
) -> ConstrainedSolution:
    """Minimise problem (5) or (6) of Theorem 1 under the constraints of notes E4 (Chapter 3).

    Constraints: every mean in the ball ``||mu_i|| <= R``, every variance ``>= s_min^2``.
    Without them (5) is unbounded below and (6) has an unattained infimum. Start: means
    uniform in the ball, variances uniform in ``[s_min^2, 4 s_min^2]`` (seeded). Each step
    moves the means by ``eta R`` and the variances by ``eta s_min^2`` along their
    *normalised* negative gradients, then projects the means back onto the ball and
    clamps the variances at ``s_min^2``; ``eta`` decays from ``lr`` to ``lr / 100`` on a
    cosine schedule. ``objective`` is a callable ``f(means, variances, lam)`` or one of
    ``"distance"`` (problem 5) and ``"overlap"`` (problem 6); ``diagonal=True`` gives each
    class K variances instead of one.

    Why normalised gradients: a coordinate-wise adaptive method such as Adam steps
    roughly along ``sign(g)``, which is not rotation-equivariant; combined with the
    projection it stalls at spurious angles. Normalising the whole gradient keeps its
    direction, so the fixed points are the true constrained stationary points, and it
    also copes with the tiny overlap gradients of (6).

    Expected optimum for C = 3, K = 2: means on the circle of radius R at 120 degrees from
    each other, variances at ``s_min^2``. In (5) the trace term does not involve the means:
    any ``lam > 0`` sends the variances to ``s_min^2``, while ``lam = 0`` leaves them where
    they started. In (6) the overlap couples means and variances. Its gradient decays like
    ``exp(-d^2 / (2 (v_i + v_j)))``, so when R is many times s_min the classes barely
    interact: plain gradient steps stop moving the means and, in the extreme, the overlap
    underflows to exactly zero. R = 1 and s_min = 0.3 keep the classes interacting.
    While two classes overlap heavily (``d^2 < K (v_i + v_j)``) the overlap favours
    *larger* variances, and ``lam`` (default 0.1) must counter it; at the optimum
    (``d^2 = 3 R^2``) the overlap itself pushes the variances down as well.
    """
    if isinstance(objective, str):
        if objective not in _OBJECTIVES:
            raise ValueError(f"objective must be a callable or one of {sorted(_OBJECTIVES)}; got {objective!r}.")
        objective = _OBJECTIVES[objective]
    if C < 2 or K < 1:
        raise ValueError(f"need C >= 2 classes and K >= 1 dimensions; got C={C}, K={K}.")
    if not (R > 0 and s_min > 0 and steps >= 1 and lr > 0):
        raise ValueError("R, s_min and lr must be > 0 and steps >= 1.")
    g = torch.Generator().manual_seed(int(seed))
    direction = torch.randn(C, K, generator=g, dtype=torch.float64)
    direction = direction / torch.linalg.vector_norm(direction, dim=1, keepdim=True)
    radius = R * torch.rand(C, 1, generator=g, dtype=torch.float64) ** (1.0 / K)
    means = (direction * radius).requires_grad_(True)
    v_shape = (C, K) if diagonal else (C,)
    v_min = float(s_min) ** 2
    variances = (v_min * (1.0 + 3.0 * torch.rand(v_shape, generator=g, dtype=torch.float64))).requires_grad_(True)
    start = (means.detach().numpy().copy(), variances.detach().numpy().copy())

    trace = np.empty(steps, dtype=np.float64)
    for step in range(steps):
        # cosine decay of the step size from lr to lr / 100
        eta = lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * step / steps)))
        loss = objective(means, variances, lam)
        g_mu, g_v = torch.autograd.grad(loss, (means, variances))
        with torch.no_grad():
            means -= eta * R * g_mu / torch.linalg.vector_norm(g_mu).clamp_min(1e-300)
            variances -= eta * v_min * g_v / torch.linalg.vector_norm(g_v).clamp_min(1e-300)
            norms = torch.linalg.vector_norm(means, dim=1, keepdim=True)
            means.mul_(torch.clamp(R / norms.clamp_min(1e-300), max=1.0))
            variances.clamp_(min=v_min)
        trace[step] = float(loss.detach())
    return ConstrainedSolution(
        means=means.detach().numpy().copy(),
        variances=variances.detach().numpy().copy(),
        objective_trace=trace,
        initial_means=start[0],
        initial_variances=start[1],
    )


def configuration_summary(means, variances, R: float, s_min: float) -> dict:
    """Describe a solution of the constrained Theorem 1 problems (Chapter 3, notes E4).

    Returns a dict with ``radii`` (norm of each mean; R at the optimum),
    ``radius_error`` (max |radius - R|), ``pairwise_angles_deg`` (sorted angles between all
    pairs of means, in degrees; all 120 for C = 3 evenly spread), ``angular_gaps_deg``
    (for K = 2 only: sorted gaps between consecutive polar angles, ``360 / C`` each when
    evenly spread), ``variances`` and ``variance_error`` (max |v - s_min^2|).
    """
    mu = as_float64(means, "means")
    v = as_float64(variances, "variances")
    radii = np.linalg.norm(mu, axis=1)
    unit = mu / np.maximum(radii[:, None], 1e-300)
    C = mu.shape[0]
    i, j = np.triu_indices(C, k=1)
    cosines = np.clip(np.sum(unit[i] * unit[j], axis=1), -1.0, 1.0)
    summary = {
        "radii": radii,
        "radius_error": float(np.max(np.abs(radii - R))),
        "pairwise_angles_deg": np.sort(np.degrees(np.arccos(cosines))),
        "variances": v,
        "variance_error": float(np.max(np.abs(v - float(s_min) ** 2))),
    }
    if mu.shape[1] == 2:
        polar = np.sort(np.mod(np.arctan2(mu[:, 1], mu[:, 0]), 2.0 * np.pi))
        gaps = np.diff(np.concatenate([polar, polar[:1] + 2.0 * np.pi]))
        summary["angular_gaps_deg"] = np.sort(np.degrees(gaps))
    return summary
