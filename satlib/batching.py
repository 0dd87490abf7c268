"""Batches sliced from an in-memory dataset on its own device, with on-device shuffling and the
training augmentations (random crop, horizontal flip): no DataLoader, no host transfer per batch
(Chapter 1's training loop; the GPU path of the trainer relies on it)."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .catalog import AUGMENTATIONS
from .data import ArrayDataset


def _random_crop(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop of each image after zero padding by ``size // 8`` pixels, vectorised."""
    b, c, h, w = x.shape
    ph, pw = h // 8, w // 8
    if ph == 0 and pw == 0:
        return x
    padded = F.pad(x, (pw, pw, ph, ph))
    where = _random_device(generator)
    oy = torch.randint(0, 2 * ph + 1, (b,), generator=generator, device=where).to(x.device)
    ox = torch.randint(0, 2 * pw + 1, (b,), generator=generator, device=where).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def _random_device(generator: torch.Generator | None) -> torch.device:
    """Where random draws happen: on the generator's device (a CUDA generator keeps them on the GPU)."""
    return generator.device if generator is not None else torch.device("cpu")


def _augment(x: torch.Tensor, augment: str, generator: torch.Generator | None) -> torch.Tensor:
    x = _random_crop(x, generator)
    if augment == "crop-flip":
        flip = (torch.rand(len(x), generator=generator, device=_random_device(generator)) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def batches(ds: ArrayDataset, batch_size: int, *, shuffle: bool,
            generator: torch.Generator | None = None, augment: str = "none",
            drop_last: bool = False, rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches sliced from ``ds`` on its own device (no DataLoader).

    ``shuffle`` draws one ``torch.randperm`` per call from ``generator`` (on the generator's device:
    a CUDA generator shuffles and augments on the GPU, with no host transfer per batch);
    ``augment`` is ``"none"``, ``"crop"`` (zero-pad ``size // 8`` pixels, random crop) or
    ``"crop-flip"`` (crop, then random horizontal flip), drawn from ``generator`` too,
    so a seeded generator gives reproducible epochs. With ``world_size`` > 1 (data-parallel
    training) every process draws the same permutation and keeps every ``world_size``-th sample
    from position ``rank``: the shards are disjoint and cover the data.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; allowed: {', '.join(AUGMENTATIONS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    n = len(ds)
    where = _random_device(generator)
    perm = torch.randperm(n, generator=generator, device=where) if shuffle else None
    if world_size > 1:
        perm = (torch.arange(n, device=where) if perm is None else perm)[rank::world_size]
        n = len(perm)
    perm = perm.to(ds.x.device) if perm is not None else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if perm is None:
            xb, yb = ds.x[start:start + batch_size], ds.y[start:start + batch_size]
        else:
            idx = perm[start:start + batch_size]
            xb, yb = ds.x[idx], ds.y[idx]
        if augment != "none":
            xb = _augment(xb, augment, generator)
        yield xb, yb
