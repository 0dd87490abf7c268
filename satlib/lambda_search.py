"""The paper's greedy search for SAT's lambda (Sec. 6.1, Chapter 5).

SAT draws the weight of its feature-shift term from U(0, lambda) (Eq. 9). The paper picks lambda by
comparing, on the PGD-AT model, the distribution of the feature shift ||f^l(x + r) - f^l(x)||_2 at the
last intermediate layer under three kinds of perturbation r:

- OLA, an output-layer attack (PGD on CE),
- ILA, an intermediate-layer attack (LAFEAT),
- Eq. 7, PGD on ``CE - lambda * shift`` with a *fixed* lambda.

Each distribution becomes a histogram on common bins, scaled to unit L2 norm, so that the inner
product of two of them is their cosine similarity (1 for identical shapes, 0 for disjoint supports).
Starting from lambda = 0 (where Eq. 7 is PGD, hence OLA), lambda moves in steps of 0.01: up while the
Eq. 7 histogram is closer to OLA's than to ILA's, down while it is closer to ILA's. The search stops
when it would revisit a lambda (it has bracketed the crossing) and returns the smallest visited
lambda whose histogram is at least as close to ILA's as to OLA's, or the last one when ``max_iter``
steps did not bracket a crossing (``converged`` is then False).

The paper prints the opposite rule ("if the inner product with OLA is larger, reduce lambda"), which
from lambda = 0 could only move to negative values; Chapter 5 discusses this erratum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .attacks import PGD, Attack, CrossEntropy
from .data import ArrayDataset
from .shift import feature_shifts
from .training import FeatureShiftObjective, sat_layers


def unit_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the bins ``edges`` (values past either end go to the end bins), unit L2 norm."""
    values = np.clip(np.asarray(values, dtype=float), edges[0], edges[-1])
    counts, _ = np.histogram(values, bins=edges)
    counts = counts.astype(float)
    norm = np.linalg.norm(counts)
    return counts / norm if norm > 0 else counts


def common_edges(*samples: np.ndarray, bins: int = 30) -> np.ndarray:
    """``bins`` equal bins from 0 to the largest value of the samples (shifts are non-negative)."""
    top = max(float(np.max(s)) for s in samples)
    return np.linspace(0.0, top if top > 0 else 1.0, bins + 1)


@dataclass
class LambdaSearch:
    """Result of ``greedy_lambda``: the chosen lambda and the path that led to it.

    ``trace`` has one row per visited lambda: ``iteration``, ``lam``, ``sim_ola`` and ``sim_ila``
    (inner products of the unit histograms), ``closer`` ("OLA" or "ILA") and ``mean_shift``.
    """

    lam: float
    converged: bool
    trace: pd.DataFrame
    edges: np.ndarray


def greedy_lambda(eq7_shifts: Callable[[float], np.ndarray], ola: np.ndarray, ila: np.ndarray, *,
                  step: float = 0.01, start: float = 0.0, bins: int = 30, max_iter: int = 100) -> LambdaSearch:
    """The greedy search of Sec. 6.1 on given OLA and ILA shift samples (see the module docstring).

    ``eq7_shifts(lam)`` returns the shift sample of Eq. 7 perturbations with that fixed lambda; it is
    called once per visited lambda. ``max_iter`` bounds the number of calls.
    """
    if step <= 0 or max_iter < 1 or bins < 2:
        raise ValueError(f"step must be positive, max_iter >= 1 and bins >= 2; got {step}, {max_iter}, {bins}")
    if start < 0:
        raise ValueError(f"start must be zero or positive, got {start}")
    edges = common_edges(ola, ila, bins=bins)
    h_ola, h_ila = unit_histogram(ola, edges), unit_histogram(ila, edges)
    rows, visited = [], set()
    lam, converged = float(start), False
    for iteration in range(max_iter):
        shifts = np.asarray(eq7_shifts(lam), dtype=float)
        h = unit_histogram(shifts, edges)
        sim_ola, sim_ila = float(h @ h_ola), float(h @ h_ila)
        closer = "OLA" if sim_ola > sim_ila else "ILA"
        rows.append(dict(iteration=iteration, lam=lam, sim_ola=sim_ola, sim_ila=sim_ila, closer=closer,
                         mean_shift=float(shifts.mean())))
        visited.add(round(lam / step))
        nxt = lam + step if closer == "OLA" else lam - step
        if nxt < -1e-12 or round(nxt / step) in visited:
            converged = True
            break
        lam = round(nxt, 10)
    trace = pd.DataFrame(rows)
    on_ila_side = trace[trace.closer == "ILA"]
    if converged and len(on_ila_side):
        chosen = float(on_ila_side.lam.min())
    else:
        chosen = float(trace.lam.iloc[-1])
    return LambdaSearch(chosen, converged, trace, edges)


def eq7_attack(model: nn.Module, lam: float, *, eps: float, steps: int, step_size: float | None = None,
               layers: Sequence[str] | None = None, random: bool = False) -> PGD:
    """PGD on Eq. 7, ``CE - lam * mean_l ||f^l(x + r) - f^l(x)||_2`` over SAT's layers (fixed ``lam``).

    ``random=True`` draws Lambda ~ U(0, ``lam``) at each step instead: SAT's training attack (Eq. 9).
    """
    layers = list(sat_layers(model) if layers is None else layers)
    return PGD(eps, steps=steps, step_size=step_size,
               objective=FeatureShiftObjective(CrossEntropy(), layers, lam, random=random))


def search_lambda(model: nn.Module, data: ArrayDataset, *, ola: Attack, ila: Attack, eps: float, steps: int,
                  step_size: float | None = None, layer: str | None = None, step: float = 0.01,
                  bins: int = 30, max_iter: int = 100, seed: int = 0) -> tuple[LambdaSearch, pd.DataFrame]:
    """Run the greedy search on ``model`` (the PGD-AT model in the paper) and ``data``.

    Shifts are measured at ``layer`` (default: the last of SAT's layers, the last intermediate layer).
    Every attack runs from the same seed, so a visited lambda always gives the same sample. Returns
    the search and a tidy frame of all shift samples (``source`` "OLA", "ILA" or "Eq. 7", ``lam``,
    ``sample``, ``shift``, ``correct``) for plotting.
    """
    layer = sat_layers(model)[-1] if layer is None else layer

    def shifts_of(attack: Attack, source: str, lam: float = float("nan")) -> pd.DataFrame:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            frame = feature_shifts(model, data, attack, [layer], attack_name=source)
        frame["source"], frame["lam"] = source, lam
        return frame.drop(columns=["attack", "layer"])

    frames = [shifts_of(ola, "OLA"), shifts_of(ila, "ILA")]

    def eq7(lam: float) -> np.ndarray:
        frame = shifts_of(eq7_attack(model, lam, eps=eps, steps=steps, step_size=step_size), "Eq. 7", lam)
        frames.append(frame)
        return frame["shift"].to_numpy()

    search = greedy_lambda(eq7, frames[0]["shift"].to_numpy(), frames[1]["shift"].to_numpy(), step=step,
                           bins=bins, max_iter=max_iter)
    return search, pd.concat(frames, ignore_index=True)


def replay(shifts: pd.DataFrame, *, step: float = 0.01, bins: int = 30, max_iter: int = 100) -> LambdaSearch:
    """The search again from the tidy frame of ``search_lambda`` (e.g. one cached in the run store).

    The greedy path depends only on the shift samples, so the replay visits the same lambdas and
    returns the same result without running an attack; it fails if the frame lacks a lambda it visits.
    """
    eq7 = shifts[shifts.source == "Eq. 7"]
    by_lam = {round(l / step): g["shift"].to_numpy() for l, g in eq7.groupby("lam")}

    def lookup(lam: float) -> np.ndarray:
        key = round(lam / step)
        if key not in by_lam:
            raise KeyError(f"the shift frame has no Eq. 7 sample for lambda = {lam:g}; run search_lambda again")
        return by_lam[key]

    return greedy_lambda(lookup, shifts.loc[shifts.source == "OLA", "shift"].to_numpy(),
                         shifts.loc[shifts.source == "ILA", "shift"].to_numpy(), step=step, bins=bins,
                         max_iter=max_iter)
