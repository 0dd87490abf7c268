"""SAT's two terms, its training attack, AWP and the greedy lambda search, against independent references.

- L_Cluster (Eq. 8/10) and the released code's variant: loops over layers, classes and dimensions in
  float64, written from the equations, sharing no code with ``satlib.training.losses``;
- L_Gen (Eq. 7/9): per-sample forward passes with hand-registered hooks;
- AWP: the proxy-copy implementation of Wu et al. (2020) (one SGD step of a copy of the model, per-layer
  rescaling of the weight difference, perturb, step, restore), compared state for state;
- the lambda search on synthetic shift distributions whose crossing point is known.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from satlib.attacks import FGSM, PGD, CrossEntropy, KLDivergence
from satlib.config import resolve
from satlib.data import load
from satlib.lambda_search import (common_edges, eq7_attack, greedy_lambda, replay, search_lambda,
                                  unit_histogram)
from satlib.models import build_model
from satlib.training import AWP, METHODS, FeatureShiftObjective, build_step, cluster_loss, sat_layers
from satlib.training.methods import TrainingObjective, TrainingStep

LAYERS = ["layer4.0", "layer4.1"]


# -- L_Cluster ---------------------------------------------------------------------------------------

def _batch(seed=0):
    """Two layers of features and labels with every case: absent classes, a singleton, big classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 3, 5, 7, 7, 0, 1])        # 5 is a singleton; 2, 4, 6, 8, 9 absent
    feats = [torch.randn(len(y), 3, 2, 2, generator=g) * 2 + 1, torch.randn(len(y), 5, generator=g)]
    return feats, y


def reference_cluster_paper(feats, y, eps=1e-8):
    """Eq. 10 term by term: for each layer, mean over classes with >= 2 samples of sum_k sqrt(var_k + eps)."""
    per_layer = []
    for f in feats:
        f = f.double().reshape(len(y), -1).numpy()
        values = []
        for c in sorted(set(y.tolist())):
            rows = [f[i] for i in range(len(y)) if y[i] == c]
            if len(rows) < 2:
                continue
            total = 0.0
            for k in range(f.shape[1]):
                column = [r[k] for r in rows]
                mean = sum(column) / len(column)
                var = sum((v - mean) ** 2 for v in column) / len(column)
                total += math.sqrt(var + eps)
            values.append(total)
        per_layer.append(sum(values) / len(values))
    return sum(per_layer) / len(per_layer)


def reference_cluster_code(feats, y):
    """The released code's variant: per sample, the L2 norm of its class's unbiased variance vector; mean."""
    per_layer = []
    for f in feats:
        f = f.double().reshape(len(y), -1)
        entries = []
        for i in range(len(y)):
            members = f[y == y[i]]
            if len(members) < 2:
                continue                                        # the guard: the code would break here
            entries.append(torch.var(members, dim=0, unbiased=True).norm().item())
        per_layer.append(sum(entries) / len(entries))
    return sum(per_layer) / len(per_layer)


def test_cluster_loss_equals_eq10_term_by_term():
    feats, y = _batch()
    ours = cluster_loss(feats, y, num_classes=10).item()
    assert ours == pytest.approx(reference_cluster_paper(feats, y), rel=1e-5)


def test_cluster_loss_code_form_equals_released_computation():
    feats, y = _batch(1)
    ours = cluster_loss(feats, y, num_classes=10, form="code").item()
    assert ours == pytest.approx(reference_cluster_code(feats, y), rel=1e-5)
    assert ours != pytest.approx(cluster_loss(feats, y, num_classes=10).item(), rel=1e-2)


def test_cluster_loss_scales_as_the_paper_and_the_code_say():
    """Eq. 10 grows linearly with the dimension (sum of d standard deviations), the code's form as sqrt(d)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(20)
    small, big = torch.randn(200, 64, generator=g), torch.randn(200, 64 * 16, generator=g)
    ratio_paper = cluster_loss([big], y, 10) / cluster_loss([small], y, 10)
    ratio_code = cluster_loss([big], y, 10, form="code") / cluster_loss([small], y, 10, form="code")
    assert ratio_paper.item() == pytest.approx(16, rel=0.05)
    assert ratio_code.item() == pytest.approx(4, rel=0.05)


def test_cluster_loss_has_finite_gradient_at_zero_spread_and_rejects_unknown_form():
    f = torch.ones(4, 6, requires_grad=True)                    # two classes, each with identical features
    loss = cluster_loss([f], torch.tensor([0, 0, 1, 1]), num_classes=3)
    loss.backward()
    assert torch.isfinite(f.grad).all() and loss.item() == pytest.approx(6 * math.sqrt(1e-8), rel=1e-3)
    with pytest.raises(ValueError, match="form"):
        cluster_loss([f], torch.tensor([0, 0, 1, 1]), num_classes=3, form="mine")


def test_training_objective_adds_beta_times_cluster_loss():
    torch.manual_seed(0)
    cfg = resolve("quick", method="sat", width=4, sat_beta=0.25, sat_cluster_form="code")
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4).train()
    x = torch.rand(16, 1, 8, 8)
    y = torch.arange(16) % 4
    objective = TrainingObjective(METHODS["sat"], cfg, sat_layers(model), 10)
    loss, terms, logits = objective(model, x, x, y)
    feats = {}
    hooks = [dict(model.named_modules())[l].register_forward_hook(
        lambda m, i, o, l=l: feats.__setitem__(l, o)) for l in LAYERS]
    ref_logits = model(x)
    for h in hooks:
        h.remove()
    expected = 0.25 * reference_cluster_code([feats[l].detach() for l in LAYERS], y)
    assert terms["cluster"].item() == pytest.approx(expected, rel=1e-4)
    assert loss.item() == pytest.approx(F.cross_entropy(ref_logits, y).item() + expected, rel=1e-4)


# -- L_Gen ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4)
    model.train()
    with torch.no_grad():                                       # give BN non-trivial running statistics
        for _ in range(3):
            model(torch.rand(32, 1, 8, 8))
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 8, 8, generator=g)
    x_adv = (x + 0.2 * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    return model, x, x_adv, y


def reference_l_gen(model, x, x_adv, y, lam, layers):
    """Eq. 7 one sample at a time: CE(f(x_i + r_i), y_i) - lam / n sum_l ||f^l(x_i + r_i) - f^l(x_i)||_2."""
    modules = dict(model.named_modules())
    values = []
    for i in range(len(y)):
        store = {}
        hooks = [modules[l].register_forward_hook(lambda m, inp, out, l=l: store.__setitem__(l, out.detach().clone()))
                 for l in layers]
        with torch.no_grad():
            model(x[i:i + 1])
            clean = dict(store)
            logits = model(x_adv[i:i + 1])
        for h in hooks:
            h.remove()
        shift = sum(torch.sqrt(((store[l] - clean[l]) ** 2).sum()).item() for l in layers) / len(layers)
        values.append(F.cross_entropy(logits, y[i:i + 1]).item() - lam * shift)
    return torch.tensor(values)


@pytest.mark.parametrize("lam", [0.0, 0.087, 1.5])
def test_l_gen_with_fixed_lambda_equals_per_sample_reference(tiny, lam):
    model, x, x_adv, y = tiny
    objective = FeatureShiftObjective(CrossEntropy(), LAYERS, lam, random=False)
    with torch.no_grad():
        ours = objective(model, x_adv, y, objective.prepare(model, x, y))
    assert torch.allclose(ours, reference_l_gen(model, x, x_adv, y, lam, LAYERS), atol=1e-5)


def test_l_gen_draws_one_lambda_per_step_shared_by_the_batch(tiny):
    model, x, x_adv, y = tiny
    objective = FeatureShiftObjective(CrossEntropy(), LAYERS, 0.5)
    ctx = objective.prepare(model, x, y)
    ce = reference_l_gen(model, x, x_adv, y, 0.0, LAYERS)
    shift = ce - reference_l_gen(model, x, x_adv, y, 1.0, LAYERS)
    draws = []
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            ours = objective(model, x_adv, y, ctx)
        torch.manual_seed(seed)
        expected_lam = torch.rand(()).item() * 0.5
        assert torch.allclose(ours, ce - expected_lam * shift, atol=1e-5)
        lam_hat = ((ce - ours) / shift).numpy()                # one Lambda for the whole batch
        assert np.ptp(lam_hat) < 1e-3 and 0 <= lam_hat[0] <= 0.5
        draws.append(lam_hat[0])
    assert len(set(np.round(draws, 4))) == 3                   # redrawn at every call


@pytest.mark.parametrize("method", ["sat", "sat-trades", "sat-awp-at"])
def test_sat_training_attack_stays_in_the_eps_ball_and_the_pixel_range(method):
    torch.manual_seed(0)
    cfg = resolve("quick", method=method, width=4, attack_steps=4, sat_lambda=5.0)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4).train()
    step = build_step(cfg, model, 10)
    objective = step.attack.objective
    assert isinstance(objective, FeatureShiftObjective) and objective.layers == LAYERS and objective.random
    assert isinstance(objective.base, KLDivergence if method == "sat-trades" else CrossEntropy)
    data = load("digits", "train").subset(64)
    x_adv = step.attack(model, data.x, data.y)
    assert (x_adv - data.x).abs().max() <= cfg.eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - data.x).abs().max() > cfg.eps / 2          # it did move
    assert model.training                                       # the attack restored the mode


# -- AWP ---------------------------------------------------------------------------------------------------

def proxy_awp(model, x_adv, y, gamma, lr=0.01):
    """Wu et al. (2020)'s AdvWeightPerturb.calc_awp: one SGD step of a proxy on -CE, per-layer rescaling."""
    proxy = copy.deepcopy(model)
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    proxy_opt = torch.optim.SGD(proxy.parameters(), lr=lr)
    loss = -F.cross_entropy(proxy(x_adv), y)
    proxy_opt.zero_grad()
    loss.backward()
    proxy_opt.step()
    diff = {}
    old, new = model.state_dict(), proxy.state_dict()
    for k in old:
        if old[k].dim() <= 1 or "weight" not in k:
            continue
        d = new[k] - old[k]
        diff[k] = old[k].norm() / (d.norm() + 1e-20) * d
    return diff


def add_into_weights(model, diff, coeff):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in diff:
                p.add_(coeff * diff[name])


def _awp_models():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4).train()
    data = load("digits", "train").subset(48)
    return model, copy.deepcopy(model), data.x, data.y


def test_awp_perturbation_equals_the_proxy_copy_reference():
    ours, ref, x, y = _awp_models()
    applied = AWP(0.01).perturb(ours, lambda: F.cross_entropy(ours(x), y))
    add_into_weights(ref, proxy_awp(ref, x, y, 0.01), 0.01)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:                                  # weights perturbed alike; BN statistics and counters untouched
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6), k
    assert len(applied) == sum(1 for p in ours.parameters() if p.ndim > 1)
    AWP.restore(applied)
    fresh, _, _, _ = _awp_models()
    assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(ours.parameters(), fresh.parameters()))


@pytest.mark.parametrize("epoch, warmup", [(1, 0), (1, 1)])
def test_awp_training_step_equals_the_reference_loop(epoch, warmup):
    """One AWP-AT step (perturb, descend, restore) against the reference training loop, state for state."""
    ours, ref, x, y = _awp_models()
    cfg = resolve("quick", method="awp-at", width=4, awp_gamma=0.01, awp_warmup=warmup)
    step = TrainingStep(None, TrainingObjective(METHODS["awp-at"], cfg, [], 10), AWP(cfg.awp_gamma), warmup)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):                                         # two steps: momentum buffers matter too
        step(ours, opt_a, x, y, epoch)
        active = epoch > warmup                                # the reference's epoch >= warmup, 0-based
        diff = proxy_awp(ref, x, y, cfg.awp_gamma) if active else {}
        add_into_weights(ref, diff, cfg.awp_gamma)
        loss = F.cross_entropy(ref(x), y)
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()
        add_into_weights(ref, diff, -cfg.awp_gamma)
    a, b = ours.state_dict(), ref.state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k


# -- the greedy lambda search ------------------------------------------------------------------------

def test_unit_histograms_have_cosine_inner_products():
    edges = np.linspace(0, 4, 9)
    a = unit_histogram(np.array([0.1, 0.2, 1.1]), edges)
    assert np.linalg.norm(a) == pytest.approx(1.0)
    assert a @ a == pytest.approx(1.0)
    assert a @ unit_histogram(np.array([3.5, 3.9]), edges) == 0.0
    assert unit_histogram(np.array([9.0]), edges)[-1] == 1.0    # past the last edge: last bin
    assert common_edges(np.array([1.0]), np.array([3.0]), bins=4)[-1] == 3.0


def _gaussian_eq7(slope=20.0, offset=0.1, sd=0.4):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(4000)
    return lambda lam: 4.0 - slope * lam + offset + sd * noise


def test_greedy_search_climbs_to_the_crossing_of_the_two_similarities():
    rng = np.random.default_rng(1)
    ola, ila = 4.0 + 0.4 * rng.standard_normal(4000), 2.0 + 0.4 * rng.standard_normal(4000)
    search = greedy_lambda(_gaussian_eq7(), ola, ila)           # mean 4.1 - 20 lam reaches 3 at lam = 0.055
    assert search.converged and search.lam == pytest.approx(0.06)
    lams = search.trace.lam.tolist()
    assert lams[:7] == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    assert (search.trace.closer[search.trace.lam < 0.055] == "OLA").all()
    assert (search.trace.closer[search.trace.lam > 0.055] == "ILA").all()
    down = greedy_lambda(_gaussian_eq7(), ola, ila, start=0.12)  # from above it walks down to the same point
    assert down.converged and down.lam == pytest.approx(0.06) and down.trace.lam.iloc[1] < 0.12


def test_greedy_search_stops_at_zero_or_at_the_iteration_guard():
    rng = np.random.default_rng(2)
    ola, ila = 4.0 + 0.4 * rng.standard_normal(4000), 2.0 + 0.4 * rng.standard_normal(4000)
    at_ila = greedy_lambda(lambda lam: ila, ola, ila)           # already ILA-like at 0: lambda stays 0
    assert at_ila.converged and at_ila.lam == 0.0 and len(at_ila.trace) == 1
    calls = []
    stuck = greedy_lambda(lambda lam: calls.append(lam) or ola, ola, ila, max_iter=7)
    assert not stuck.converged and len(calls) == 7 and stuck.lam == pytest.approx(0.06)
    with pytest.raises(ValueError):
        greedy_lambda(lambda lam: ola, ola, ila, step=0)


def test_search_lambda_on_a_model_runs_caches_and_replays(trained_digits_model, digits_test):
    model, data = trained_digits_model, digits_test.subset(24)
    eps = 0.2
    search, shifts = search_lambda(model, data, ola=PGD(eps, steps=3), ila=FGSM(eps), eps=eps, steps=3,
                                   step=0.05, max_iter=4)
    assert set(shifts.source) == {"OLA", "ILA", "Eq. 7"} and (shifts["shift"] >= 0).all()
    assert len(shifts[shifts.source == "Eq. 7"]) == 24 * len(search.trace)
    again = replay(shifts, step=0.05, max_iter=4)
    assert again.lam == search.lam and again.trace.equals(search.trace)
    # lambda = 0 is plain PGD with the same seed, so its sample equals the OLA sample
    zero = shifts[(shifts.source == "Eq. 7") & (shifts.lam == 0.0)]["shift"].to_numpy()
    assert np.allclose(zero, shifts[shifts.source == "OLA"]["shift"].to_numpy(), atol=1e-5)


def test_eq7_attack_with_large_lambda_moves_the_features_less(trained_digits_model, digits_test):
    model, data = trained_digits_model, digits_test.subset(64)
    layer = sat_layers(model)[-1]
    shifts = {}
    for lam in (0.0, 10.0):
        torch.manual_seed(0)
        attack = eq7_attack(model, lam, eps=0.2, steps=5)
        x_adv = attack(model, data.x, data.y)
        assert (x_adv - data.x).abs().max() <= 0.2 + 1e-6
        store = {}
        h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: store.__setitem__("f", o))
        with torch.no_grad():
            model(data.x)
            clean = store["f"].flatten(1)
            model(x_adv)
        h.remove()
        shifts[lam] = (store["f"].flatten(1) - clean).norm(dim=1).mean().item()
    assert shifts[10.0] < 0.5 * shifts[0.0]


# -- Table 1 machinery ---------------------------------------------------------------------------------

def test_evaluate_many_in_two_processes_equals_seeded_evaluation_in_this_one(tmp_path):
    from satlib.attacks import make_attack
    from satlib.evaluation import evaluate
    from satlib.experiments import evaluate_many, load_or_train_many
    from satlib.runs import RunStore

    store = RunStore(tmp_path)
    small = dict(width=4, epochs=1, train_limit=128, val_size=32, monitor_steps=1, eval_size=32, attack_steps=1)
    cfgs = [resolve("quick", method="pgd-at", seed=s, **small) for s in (0, 1)]
    runs = load_or_train_many(cfgs, store=store, progress=False)
    frames = evaluate_many(runs, [["fgsm", "pgd"], ["pgd"]], steps=3, workers=2, progress=False)
    assert [list(f.attack) for f in frames] == [["clean", "FGSM", "PGD", "worst case"], ["clean", "PGD", "worst case"]]
    for t, names, frame in zip(runs, [["fgsm", "pgd"], ["pgd"]], frames):
        attacks = {a.name: a for a in (make_attack(n, eps=t.cfg.eps, steps=3, seed=t.cfg.seed) for n in names)}
        expected = evaluate(t.model, t.test_set(), attacks, seed=t.cfg.seed)
        assert np.allclose(frame.accuracy, expected.accuracy), (frame, expected)
    with pytest.raises(ValueError, match="attack lists"):
        evaluate_many(runs, [["pgd"]], progress=False)
