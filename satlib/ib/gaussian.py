"""The Gaussian differential entropy, its upper bounds, and overlaps of Gaussian densities (Chapter 3).

Proposition 2 as printed, the tighter bound its proof actually gives and the Hadamard bound in
between (notes E3); the closed-form overlap ``int N(t; mu_i, S_i) N(t; mu_j, S_j) dt`` of problem (6)
of Theorem 1 and the collision integral of one Gaussian (notes E4, E7). Entropies are in nats.
"""

from __future__ import annotations

import math

import numpy as np

from .inputs import LOG_2PI, as_cov, as_float64, cholesky, logdet_pd, scalar_or_array


def gaussian_entropy(cov):
    """Differential entropy of ``N(mu, cov)`` in nats (Chapter 3, notes E3).

    ``H = K/2 log(2 pi e) + 1/2 log det(cov)``; it does not depend on the mean. The log
    determinant comes from a Cholesky factor, which also checks positive definiteness
    (a ``ValueError`` is raised otherwise). ``cov`` may be a numpy array or torch tensor of
    shape [K, K] (returns a float) or a batch [..., K, K] (returns an array).
    """
    S = as_cov(cov)
    K = S.shape[-1]
    return scalar_or_array(0.5 * K * (LOG_2PI + 1.0) + 0.5 * logdet_pd(S, "cov"))


def paper_entropy_bound(cov):
    """Proposition 2 as printed: ``K log(2 pi) + 1/2 tr(cov)`` (Chapter 3).

    A valid upper bound on the Gaussian entropy, but looser by ``K/2 log(2 pi)`` than
    what the paper's own proof gives (see :func:`tight_entropy_bound`, notes E3 and E7).
    Accepts [K, K] or batched [..., K, K] covariances.
    """
    S = as_cov(cov)
    K = S.shape[-1]
    return scalar_or_array(K * LOG_2PI + 0.5 * np.trace(S, axis1=-2, axis2=-1))


def tight_entropy_bound(cov):
    """Bound the proof of Proposition 2 yields: ``K/2 log(2 pi) + 1/2 tr(cov)`` (Chapter 3).

    From Hadamard's inequality and ``log s <= s - 1`` applied to each variance; equality
    holds exactly when ``cov`` is the identity (notes E3). Combined with Proposition 1 it
    bounds the entropy of *any* K-dimensional variable with covariance ``cov``.
    """
    S = as_cov(cov)
    K = S.shape[-1]
    return scalar_or_array(0.5 * K * LOG_2PI + 0.5 * np.trace(S, axis1=-2, axis2=-1))


def hadamard_entropy_bound(cov):
    """Intermediate bound ``K/2 log(2 pi e) + 1/2 sum_k log cov_kk`` (Chapter 3, notes E3).

    Hadamard's inequality ``det(cov) <= prod_k cov_kk`` in the Gaussian entropy formula;
    it lies between :func:`gaussian_entropy` and :func:`tight_entropy_bound`, with
    equality to the exact entropy for a diagonal covariance.
    """
    S = as_cov(cov)
    K = S.shape[-1]
    diag = np.diagonal(S, axis1=-2, axis2=-1)
    if np.any(diag <= 0):
        raise ValueError("cov must have a strictly positive diagonal for the Hadamard bound.")
    return scalar_or_array(0.5 * K * (LOG_2PI + 1.0) + 0.5 * np.sum(np.log(diag), axis=-1))


# ---------------------------------------------------------------------------
# Overlaps of Gaussian densities and the Renyi-2 entropy of a mixture
# ---------------------------------------------------------------------------


def log_gaussian_overlap(mu_i, S_i, mu_j, S_j):
    """``log int N(t; mu_i, S_i) N(t; mu_j, S_j) dt = log N(mu_i; mu_j, S_i + S_j)`` (Chapter 3).

    The overlap integral of problem (6) in Theorem 1, in closed form (notes E4). Means
    have shape [..., K] and covariances [..., K, K]; leading dimensions broadcast. Works in
    the log domain, so far-apart or very narrow components do not underflow.
    """
    mi = as_float64(mu_i, "mu_i")
    mj = as_float64(mu_j, "mu_j")
    S = as_cov(S_i, "S_i") + as_cov(S_j, "S_j")
    K = S.shape[-1]
    if mi.shape[-1:] != (K,) or mj.shape[-1:] != (K,):
        raise ValueError(
            f"means must end in dimension K={K}; got {tuple(mi.shape)} and {tuple(mj.shape)}."
        )
    d = mi - mj
    batch = np.broadcast_shapes(d.shape[:-1], S.shape[:-2])
    d = np.broadcast_to(d, batch + (K,))
    S = np.broadcast_to(S, batch + (K, K))
    L = cholesky(S, "S_i + S_j")
    y = np.linalg.solve(L, d[..., None])[..., 0]  # L y = d, so |y|^2 = d^T S^-1 d
    maha = np.sum(y * y, axis=-1)
    logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=-2, axis2=-1)), axis=-1)
    return scalar_or_array(-0.5 * (K * LOG_2PI + logdet + maha))


def gaussian_overlap(mu_i, S_i, mu_j, S_j):
    """``int N(t; mu_i, S_i) N(t; mu_j, S_j) dt = N(mu_i; mu_j, S_i + S_j)`` (Chapter 3).

    Closed-form overlap of two Gaussian densities used in problem (6) of Theorem 1
    (notes E4). It decreases monotonically in the Mahalanobis distance of the means
    under ``S_i + S_j``. Computed as ``exp`` of :func:`log_gaussian_overlap`.
    """
    return scalar_or_array(np.exp(log_gaussian_overlap(mu_i, S_i, mu_j, S_j)))


def gaussian_self_overlap(cov):
    """``int N(t; mu, cov)^2 dt = 1 / sqrt(det(4 pi cov))`` (Chapter 3, notes E7).

    The collision integral of a single Gaussian. It exceeds 1 for narrow Gaussians (for
    an isotropic standard deviation ``s`` it is ``(2 s sqrt(pi))^-K``), which is why the
    appendix's step ``int p^2 <= 1`` in the proof of Theorem 1 fails for densities.
    """
    S = as_cov(cov)
    K = S.shape[-1]
    return scalar_or_array(np.exp(-0.5 * (K * math.log(4.0 * math.pi) + logdet_pd(S, "cov"))))
