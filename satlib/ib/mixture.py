"""Entropies of Gaussian mixtures and the sound upper bound on the IB loss built from them (Chapter 3).

The Renyi-2 entropy of a mixture in closed form, its Shannon entropy by Monte Carlo, and the bound
that replaces the faulty step ``int p^2 <= 1`` of the appendix's proof of Theorem 1 (notes E4, E7).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.special

from .gaussian import log_gaussian_overlap
from .inputs import LOG_2PI, as_cov, as_float64, cholesky


def _mixture_inputs(weights, means, covs):
    """Validate a Gaussian mixture: weights [M] (normalised here), means [M, K], covs [M, K, K]."""
    w = as_float64(weights, "weights").reshape(-1)
    mu = as_float64(means, "means")
    S = as_cov(covs, "covs")
    if mu.ndim != 2 or S.ndim != 3 or not (len(w) == mu.shape[0] == S.shape[0]) or mu.shape[1] != S.shape[-1]:
        raise ValueError(
            "expected weights [M], means [M, K] and covs [M, K, K]; got shapes "
            f"{tuple(w.shape)}, {tuple(mu.shape)}, {tuple(S.shape)}."
        )
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum.")
    return w / w.sum(), mu, S


def _log_collision_matrix(mu: np.ndarray, S: np.ndarray) -> np.ndarray:
    """``[M, M]`` matrix of ``log int N(t; mu_i, S_i) N(t; mu_j, S_j) dt``."""
    M = mu.shape[0]
    return np.asarray(
        log_gaussian_overlap(mu[:, None, :], S[:, None], mu[None, :, :], S[None, :]),
        dtype=np.float64,
    ).reshape(M, M)


def renyi2_entropy_mixture(weights, means, covs) -> float:
    """Renyi-2 entropy ``-log int p(t)^2 dt`` of a Gaussian mixture (Chapter 3, notes E4).

    For ``p = sum_i w_i N(mu_i, S_i)``, ``int p^2 = sum_i sum_j w_i w_j N(mu_i; mu_j, S_i + S_j)``,
    summed here in the log domain. Renyi-2 entropy never exceeds Shannon entropy, so
    small pairwise overlaps (problem (6) of Theorem 1) raise a lower bound on H(T).
    ``weights`` [M] (non-negative; normalised here), ``means`` [M, K], ``covs`` [M, K, K].
    """
    w, mu, S = _mixture_inputs(weights, means, covs)
    lo = _log_collision_matrix(mu, S)
    with np.errstate(divide="ignore"):
        logw = np.log(w)
    log_int_p2 = scipy.special.logsumexp(logw[:, None] + logw[None, :] + lo)
    return float(-log_int_p2)


class MonteCarloEstimate(NamedTuple):
    """A Monte Carlo mean and its standard error."""

    value: float
    stderr: float


def gaussian_mixture_entropy_mc(weights, means, covs, n: int = 100_000, seed: int = 0) -> MonteCarloEstimate:
    """Shannon entropy (nats) of a Gaussian mixture by Monte Carlo (Chapter 3).

    A mixture of Gaussians has no closed-form entropy. With ``n`` samples ``t_m`` drawn from
    ``p = sum_i w_i N(mu_i, S_i)`` (numpy generator seeded with ``seed``), the estimate is
    ``-(1/n) sum_m log p(t_m)``, with ``log p`` evaluated exactly (Cholesky factors,
    log-sum-exp over components); ``stderr`` is the standard error of that mean. Used to
    check Renyi-2 <= Shannon (notes E4), Proposition 1 on non-Gaussian variables, and the
    upper bound :func:`ib_loss_upper_bound_mixture`.
    """
    w, mu, S = _mixture_inputs(weights, means, covs)
    n = int(n)
    if n < 2:
        raise ValueError(f"n must be >= 2 samples; got {n}.")
    M, K = mu.shape
    rng = np.random.default_rng(seed)
    L = cholesky(S, "covs")
    comp = rng.choice(M, size=n, p=w)
    z = rng.standard_normal((n, K))
    t = mu[comp] + np.einsum("nij,nj->ni", L[comp], z)
    logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=-2, axis2=-1)), axis=-1)
    with np.errstate(divide="ignore"):
        logw = np.log(w)
    logp = np.empty((M, n))
    for m in range(M):
        y = scipy.linalg.solve_triangular(L[m], (t - mu[m]).T, lower=True)
        logp[m] = logw[m] - 0.5 * (K * LOG_2PI + logdet[m] + np.sum(y * y, axis=0))
    neg = -scipy.special.logsumexp(logp, axis=0)
    return MonteCarloEstimate(float(neg.mean()), float(neg.std(ddof=1) / math.sqrt(n)))


class IBMixtureBound(NamedTuple):
    """Pieces of :func:`ib_loss_upper_bound_mixture` (nats)."""

    bound: float  # (gamma - 1) log int p^2 + gamma * conditional_entropy_bound
    linear_bound: float  # the same with log int p^2 <= int p^2 - 1
    collision: float  # int p^2 = self_term + cross_term
    self_term: float  # sum_i w_i^2 int p_i^2
    cross_term: float  # 2 sum_{i<j} w_i w_j int p_i p_j (the overlaps of problem (6))
    conditional_entropy_bound: float  # sum_i w_i (K/2 log 2 pi + 1/2 tr S_i) >= H(T|Y)


def ib_loss_upper_bound_mixture(weights, means, covs, gamma: float) -> IBMixtureBound:
    """Sound upper bound on ``(1 - gamma) H(T) + gamma H(T|Y)`` for ``gamma >= 1`` (Chapter 3, notes E4, E7).

    T has class-conditional densities ``N(mu_i, S_i)`` with class probabilities ``w_i``, so
    p(t) is the mixture. Two facts give the bound, replacing the appendix's faulty step
    ``int p_i^2 <= 1``:

    * ``H(T) >= H_2(T) = -log int p^2`` (Renyi-2 <= Shannon), and
      ``int p^2 = sum_i w_i^2 int p_i^2 + 2 sum_{i<j} w_i w_j int p_i p_j``;
    * ``H(T|Y) <= sum_i w_i (K/2 log 2 pi + 1/2 tr S_i)`` (Propositions 1 and 2, tight form).

    For ``gamma >= 1``: ``L <= (gamma - 1) log int p^2 + gamma sum_i w_i (K/2 log 2 pi + 1/2 tr S_i)``,
    and ``log x <= x - 1`` gives the looser ``linear_bound``, which is linear in the pairwise
    overlaps of problem (6) and in the traces. Its *self* term ``sum_i w_i^2 int p_i^2``
    grows without limit as the classes tighten; it is bounded by a constant only when
    the variances are bounded below (for Gaussians, ``int p_i^2 <= (4 pi s_min^2)^(-K/2)``
    when every eigenvalue of ``S_i`` is at least ``s_min^2``).
    """
    gamma = float(gamma)
    if not gamma >= 1.0:
        raise ValueError(
            f"gamma must be >= 1: for gamma < 1 the coefficient of H(T) is positive and a lower "
            f"bound on H(T) gives no upper bound on the loss; got {gamma}."
        )
    w, mu, S = _mixture_inputs(weights, means, covs)
    K = mu.shape[1]
    P = np.exp(_log_collision_matrix(mu, S)) * w[:, None] * w[None, :]
    self_term = float(np.trace(P))
    cross_term = float(P.sum() - np.trace(P))
    collision = self_term + cross_term
    h_y = float(np.sum(w * (0.5 * K * LOG_2PI + 0.5 * np.trace(S, axis1=-2, axis2=-1))))
    return IBMixtureBound(
        bound=(gamma - 1.0) * math.log(collision) + gamma * h_y,
        linear_bound=(gamma - 1.0) * (collision - 1.0) + gamma * h_y,
        collision=collision,
        self_term=self_term,
        cross_term=cross_term,
        conditional_entropy_bound=h_y,
    )
