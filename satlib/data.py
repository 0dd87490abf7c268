"""Datasets as in-memory tensors (batches are sliced from them by ``satlib.batching``).

Every dataset is loaded whole into an :class:`ArrayDataset` (float32 images in [0, 1],
shape ``[N, C, H, W]``; int64 labels), so batches are tensor slices that can live on
the GPU. ``digits`` (scikit-learn, bundled, no download) backs the ``quick`` preset;
``cifar10``, ``cifar100`` and ``svhn`` back the paper setting (Section 5 of the paper)
and are read with torchvision from :func:`data_root`; ``synthetic`` is random data for
shape tests and benchmarks only.

Test splits are stored in a fixed shuffled order (``torch.Generator`` seeded 0), so the
first ``n`` test samples (:meth:`ArrayDataset.subset`) are class-balanced in expectation.
Train splits keep their natural order.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .catalog import DATASETS, DatasetInfo
from .errors import SatlibError

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetInfo",
    "DatasetUnavailable",
    "data_root",
    "holdout",
    "load",
]

SPLITS = ("train", "test")
_REPO_ROOT = Path(__file__).resolve().parent.parent


class DatasetUnavailable(SatlibError, RuntimeError):
    """A dataset's files are missing or damaged and could not be downloaded."""


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images ``x`` (float32 ``[N, C, H, W]`` in [0, 1]) and labels ``y`` (int64 ``[N]``)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.y.dim() != 1 or len(self.x) != len(self.y):
            raise ValueError(
                f"ArrayDataset needs x of shape [N, C, H, W] and y of shape [N]; "
                f"got {tuple(self.x.shape)} and {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n_or_indices: int | Sequence[int] | torch.Tensor) -> ArrayDataset:
        """The first ``n`` samples (all of them if ``n >= len``), or the given 1-D indices."""
        if isinstance(n_or_indices, (int, np.integer)):
            n = int(n_or_indices)
            if n < 0:
                raise ValueError(f"subset size must be >= 0, got {n}")
            return ArrayDataset(self.x[:n], self.y[:n], self.num_classes, self.name)
        idx = torch.as_tensor(n_or_indices, dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(f"subset indices must be 1-D, got shape {tuple(idx.shape)}")
        idx = idx.to(self.x.device)
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes, self.name)

    def to(self, device: torch.device | str) -> ArrayDataset:
        """A copy with both tensors on ``device``."""
        return ArrayDataset(self.x.to(device), self.y.to(device), self.num_classes, self.name)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Dataset folder: ``root`` if given, else ``$SATLIB_DATA``, else ``<repository>/data``."""
    if root is None:
        root = os.environ.get("SATLIB_DATA") or (_REPO_ROOT / "data")
    return Path(root).expanduser().absolute()


def _fixed_shuffle(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0)
    idx = train_idx if split == "train" else test_idx
    x = torch.from_numpy(images[idx] / 16.0).float().reshape(-1, 1, 8, 8)
    return x, torch.from_numpy(labels[idx]).long()


def _load_synthetic(split: str, shape, num_classes: int, n: int | None, seed: int):
    """Class means uniform in [0.25, 0.75] (shared by both splits), plus Gaussian noise."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"synthetic shape must be (C, H, W) with positive sizes, got {shape}")
    if num_classes < 1:
        raise ValueError(f"synthetic num_classes must be >= 1, got {num_classes}")
    n = (2048 if split == "train" else 512) if n is None else int(n)
    means = 0.25 + 0.5 * torch.rand(num_classes, *shape, generator=torch.Generator().manual_seed(seed))
    noise_seed = int(np.random.SeedSequence([seed, SPLITS.index(split) + 1]).generate_state(1)[0])
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(noise_seed))
    y = torch.arange(n) % num_classes
    return (means[y] + 0.25 * noise).clamp_(0, 1), y


# Files each torchvision dataset needs, for the error message.
_SOURCES = {
    "cifar10": ("CIFAR-10", "cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta, "
                "or the archive cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "cifar100": ("CIFAR-100", "cifar-100-python/ with train, test and meta, "
                 "or the archive cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "svhn": ("SVHN", "train_32x32.mat and test_32x32.mat",
             "http://ufldl.stanford.edu/housenumbers/"),
}


def _tv_class(name: str):
    from torchvision import datasets

    return {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "svhn": datasets.SVHN}[name]


def _needed_files(cls, name: str, split: str, folder: Path) -> list[Path]:
    if name == "svhn":
        return [folder / cls.split_list[split][1]]
    base = folder / cls.base_folder
    return [base / f for f, _ in cls.train_list + cls.test_list] + [base / cls.meta["filename"]]


def _unavailable(name: str, folder: Path, problem: str) -> DatasetUnavailable:
    title, files, url = _SOURCES[name]
    return DatasetUnavailable(
        f"{title} ({name!r}) is not available: {problem}; satlib looked in {folder}, which "
        f"should hold {files} (get them from {url}), and the SATLIB_DATA environment variable "
        f"can point to another data folder.")


def _unpack(name: str, archive: Path, folder: Path, md5: str) -> None:
    """Unpack a dataset archive into ``folder`` once its MD5 matches the published one; every member must be
    a plain file or folder that lands inside ``folder`` (no links, no devices), checked before anything is
    written, and on Pythons that have it tarfile's ``data`` filter checks again."""
    from torchvision.datasets.utils import check_md5

    if not check_md5(str(archive), md5):
        raise _unavailable(name, folder, f"the archive {archive} does not match its published MD5 checksum "
                                         f"(a damaged or different file: delete it and fetch it again)")
    inside = folder.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                lands = (inside / member.name).resolve()
                if not (member.isfile() or member.isdir()) or not lands.is_relative_to(inside):
                    raise _unavailable(name, folder, f"the archive {archive} holds {member.name!r}, which is not a "
                                                     f"plain file or folder inside {folder}, so nothing was unpacked")
            tar.extractall(folder, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise _unavailable(name, folder, f"the archive {archive.name} could not be unpacked ({e})") from e


def _load_torchvision(name: str, split: str, root, download: bool | None):
    cls = _tv_class(name)
    folder = data_root(root) / name
    needed = _needed_files(cls, name, split, folder)
    archive = folder / getattr(cls, "filename", "")
    if name != "svhn" and not all(p.is_file() for p in needed) and archive.is_file():
        _unpack(name, archive, folder, cls.tgz_md5)       # a local archive needs no network

    kwargs = {"split": split} if name == "svhn" else {"train": split == "train"}
    if all(p.is_file() for p in needed):
        try:
            ds = cls(str(folder), download=False, **kwargs)
        except RuntimeError as e:
            if "corrupted" not in str(e):
                raise
            raise _unavailable(name, folder, "its files failed the integrity check (MD5 mismatch: "
                                             "damaged or incomplete files; delete and fetch them again)") from e
        except (OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
            raise _unavailable(name, folder, f"its files could not be read ({type(e).__name__}: {e})") from e
    else:
        missing = ", ".join(p.name for p in needed if not p.is_file())
        if download is None:
            download = os.environ.get("SATLIB_OFFLINE") != "1"
            off_reason = "downloads are off (SATLIB_OFFLINE=1)"
        else:
            off_reason = "downloads are off (download=False)"
        if not download:
            raise _unavailable(name, folder, f"files are missing ({missing}) and {off_reason}")
        try:
            ds = cls(str(folder), download=True, **kwargs)
        except Exception as e:
            # the message names the download's error; chaining it would print that traceback first
            # (offline, a long trail of socket errors) above the one message that says what to do
            raise _unavailable(name, folder, f"files are missing ({missing}) and the download "
                                             f"failed ({type(e).__name__}: {e})") from None

    data = torch.from_numpy(np.ascontiguousarray(ds.data))
    if name != "svhn":  # CIFAR is stored [N, H, W, C]; torchvision's SVHN is [N, C, H, W]
        data = data.permute(0, 3, 1, 2)
    x = data.float().div_(255).contiguous()
    y = torch.as_tensor(np.asarray(ds.labels if name == "svhn" else ds.targets), dtype=torch.long)
    return x, y


def load(name: str, split: str, *, root: str | os.PathLike | None = None,
         download: bool | None = None, shape=(3, 32, 32), num_classes: int = 10,
         n: int | None = None, seed: int = 0) -> ArrayDataset:
    """Load a split of a dataset whole into memory as an :class:`ArrayDataset`.

    ``name`` is a key of :data:`DATASETS`, ``split`` is ``"train"`` or ``"test"``.
    ``root``/``download`` apply to the torchvision datasets (``download=None`` downloads
    unless ``SATLIB_OFFLINE=1``); missing or damaged files raise :class:`DatasetUnavailable`.
    ``shape``, ``num_classes`` and ``seed`` apply to ``synthetic`` only (random data for
    shape tests and benchmarks, never a result). ``n`` is the synthetic sample count
    (default 2048 train / 512 test); for the other datasets it keeps the first ``n``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if n is not None and int(n) < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")

    if name == "synthetic":
        x, y = _load_synthetic(split, shape, num_classes, n, seed)
        k = int(num_classes)
    else:
        x, y = _load_digits(split) if name == "digits" else _load_torchvision(name, split, root, download)
        k = DATASETS[name].num_classes
    if split == "test":
        x, y = _fixed_shuffle(x, y)
    ds = ArrayDataset(x, y, k, name)
    return ds if n is None or name == "synthetic" else ds.subset(int(n))


def holdout(train: ArrayDataset, n: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Split ``n`` validation images off a training split: ``(rest, validation)``, stratified by class.

    The split is fixed (scikit-learn's stratified ``train_test_split``, seed 0), so every run of a
    dataset holds out the same images; the rest keeps its order. The trainer monitors the
    validation images after every epoch and keeps the best epoch's weights by their PGD accuracy
    (Chapter 5, "Robust overfitting"); the test split is never used to choose anything.
    """
    if n == 0:
        return train, train.subset(0)
    if not 0 < n < len(train):
        raise ValueError(f"the validation split must hold between 0 and {len(train) - 1} images, got {n}")
    from sklearn.model_selection import train_test_split

    labels = train.y.cpu().numpy()
    rest, val = train_test_split(np.arange(len(labels)), test_size=n, stratify=labels, random_state=0)
    return train.subset(np.sort(rest)), train.subset(val)

