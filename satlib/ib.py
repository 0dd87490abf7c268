"""Information-bottleneck quantities behind the clustering effect (Chapter 3).

This module collects the closed forms and estimators that Chapter 3 uses to check the
paper's Section 3.3 (Definition 2, Eq. 3-4, Propositions 1-2, Theorem 1) and the
corrected versions of its arguments (reading notes E2, E3, E4 and E7):

* Gaussian differential entropy and its three upper bounds (Proposition 2 as printed,
  the tighter bound its proof actually gives, and the Hadamard bound in between);
* the overlap integral of two Gaussian densities, the Renyi-2 entropy of a Gaussian
  mixture and the upper bound on the IB loss built from it, which replace the faulty step
  ``int p^2 <= 1`` of the appendix's proof; a Monte Carlo Shannon entropy of a mixture to
  check them against;
* the information-bottleneck loss for a discrete, deterministic representation, in the
  paper's form and in the decomposed form that makes its three cases one-liners;
* plug-in (binning) and noise-added (pairwise-distance / KDE) estimators of entropies
  and mutual information of network features;
* the per-class spread of features (the variance form of Proposition 2 and the
  standard-deviation form of L_Cluster) and the bounds on H(T|Y) each one controls;
* the constrained version of Theorem 1: problems (5) and (6) over C Gaussian classes,
  solved by projected gradient descent.

All entropies are in nats. The module stands apart from the rest of ``satlib``: it
imports only numpy, scipy, torch and the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import scipy.linalg
import scipy.special
import torch

__all__ = [
    # Gaussian entropy and bounds (Proposition 2, notes E3)
    "gaussian_entropy",
    "paper_entropy_bound",
    "tight_entropy_bound",
    "hadamard_entropy_bound",
    # overlaps and Renyi-2 entropy (Theorem 1, notes E4 and E7)
    "log_gaussian_overlap",
    "gaussian_overlap",
    "gaussian_self_overlap",
    "renyi2_entropy_mixture",
    "MonteCarloEstimate",
    "gaussian_mixture_entropy_mc",
    "IBMixtureBound",
    "ib_loss_upper_bound_mixture",
    # discrete IB loss (Eq. 3-4, notes E2)
    "DiscreteEntropies",
    "discrete_entropies",
    "ib_loss",
    "ib_loss_decomposed",
    # estimators for network features
    "BinnedEntropies",
    "binned_entropies",
    "KDEInformation",
    "kde_entropy_upper",
    "kde_entropy_lower",
    "kde_conditional_entropy_upper",
    "kde_conditional_entropy_lower",
    "kde_mutual_information",
    # the spread term of L_Cluster and the entropy bounds it controls (notes E3, E6)
    "ClassSpread",
    "class_spread",
    # constrained Theorem 1 experiment (notes E4)
    "objective_distance",
    "objective_overlap",
    "ConstrainedSolution",
    "solve_constrained",
    "configuration_summary",
]

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------
# input helpers
# ---------------------------------------------------------------------------


def _as_float64(x, name: str) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor, list or scalar) as a float64 ndarray."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite entries.")
    return arr


def _as_cov(cov, name: str = "cov") -> np.ndarray:
    """Validate a (possibly batched) covariance: shape [..., K, K], symmetric."""
    S = _as_float64(cov, name)
    if S.ndim < 2 or S.shape[-1] != S.shape[-2] or S.shape[-1] == 0:
        raise ValueError(
            f"{name} must be a square matrix of shape [K, K] or a batch [..., K, K]; "
            f"got shape {tuple(S.shape)}."
        )
    asym = np.max(np.abs(S - np.swapaxes(S, -1, -2)), initial=0.0)
    scale = max(1.0, float(np.max(np.abs(S), initial=0.0)))
    if asym > 1e-8 * scale:
        raise ValueError(f"{name} must be symmetric (max |S - S^T| = {asym:.3g}).")
    return S


def _cholesky(S: np.ndarray, name: str) -> np.ndarray:
    """Cholesky factor of a batch of symmetric matrices, with a readable error."""
    try:
        return np.linalg.cholesky(S)
    except np.linalg.LinAlgError:
        raise ValueError(
            f"{name} is not positive definite (its Cholesky factorisation failed), so the "
            "Gaussian density and its differential entropy are undefined; a degenerate "
            "Gaussian has entropy -inf."
        ) from None


def _logdet_pd(S: np.ndarray, name: str) -> np.ndarray:
    L = _cholesky(S, name)
    return 2.0 * np.sum(np.log(np.diagonal(L, axis1=-2, axis2=-1)), axis=-1)


def _out(x):
    """A 0-d result becomes a Python float, a batched one stays an ndarray."""
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x


# ---------------------------------------------------------------------------
# Gaussian entropy and its upper bounds
# ---------------------------------------------------------------------------


def gaussian_entropy(cov):
    """Differential entropy of ``N(mu, cov)`` in nats (Chapter 3, notes E3).

    ``H = K/2 log(2 pi e) + 1/2 log det(cov)``; it does not depend on the mean. The log
    determinant comes from a Cholesky factor, which also checks positive definiteness
    (a ``ValueError`` is raised otherwise). ``cov`` may be a numpy array or torch tensor of
    shape [K, K] (returns a float) or a batch [..., K, K] (returns an array).
    """
    S = _as_cov(cov)
    K = S.shape[-1]
    return _out(0.5 * K * (_LOG_2PI + 1.0) + 0.5 * _logdet_pd(S, "cov"))


def paper_entropy_bound(cov):
    """Proposition 2 as printed: ``K log(2 pi) + 1/2 tr(cov)`` (Chapter 3).

    A valid upper bound on the Gaussian entropy, but looser by ``K/2 log(2 pi)`` than
    what the paper's own proof gives (see :func:`tight_entropy_bound`, notes E3 and E7).
    Accepts [K, K] or batched [..., K, K] covariances.
    """
    S = _as_cov(cov)
    K = S.shape[-1]
    return _out(K * _LOG_2PI + 0.5 * np.trace(S, axis1=-2, axis2=-1))


def tight_entropy_bound(cov):
    """Bound the proof of Proposition 2 yields: ``K/2 log(2 pi) + 1/2 tr(cov)`` (Chapter 3).

    From Hadamard's inequality and ``log s <= s - 1`` applied to each variance; equality
    holds exactly when ``cov`` is the identity (notes E3). Combined with Proposition 1 it
    bounds the entropy of *any* K-dimensional variable with covariance ``cov``.
    """
    S = _as_cov(cov)
    K = S.shape[-1]
    return _out(0.5 * K * _LOG_2PI + 0.5 * np.trace(S, axis1=-2, axis2=-1))


def hadamard_entropy_bound(cov):
    """Intermediate bound ``K/2 log(2 pi e) + 1/2 sum_k log cov_kk`` (Chapter 3, notes E3).

    Hadamard's inequality ``det(cov) <= prod_k cov_kk`` in the Gaussian entropy formula;
    it lies between :func:`gaussian_entropy` and :func:`tight_entropy_bound`, with
    equality to the exact entropy for a diagonal covariance.
    """
    S = _as_cov(cov)
    K = S.shape[-1]
    diag = np.diagonal(S, axis1=-2, axis2=-1)
    if np.any(diag <= 0):
        raise ValueError("cov must have a strictly positive diagonal for the Hadamard bound.")
    return _out(0.5 * K * (_LOG_2PI + 1.0) + 0.5 * np.sum(np.log(diag), axis=-1))


# ---------------------------------------------------------------------------
# Overlaps of Gaussian densities and the Renyi-2 entropy of a mixture
# ---------------------------------------------------------------------------


def log_gaussian_overlap(mu_i, S_i, mu_j, S_j):
    """``log int N(t; mu_i, S_i) N(t; mu_j, S_j) dt = log N(mu_i; mu_j, S_i + S_j)`` (Chapter 3).

    The overlap integral of problem (6) in Theorem 1, in closed form (notes E4). Means
    have shape [..., K] and covariances [..., K, K]; leading dimensions broadcast. Works in
    the log domain, so far-apart or very narrow components do not underflow.
    """
    mi = _as_float64(mu_i, "mu_i")
    mj = _as_float64(mu_j, "mu_j")
    S = _as_cov(S_i, "S_i") + _as_cov(S_j, "S_j")
    K = S.shape[-1]
    if mi.shape[-1:] != (K,) or mj.shape[-1:] != (K,):
        raise ValueError(
            f"means must end in dimension K={K}; got {tuple(mi.shape)} and {tuple(mj.shape)}."
        )
    d = mi - mj
    batch = np.broadcast_shapes(d.shape[:-1], S.shape[:-2])
    d = np.broadcast_to(d, batch + (K,))
    S = np.broadcast_to(S, batch + (K, K))
    L = _cholesky(S, "S_i + S_j")
    y = np.linalg.solve(L, d[..., None])[..., 0]  # L y = d, so |y|^2 = d^T S^-1 d
    maha = np.sum(y * y, axis=-1)
    logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=-2, axis2=-1)), axis=-1)
    return _out(-0.5 * (K * _LOG_2PI + logdet + maha))


def gaussian_overlap(mu_i, S_i, mu_j, S_j):
    """``int N(t; mu_i, S_i) N(t; mu_j, S_j) dt = N(mu_i; mu_j, S_i + S_j)`` (Chapter 3).

    Closed-form overlap of two Gaussian densities used in problem (6) of Theorem 1
    (notes E4). It decreases monotonically in the Mahalanobis distance of the means
    under ``S_i + S_j``. Computed as ``exp`` of :func:`log_gaussian_overlap`.
    """
    return _out(np.exp(log_gaussian_overlap(mu_i, S_i, mu_j, S_j)))


def gaussian_self_overlap(cov):
    """``int N(t; mu, cov)^2 dt = 1 / sqrt(det(4 pi cov))`` (Chapter 3, notes E7).

    The collision integral of a single Gaussian. It exceeds 1 for narrow Gaussians (for
    an isotropic standard deviation ``s`` it is ``(2 s sqrt(pi))^-K``), which is why the
    appendix's step ``int p^2 <= 1`` in the proof of Theorem 1 fails for densities.
    """
    S = _as_cov(cov)
    K = S.shape[-1]
    return _out(np.exp(-0.5 * (K * math.log(4.0 * math.pi) + _logdet_pd(S, "cov"))))


def _mixture_inputs(weights, means, covs):
    """Validate a Gaussian mixture: weights [M] (normalised here), means [M, K], covs [M, K, K]."""
    w = _as_float64(weights, "weights").reshape(-1)
    mu = _as_float64(means, "means")
    S = _as_cov(covs, "covs")
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
    L = _cholesky(S, "covs")
    comp = rng.choice(M, size=n, p=w)
    z = rng.standard_normal((n, K))
    t = mu[comp] + np.einsum("nij,nj->ni", L[comp], z)
    logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=-2, axis2=-1)), axis=-1)
    with np.errstate(divide="ignore"):
        logw = np.log(w)
    logp = np.empty((M, n))
    for m in range(M):
        y = scipy.linalg.solve_triangular(L[m], (t - mu[m]).T, lower=True)
        logp[m] = logw[m] - 0.5 * (K * _LOG_2PI + logdet[m] + np.sum(y * y, axis=0))
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
    h_y = float(np.sum(w * (0.5 * K * _LOG_2PI + 0.5 * np.trace(S, axis1=-2, axis2=-1))))
    return IBMixtureBound(
        bound=(gamma - 1.0) * math.log(collision) + gamma * h_y,
        linear_bound=(gamma - 1.0) * (collision - 1.0) + gamma * h_y,
        collision=collision,
        self_term=self_term,
        cross_term=cross_term,
        conditional_entropy_bound=h_y,
    )


# ---------------------------------------------------------------------------
# Discrete information bottleneck (Eq. 3-4, notes E2)
# ---------------------------------------------------------------------------


class DiscreteEntropies(NamedTuple):
    """Entropies (nats) of a discrete pair (T, Y)."""

    H_T: float
    H_Y: float
    H_T_given_Y: float
    I_T_Y: float


def discrete_entropies(joint) -> DiscreteEntropies:
    """H(T), H(Y), H(T|Y) and I(T;Y) of a joint table ``p(t, y)`` (Chapter 3, Eq. 4).

    ``joint`` has shape [n_T, n_Y] (rows index values of T, columns values of Y). Counts
    are accepted too: the table is normalised to sum to one. Uses
    ``H(T|Y) = H(T, Y) - H(Y)`` and ``I(T;Y) = H(T) + H(Y) - H(T, Y)``, with ``0 log 0 = 0``.
    """
    p = _as_float64(joint, "joint")
    if p.ndim != 2:
        raise ValueError(f"joint must be a 2-D table p(t, y); got shape {tuple(p.shape)}.")
    if np.any(p < 0) or p.sum() <= 0:
        raise ValueError("joint must be non-negative with a positive sum.")
    p = p / p.sum()
    H_TY = float(np.sum(scipy.special.entr(p)))
    H_T = float(np.sum(scipy.special.entr(p.sum(axis=1))))
    H_Y = float(np.sum(scipy.special.entr(p.sum(axis=0))))
    return DiscreteEntropies(
        H_T=H_T,
        H_Y=H_Y,
        H_T_given_Y=max(H_TY - H_Y, 0.0),
        I_T_Y=max(H_T + H_Y - H_TY, 0.0),
    )


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0 (Eq. 3); got {gamma}.")
    return gamma


def ib_loss(joint, gamma: float) -> float:
    """IB loss in the paper's form ``(1 - gamma) H(T) + gamma H(T|Y)`` (Eq. 4, Chapter 3).

    Equals ``I(X;T) - gamma I(T;Y)`` (Eq. 3) when T is a deterministic function of X with
    discrete values, so that ``H(T|X) = 0``. For continuous deterministic T this premise
    fails (``H(T|X) = -inf``); see :func:`binned_entropies`.
    """
    gamma = _check_gamma(gamma)
    e = discrete_entropies(joint)
    return (1.0 - gamma) * e.H_T + gamma * e.H_T_given_Y


def ib_loss_decomposed(joint, gamma: float) -> float:
    """IB loss as ``(1 - gamma) I(T;Y) + H(T|Y)`` (Chapter 3, notes E2).

    Identical to :func:`ib_loss` via ``H(T) = I(T;Y) + H(T|Y)``. Since
    ``0 <= I(T;Y) <= H(Y)`` and ``H(T|Y) >= 0``: for ``gamma < 1`` the minimum 0 is reached
    by a constant T; for ``gamma = 1`` by any function of Y; for ``gamma > 1`` the minimum
    ``(1 - gamma) H(Y)`` is reached exactly by injective functions of Y.
    """
    gamma = _check_gamma(gamma)
    e = discrete_entropies(joint)
    return (1.0 - gamma) * e.I_T_Y + e.H_T_given_Y


# ---------------------------------------------------------------------------
# Estimators for network features
# ---------------------------------------------------------------------------


def _features_2d(features, name: str = "features") -> np.ndarray:
    x = _as_float64(features, name)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, ...] with N >= 1.")
    if x.ndim == 1:
        x = x[:, None]
    return x.reshape(x.shape[0], -1)


def _labels_1d(labels, n: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"labels has {y.shape[0]} entries but features has {n} rows.")
    return np.unique(y, return_inverse=True)[1].reshape(-1)


def _plugin_entropy(codes: np.ndarray) -> float:
    """Plug-in entropy (nats) of the empirical distribution of integer codes."""
    counts = np.unique(codes, return_counts=True)[1].astype(np.float64)
    n = counts.sum()
    return float(math.log(n) - np.sum(counts * np.log(counts)) / n)


@dataclass(frozen=True)
class BinnedEntropies:
    """Plug-in entropies (nats) of binned features T and labels Y.

    ``I_X_T`` equals ``H_T``: the binned representation is a deterministic function of
    the input, so ``H(T_binned | X) = 0``.
    """

    H_T: float
    H_Y: float
    H_T_given_Y: float
    I_T_Y: float
    n_symbols: int
    n_samples: int

    @property
    def I_X_T(self) -> float:
        return self.H_T


def binned_entropies(features, labels, n_bins: int = 30, range=None) -> BinnedEntropies:
    """Plug-in H(T), H(T|Y), I(T;Y) of features discretised by binning (Chapter 3, notes E2).

    Why an estimator is needed at all: a deterministic network with continuous features
    has ``H(T|X) = -inf``, so I(X;T) is infinite and Eq. 3 is not finite as written.
    Two standard remedies make it finite: discretise T (Shwartz-Ziv & Tishby, 2017), as
    here, or add noise to T (Saxe et al., 2019, "On the information bottleneck theory of
    deep learning"), as in :func:`kde_mutual_information`. Either way the numbers depend
    on the bin width or noise level, not only on the network.

    Each of the K feature dimensions is cut into ``n_bins`` equal-width bins over one
    shared ``range=(lo, hi)`` (default: min and max over all features; values outside
    a given range go to the edge bins). A sample's vector of bin indices is one discrete
    symbol, and entropies are plug-in estimates from symbol (and symbol, label) counts.

    Caveats: the plug-in H(T) is at most ``log N`` (every sample its own symbol), and it
    is biased downward when the number of occupied cells is comparable to N, which
    happens quickly for large K; I(T;Y) is biased upward by roughly
    ``(n_symbols - 1)(n_classes - 1) / (2N)``; with bins so fine that every sample is its
    own symbol, I(T;Y) equals H(Y) whatever the labels. Compare layers only at equal N and
    equal binning. ``features`` is a numpy array or torch tensor [N, ...] (flattened to [N, K]);
    ``labels`` has N entries.
    """
    x = _features_2d(features)
    n = x.shape[0]
    y = _labels_1d(labels, n)
    n_bins = int(n_bins)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
    if range is None:
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = (float(v) for v in range)
        if not hi >= lo:
            raise ValueError(f"range must satisfy lo <= hi; got {range}.")
    if hi > lo:
        idx = np.floor((x - lo) / (hi - lo) * n_bins)
        idx = np.clip(idx, 0, n_bins - 1)
    else:  # all features equal (or a degenerate range): one bin
        idx = np.zeros_like(x)
    dtype = np.int16 if n_bins <= np.iinfo(np.int16).max else np.int64
    idx = np.ascontiguousarray(idx.astype(dtype))
    symbols = np.unique(idx, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
    n_classes = int(y.max()) + 1
    H_T = _plugin_entropy(symbols)
    H_Y = _plugin_entropy(y)
    H_TY = _plugin_entropy(symbols * n_classes + y)
    return BinnedEntropies(
        H_T=H_T,
        H_Y=H_Y,
        H_T_given_Y=max(H_TY - H_Y, 0.0),
        I_T_Y=max(H_T + H_Y - H_TY, 0.0),
        n_symbols=int(symbols.max()) + 1,
        n_samples=n,
    )


def _check_noise_var(noise_var: float) -> float:
    noise_var = float(noise_var)
    if not noise_var > 0:
        raise ValueError(f"noise_var must be > 0; got {noise_var}.")
    return noise_var


def _mean_log_kernel_mean(x: torch.Tensor, scale: float, max_chunk_bytes: int = 2**26) -> float:
    """``mean_i log mean_j exp(-||x_i - x_j||^2 / scale)`` with pairwise distances in chunks."""
    n = x.shape[0]
    rows = max(1, max_chunk_bytes // (8 * n))
    total = 0.0
    log_n = math.log(n)
    for start in range(0, n, rows):
        d = torch.cdist(x[start:start + rows], x).pow_(2)
        total += float((torch.logsumexp(-d / scale, dim=1) - log_n).sum())
    return total / n


def _features_torch(features) -> torch.Tensor:
    if isinstance(features, torch.Tensor):
        x = features.detach().to("cpu", torch.float64)
    else:
        x = torch.from_numpy(_as_float64(features, "features"))
    if x.ndim == 1:
        x = x[:, None]
    if x.shape[0] == 0:
        raise ValueError("features must have at least one row.")
    if not torch.isfinite(x).all():
        raise ValueError("features contains NaN or infinite entries.")
    return x.reshape(x.shape[0], -1)


def kde_entropy_upper(features, noise_var: float) -> float:
    """Pairwise-KL upper bound on H(T + Z), Z ~ N(0, noise_var I) (Chapter 3).

    With T uniform over the N rows ``t_i`` of ``features``, T + Z is the mixture
    ``(1/N) sum_i N(t_i, noise_var I)``. The pairwise-distance bound of Kolchinsky & Tracey
    (2017), used by Saxe et al. (2019), with the KL divergence
    ``KL(N(t_i, s I) || N(t_j, s I)) = ||t_i - t_j||^2 / (2 s)`` reads

        H(T + Z) <= K/2 log(2 pi e s) - (1/N) sum_i log (1/N) sum_j exp(-||t_i - t_j||^2 / (2 s)),

    with ``s = noise_var`` (the kernel width is 2 s, not the 4 s of the
    ``N(t_i; t_j, 2 s I)`` overlap and not the 8 s of the Bhattacharyya lower bound
    :func:`kde_entropy_lower`). It is exact when all t_i coincide (value ``K/2 log(2 pi e s)``)
    and when they are infinitely far apart (value ``K/2 log(2 pi e s) + log N``). It bounds
    the entropy of the *empirical* mixture; as an estimate of the population H(T + Z) the
    empirical mixture is biased downward (entropy is concave), so compare at equal N.
    In between the two limits it overshoots: for points drawn from ``N(0, a I)`` and
    N -> inf the bound is ``K/2 log(2 pi e (a + s)) + K/2 * a / (a + s)``, i.e. up to
    ``K/2`` nats above the true entropy.
    Pairwise distances are computed with ``torch.cdist`` in row chunks (bounded memory).
    """
    s = _check_noise_var(noise_var)
    x = _features_torch(features)
    K = x.shape[1]
    return 0.5 * K * math.log(2.0 * math.pi * math.e * s) - _mean_log_kernel_mean(x, 2.0 * s)


def kde_entropy_lower(features, noise_var: float) -> float:
    """Pairwise-Bhattacharyya lower bound on H(T + Z), Z ~ N(0, noise_var I) (Chapter 3).

    Same mixture as :func:`kde_entropy_upper`; the Bhattacharyya distance between the
    components is ``||t_i - t_j||^2 / (8 s)``, and the Chernoff-divergence bound of
    Kolchinsky & Tracey (2017) gives

        H(T + Z) >= K/2 log(2 pi e s) - (1/N) sum_i log (1/N) sum_j exp(-||t_i - t_j||^2 / (8 s)).
    """
    s = _check_noise_var(noise_var)
    x = _features_torch(features)
    K = x.shape[1]
    return 0.5 * K * math.log(2.0 * math.pi * math.e * s) - _mean_log_kernel_mean(x, 8.0 * s)


def _kde_conditional(features, labels, noise_var: float, entropy: Callable) -> float:
    s = _check_noise_var(noise_var)
    x = _features_torch(features)
    y = torch.from_numpy(_labels_1d(labels, x.shape[0]))
    n = x.shape[0]
    total = 0.0
    for c in torch.unique(y):
        xc = x[y == c]
        total += xc.shape[0] / n * entropy(xc, s)
    return total


def kde_conditional_entropy_upper(features, labels, noise_var: float) -> float:
    """Upper bound on ``H(T + Z | Y) = sum_y p(y) H(T + Z | Y = y)`` (Chapter 3).

    Applies :func:`kde_entropy_upper` to the rows of each class separately and averages
    with the empirical class frequencies.
    """
    return _kde_conditional(features, labels, noise_var, kde_entropy_upper)


def kde_conditional_entropy_lower(features, labels, noise_var: float) -> float:
    """Lower bound on ``H(T + Z | Y)``: :func:`kde_entropy_lower` per class, weighted (Chapter 3).

    Together with the Gaussian maximum-entropy bound (Proposition 1) applied to each
    class's empirical mixture, whose covariance is the class covariance (denominator
    ``n_i``) plus ``noise_var I``, it brackets the noise-added conditional entropy.
    """
    return _kde_conditional(features, labels, noise_var, kde_entropy_lower)


@dataclass(frozen=True)
class KDEInformation:
    """Noise-added entropy and information estimates (nats) for features T.

    ``H_T`` and ``H_T_given_Y`` are upper bounds on H(T + Z) and H(T + Z | Y);
    ``I_T_Y`` is their difference (an estimate, not a bound); ``I_X_T`` is an upper bound
    on I(X; T + Z) = H(T + Z) - H(Z) for distinct inputs X; ``H_noise`` is H(Z).
    """

    H_T: float
    H_T_given_Y: float
    I_T_Y: float
    I_X_T: float
    H_noise: float


def kde_mutual_information(features, labels, noise_var: float) -> KDEInformation:
    """Noise-added estimates of I(X;T) and I(T;Y) in the style of Saxe et al. (Chapter 3).

    Adding Z ~ N(0, noise_var I) to a deterministic T makes ``H(T + Z | X) = H(Z)`` finite,
    so ``I(X; T + Z) = H(T + Z) - K/2 log(2 pi e noise_var)``, bounded above via
    :func:`kde_entropy_upper` (at most ``log N``). ``I(T + Z; Y)`` is estimated as the
    difference of the upper bounds on H(T + Z) and H(T + Z | Y). The values depend on
    ``noise_var``; keep it (and N) fixed when comparing layers or epochs. When the noise
    is far below the spacing of the points, every sample is told apart from every other:
    ``H(T + Z) -> H(Z) + log N`` and the I(T;Y) estimate tends to the plug-in H(Y) for
    *any* labels, random ones included (the same saturation as binning with tiny bins).
    """
    s = _check_noise_var(noise_var)
    x = _features_torch(features)
    K = x.shape[1]
    h_noise = 0.5 * K * math.log(2.0 * math.pi * math.e * s)
    h = kde_entropy_upper(x, s)
    h_y = kde_conditional_entropy_upper(x, labels, s)
    return KDEInformation(H_T=h, H_T_given_Y=h_y, I_T_Y=h - h_y, I_X_T=h - h_noise, H_noise=h_noise)


# ---------------------------------------------------------------------------
# The spread term of L_Cluster and what it bounds (notes E3, E6)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassSpread:
    """Per-class spread of features T given labels Y (Chapter 3; L_Cluster is Eq. 8/10, Chapter 5).

    Arrays have one entry per class present in the labels: ``weights`` (class frequencies
    p_i), ``traces`` (``tr Sigma^i``, the sum of the per-dimension variances),
    ``std_sums`` (``S_i = sum_k sqrt(Sigma^i_kk)``, the term of L_Cluster) and
    ``log_var_sums`` (``sum_k log Sigma^i_kk``; ``-inf`` when a dimension is constant in a
    class). Variances use the class size as denominator, like the loss. ``dim`` is K,
    ``total_trace`` the trace of the covariance of T over all classes.

    Three upper bounds on H(T|Y), each valid for any distribution with these second
    moments (Proposition 1) and ordered
    ``hadamard_bound <= std_bound <= variance_bound``:

    * ``variance_bound = K/2 log 2 pi + 1/2 sum_i p_i tr Sigma^i`` (Proposition 2, tight
      form; notes E3), linear in the variances;
    * ``std_bound = K/2 log(2 pi e) + K log(sum_i p_i S_i / K)``, from the Hadamard bound,
      the AM-GM inequality ``sum_k log sigma_k <= K log(S / K)`` and Jensen's inequality over
      classes: monotone in the class-weighted sum of standard deviations, which is
      L_Cluster for one layer when the classes are balanced;
    * ``hadamard_bound = sum_i p_i (K/2 log(2 pi e) + 1/2 sum_k log Sigma^i_kk)``.

    ``std_sums`` alone does not control ``traces``: ``S_i`` can fall while ``tr Sigma^i``
    rises (variance moved into fewer dimensions); only ``S_i^2 / K <= tr Sigma^i <= S_i^2``
    holds (Cauchy-Schwarz).
    """

    weights: np.ndarray
    traces: np.ndarray
    std_sums: np.ndarray
    log_var_sums: np.ndarray
    dim: int
    total_trace: float

    @property
    def variance_bound(self) -> float:
        return float(0.5 * self.dim * _LOG_2PI + 0.5 * np.sum(self.weights * self.traces))

    @property
    def std_bound(self) -> float:
        mean_s = float(np.sum(self.weights * self.std_sums))
        if mean_s <= 0:
            return -math.inf
        return float(0.5 * self.dim * (_LOG_2PI + 1.0) + self.dim * math.log(mean_s / self.dim))

    @property
    def hadamard_bound(self) -> float:
        return float(np.sum(self.weights * (0.5 * self.dim * (_LOG_2PI + 1.0) + 0.5 * self.log_var_sums)))

    @property
    def l_cluster(self) -> float:
        """Mean over classes (unweighted) of ``S_i``: Eq. (8) for one layer, without its epsilon."""
        return float(np.mean(self.std_sums))

    @property
    def within_fraction(self) -> float:
        """``sum_i p_i tr Sigma^i / tr Sigma_T``: the share of the variance left inside the classes."""
        return float(np.sum(self.weights * self.traces) / self.total_trace) if self.total_trace > 0 else math.nan


def class_spread(features, labels) -> ClassSpread:
    """Per-class traces and standard-deviation sums of features [N, ...] (Chapter 3, notes E3, E6).

    See :class:`ClassSpread` for the bounds on H(T|Y) they give and how the
    standard-deviation form of L_Cluster relates to the variance form of Proposition 2.
    """
    x = _features_2d(features)
    n, K = x.shape
    y = _labels_1d(labels, n)
    C = int(y.max()) + 1
    weights, traces, std_sums, log_var_sums = (np.empty(C) for _ in range(4))
    for c in range(C):
        xc = x[y == c]
        var = np.mean((xc - xc.mean(axis=0)) ** 2, axis=0)
        weights[c] = xc.shape[0] / n
        traces[c] = var.sum()
        std_sums[c] = np.sqrt(var).sum()
        with np.errstate(divide="ignore"):
            log_var_sums[c] = np.log(var).sum()
    total = float(np.mean((x - x.mean(axis=0)) ** 2, axis=0).sum())
    return ClassSpread(weights, traces, std_sums, log_var_sums, K, total)


# ---------------------------------------------------------------------------
# Constrained Theorem 1 experiment (notes E4)
# ---------------------------------------------------------------------------


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
    mu = _as_float64(means, "means")
    v = _as_float64(variances, "variances")
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
