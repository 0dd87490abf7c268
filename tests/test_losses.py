"""TRADES and MART against reference computations written the way their authors' public code writes them.

The references below follow the authors' released training scripts line by line: TRADES'
``nn.KLDivLoss(reduction="sum")`` divided by the batch size, and MART's ``argsort`` runner-up, its
``1.0001`` and ``1e-12`` constants and its ``1.0000001 - true_probs`` weight. They are independent of
``satlib.training.losses`` (no shared helper), so a slip in either shows up as a mismatch.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from satlib.attacks import PGD, KLDivergence
from satlib.config import resolve
from satlib.models import build_model
from satlib.training import METHODS, build_step, mart_loss, trades_loss

B, C = 64, 10


@pytest.fixture(scope="module")
def logits():
    """A fixed batch: clean and adversarial logits with a spread of confidences, and labels.

    A third of the labels is the adversarial top class, so MART's runner-up takes both branches.
    """
    g = torch.Generator().manual_seed(0)
    clean = 3 * torch.randn(B, C, generator=g)
    adv = clean + 2 * torch.randn(B, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    y[::3] = adv[::3].argmax(1)
    return clean, adv, y


def reference_trades(logits_clean, logits_adv, y, beta):
    """TRADES (Zhang et al. 2019, trades.py): CE(clean) + beta * KLDivLoss(sum)(log p(x'), p(x)) / batch."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    batch_size = len(y)
    loss_natural = F.cross_entropy(logits_clean, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1))
    return loss_natural, beta * loss_robust


def reference_mart(logits_clean, logits_adv, y, beta):
    """MART (Wang et al. 2020, mart.py): BCE(x') + beta * mean(sum KL(p(x) || p(x')) * (1.0000001 - p_y(x)))."""
    kl = nn.KLDivLoss(reduction="none")
    batch_size = len(y)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits_clean, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    return loss_adv, float(beta) * loss_robust


def close(a, b):
    return torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss, reference, keys, beta", [
    (lambda a, c, y, b: trades_loss(a, c, y, trades_beta=b), reference_trades, ("ce", "kl"), 1.0),
    (lambda a, c, y, b: trades_loss(a, c, y, trades_beta=b), reference_trades, ("ce", "kl"), 6.0),
    (lambda a, c, y, b: mart_loss(a, c, y, mart_beta=b), reference_mart, ("bce", "kl"), 5.0),
    (lambda a, c, y, b: mart_loss(a, c, y, mart_beta=b), reference_mart, ("bce", "kl"), 6.0),
], ids=["trades-1", "trades-6", "mart-5", "mart-6"])
def test_outer_loss_equals_reference(logits, loss, reference, keys, beta):
    clean, adv, y = logits
    terms = loss(adv, clean, y, beta)
    expected = dict(zip(keys, reference(clean, adv, y, beta)))
    assert set(terms) == set(keys)
    assert all(close(terms[k], expected[k]) for k in keys), (terms, expected)
    assert expected["kl"] > 0


def test_mart_bce_is_ce_plus_strongest_wrong_class_term(logits):
    """The boosted CE, computed sample by sample in float64 with an explicit max over the wrong classes."""
    clean, adv, y = logits
    p = F.softmax(adv.double(), dim=1)
    total = 0.0
    for i in range(B):
        wrong = torch.cat([p[i, :y[i]], p[i, y[i] + 1:]])
        total += -torch.log(p[i, y[i]]) - torch.log(1.0001 - wrong.max() + 1e-12)
    assert abs(mart_loss(adv, clean, y, mart_beta=5.0)["bce"].item() - total.item() / B) < 1e-5


@pytest.mark.parametrize("loss, reference, key",
                         [(trades_loss, reference_trades, "trades_beta"), (mart_loss, reference_mart, "mart_beta")])
def test_gradients_equal_reference(logits, loss, reference, key):
    """Same values are not enough for training: the gradients w.r.t. both logit tensors must agree too."""
    clean, adv, y = logits
    ours = [t.clone().requires_grad_(True) for t in (clean, adv)]
    theirs = [t.clone().requires_grad_(True) for t in (clean, adv)]
    sum(loss(ours[1], ours[0], y, **{key: 6.0}).values()).backward()
    sum(reference(theirs[0], theirs[1], y, 6.0)).backward()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_trades_gradient_stays_finite_when_a_clean_probability_underflows():
    """A logit gap above ~104 makes a float32 softmax probability exactly 0: the reference's KL target
    then has a NaN gradient (d/dp of p log p at p = 0); satlib's log-probability target does not."""
    clean = torch.tensor([[120.0, 0.0, -5.0], [0.0, 1.0, 2.0]])
    adv = torch.tensor([[60.0, 10.0, 0.0], [1.0, 0.0, 2.0]])
    y = torch.tensor([0, 2])
    ours = [t.clone().requires_grad_(True) for t in (clean, adv)]
    sum(trades_loss(ours[1], ours[0], y, trades_beta=6.0).values()).backward()
    assert all(torch.isfinite(t.grad).all() for t in ours)
    theirs = [t.clone().requires_grad_(True) for t in (clean, adv)]
    sum(reference_trades(theirs[0], theirs[1], y, 6.0)).backward()
    assert torch.isnan(theirs[0].grad).any()
    with torch.no_grad():                                   # same value all the same
        assert close(sum(trades_loss(adv, clean, y, trades_beta=6.0).values()), sum(reference_trades(clean, adv, y, 6.0)))


def test_trades_inner_objective_is_the_per_sample_kl(trained_digits_model, digits_test):
    """KLDivergence (TRADES' attack objective) returns KL(p(x) || p(x')) per sample, averaging to the loss's term."""
    model = trained_digits_model
    x, y = digits_test.x[:32], digits_test.y[:32]
    torch.manual_seed(0)
    x_adv = PGD(0.2, steps=3, objective=KLDivergence(), start="normal")(model, x, y)
    objective = KLDivergence()
    ctx = objective.prepare(model, x, y)
    with torch.no_grad():
        values = objective(model, x_adv, y, ctx)
        p = F.softmax(model(x).double(), dim=1)
        q = F.softmax(model(x_adv).double(), dim=1)
    expected = (p * (p.log() - q.log())).sum(1)
    assert values.shape == (32,) and (values >= -1e-6).all() and values.mean() > 0.1   # the attack moved p
    assert torch.allclose(values.double(), expected, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        kl_term = trades_loss(model(x_adv), model(x), y, trades_beta=1.0)["kl"]
    assert torch.allclose(values.mean(), kl_term, rtol=1e-5, atol=1e-7)
    assert torch.allclose(objective(model, x, y, ctx), torch.zeros(32), atol=1e-6)   # no perturbation, no KL


@pytest.mark.parametrize("method", ["trades", "mart"])
def test_training_attack_of_trades_and_mart(digits_test, method):
    """TRADES attacks KL from x + 0.001 N(0, 1); MART attacks CE. Both run in eval mode: BN statistics untouched."""
    cfg = resolve("quick", method=method, width=4, attack_steps=3)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4).train()
    step = build_step(cfg, model, 10)
    assert METHODS[method].outer == method
    expected = KLDivergence if method == "trades" else type(build_step(cfg.replace(method="pgd-at"), model,
                                                                       10).attack.objective)
    assert isinstance(step.attack.objective, expected)
    assert (step.attack.start == "normal") == (method == "trades")
    assert step.attack.steps == cfg.attack_steps and step.attack.step_size == cfg.step_size
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = digits_test.x[:64], digits_test.y[:64]
    x_adv = step.attack(model, x, y)
    assert model.training and (x_adv - x).abs().max() <= cfg.eps + 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
