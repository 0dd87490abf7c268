"""Tests of satlib.bound: the feature margin, Hoelder's step, layer norms, the Lipschitz bound, and the
certified and empirical radii of Theorem 2 (Chapter 6)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from satlib import bound
from satlib.attacks import PGD
from satlib.clustering import class_centroids
from satlib.data import ArrayDataset
from satlib.models import WideResNet

INF = float("inf")
PAIRS = [(2.0, 2.0), (1.0, INF), (INF, 1.0)]          # (u, v) with 1/u + 1/v = 1


@pytest.fixture(scope="module")
def model64(trained_digits_model):
    return copy.deepcopy(trained_digits_model).double().eval()


@pytest.fixture(scope="module")
def lip(model64):
    return bound.lipschitz_bound(model64, (1, 8, 8), power_iters=20)


@pytest.fixture(scope="module")
def wrn():
    """An untrained small WideResNet with non-trivial BatchNorm statistics (exercises the other model type)."""
    torch.manual_seed(1)
    model = WideResNet(num_classes=10, in_channels=1, depth=10, widen=1).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
    return model.eval()


# -- norms and the margin ----------------------------------------------------------------------------
def test_dual_norms_and_conversions():
    assert bound.dual_norm(2) == 2 and bound.dual_norm(1) == INF and bound.dual_norm("inf") == 1
    with pytest.raises(ValueError, match="norm must be one of"):
        bound.dual_norm(3)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 50, generator=g, dtype=torch.float64)
    for src in (1, 2, INF):
        for dst in (1, 2, INF):
            c = bound.norm_conversion(50, src=src, dst=dst)
            ratio = torch.linalg.vector_norm(a, ord=dst, dim=1) / torch.linalg.vector_norm(a, ord=src, dim=1)
            assert (ratio <= c * (1 + 1e-12)).all()
    # the constants are attained: the all-ones vector for the smaller exponent going down
    ones = torch.ones(50, dtype=torch.float64)
    assert math.isclose(ones.norm(1) / ones.norm(2), bound.norm_conversion(50, src=2, dst=1))
    assert math.isclose(ones.norm(2) / ones.norm(INF), bound.norm_conversion(50, src=INF, dst=2))


@pytest.mark.parametrize("u", [1, 2, "inf"])
def test_feature_margin_matches_brute_force(u):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 7, generator=g, dtype=torch.float64)
    weight = torch.randn(7, 12, generator=g, dtype=torch.float64)
    label = torch.randint(0, 7, (40,), generator=g)
    got = bound.feature_margin(logits, weight, label, u=u)
    p = {1: 1, 2: 2, "inf": np.inf}[u]
    z, w = logits.numpy(), weight.numpy()
    for i in range(40):
        y = label[i].item()
        want = min((z[i, y] - z[i, j]) / np.linalg.norm(w[y] - w[j], ord=p) for j in range(7) if j != y)
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    # default label = prediction: the margin is then non-negative
    assert (bound.feature_margin(logits, weight, u=u) >= 0).all()


def test_features_and_logits_read_the_last_layer_input(model64, digits_test):
    x = digits_test.x[:16].double()
    h, z = bound.features_and_logits(model64, x)
    assert torch.allclose(model64.linear(h), z) and torch.allclose(z, model64(x))
    assert h.shape == (16, model64.linear.in_features)


@pytest.mark.parametrize("u,v", PAIRS)
def test_hoelder_step_holds_for_random_perturbations(model64, digits_test, u, v):
    """z_y - z_j drops by at most ||W_y - W_j||_u ||h(x+r) - h(x)||_v, for every class j (Theorem 2's step)."""
    g = torch.Generator().manual_seed(4)
    x = digits_test.x[:100].double()
    w = model64.linear.weight.detach()
    with torch.no_grad():
        h0, z0 = bound.features_and_logits(model64, x)
        y = z0.argmax(1)
        for scale in (1e-3, 0.05, 0.3):
            r = scale * (2 * torch.rand(x.shape, generator=g, dtype=x.dtype) - 1)
            h1, z1 = bound.features_and_logits(model64, (x + r).clamp(0, 1))
            drop = (z0.gather(1, y[:, None]) - z0) - (z1.gather(1, y[:, None]) - z1)         # [B, C]
            allowed = torch.linalg.vector_norm(w[y][:, None] - w[None], ord=u, dim=2) * \
                torch.linalg.vector_norm(h1 - h0, ord=v, dim=1)[:, None]
            assert (drop <= allowed + 1e-9).all()
            # and so no label flips while the shift stays below rho
            rho = bound.feature_margin(z0, w, y, u=u)
            below = torch.linalg.vector_norm(h1 - h0, ord=v, dim=1) < rho
            assert (z1.argmax(1)[below] == y[below]).all()


# -- layer norms -------------------------------------------------------------------------------------
CONVS = [  # (c_out, c_in, k, stride, padding, input size)
    (6, 3, 3, 1, 1, (7, 7)), (5, 4, 3, 2, 1, (8, 8)), (8, 4, 1, 2, 0, (6, 6)), (4, 2, 3, 1, 0, (5, 6)),
    (3, 3, 3, 1, 1, (1, 1)),
]


@pytest.mark.parametrize("co,ci,k,stride,pad,hw", CONVS)
def test_conv_norms_bracket_the_exact_norm(co, ci, k, stride, pad, hw):
    g = torch.Generator().manual_seed(co * 7 + ci)
    w = torch.randn(co, ci, k, k, generator=g, dtype=torch.float64)
    # the dense matrix is the convolution (independent check against F.conv2d)
    m = bound.conv_matrix(w, hw, stride=stride, padding=pad)
    x = torch.randn(3, ci, *hw, generator=g, dtype=torch.float64)
    assert torch.allclose((x.flatten(1) @ m.T), F.conv2d(x, w, stride=stride, padding=pad).flatten(1))
    exact = torch.linalg.matrix_norm(m, ord=2).item()
    assert bound.conv_norm_dense(w, hw, stride=stride, padding=pad) == pytest.approx(exact, rel=1e-10)
    power = bound.conv_norm_power(w, hw, stride=stride, padding=pad, iters=500)
    assert power <= exact * (1 + 1e-9) and power == pytest.approx(exact, rel=1e-3)
    assert bound.conv_norm_fft(w, hw, padding=pad) >= exact * (1 - 1e-9)


def test_fft_bound_is_exact_for_circular_structure():
    """A 1x1 convolution is W (x) I: its norm is ||W||_2 at any size, and the FFT bound finds it exactly."""
    w = torch.randn(5, 3, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = torch.linalg.matrix_norm(w[:, :, 0, 0], ord=2).item()
    assert bound.conv_norm_fft(w, (4, 4)) == pytest.approx(want, rel=1e-12)
    assert bound.conv_norm_dense(w, (4, 4)) == pytest.approx(want, rel=1e-10)


def test_first_layer_inf_to_2_bound_holds_on_box_vertices():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    b = bound.first_layer_inf_to_2(w, (5, 5), padding=1)
    r = torch.randint(0, 2, (4000, 2, 5, 5), generator=g).double() * 2 - 1     # vertices of the unit L-inf ball
    out = F.conv2d(r, w, padding=1).flatten(1).norm(dim=1)
    assert (out <= b * (1 + 1e-12)).all() and out.max() > 0.3 * b
    m = bound.conv_matrix(w, (5, 5), padding=1)
    assert b == pytest.approx((m.abs() @ torch.ones(m.shape[1], dtype=m.dtype)).norm().item(), rel=1e-12)


# -- the Lipschitz bound of the feature map -----------------------------------------------------------
def _observed_ratios(model, x, v, generator):
    """Largest ||h(x+r) - h(x)||_v / ||r||_inf over random and adversarial (feature-shift PGD) r."""
    v = {"inf": INF}.get(v, v)
    with torch.no_grad():
        h0, _ = bound.features_and_logits(model, x)
    best = 0.0
    for scale in (1e-4, 1e-2, 0.1):
        r = scale * torch.sign(torch.rand(x.shape, generator=generator, dtype=x.dtype) - 0.5)
        with torch.no_grad():
            h1, _ = bound.features_and_logits(model, x + r)
        best = max(best, (torch.linalg.vector_norm(h1 - h0, ord=v, dim=1) / scale).max().item())
        eps = torch.full((len(x),), scale, dtype=x.dtype)
        x_adv, shift = bound.feature_shift_attack(model, x, eps, v=v, steps=5, restarts=1, generator=generator)
        step = (x_adv - x).flatten(1).abs().amax(1)
        assert (step <= eps * (1 + 1e-12)).all()
        best = max(best, (shift / step.clamp_min(1e-300)).max().item())
    return best


@pytest.mark.parametrize("v", [2, 1, "inf"])
def test_lipschitz_bound_dominates_observed_ratios(model64, lip, digits_test, v):
    g = torch.Generator().manual_seed(6)
    x = digits_test.x[:32].double()
    observed = _observed_ratios(model64, x, v, g)
    assert 0 < observed <= lip.value(v)
    assert lip.certified and lip.inf_to_2 <= math.sqrt(lip.input_dim) * lip.l2 * (1 + 1e-12)


def test_lipschitz_bound_of_a_wide_resnet(wrn, digits_test):
    lip = bound.lipschitz_bound(wrn, (1, 8, 8), power_iters=20)
    g = torch.Generator().manual_seed(7)
    x = digits_test.x[:32].double()
    assert _observed_ratios(wrn, x, 2, g) <= lip.value(2)
    table = lip.layers
    convs = table[table["kind"].str.startswith("conv")]
    assert (convs["power"] <= convs["exact"] * (1 + 1e-6)).all()
    assert (convs["exact"] <= convs["fft"] * (1 + 1e-9)).all()


def test_lipschitz_bound_layer_table_and_methods(model64, lip):
    table = lip.layers
    convs = table[table["kind"].str.startswith("conv")]
    assert len(convs) == 20                               # 17 main-path convs + 3 projection shortcuts
    assert (convs["power"] <= convs["exact"] * (1 + 1e-6)).all()
    assert (convs["exact"] <= convs["fft"] * (1 + 1e-9)).all()
    assert (convs["used"] >= convs["exact"]).all()
    estimate = bound.lipschitz_bound(model64, (1, 8, 8), method="power", power_iters=20, safety=1.0)
    assert not estimate.certified and estimate.inf_to_2 <= lip.inf_to_2 * (1 + 1e-9)
    with pytest.raises(ValueError, match="method"):
        bound.lipschitz_bound(model64, (1, 8, 8), method="magic")
    with pytest.raises(TypeError, match="no last linear layer"):
        bound.lipschitz_bound(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8))


class _GatedBlock(nn.Module):
    """A block type the library has no Lipschitz rule for: x + a * tanh(conv(x))."""

    def __init__(self, channels, a):
        super().__init__()
        self.conv, self.a = nn.Conv2d(channels, channels, 3, padding=1, bias=False), a

    def forward(self, x):
        return x + self.a * torch.tanh(self.conv(x))


class _SmallNet(nn.Module):
    """A new architecture: stem conv + BN, a stage of gated blocks, an nn.ReLU module, pooling, linear."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.stage = nn.Sequential(_GatedBlock(4, 0.5), _GatedBlock(4, 2.0))
        self.act = nn.ReLU()
        self.linear = nn.Linear(4, 10)

    def forward(self, x):
        out = self.act(self.stage(self.bn(self.stem(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def test_a_new_architecture_needs_only_a_rule_for_its_block():
    torch.manual_seed(2)
    model = _SmallNet().double().eval()
    with pytest.raises(TypeError, match="no Lipschitz rule for _GatedBlock"):
        bound.lipschitz_bound(model, (1, 8, 8), power_iters=0)

    def gated(table, name, block):        # tanh is 1-Lipschitz: Lip <= 1 + a ||conv||
        return table.note(name, "gated block", 1.0 + block.a * table.conv(f"{name}.conv", block.conv))
    try:
        bound.lipschitz_rule(_GatedBlock)(gated)
        lip = bound.lipschitz_bound(model, (1, 8, 8), power_iters=20)
    finally:
        del bound.LIPSCHITZ_RULES[_GatedBlock]
    assert list(lip.layers["operator"][:7]) == ["stem+bn", "stage.0.conv", "stage.0", "stage.1.conv", "stage.1",
                                                "act", "avg-pool 8x8"]
    stem, c0, c1 = lip.layers.loc[lip.layers["kind"].str.startswith("conv"), "used"]
    assert lip.l2 == pytest.approx(stem * (1 + 0.5 * c0) * (1 + 2.0 * c1) / 8, rel=1e-12)
    x = torch.rand(32, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert 0 < _observed_ratios(model, x, 2, torch.Generator().manual_seed(4)) <= lip.value(2)
    # the walk follows the registration order of the children, so it checks that forward does too
    swapped = _SmallNet().double().eval()
    s = swapped
    s.forward = lambda x: s.linear(s.act(s.stage[0](s.stage[1](s.bn(s.stem(x))))).mean((2, 3)))
    with pytest.raises(TypeError, match="registration order"):
        bound.lipschitz_bound(swapped, (1, 8, 8), power_iters=0)


# -- radii ---------------------------------------------------------------------------------------------
def test_certified_radius_is_never_violated(trained_digits_model, lip, digits_test):
    """PGD on the margin, run inside each sample's certified radius, never changes the predicted label."""
    for seed in (0, 1, 2):
        part = digits_test.subset(torch.arange(100 * seed, 100 * seed + 100))
        frame = bound.certify(trained_digits_model, part, eps=0.2, lip=lip, check_steps=10, seed=seed)
        assert len(frame) == len(part)
        assert not frame["violated"].any()
        assert (frame["feature_shift"] < frame["rho"]).all()
        assert (frame["certified"] > 0).all() and (frame["certified"] <= 0.2).all()
    # the same attack does flip labels at the threat model's radius: the check has teeth
    x, y = digits_test.x[:200].double(), digits_test.y[:200]
    model64 = copy.deepcopy(trained_digits_model).double()
    with torch.no_grad():
        pred = model64(x).argmax(1)
    _, flipped = bound.margin_attack(model64, x, pred, torch.full((200,), 0.2, dtype=x.dtype), steps=10)
    assert flipped.float().mean() > 0.5


def test_certified_radius_holds_for_a_wide_resnet(wrn, digits_test):
    data = ArrayDataset(digits_test.x[:50], digits_test.y[:50], 10, "digits")
    frame = bound.certify(wrn, data, eps=0.2, lip=bound.lipschitz_bound(wrn, (1, 8, 8), power_iters=5))
    assert not frame["violated"].any() and (frame["feature_shift"] < frame["rho"]).all()


def test_bisect_radius_finds_per_sample_thresholds():
    thresholds = torch.tensor([1e-4, 3e-3, 0.05, 0.15, 0.5], dtype=torch.float64)
    calls = []

    def reaches(eps, idx):
        calls.append(idx.clone())
        return eps >= thresholds[idx]
    lo = torch.full_like(thresholds, 1e-6)
    radius, reached = bound.bisect_radius(reaches, lo, torch.full_like(thresholds, 0.2), iters=30)
    assert reached.tolist() == [True, True, True, True, False]
    assert (radius[:4] >= thresholds[:4]).all() and torch.allclose(radius[:4], thresholds[:4], rtol=1e-3)
    assert radius[4] == 0.2
    assert len(calls) == 31 and len(calls[0]) == 5 and all(c.tolist() == [0, 1, 2, 3] for c in calls[1:])
    arith, _ = bound.bisect_radius(reaches, torch.zeros_like(thresholds), torch.full_like(thresholds, 0.2),
                                   iters=30, geometric=False)
    assert torch.allclose(arith[:4], thresholds[:4], rtol=1e-3, atol=1e-9)


class _LinearFeature(nn.Module):
    """h(x) = <a, x> (one feature), logits = w h + b: the feature-shift attack has a closed-form optimum."""

    def __init__(self, a, w, b):
        super().__init__()
        self.features = nn.Linear(a.numel(), 1, bias=False)
        self.features.weight.data = a.reshape(1, -1)
        self.linear = nn.Linear(1, w.numel())
        self.linear.weight.data, self.linear.bias.data = w.reshape(-1, 1), b

    def forward(self, x):
        return self.linear(self.features(x.flatten(1)))


def test_empirical_radius_matches_closed_form_on_a_linear_feature():
    """With h = <a, x>, max |h(x+r) - h(x)| over ||r||_inf <= e is e ||a||_1 (inside [0, 1]), so
    Delta = rho / ||a||_1 exactly: the bisected attack must find it, and never undercut it."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(16, generator=g, dtype=torch.float64) / 2
    c = 0.5 * a.sum()                                      # two classes split at h = c, near the data
    w, b = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.stack([-c, c])
    model = _LinearFeature(a, w, b).double().eval()
    x = 0.5 + 0.05 * torch.randn(40, 1, 4, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        _, z = bound.features_and_logits(model, x)
    rho = bound.feature_margin(z, w.reshape(-1, 1), u=2)
    exact = rho / a.abs().sum()
    eps = 0.4
    radius, reached = bound.empirical_radius(model, x, rho, eps=eps, v=2, lo=torch.full_like(rho, 1e-7), iters=25,
                                             steps=10, restarts=1)
    inside = exact < 0.3                                   # the clamp to [0, 1] is inactive there
    assert inside.sum() >= 10 and (~reached == (exact > eps)).all()
    assert torch.allclose(radius[inside], exact[inside], rtol=2e-3)
    assert (radius[inside] >= exact[inside] * (1 - 1e-9)).all()   # an upper estimate never undercuts Delta


def test_estimates_are_above_the_certificate(trained_digits_model, lip, digits_test):
    data = ArrayDataset(digits_test.x[:40], digits_test.y[:40], 10, "digits")
    cert = bound.certify(trained_digits_model, data, eps=0.2, lip=lip)
    est = bound.estimate_radii(trained_digits_model, data, torch.tensor(cert["rho"].values), eps=0.2,
                               lo=torch.tensor(cert["certified"].values), iters=6, steps=5)
    assert list(est.columns) == ["sample", "empirical", "reached", "flip", "flipped"]
    assert (est["empirical"] >= cert["certified"]).all() and (est["empirical"] <= 0.2).all()
    assert (est["flip"] >= cert["certified"]).all()
    assert (est.loc[~est["reached"], "empirical"] == 0.2).all()


def test_triangle_inequality_frame(trained_digits_model, digits_test):
    data = ArrayDataset(digits_test.x[:100], digits_test.y[:100], 10, "digits")
    mu = class_centroids(trained_digits_model, data, [bound.FEATURES])[bound.FEATURES]
    with torch.no_grad():
        h, _ = bound.features_and_logits(trained_digits_model, data.x)
    for c in range(10):
        assert torch.allclose(mu[c], h[data.y == c].mean(0), atol=1e-5)
    frame = bound.shift_and_spread(trained_digits_model, data, PGD(0.2, steps=5), mu)
    assert (frame["feature_shift"] <= frame["dist_clean"] + frame["dist_adv"] + 1e-6).all()
    assert (frame["feature_shift"] > 0).all()
