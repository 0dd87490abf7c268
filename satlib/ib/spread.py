"""The per-class spread of features and the bounds on H(T|Y) it controls (Chapter 3, notes E3, E6).

The variance form of Proposition 2 and the standard-deviation form of L_Cluster (Eq. 8/10,
Chapter 5); the loss itself is the training code's ``satlib.training.losses.cluster_loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..training.losses import cluster_loss
from .inputs import LOG_2PI, features_2d, labels_1d


@dataclass(frozen=True)
class ClassSpread:
    """Per-class spread of features T given labels Y (Chapter 3; L_Cluster is Eq. 8/10, Chapter 5).

    Arrays have one entry per class present in the labels: ``weights`` (class frequencies
    p_i), ``traces`` (``tr Sigma^i``, the sum of the per-dimension variances),
    ``std_sums`` (``S_i = sum_k sqrt(Sigma^i_kk)``, the term of L_Cluster) and
    ``log_var_sums`` (``sum_k log Sigma^i_kk``; ``-inf`` when a dimension is constant in a
    class). Variances use the class size as denominator, like the loss. ``dim`` is K,
    ``total_trace`` the trace of the covariance of T over all classes, ``l_cluster`` the loss
    L_Cluster of Eq. (8) for one layer, without its epsilon, as the training code computes it.

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
    l_cluster: float

    @property
    def variance_bound(self) -> float:
        return float(0.5 * self.dim * LOG_2PI + 0.5 * np.sum(self.weights * self.traces))

    @property
    def std_bound(self) -> float:
        mean_s = float(np.sum(self.weights * self.std_sums))
        if mean_s <= 0:
            return -math.inf
        return float(0.5 * self.dim * (LOG_2PI + 1.0) + self.dim * math.log(mean_s / self.dim))

    @property
    def hadamard_bound(self) -> float:
        return float(np.sum(self.weights * (0.5 * self.dim * (LOG_2PI + 1.0) + 0.5 * self.log_var_sums)))

    @property
    def within_fraction(self) -> float:
        """``sum_i p_i tr Sigma^i / tr Sigma_T``: the share of the variance left inside the classes."""
        return float(np.sum(self.weights * self.traces) / self.total_trace) if self.total_trace > 0 else math.nan


def class_spread(features, labels) -> ClassSpread:
    """Per-class traces and standard-deviation sums of features [N, ...] (Chapter 3, notes E3, E6).

    See :class:`ClassSpread` for the bounds on H(T|Y) they give and how the
    standard-deviation form of L_Cluster relates to the variance form of Proposition 2.
    ``l_cluster`` comes from ``cluster_loss`` (float32, the mean of ``S_i`` over the classes with at
    least two samples), so it is the number training minimises.
    """
    x = features_2d(features)
    n, K = x.shape
    y = labels_1d(labels, n)
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
    loss = cluster_loss([torch.from_numpy(x)], torch.from_numpy(y), C, eps=0.0)
    return ClassSpread(weights, traces, std_sums, log_var_sums, K, total, float(loss))
