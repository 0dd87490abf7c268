"""LAFEAT (Chapter 4): heads, the mixed margin-normalised logits, the attack's properties, run-store caching."""
import math

import pytest
import torch
import torch.nn.functional as F

from satlib.attacks import LAFEAT, fit_heads, make_attack, train_heads
from satlib.attacks.lafeat import AUTHORS_BETAS, mixed_logits
from satlib.attacks.lafeat_heads import (default_layers, head_agreement, heads_from_state, heads_state, make_head,
                                         make_heads)
from satlib.config import resolve
from satlib.data import load
from satlib.evaluation import correct_mask
from satlib.experiments import evaluate_run, lafeat_for, load_or_train
from satlib.runs import RunStore

EPS = 0.2


@pytest.fixture(scope="module")
def train_set():
    return load("digits", "train")


@pytest.fixture(scope="module")
def heads(trained_digits_model, train_set):
    return train_heads(trained_digits_model, train_set, ["layer3.1"], epochs=40)


@pytest.fixture(scope="module")
def at_run(tmp_path_factory):
    """A small PGD-AT run (narrow ResNet-18, 6 epochs of 3-step PGD) in a private run store."""
    cfg = resolve("quick", width=8, epochs=6, attack_steps=3, step_size=0.1, val_size=64, monitor_steps=2,
                  snapshot_epochs=(), eval_steps=10)
    torch.manual_seed(0)
    return load_or_train(cfg, store=RunStore(tmp_path_factory.mktemp("runs")), progress=False)


def test_heads_predict_the_models_own_labels_and_leave_the_model_alone(trained_digits_model, train_set,
                                                                       digits_test):
    model = trained_digits_model
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        heads = train_heads(model, train_set, ["layer3.1", "layer4.0"], epochs=40)
        assert model.training
    finally:
        model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    agreement = head_agreement(model, heads, digits_test)
    assert set(agreement) == {"layer3.1", "layer4.0"}
    assert min(agreement.values()) >= 0.9, agreement
    # the heads were fitted to the model's labels: they agree with the model at least as often as with the truth
    truth = head_agreement(model, heads, digits_test, target="labels")
    assert all(agreement[l] >= truth[l] - 0.02 for l in heads)


def test_head_shapes_and_state_round_trip(trained_digits_model, digits_test):
    head = make_head((32, 2, 2), 10)
    assert [type(m).__name__ for m in head] == ["AdaptiveAvgPool2d", "Flatten", "Linear", "Linear"]
    assert head[2].in_features == 32 and head[2].out_features == 32
    flat = make_head((32, 2, 2), 10, pool="none", hidden=16, activation=True)
    assert flat[1].in_features == 128 and isinstance(flat[2], torch.nn.ReLU)
    assert flat(torch.randn(3, 32, 2, 2)).shape == (3, 10)
    with pytest.raises(ValueError, match="pool"):
        make_head((32, 2, 2), 10, pool="max")
    heads = make_heads(trained_digits_model, digits_test.x, ["layer2.1", "layer4.0"], 10)
    state = heads_state(heads)
    assert all(k.split("/")[0] in heads for k in state)
    fresh = heads_from_state(state)          # rebuilt from the weights alone, no sample needed
    assert list(fresh) == ["layer2.1", "layer4.0"] and not fresh["layer4.0"].training
    assert heads_state(fresh).keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in heads_state(fresh).items())
    for options in (dict(pool="none", hidden=16, activation=True), dict(activation=True), dict(pool="none")):
        other = {"layer3.1": make_head((32, 2, 2), 10, **options)}
        rebuilt = heads_from_state(heads_state(other))["layer3.1"]
        assert [type(m) for m in rebuilt] == [type(m) for m in other["layer3.1"]]
        x = torch.randn(2, 32, 2, 2)
        assert torch.equal(rebuilt(x), other["layer3.1"].eval()(x))
    assert default_layers(trained_digits_model) == ["layer4.0"]


def test_mixed_logits_match_the_formula():
    torch.manual_seed(0)
    z, z_h, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])

    def gap(t):
        top = t.topk(2, dim=1).values
        return (top[:, 0] - top[:, 1])[:, None]

    assert torch.allclose(mixed_logits(z, [], y, 0.7), z / gap(z))
    assert torch.allclose(mixed_logits(z, [z_h], y, 0.0), z / gap(z))
    m = ((z.argmax(1) == y) & (z_h.argmax(1) == y)).float()[:, None]
    expected = 0.4 * m * z_h / gap(z_h) + (1 - 0.4 * m) * z / gap(z)
    assert torch.allclose(mixed_logits(z, [z_h], y, 0.4), expected)
    # margin normalisation: the scaled logits' top-2 gap is exactly 1
    assert torch.allclose(gap(mixed_logits(z, [], y, 0.0)), torch.ones(6, 1))
    # gradients flow to both logit tensors, not to the detached scales
    z.requires_grad_(True), z_h.requires_grad_(True)
    F.cross_entropy(mixed_logits(z, [z_h], torch.zeros(6, dtype=torch.long), 0.5), torch.zeros(6, dtype=torch.long)
                    ).backward()
    assert z.grad.abs().sum() > 0


def test_perturbation_stays_in_ball_and_range(trained_digits_model, heads, digits_test):
    x, y = digits_test.x[:100], digits_test.y[:100]
    for attack in (LAFEAT(EPS, heads, steps=5, betas=(0.4, 0.0)), LAFEAT(EPS, {}, steps=5, betas=(0.0,), start="none")):
        x_adv = attack(trained_digits_model, x, y)
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(LAFEAT(0.0, heads, steps=3)(trained_digits_model, x, y), x)


def test_model_and_head_state_is_restored(trained_digits_model, heads, digits_test):
    model = trained_digits_model
    head = heads["layer3.1"]
    model.zero_grad(set_to_none=True)
    model.train(), head.train()
    flags = [p.requires_grad for p in model.parameters()]
    head_flags = [p.requires_grad for p in head.parameters()]
    try:
        LAFEAT(EPS, heads, steps=3, betas=(0.5,))(model, digits_test.x[:50], digits_test.y[:50])
        assert model.training and head.training
        assert [p.requires_grad for p in model.parameters()] == flags
        assert [p.requires_grad for p in head.parameters()] == head_flags
    finally:
        model.eval(), head.eval()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in head.parameters())


def test_schedule_and_validation():
    attack = LAFEAT(EPS, {}, steps=10)
    sizes = attack.step_sizes()
    assert sizes[0] == pytest.approx(2 * EPS) and all(a > b > 0 for a, b in zip(sizes, sizes[1:]))
    assert sizes[5] == pytest.approx(EPS * (1 + math.cos(math.pi / 2)))
    assert attack.betas == AUTHORS_BETAS and attack.momentum == 0.75 and attack.name == "LAFEAT"
    for bad in (dict(betas=()), dict(betas=(1.5,)), dict(momentum=0.0), dict(steps=0), dict(start="normal")):
        with pytest.raises(ValueError):
            LAFEAT(EPS, {}, **bad)


def test_broken_samples_are_misclassified_and_results_are_reproducible(trained_digits_model, heads, digits_test):
    model, x, y = trained_digits_model, digits_test.x[:100], digits_test.y[:100]
    attack = LAFEAT(EPS, heads, steps=5, betas=(0.3, 0.0))
    x_adv = attack(model, x, y)
    with torch.no_grad():
        clean, adv = model(x).argmax(1) == y, model(x_adv).argmax(1) == y
    assert adv.float().mean() < clean.float().mean()
    assert torch.equal(x_adv[~clean], x[~clean])            # already misclassified: left as they are
    assert torch.equal(LAFEAT(EPS, heads, steps=5, betas=(0.3, 0.0))(model, x, y), x_adv)   # seeded


def test_memo_returns_the_stored_result_until_the_weights_change(trained_digits_model, heads, digits_test):
    model, x, y = trained_digits_model, digits_test.x[:60], digits_test.y[:60]
    attack = LAFEAT(EPS, heads, steps=3, betas=(0.5,), memo=2)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = attack(model, x, y)
        n = len(calls)
        assert torch.equal(attack(model, x, y), first) and len(calls) == n      # no forward pass
        assert torch.equal(LAFEAT(EPS, heads, steps=3, betas=(0.5,))(model, x, y), first)
        with torch.no_grad():
            model.linear.bias.add_(1e-3)
        try:
            attack(model, x, y)
            assert len(calls) > n
        finally:
            with torch.no_grad():
                model.linear.bias.sub_(1e-3)
    finally:
        hook.remove()


class DictStore:
    """A store like a run's artifacts, in memory."""

    def __init__(self):
        self.kept = {}

    def cached_tensors(self, name, compute):
        if name not in self.kept:
            self.kept[name] = compute()
        return self.kept[name]


def test_kept_results_are_shared_between_objects_and_keyed_by_attack_and_batch(trained_digits_model, heads,
                                                                               digits_test):
    model, x, y = trained_digits_model, digits_test.x[:40], digits_test.y[:40]
    store = DictStore()
    first = LAFEAT(EPS, heads, steps=3, betas=(0.5,)).keep_results(store)(model, x, y)
    assert len(store.kept) == 1 and first.device == x.device and next(iter(store.kept)).startswith("adversarial-lafeat-")
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = LAFEAT(EPS, heads, steps=3, betas=(0.5,)).keep_results(store)(model, x, y)
        assert torch.equal(again, first) and not calls                           # read, not recomputed
    finally:
        hook.remove()
    LAFEAT(EPS, heads, steps=4, betas=(0.5,)).keep_results(store)(model, x, y)              # another attack
    LAFEAT(EPS, heads, steps=3, betas=(0.5,)).keep_results(store)(model, x[:20], y[:20])    # another batch
    assert len(store.kept) == 3


def test_make_attack_builds_lafeat_from_heads_or_says_what_is_missing(heads):
    attack = make_attack("LAFEAT", eps=EPS, steps=7, seed=3, heads=heads, betas=(0.2,))
    assert isinstance(attack, LAFEAT) and attack.steps == 7 and attack.seed == 3 and list(attack.heads) == ["layer3.1"]
    assert make_attack("lafeat", eps=EPS, heads=lambda: {}).heads == {}          # built lazily, or none at all
    with pytest.raises(ValueError, match="LAFEAT needs trained heads"):
        make_attack("lafeat", eps=EPS)
    with pytest.raises(ValueError, match="LAFEAT's"):
        make_attack("pgd", eps=EPS, betas=(0.2,))


def test_fit_heads_trains_once_then_reads_the_cache(trained_digits_model, train_set):
    store, calls = {}, []

    def cache(name, compute):
        if name not in store:
            store[name] = compute()
        return store[name]

    def data():
        calls.append(1)
        return train_set

    first = fit_heads(trained_digits_model, data, ["layer3.1"], cache=cache, epochs=2)
    second = fit_heads(trained_digits_model, data, ["layer3.1"], cache=cache, epochs=2)
    assert len(calls) == 1 and len(store) == 1 and next(iter(store)).startswith("lafeat-heads-layer3.1-")
    assert all(torch.equal(a, b) for a, b in zip(heads_state(first).values(), heads_state(second).values()))
    fit_heads(trained_digits_model, data, ["layer3.1"], cache=cache, epochs=3)
    fit_heads(trained_digits_model, data, ["layer3.1"], cache=cache, epochs=2, seed=1)
    assert len(store) == 3
    with pytest.raises(ValueError, match="unknown head option"):
        fit_heads(trained_digits_model, train_set, ["layer3.1"], epoch=2)


def test_heads_beat_their_beta_zero_variant_on_an_adversarially_trained_model(at_run):
    """The issue's acceptance check, on a small PGD-AT model: LAFEAT >= its beta = 0 variant, and they differ."""
    model, test = at_run.model, at_run.test_set(200)
    attack = lafeat_for(at_run, steps=10, epochs=30)
    beta0 = LAFEAT(at_run.cfg.eps, attack.heads, steps=10, betas=(0.0,))
    full_correct = correct_mask(model, test, attack)
    beta0_correct = correct_mask(model, test, beta0)
    clean = correct_mask(model, test)
    assert full_correct.sum() <= beta0_correct.sum() < clean.sum()
    x, y = test.x, test.y
    assert not torch.equal(attack(model, x, y), beta0(model, x, y))


def test_lafeat_for_caches_heads_and_adversarial_examples_and_evaluate_run_accepts_lafeat(at_run):
    first = lafeat_for(at_run, steps=4, epochs=5)
    artifacts = at_run.run.dir / "artifacts"
    assert list(artifacts.glob("lafeat-heads-layer4.0-*.pt")), "heads were not cached in the run store"
    again = lafeat_for(at_run, steps=4, epochs=5)
    assert repr(again) == repr(first) and again is not first
    other = lafeat_for(at_run, steps=4, epochs=5, layers=["layer3.1"])
    assert list(other.heads) == ["layer3.1"] and len(list(artifacts.glob("lafeat-heads-*"))) > 1
    assert first.steps == 4 and lafeat_for(at_run, epochs=5).steps == at_run.cfg.eval_steps
    table = evaluate_run(at_run, ["pgd", "LAFEAT"], n=64, steps=4).set_index("attack")["accuracy"]
    assert list(table.index) == ["clean", "PGD", "LAFEAT", "worst case"]
    assert table["worst case"] <= min(table["PGD"], table["LAFEAT"]) <= table["clean"]
    # the evaluation kept LAFEAT's adversarial examples: a new object, same arguments and batch, reads them
    kept = list(artifacts.glob("adversarial-lafeat-*.pt"))
    assert kept
    test = at_run.test_set(64)
    attack, calls = lafeat_for(at_run, steps=4), []           # the evaluation's attack: default heads
    hook = at_run.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        x_adv = attack(at_run.model, test.x, test.y)
    finally:
        hook.remove()
    assert not calls and len(list(artifacts.glob("adversarial-lafeat-*.pt"))) == len(kept)
    with torch.no_grad():
        assert (at_run.model(x_adv).argmax(1) == test.y).float().mean().item() == pytest.approx(table["LAFEAT"])


def test_the_command_line_evaluates_lafeat_like_any_other_attack(tmp_path, monkeypatch, capsys):
    from satlib.__main__ import main
    monkeypatch.setenv("SATLIB_RUNS", str(tmp_path))
    tiny = ["--set", "width=4", "--set", "train_limit=128", "--set", "val_size=64", "--set", "monitor_steps=1",
            "--set", "attack_steps=1", "--epochs", "1"]
    assert main(["evaluate", *tiny, "--attacks", "pgd,lafeat", "--n", "16", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "PGD" in out and "LAFEAT" in out and "worst case" in out
    assert list(tmp_path.glob("*/artifacts/lafeat-heads-*.pt"))
    assert list(tmp_path.glob("*/artifacts/adversarial-lafeat-*.pt"))
