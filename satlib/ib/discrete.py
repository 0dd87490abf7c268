"""The information-bottleneck loss of a discrete, deterministic representation (Eq. 3-4, Chapter 3).

In the paper's form and in the decomposed form that makes its three cases one-liners (notes E2).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.special

from .inputs import as_float64


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
    p = as_float64(joint, "joint")
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
