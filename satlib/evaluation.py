"""Clean and robust accuracy under a list of attacks, with the per-sample worst case (Chapters 1 and 5).

A sample counts as robust in the worst case only if it is classified correctly clean *and* under
every attack: the accuracy of the strongest adaptive combination of the attacks, always at most the
accuracy under each one (the "worst case" column of the book's Table 1).

Every number here is decided in fp32, whatever the device (``exact_fp32``); bf16 is for training
speed only. On a GPU the attacks run in batches that fill a quarter of the free memory.
"""
from __future__ import annotations

import hashlib
import time
from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import nn
from .progress import bar

from .attacks import Attack, attack_mode
from .data import ArrayDataset
from .batching import batches
from .precision import exact_fp32
from .runs import Run


def evaluation_batch_size(model: nn.Module, sample: torch.Tensor, *, share: float = 0.25, largest: int = 8192) -> int:
    """Images per attack batch: 500 on a CPU; on a GPU, as many as fill ``share`` of the free memory.

    On a GPU one fp32 forward and input-gradient pass of a probe batch of 32 measures the memory an
    image needs; the result is the largest power of two (at most ``largest``) that fits.
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        return 500
    probe = sample[:1].to(device).expand(32, *sample.shape[1:]).clone().requires_grad_(True)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with attack_mode(model), exact_fp32(device):
        model(probe).float().logsumexp(1).sum().backward()
    per_image = max(1, (torch.cuda.max_memory_allocated(device) - base) // 32)
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(share * free // per_image)
    return max(32, min(largest, 1 << max(0, fits.bit_length() - 1)))


def correct_mask(model: nn.Module, data: ArrayDataset, attack: Attack | None = None, *,
                 batch_size: int | None = None) -> torch.Tensor:
    """Boolean [N] tensor on the CPU: is each sample classified correctly (under ``attack``, if given)?

    Attacks and the final check run in fp32 (``exact_fp32``) in batches of ``batch_size`` (default
    ``evaluation_batch_size``).
    """
    device = next(model.parameters()).device
    if batch_size is None:
        batch_size = evaluation_batch_size(model, data.x)
    was_training = model.training
    model.eval()
    masks = []
    try:
        with exact_fp32(device):
            for x, y in batches(data.to(device), batch_size, shuffle=False):
                if attack is not None:
                    x = attack(model, x, y)
                with torch.no_grad():
                    masks.append((model(x).argmax(1) == y).cpu())
    finally:
        model.train(was_training)
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)


def correctness(model: nn.Module, data: ArrayDataset, attacks: Mapping[str, Attack] | Sequence[Attack], *,
                batch_size: int | None = None, progress: bool = False, seed: int | None = None,
                cache: Run | None = None, tag: str = "last") -> pd.DataFrame:
    """Per-sample correctness: one boolean column for ``clean`` and for each attack, one row per sample.

    With ``seed``, the global random state is reset before each attack, so an attack's column does
    not depend on which other attacks run or in what order. With ``cache`` (a run of the store, or any
    ``satlib.artifacts.Artifacts``), each column is kept under the attack's full description and the
    data size, so a chapter that asks again, alone or in another list, reads it instead of attacking
    again; ``tag`` names the weights evaluated (a run's ``last`` or ``best`` epoch), so their columns
    stay apart. ``frame.attrs["seconds"]`` holds each column's computing time (when it was computed).
    """
    if not isinstance(attacks, Mapping):
        attacks = {a.name: a for a in attacks}
    columns, seconds = {}, {}
    for name, attack in bar([("clean", None), *attacks.items()], desc="attacks", enabled=progress):
        def compute(attack=attack):
            if seed is not None:
                torch.manual_seed(seed)
            began = time.perf_counter()
            mask = correct_mask(model, data, attack, batch_size=batch_size).numpy()
            return pd.DataFrame({"correct": mask, "seconds": time.perf_counter() - began})

        if cache is None:
            column = compute()
        else:
            key = hashlib.sha256(repr((repr(attack), data.name, len(data), seed, tag)).encode()).hexdigest()[:12]
            column = cache.cached_frame(f"correct-{key}", compute, columns=("correct", "seconds"))
        columns[name] = column["correct"].to_numpy(dtype=bool)
        seconds[name] = float(column["seconds"].iloc[0]) if len(column) else 0.0
        if progress:
            print(f"{name}: {columns[name].mean():.4f} ({seconds[name]:.1f} s)", flush=True)
    frame = pd.DataFrame(columns)
    frame.attrs["seconds"] = seconds
    return frame


def summarize(correct: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per column of a ``correctness`` frame plus the per-sample worst case over all of them."""
    rows = [{"attack": name, "accuracy": float(col.mean())} for name, col in correct.items()]
    rows.append({"attack": "worst case", "accuracy": float(correct.all(axis=1).mean())})
    frame = pd.DataFrame(rows)
    frame["n"] = len(correct)
    return frame


def evaluate(model: nn.Module, data: ArrayDataset, attacks: Mapping[str, Attack] | Sequence[Attack], *,
             batch_size: int | None = None, progress: bool = False, seed: int | None = None,
             cache: Run | None = None, tag: str = "last") -> pd.DataFrame:
    """Clean accuracy, accuracy under each attack and the worst case, as a tidy DataFrame.

    Columns: ``attack``, ``accuracy`` (fraction in [0, 1]), ``n`` (samples), ``seconds`` (per attack).
    The arguments are those of ``correctness``, whose per-sample columns this summarizes.
    """
    correct = correctness(model, data, attacks, batch_size=batch_size, progress=progress, seed=seed, cache=cache,
                          tag=tag)
    frame = summarize(correct)
    frame["seconds"] = frame["attack"].map(correct.attrs["seconds"]).fillna(0.0)
    return frame
