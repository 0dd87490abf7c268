"""Input checks shared by the information-bottleneck modules (Chapter 3).

Every public function of ``satlib.ib`` accepts numpy arrays, torch tensors, lists or scalars; these
helpers turn them into float64 arrays and reject NaN, infinite, non-square, asymmetric or not
positive-definite input with one sentence that names the argument.
"""

from __future__ import annotations

import math

import numpy as np
import torch

LOG_2PI = math.log(2.0 * math.pi)


def as_float64(x, name: str) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor, list or scalar) as a float64 ndarray."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite entries.")
    return arr


def as_cov(cov, name: str = "cov") -> np.ndarray:
    """Validate a (possibly batched) covariance: shape [..., K, K], symmetric."""
    S = as_float64(cov, name)
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


def cholesky(S: np.ndarray, name: str) -> np.ndarray:
    """Cholesky factor of a batch of symmetric matrices, with a readable error."""
    try:
        return np.linalg.cholesky(S)
    except np.linalg.LinAlgError:
        raise ValueError(
            f"{name} is not positive definite (its Cholesky factorisation failed), so the "
            "Gaussian density and its differential entropy are undefined; a degenerate "
            "Gaussian has entropy -inf."
        ) from None


def logdet_pd(S: np.ndarray, name: str) -> np.ndarray:
    """``log det S`` of positive-definite matrices, from their Cholesky factors."""
    L = cholesky(S, name)
    return 2.0 * np.sum(np.log(np.diagonal(L, axis1=-2, axis2=-1)), axis=-1)


def scalar_or_array(x):
    """A 0-d result becomes a Python float, a batched one stays an ndarray."""
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x


def features_2d(features, name: str = "features") -> np.ndarray:
    """Features [N, ...] as a float64 array [N, K] (a 1-D input is N samples of one dimension)."""
    x = as_float64(features, name)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, ...] with N >= 1.")
    if x.ndim == 1:
        x = x[:, None]
    return x.reshape(x.shape[0], -1)


def labels_1d(labels, n: int) -> np.ndarray:
    """``n`` labels as class codes 0 .. C - 1 (the sorted distinct labels, renumbered)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"labels has {y.shape[0]} entries but features has {n} rows.")
    return np.unique(y, return_inverse=True)[1].reshape(-1)
