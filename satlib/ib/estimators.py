"""Estimators of entropies and mutual information of network features (Chapter 3).

A deterministic network with continuous features has ``H(T|X) = -inf``, so Eq. 3 needs an
estimator: plug-in entropies of binned features (Shwartz-Ziv & Tishby, 2017) or noise-added
pairwise-distance (KDE) bounds (Kolchinsky & Tracey, 2017; Saxe et al., 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .inputs import as_float64, features_2d, labels_1d


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
    x = features_2d(features)
    n = x.shape[0]
    y = labels_1d(labels, n)
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
        x = torch.from_numpy(as_float64(features, "features"))
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
    y = torch.from_numpy(labels_1d(labels, x.shape[0]))
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
