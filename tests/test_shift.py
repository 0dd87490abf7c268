"""Tests of satlib.shift: feature shifts under attacks and the shift/gradient cosine of Figure 1 (Chapter 1)."""
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from satlib.attacks import FGSM, PGD, project
from satlib.evaluation import correct_mask
from satlib.models import build_model, conv_layers
from satlib.shift import feature_shifts, shift_gradient_cosine

EPS = 0.2


@pytest.fixture(scope="module")
def small(digits_test):
    return digits_test.subset(24)


@pytest.fixture(scope="module")
def two_stage():
    """A small conv net written as two stages, so the stage-0 output can be tapped by the name "0"."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)),
    )
    return net.eval()


def test_cosine_is_one_when_the_shift_is_the_gradient_direction():
    """Tap the input itself (an Identity layer) of a 2-class linear model whose weights are +-1.

    The CE gradient with respect to the input is then c * w with |w_k| = 1 and a sign fixed by the label,
    so PGD with step eps saturates the box at r = eps * sign(g) after two steps: r is parallel to g.
    """
    torch.manual_seed(0)
    d = 16
    w = torch.where(torch.rand(d) < 0.5, -1.0, 1.0)
    linear = nn.Linear(d, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([w, -w]) * 0.1)
    model = nn.Sequential(nn.Identity(), nn.Flatten(), linear).eval()
    x = torch.full((6, 1, 4, 4), 0.5)        # pixel range not binding: 0.5 +- 0.1 stays in [0, 1]
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    frame = shift_gradient_cosine(model, x, y, ["0"], eps=0.1, steps=4, step_size=0.1)
    later = frame[frame["step"] >= 2]
    assert torch.allclose(torch.tensor(later["cosine"].values), torch.ones(len(later), dtype=torch.float64),
                          atol=1e-5)
    assert (later["positive"] == 1.0).all()
    assert (frame["cosine"] > 0).all()       # step 1 already points into the gradient's orthant


def test_cosine_matches_an_independent_computation(two_stage, small):
    """Oracle: rerun the same PGD by hand and take the layer gradient through the second stage directly."""
    model, (x, y), steps, alpha = two_stage, (small.x, small.y), 4, EPS / 4
    torch.manual_seed(3)
    frame = shift_gradient_cosine(model, x, y, ["0"], eps=EPS, steps=steps)

    stage0, stage1 = model[0], model[1]
    h = stage0(x).detach().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(stage1(h), y, reduction="sum"), h)
    torch.manual_seed(3)
    x_adv = project(x + torch.empty_like(x).uniform_(-EPS, EPS), x, EPS)
    expected = []
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad_x, = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = project(x_adv.detach() + alpha * grad_x.sign(), x, EPS)
        with torch.no_grad():
            shift = (stage0(x_adv) - stage0(x)).flatten(1)
            cos = (shift * g.flatten(1)).sum(1) / (shift.norm(dim=1) * g.flatten(1).norm(dim=1))
        expected.append((cos.mean().item(), (cos > 0).float().mean().item()))
    assert frame["cosine"].tolist() == pytest.approx([e[0] for e in expected], abs=1e-5)
    assert frame["positive"].tolist() == pytest.approx([e[1] for e in expected], abs=1e-9)


def test_cosine_frame_shape_and_columns(small):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4).eval()
    layers = conv_layers(model)
    assert len(layers) == 17
    frame = shift_gradient_cosine(model, small.x[:8], small.y[:8], layers, eps=EPS, steps=3)
    assert list(frame.columns) == ["step", "layer", "cosine", "positive"]
    assert len(frame) == 3 * 17
    assert sorted(frame["step"].unique()) == [1, 2, 3]
    assert frame.groupby("step")["layer"].apply(list).map(lambda ls: ls == layers).all()
    assert frame["cosine"].between(-1, 1).all() and frame["positive"].between(0, 1).all()
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_zero_eps_gives_zero_shift_and_zero_cosine(two_stage, small):
    frame = shift_gradient_cosine(two_stage, small.x, small.y, ["0", "1"], eps=0.0, steps=2)
    assert (frame["cosine"] == 0).all() and (frame["positive"] == 0).all()


def test_feature_shifts_columns_and_values(two_stage, small):
    model, layers = two_stage, ["0", "1.1"]
    attack = FGSM(EPS)
    frame = feature_shifts(model, small, attack, layers, batch_size=10)   # three batches, the last one short
    assert list(frame.columns) == ["sample", "layer", "shift", "correct", "attack"]
    assert len(frame) == len(small) * len(layers)
    assert sorted(frame["sample"].unique()) == list(range(len(small)))
    assert (frame["attack"] == "FGSM").all() and (frame["shift"] >= 0).all()

    # oracle: the same norms and correctness computed directly
    x_adv = attack(model, small.x, small.y)
    with torch.no_grad():
        h0 = (model[0](x_adv) - model[0](small.x)).flatten(1).norm(dim=1)
        h1 = (model[1][1](model[1][0](model[0](x_adv))) - model[1][1](model[1][0](model[0](small.x)))).flatten(1)
    got = frame.pivot(index="sample", columns="layer", values="shift")
    assert torch.allclose(torch.tensor(got["0"].values, dtype=torch.float64), h0.double(), atol=1e-5)
    assert torch.allclose(torch.tensor(got["1.1"].values, dtype=torch.float64), h1.norm(dim=1).double(), atol=1e-5)
    correct = frame[frame["layer"] == "0"].sort_values("sample")["correct"].to_numpy()
    assert (correct == correct_mask(model, small, attack).numpy()).all()


def test_feature_shifts_zero_eps_is_zero_and_named(two_stage, small):
    frame = feature_shifts(two_stage, small, PGD(0.0, steps=2), ["0", "1.1"], attack_name="PGD eps 0")
    assert (frame["shift"] == 0).all()
    assert (frame["attack"] == "PGD eps 0").all()
    clean = correct_mask(two_stage, small).numpy()
    assert (frame[frame["layer"] == "0"].sort_values("sample")["correct"].to_numpy() == clean).all()
    assert isinstance(frame, pd.DataFrame)
