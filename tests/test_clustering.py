"""Clustering accuracy (Definition 1 with arg min, Chapter 2) against independent computations.

- L2: scikit-learn's ``NearestCentroid`` (Euclidean metric: centroid = class mean) fitted on the same
  flattened clean training features and asked to predict the test features, for every conv layer.
- L1 and L-inf: a direct NumPy nearest-mean computation (scikit-learn's manhattan variant uses the
  class *median* as its centroid, which is a different definition).
- Centroids: the plain mean of all features of a class, however the data is batched.
- Memory: the peak of the bytes PyTorch allocates while computing centroids does not grow with the
  number of samples (checked to fail on an implementation that keeps all features).
"""
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.neighbors import NearestCentroid
from torch import nn
from torch.profiler import ProfilerActivity, profile

from satlib.attacks import PGD
from satlib.clustering import (class_centroids, clustered_labels, clustering_accuracy, clustering_by_epoch,
                               clustering_callback, clustering_report, stage_of)
from satlib.config import resolve
from satlib.data import load
from satlib.experiments import load_or_train
from satlib.models import FeatureTap, conv_layers
from satlib.runs import RunStore
from satlib.training import train as train_run

EPS = 0.2


@pytest.fixture(scope="module")
def train_set():
    return load("digits", "train").subset(600)


@pytest.fixture(scope="module")
def test_set(digits_test):
    return digits_test.subset(300)


def all_features(model, data, layers):
    """Every sample's flattened features of each layer, as float64 NumPy arrays (one forward pass)."""
    with torch.no_grad(), FeatureTap(model, layers) as tap:
        model(data.x)
        return {l: tap.flat(l).double().numpy() for l in layers}


@pytest.fixture(scope="module")
def features(trained_digits_model, train_set, test_set):
    layers = conv_layers(trained_digits_model)
    return layers, all_features(trained_digits_model, train_set, layers), all_features(
        trained_digits_model, test_set, layers)


def test_centroids_are_the_plain_class_means(trained_digits_model, train_set, features):
    layers, train_feats, _ = features
    y = train_set.y.numpy()
    for batch_size in (64, 10_000):                      # many batches with ragged classes, and one batch
        centroids = class_centroids(trained_digits_model, train_set, layers, batch_size=batch_size)
        for l in layers:
            expected = np.stack([train_feats[l][y == k].mean(0) for k in range(10)])
            assert centroids[l].shape == expected.shape
            np.testing.assert_allclose(centroids[l].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_l2_clustering_accuracy_equals_sklearn_nearest_centroid(trained_digits_model, train_set, test_set,
                                                                features):
    layers, train_feats, test_feats = features
    centroids = class_centroids(trained_digits_model, train_set, layers, batch_size=200)
    ours = clustering_accuracy(trained_digits_model, test_set, centroids, norms=("l2",), batch_size=128)
    assert list(ours.layer) == layers and len(layers) == 17
    y_test = test_set.y.numpy()
    for l in layers:
        sk = NearestCentroid(metric="euclidean").fit(train_feats[l], train_set.y.numpy())
        predicted = sk.predict(test_feats[l])
        labels = clustered_labels(torch.from_numpy(test_feats[l]).float(), centroids[l], "l2").numpy()
        assert (labels == predicted).mean() >= 0.995, l          # identical up to float32 near-ties
        expected = (predicted == y_test).mean()
        assert abs(ours.set_index("layer").clu_acc[l] - expected) <= 1 / len(y_test) + 1e-12, l


@pytest.mark.parametrize("norm, ord_", [("l1", 1), ("linf", np.inf)])
def test_l1_and_linf_equal_a_direct_nearest_mean_computation(trained_digits_model, train_set, test_set, features,
                                                             norm, ord_):
    layers, train_feats, test_feats = features
    y, y_test = train_set.y.numpy(), test_set.y.numpy()
    ours = clustering_report(trained_digits_model, train_set, test_set, norms=(norm,)).set_index("layer")
    for l in layers:
        means = np.stack([train_feats[l][y == k].mean(0) for k in range(10)])
        dist = np.linalg.norm(test_feats[l][:, None, :] - means[None], ord=ord_, axis=2)
        expected = (dist.argmin(1) == y_test).mean()
        assert abs(ours.clu_acc[l] - expected) <= 1 / len(y_test) + 1e-12, (l, ours.clu_acc[l], expected)


def test_clustered_label_is_the_nearest_centroid_not_the_farthest():
    """Definition 1 with arg min (``errata-argmin``): a point sitting on a centroid gets that centroid's label."""
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 3.0]])
    points = centroids + 0.1
    for norm in ("l1", "l2", "linf"):
        assert clustered_labels(points, centroids, norm).tolist() == [0, 1, 2]


def test_report_has_depth_stage_and_all_norms(trained_digits_model, train_set, test_set):
    frame = clustering_report(trained_digits_model, train_set, test_set, norms=("l1", "l2", "linf"))
    assert len(frame) == 17 * 3 and set(frame.norm) == {"l1", "l2", "linf"}
    assert frame.depth.min() == 1 and frame.depth.max() == 17
    assert stage_of("conv1") == "stem" and stage_of("layer3.1.conv2") == "layer3"
    assert frame.acc.nunique() == 1 and 0.9 < frame.acc.iloc[0] <= 1     # the trained fixture: ~97% clean


def test_attack_path(trained_digits_model, train_set, test_set):
    model = trained_digits_model
    centroids = class_centroids(model, train_set, conv_layers(model))
    clean = clustering_accuracy(model, test_set, centroids).set_index("layer")
    no_op = clustering_accuracy(model, test_set, centroids, attack=PGD(0.0, steps=2)).set_index("layer")
    pd.testing.assert_frame_equal(clean, no_op)                       # eps = 0 changes nothing
    torch.manual_seed(0)
    attacked = clustering_accuracy(model, test_set, centroids, attack=PGD(EPS, steps=5)).set_index("layer")
    assert attacked.acc.iloc[0] < clean.acc.iloc[0] - 0.5              # a standard model falls under PGD
    assert (attacked.clu_acc <= clean.clu_acc + 0.02).all()
    assert attacked.clu_acc.iloc[-1] < clean.clu_acc.iloc[-1] - 0.3    # and so do its deep clusters


class Widen(nn.Module):
    """A tiny model whose one feature layer is 64 times larger than its input: features dominate memory."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(1, 64, 3, padding=1)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.expand(x).mean((2, 3)))


def torch_peak_bytes(fn) -> int:
    """Peak of the bytes PyTorch holds allocated (CPU) while ``fn`` runs, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def keep_everything_centroids(model, data, layers, batch_size):
    """What class_centroids must NOT do: hold every sample's features, then average."""
    with torch.no_grad(), FeatureTap(model, layers) as tap:
        kept = []
        for start in range(0, len(data), batch_size):
            model(data.x[start:start + batch_size])
            kept.append(tap.flat(layers[0]).double())
        feats = torch.cat(kept)
        return {layers[0]: torch.stack([feats[data.y == k].mean(0) for k in range(data.num_classes)]).float()}


def test_centroid_memory_stays_flat_as_the_dataset_grows():
    torch.manual_seed(0)
    model = Widen().eval()
    n, batch = 600, 100
    small, large = (load("synthetic", "train", shape=(1, 8, 8), num_classes=4, n=k) for k in (n, 4 * n))
    feature_bytes = 3 * n * 64 * 8 * 8 * 4            # what holding the extra 3n samples' features would cost

    def growth(fn):
        fn(small)                                        # warm-up
        return torch_peak_bytes(lambda: fn(large)) - torch_peak_bytes(lambda: fn(small))

    naive = growth(lambda d: keep_everything_centroids(model, d, ["expand"], batch))
    ours = growth(lambda d: class_centroids(model, d, ["expand"], batch_size=batch))
    assert naive > 0.9 * feature_bytes, "the measurement no longer sees memory that grows with the data"
    assert ours < 0.1 * feature_bytes, f"class_centroids' peak memory grew by {ours} bytes with 3n more samples"
    np.testing.assert_allclose(class_centroids(model, large, ["expand"], batch_size=batch)["expand"],
                               keep_everything_centroids(model, large, ["expand"], batch)["expand"],
                               rtol=1e-5, atol=1e-6)


TINY = dict(width=4, epochs=3, train_limit=256, batch_size=64, attack_steps=2, val_size=64, monitor_steps=2,
            snapshot_epochs=[1, 2])
LAYERS = ["layer1.0.conv1", "layer4.1.conv2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny PGD-AT run trained with the clustering callback after epoch 2, and its data."""
    store = RunStore(tmp_path_factory.mktemp("clustering-runs"))
    cfg = resolve("quick", **TINY)
    data = load("digits", "train").subset(cfg.train_limit)
    train_run(cfg, store=store, progress=False, callbacks=[clustering_callback(data, epochs=[2], layers=LAYERS[1:])])
    return load_or_train(cfg, store=store, progress=False), data


def test_clustering_callback_records_metrics_while_training(tiny_run):
    trained, data = tiny_run
    metrics = trained.run.metrics()
    column = f"clu_acc/{LAYERS[1]}/l2"
    assert metrics[column].isna().tolist() == [True, False, True]
    monitor = trained.val_set()
    expected = clustering_report(trained.snapshot(2), data, monitor, LAYERS[1:]).clu_acc.iloc[0]
    assert metrics[column].iloc[1] == pytest.approx(expected)


def test_clustering_by_epoch_uses_snapshots_and_caches(tiny_run):
    trained, _ = tiny_run
    frame = clustering_by_epoch(trained, layers=LAYERS, norms=("l2", "linf"), n=100)
    assert sorted(frame.epoch.unique()) == [1, 2, 3]                   # the snapshots and the final weights
    assert len(frame) == 3 * 2 * 2 and frame.attack.eq("clean").all()
    for epoch in (1, 3):                                               # each epoch's numbers are its weights'
        model = trained.snapshot(epoch) if epoch == 1 else trained.model
        direct = clustering_report(model, trained.train_set(), trained.test_set(100), LAYERS, norms=("l2", "linf"))
        got = frame[frame.epoch == epoch].reset_index(drop=True)
        np.testing.assert_allclose(got.clu_acc, direct.clu_acc)
        np.testing.assert_allclose(got.acc, direct.acc)
    artifacts = sorted(p.name for p in (trained.run.dir / "artifacts").iterdir())
    assert sum(a.startswith("centroids-epoch") for a in artifacts) == 3
    assert sum(a.startswith("clustering-epoch") for a in artifacts) == 3
    again = clustering_by_epoch(trained, layers=LAYERS, norms=("l2", "linf"), n=100)
    pd.testing.assert_frame_equal(again, frame, check_dtype=False)
    attacked = clustering_by_epoch(trained, epochs=[3], layers=LAYERS[1:], attack=PGD(EPS, steps=2), n=100)
    assert attacked.attack.eq("PGD").all() and len(attacked) == 1
    assert (attacked.clu_acc.iloc[0], attacked.acc.iloc[0]) == tuple(
        clustering_by_epoch(trained, epochs=[3], layers=LAYERS[1:], attack=PGD(EPS, steps=2), n=100)
        .loc[0, ["clu_acc", "acc"]])                                   # cached: same numbers again
    with pytest.raises(ValueError, match="kept no weights after epoch"):
        clustering_by_epoch(trained, epochs=[7])
