"""Tests of satlib.data: digits, the torchvision datasets on small files in the real
formats, the missing/corrupted-file errors, synthetic data and the batch iterator."""

import hashlib
import io
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest
import scipy.io
import torch
from torchvision import datasets as tvd

from satlib import data
from satlib.data import ArrayDataset, DatasetUnavailable, load
from satlib.batching import batches


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch):
    monkeypatch.delenv("SATLIB_DATA", raising=False)
    monkeypatch.delenv("SATLIB_OFFLINE", raising=False)


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def fixed_perm(n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


def as_float(u8_nchw):
    return torch.from_numpy(u8_nchw).float().div(255)


# ---------------------------------------------------------------- digits

def test_digits_shapes_range_and_sizes():
    train, test = load("digits", "train"), load("digits", "test")
    assert train.x.shape == (1347, 1, 8, 8) and test.x.shape == (450, 1, 8, 8)
    assert len(train) + len(test) == 1797
    for ds in (train, test):
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.min() >= 0 and ds.x.max() <= 1 and ds.x.max() == 1
        assert ds.num_classes == 10 and ds.name == "digits"
        assert set(ds.y.tolist()) == set(range(10))


def test_digits_split_is_stratified_and_deterministic():
    from sklearn.datasets import load_digits

    all_counts = np.bincount(load_digits().target, minlength=10)
    test = load("digits", "test")
    test_counts = np.bincount(test.y.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - all_counts * 0.25) <= 1)
    again = load("digits", "test")
    assert torch.equal(test.x, again.x) and torch.equal(test.y, again.y)
    train, train2 = load("digits", "train"), load("digits", "train")
    assert torch.equal(train.x, train2.x) and torch.equal(train.y, train2.y)
    # pixel values are the raw 0..16 counts over 16
    assert torch.equal(test.x * 16, (test.x * 16).round())


def test_digits_first_test_samples_are_balanced_and_n_keeps_first():
    test = load("digits", "test")
    counts = torch.bincount(test.subset(100).y, minlength=10)
    assert counts.min() >= 4  # fixed shuffle: first 100 cover every class
    first = load("digits", "test", n=100)
    assert torch.equal(first.x, test.x[:100]) and torch.equal(first.y, test.y[:100])


# ---------------------------------------------------------------- ArrayDataset

def test_subset_and_to():
    ds = ArrayDataset(torch.rand(10, 1, 4, 4), torch.arange(10), 10, "t")
    assert torch.equal(ds.subset(3).y, torch.arange(3))
    assert len(ds.subset(100)) == 10
    picked = ds.subset([7, 2])
    assert torch.equal(picked.y, torch.tensor([7, 2])) and torch.equal(picked.x[0], ds.x[7])
    assert torch.equal(ds.subset(torch.tensor([1, 1])).y, torch.tensor([1, 1]))
    moved = ds.to("cpu")
    assert moved.x.device.type == "cpu" and moved.num_classes == 10 and moved.name == "t"
    with pytest.raises(ValueError):
        ArrayDataset(torch.rand(3, 4, 4), torch.arange(3), 3, "bad")


# ---------------------------------------------------------------- CIFAR / SVHN on small files

def _dump(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _make_cifar10(root, monkeypatch, per_batch=4, n_test=10, seed=0):
    """CIFAR-10 python batches (5 train, 1 test, batches.meta) in the real layout."""
    rng = np.random.default_rng(seed)
    base = root / "cifar10" / "cifar-10-batches-py"
    arrays = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        d, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        _dump({"batch_label": name, "labels": labels, "data": d,
               "filenames": [f"{name}_{i}.png" for i in range(n)]}, base / name)
        arrays[name] = (d, labels)
    _dump({"num_cases_per_batch": per_batch, "num_vis": 3072,
           "label_names": [f"class{i}" for i in range(10)]}, base / "batches.meta")
    monkeypatch.setattr(tvd.CIFAR10, "train_list",
                        [[f"data_batch_{i}", md5(base / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5(base / "test_batch")]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                              "md5": md5(base / "batches.meta")})
    return base, arrays


def _make_cifar100(root, monkeypatch, n_train=30, n_test=20):
    rng = np.random.default_rng(1)
    base = root / "cifar100" / "cifar-100-python"
    arrays = {}
    for name, n in [("train", n_train), ("test", n_test)]:
        d = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        _dump({"filenames": [f"{i}.png" for i in range(n)], "batch_label": name,
               "fine_labels": fine, "coarse_labels": coarse, "data": d}, base / name)
        arrays[name] = (d, fine)
    _dump({"fine_label_names": [f"fine{i}" for i in range(100)],
           "coarse_label_names": [f"coarse{i}" for i in range(20)]}, base / "meta")
    monkeypatch.setattr(tvd.CIFAR100, "train_list", [["train", md5(base / "train")]])
    monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", md5(base / "test")]])
    monkeypatch.setattr(tvd.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names",
                                               "md5": md5(base / "meta")})
    return arrays


def _make_svhn(root, monkeypatch):
    """SVHN .mat files: X [32, 32, 3, n] uint8, y [n, 1] with 10 meaning digit 0."""
    rng = np.random.default_rng(2)
    folder = root / "svhn"
    folder.mkdir(parents=True)
    arrays, split_list = {}, dict(tvd.SVHN.split_list)
    for split, n in [("train", 12), ("test", 8)]:
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10
        fname = f"{split}_32x32.mat"
        scipy.io.savemat(folder / fname, {"X": X, "y": y})
        arrays[split] = (X, y)
        split_list[split] = [split_list[split][0], fname, md5(folder / fname)]
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)
    return arrays


def test_cifar10_reads_real_format(tmp_path, monkeypatch):
    _, arrays = _make_cifar10(tmp_path, monkeypatch)
    train = load("cifar10", "train", root=tmp_path, download=False)
    d = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.x.shape == (20, 3, 32, 32) and train.x.dtype == torch.float32
    assert torch.equal(train.x, as_float(d.reshape(-1, 3, 32, 32)))  # natural order, exact
    assert torch.equal(train.y, torch.tensor(labels))
    assert train.num_classes == 10 and train.name == "cifar10"

    test = load("cifar10", "test", root=tmp_path, download=False)
    d, labels = arrays["test_batch"]
    perm = fixed_perm(10)
    assert torch.equal(test.x, as_float(d.reshape(-1, 3, 32, 32))[perm])
    assert torch.equal(test.y, torch.tensor(labels)[perm])
    assert torch.equal((test.x * 255).round().to(torch.uint8),
                       torch.from_numpy(d.reshape(-1, 3, 32, 32))[perm])


def _cifar10_archive(root, monkeypatch):
    """A CIFAR-10 archive in the real layout under ``root/cifar10``, and the arrays it holds."""
    base, arrays = _make_cifar10(root / "src", monkeypatch)
    (root / "cifar10").mkdir()
    archive = root / "cifar10" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(base, arcname="cifar-10-batches-py")
    return archive, arrays


def test_cifar10_reads_local_archive(tmp_path, monkeypatch):
    archive, arrays = _cifar10_archive(tmp_path, monkeypatch)
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", md5(archive))
    test = load("cifar10", "test", root=tmp_path, download=False)
    assert torch.equal(test.y, torch.tensor(arrays["test_batch"][1])[fixed_perm(10)])


def test_archive_with_another_checksum_is_not_unpacked(tmp_path, monkeypatch):
    archive, _ = _cifar10_archive(tmp_path, monkeypatch)
    with pytest.raises(DatasetUnavailable, match="does not match its published MD5 checksum") as info:
        load("cifar10", "test", root=tmp_path, download=False)
    assert str(archive) in str(info.value) and "\n" not in str(info.value)
    assert [p.name for p in (tmp_path / "cifar10").iterdir()] == [archive.name]


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 6 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("crafted", [
    _member("../escaped_by_tar.txt"),
    _member("cifar-10-batches-py/../../../escaped_by_tar.txt"),
    _member("ABSOLUTE/escaped_by_tar.txt"),
    _member("cifar-10-batches-py/test_batch", tarfile.SYMTYPE, "../../escaped_by_tar.txt"),
    _member("cifar-10-batches-py/inner_link", tarfile.SYMTYPE, "data_batch_1"),
    _member("cifar-10-batches-py/test_batch", tarfile.LNKTYPE, "cifar-10-batches-py/data_batch_1"),
    _member("cifar-10-batches-py/tty", tarfile.CHRTYPE),
])
def test_crafted_archive_writes_nothing(tmp_path, monkeypatch, crafted):
    root = tmp_path / "data"
    folder = root / "cifar10"
    folder.mkdir(parents=True)
    if crafted.name.startswith("ABSOLUTE"):
        crafted.name = str(tmp_path / "escaped_by_tar.txt")
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.addfile(_member("cifar-10-batches-py/data_batch_1"), io.BytesIO(b"benign"))
        tar.addfile(crafted, io.BytesIO(b"escape") if crafted.isfile() else None)
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", md5(archive))
    with pytest.raises(DatasetUnavailable, match="not a plain file or folder inside") as info:
        load("cifar10", "test", root=root, download=False)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cifar-10-python.tar.gz", "cifar10", "data"]


def test_cifar100_reads_fine_labels(tmp_path, monkeypatch):
    arrays = _make_cifar100(tmp_path, monkeypatch)
    train = load("cifar100", "train", root=tmp_path, download=False)
    d, fine = arrays["train"]
    assert train.x.shape == (30, 3, 32, 32) and train.num_classes == 100
    assert torch.equal(train.x, as_float(d.reshape(-1, 3, 32, 32)))
    assert torch.equal(train.y, torch.tensor(fine))
    test = load("cifar100", "test", root=tmp_path, download=False)
    d, fine = arrays["test"]
    assert torch.equal(test.x, as_float(d.reshape(-1, 3, 32, 32))[fixed_perm(20)])
    assert torch.equal(test.y, torch.tensor(fine)[fixed_perm(20)])


def test_svhn_reads_mat_and_maps_label_10_to_0(tmp_path, monkeypatch):
    arrays = _make_svhn(tmp_path, monkeypatch)
    train = load("svhn", "train", root=tmp_path, download=False)
    X, y = arrays["train"]
    expected_x = as_float(np.ascontiguousarray(X.transpose(3, 2, 0, 1)))  # [n, C, H, W]
    expected_y = torch.from_numpy(y[:, 0].astype(np.int64) % 10)
    assert train.x.shape == (12, 3, 32, 32) and train.num_classes == 10
    assert torch.equal(train.x, expected_x) and torch.equal(train.y, expected_y)
    assert train.y[0] == 0 and train.y.max() <= 9
    # channel 0, row 5, column 7 of image 3 is X[5, 7, 0, 3] (torchvision's transpose keeps H, W)
    assert train.x[3, 0, 5, 7] == X[5, 7, 0, 3] / np.float32(255)
    test = load("svhn", "test", root=tmp_path, download=False)
    X, y = arrays["test"]
    perm = fixed_perm(8)
    assert torch.equal(test.x, as_float(np.ascontiguousarray(X.transpose(3, 2, 0, 1)))[perm])
    assert torch.equal(test.y, torch.from_numpy(y[:, 0].astype(np.int64) % 10)[perm])


@pytest.mark.parametrize("name, expected", [
    ("cifar10", ["cifar-10-batches-py", "data_batch_1", "test_batch", "cifar-10-python.tar.gz"]),
    ("cifar100", ["cifar-100-python", "cifar-100-python.tar.gz"]),
    ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
])
def test_missing_files_download_false(tmp_path, name, expected):
    with pytest.raises(DatasetUnavailable) as info:
        load(name, "test", root=tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path / name) in msg and "SATLIB_DATA" in msg and "http" in msg
    assert "download=False" in msg
    for word in expected:
        assert word in msg
    assert "\n" not in msg


def test_missing_files_offline_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SATLIB_OFFLINE", "1")
    monkeypatch.setattr(tvd.CIFAR10, "download", lambda self: pytest.fail("tried to download"))
    with pytest.raises(DatasetUnavailable, match="SATLIB_OFFLINE=1") as info:
        load("cifar10", "train", root=tmp_path)
    assert str(tmp_path / "cifar10") in str(info.value)


def test_failed_download_becomes_dataset_unavailable(tmp_path, monkeypatch):
    def no_network(self):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tvd.SVHN, "download", no_network)
    with pytest.raises(DatasetUnavailable, match="download failed") as info:
        load("svhn", "train", root=tmp_path, download=True)
    assert "train_32x32.mat" in str(info.value)
    assert "URLError" in str(info.value) and "Name or service not known" in str(info.value)
    # one error, not a chain: the failed download's traceback is not printed above the clear message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_corrupted_file_fails_integrity_check(tmp_path, monkeypatch):
    base, _ = _make_cifar10(tmp_path, monkeypatch)
    (base / "test_batch").write_bytes(b"this is not a pickle" * 10)
    with pytest.raises(DatasetUnavailable, match="integrity check") as info:
        load("cifar10", "test", root=tmp_path, download=False)
    assert str(tmp_path / "cifar10") in str(info.value)


def test_corrupted_svhn_fails_integrity_check(tmp_path, monkeypatch):
    _make_svhn(tmp_path, monkeypatch)
    (tmp_path / "svhn" / "train_32x32.mat").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(DatasetUnavailable, match="integrity check"):
        load("svhn", "train", root=tmp_path, download=False)


def test_data_root_precedence(tmp_path, monkeypatch):
    assert data.data_root() == data._REPO_ROOT / "data"
    assert data._REPO_ROOT == data.Path(data.__file__).resolve().parent.parent
    monkeypatch.setenv("SATLIB_DATA", str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "explicit") == tmp_path / "explicit"
    with pytest.raises(DatasetUnavailable) as info:
        load("svhn", "test", download=False)
    assert str(tmp_path / "env" / "svhn") in str(info.value)


def test_unknown_name_or_split():
    with pytest.raises(ValueError, match="digits.*cifar10.*cifar100.*svhn.*synthetic"):
        load("mnist", "train")
    with pytest.raises(ValueError, match="train, test"):
        load("digits", "val")


def test_datasets_table():
    assert set(data.DATASETS) == {"digits", "cifar10", "cifar100", "svhn", "synthetic"}
    assert (data.DATASETS["digits"].channels, data.DATASETS["digits"].size) == (1, 8)
    assert data.DATASETS["cifar100"].num_classes == 100


# ---------------------------------------------------------------- synthetic

def test_synthetic_shapes_and_determinism():
    train = load("synthetic", "train")
    assert train.x.shape == (2048, 3, 32, 32) and len(load("synthetic", "test")) == 512
    ds = load("synthetic", "train", shape=(1, 8, 8), num_classes=4, n=100, seed=3)
    assert ds.x.shape == (100, 1, 8, 8) and ds.num_classes == 4 and ds.y.max() == 3
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert ds.x.min() >= 0 and ds.x.max() <= 1
    again = load("synthetic", "train", shape=(1, 8, 8), num_classes=4, n=100, seed=3)
    assert torch.equal(ds.x, again.x) and torch.equal(ds.y, again.y)
    other_seed = load("synthetic", "train", shape=(1, 8, 8), num_classes=4, n=100, seed=4)
    assert not torch.equal(ds.x, other_seed.x)
    test = load("synthetic", "test", shape=(1, 8, 8), num_classes=4, n=100, seed=3)
    assert not torch.equal(ds.x, test.x)


def test_synthetic_has_class_structure():
    from sklearn.neighbors import NearestCentroid

    kw = dict(shape=(3, 8, 8), num_classes=10, seed=0)
    train, test = load("synthetic", "train", n=500, **kw), load("synthetic", "test", n=300, **kw)
    clf = NearestCentroid().fit(train.x.flatten(1).numpy(), train.y.numpy())
    assert clf.score(test.x.flatten(1).numpy(), test.y.numpy()) > 0.9


# ---------------------------------------------------------------- batches

def _indexed(n=103, shape=(1, 8, 8)):
    return ArrayDataset(torch.rand(n, *shape), torch.arange(n), n, "indexed")


def test_batches_cover_every_sample_once():
    ds = _indexed()
    ys = torch.cat([y for _, y in batches(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(1))])
    assert torch.equal(ys.sort().values, torch.arange(103)) and not torch.equal(ys, torch.arange(103))
    for xb, yb in batches(ds, 16, shuffle=True):
        assert torch.equal(xb, ds.x[yb])
    plain = list(batches(ds, 16, shuffle=False))
    assert [len(y) for _, y in plain] == [16] * 6 + [7]
    assert torch.equal(torch.cat([y for _, y in plain]), torch.arange(103))
    assert [len(y) for _, y in batches(ds, 16, shuffle=True, drop_last=True)] == [16] * 6


def test_batches_reproducible_with_seed():
    ds = _indexed()

    def epoch(seed, augment="none"):
        g = torch.Generator().manual_seed(seed)
        return list(batches(ds, 32, shuffle=True, generator=g, augment=augment))

    a, b, c = epoch(5), epoch(5), epoch(6)
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(a, b))
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
    a, b = epoch(5, "crop-flip"), epoch(5, "crop-flip")
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))


def _shifts(img, pad):
    """All zero-padded shifts of one [C, H, W] image (reference, loop over offsets)."""
    c, h, w = img.shape
    p = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    return [p[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


@pytest.mark.parametrize("size, pad", [(32, 4), (8, 1)])
def test_crop_is_a_padded_shift(size, pad):
    ds = ArrayDataset(torch.rand(20, 3, size, size), torch.zeros(20, dtype=torch.long), 1, "r")
    (xb, _), = batches(ds, 20, shuffle=False, augment="crop", generator=torch.Generator().manual_seed(0))
    assert xb.shape == ds.x.shape and xb.min() >= 0 and xb.max() <= 1
    for out, img in zip(xb, ds.x):
        assert any(torch.equal(out, s) for s in _shifts(img, pad))
    assert not torch.equal(xb, ds.x)


def test_crop_flip_is_a_shift_of_image_or_mirror():
    ds = ArrayDataset(torch.rand(40, 2, 8, 8), torch.zeros(40, dtype=torch.long), 1, "r")
    (xb, _), = batches(ds, 40, shuffle=False, augment="crop-flip", generator=torch.Generator().manual_seed(0))
    flipped = 0
    for out, img in zip(xb, ds.x):
        plain = any(torch.equal(out, s) for s in _shifts(img, 1))
        mirror = any(torch.equal(out, s) for s in _shifts(img.flip(2), 1))
        assert plain or mirror
        flipped += mirror and not plain
    assert 0 < flipped < 40


def test_crop_of_constant_image_shows_zero_border():
    ds = ArrayDataset(torch.ones(64, 3, 32, 32), torch.zeros(64, dtype=torch.long), 1, "ones")
    (xb, _), = batches(ds, 64, shuffle=True, augment="crop", generator=torch.Generator().manual_seed(0))
    assert xb.shape == (64, 3, 32, 32) and xb.min() == 0 and xb.max() == 1
    border_zero = ((xb[:, :, 0, :] == 0).all(dim=(1, 2)) | (xb[:, :, -1, :] == 0).all(dim=(1, 2))
                   | (xb[:, :, :, 0] == 0).all(dim=(1, 2)) | (xb[:, :, :, -1] == 0).all(dim=(1, 2)))
    assert border_zero.any()
    # at most 4 zero rows/columns: the padding
    assert (xb[:, :, 4:28, 4:28] == 1).all()


def test_batches_rejects_bad_arguments():
    ds = _indexed()
    with pytest.raises(ValueError, match="crop-flip"):
        next(batches(ds, 8, shuffle=False, augment="flip"))
    with pytest.raises(ValueError):
        next(batches(ds, 0, shuffle=False))
