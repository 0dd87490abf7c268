"""satlib.report: a chapter's setup in one call, the paper's tables, the gradient-masking checks (Chapters 1 and 5)."""
import pandas as pd
import pytest
import torch
from torch import nn

from satlib.config import ConfigError, resolve
from satlib.data import load
from satlib.models import build_model
from satlib.report import chapter_config, gradient_masking, masking_checks, paper_table, tag

CH5 = dict(defaults=dict(eval_size=200, seeds=2, autoattack_methods=["sat"], attack_steps=None, noise=0.1,
                         autoattack_seeds=1, plots=True),
           minimum=dict(autoattack_seeds=0), choices=dict(autoattack_methods=["pgd-at", "sat"]))
KNOBS = dict(epochs=None, seed=None, eval_size=None)
NONE = dict(seeds=None, autoattack_methods=None, attack_steps=None, noise=None, autoattack_seeds=None, plots=None)


def setup(preset="quick", knobs=(), **params):
    return chapter_config(preset, {**KNOBS, **dict(knobs)}, **CH5, **{**NONE, **params})


def test_chapter_config_fills_defaults_and_recognises_the_default_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("SATLIB_RUNS", str(tmp_path))
    ch = setup()
    assert ch.cfg == resolve("quick", eval_size=200) and ch.default and ch.verdicts.default
    assert (ch.seeds, ch.autoattack_methods, ch.attack_steps, ch.noise, ch.plots) == (2, ["sat"], None, 0.1, True)
    assert ch.verdicts.setting == "quick"
    assert ch.cfg.attack_steps == resolve("quick").attack_steps          # a chapter parameter, not the knob
    assert setup(knobs=dict(seed=0, eval_size=200), seeds=2).default
    changed = setup(knobs=dict(epochs=2), autoattack_methods="pgd-at, sat")
    assert changed.cfg.epochs == 2 and changed.autoattack_methods == ["pgd-at", "sat"] and not changed.default
    assert changed.verdicts.setting.startswith("quick-") and not changed.verdicts.default
    again = setup(knobs=dict(epochs=2), autoattack_methods=["pgd-at", "sat"])
    assert again.verdicts.setting == changed.verdicts.setting
    assert not setup(attack_steps=5).default
    assert not setup("paper").default                      # the prose describes the quick preset
    with pytest.raises(AttributeError, match="no parameter 'sedes'"):
        setup().sedes


@pytest.mark.parametrize("change, message", [
    (dict(seeds=0), "seeds must be an integer >= 1, got 0."),
    (dict(seeds=True), "seeds must be an integer >= 1"),
    (dict(autoattack_seeds=-1), "autoattack_seeds must be an integer >= 0"),
    (dict(attack_steps=0), "attack_steps must be a positive integer or None, got 0."),
    (dict(attack_steps=2.5), "attack_steps must be a positive integer or None"),
    (dict(noise=-1.0), "noise must be a positive number"),
    (dict(plots="yes"), "plots must be True or False"),
    (dict(autoattack_methods="sat,trades"), "autoattack_methods must be a list (or comma-separated string) of "
                                            "pgd-at, sat"),
    (dict(knobs=dict(epochs=-3)), "epochs must be positive"),
    (dict(knobs=dict(eval_size="all")), "eval_size must be an integer"),
    (dict(knobs=dict(epoch=3)), "unknown parameter 'epoch'"),
])
def test_chapter_config_stops_each_bad_value_with_one_sentence(change, message):
    with pytest.raises(ConfigError) as err:
        setup(**change)
    assert message in str(err.value) and str(err.value).count(". ") == 0 and "\n" not in str(err.value)


def test_chapter_config_rejects_a_preset_and_a_parameter_without_default():
    with pytest.raises(ConfigError, match="preset must be one of"):
        setup("fast")
    with pytest.raises(ValueError, match="have no default"):
        chapter_config("quick", seeds=3)
    listed = chapter_config("quick", defaults=dict(methods=["pgd-at"]), methods="trades,mart")
    assert listed.methods == ["trades", "mart"]
    assert chapter_config("quick").cfg == resolve("quick")


def test_tag_names_every_part():
    assert tag(1, "a") == tag(1, "a") != tag(1, "b") and len(tag()) == 10


def test_paper_table_maps_the_paper_columns_to_ours():
    t1 = paper_table("table1")
    assert list(t1.columns) == ["clean", "FGSM", "BIM", "PGD", "CW-inf", "AutoAttack", "LAFEAT"]
    assert list(t1.index) == ["pgd-at", "trades", "mart", "awp-at", "sat", "sat-trades", "sat-awp-at"]
    assert t1.loc["pgd-at", "PGD"] == 38.75 and t1.loc["sat", "LAFEAT"] == 43.08
    assert paper_table("table1", model="WRN-28-10").loc["sat", "clean"] != t1.loc["sat", "clean"]
    t2 = paper_table("table2", dataset="CIFAR-100")
    assert list(t2.columns) == ["PGD", "AutoAttack", "LAFEAT"] and t2.loc["sat", "PGD"] == 31.35
    with pytest.raises(ValueError, match="table1, table2"):
        paper_table("table3")
    with pytest.raises(ValueError, match="no rows for ResNet-18 on SVHN"):
        paper_table("table1", dataset="SVHN")


def sweep(*accuracies):
    return pd.DataFrame({"eps": [0.0, 0.1, 0.2, 0.3][:len(accuracies)], "accuracy": accuracies})


def test_masking_checks_decide_each_symptom():
    good = masking_checks(clean=0.9, sweep=sweep(0.9, 0.6, 0.3, 0.0), fgsm=0.4, bim=0.3, pgd=0.3, transfer=0.7)
    assert list(good.check) == ["eps-zero", "vanishes", "monotone", "iterative", "transfer"]
    assert (good.verdict == "pass").all()
    bad = masking_checks(clean=0.9, sweep=sweep(0.85, 0.6, 0.65, 0.4), fgsm=0.3, bim=0.3, pgd=0.35, transfer=0.2)
    assert (bad.verdict == "fail").all(), bad
    assert masking_checks(clean=0.9, sweep=sweep(0.9, 0.0), fgsm=0.1, bim=0.0, pgd=0.0).set_index(
        "check").loc["transfer", "verdict"] == "skipped"
    # a model near chance: nothing to vanish, and the strict comparisons relax
    chance = masking_checks(clean=0.11, sweep=sweep(0.11, 0.1, 0.1, 0.1), fgsm=0.1, bim=0.1, pgd=0.1, transfer=0.095)
    assert dict(zip(chance.check, chance.verdict)) == {"eps-zero": "pass", "vanishes": "skipped", "monotone": "pass",
                                                       "iterative": "pass", "transfer": "pass"}


class Quantised(nn.Module):
    """The same classifier behind an input rounding: its input gradient is zero almost everywhere."""

    def __init__(self, model: nn.Module, levels: int = 16):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x):
        return self.model(torch.round(x * self.levels) / self.levels)


@pytest.fixture(scope="module")
def surrogate():
    """Another small digits classifier, for the transfer attack."""
    torch.manual_seed(1)
    train = load("digits", "train")
    model = build_model("resnet18", num_classes=10, in_channels=1, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for idx in torch.randperm(len(train)).split(128):
            loss = nn.functional.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_an_honest_model_passes_and_a_masked_gradient_fails(trained_digits_model, surrogate, digits_test):
    data = digits_test.subset(200)
    honest = gradient_masking(trained_digits_model, data, eps=0.1, steps=10, surrogate=surrogate)
    assert (honest.verdict == "pass").all(), honest
    masked = gradient_masking(Quantised(trained_digits_model), data, eps=0.1, steps=10,
                              surrogate=trained_digits_model).set_index("check")["verdict"]
    # rounding hides the gradient: one step does as well as many, the ball's corners stay unfound,
    # and the same weights attacked without the rounding (a transfer attack) do far better
    assert masked[["vanishes", "iterative", "transfer"]].eq("fail").all(), masked
    assert masked["eps-zero"] == "pass"


def test_expect_asserts_a_claim_only_in_the_default_setting(capsys):
    from satlib.report.chapter import chapter_config

    default = chapter_config("quick", dict(epochs=None), defaults=dict(seeds=2), seeds=None)
    other = chapter_config("quick", dict(epochs=3), defaults=dict(seeds=2), seeds=None)
    other.expect(False, "SAT is ahead")
    assert "DOES NOT HOLD: SAT is ahead" in capsys.readouterr().out
    default.expect(True, "SAT is ahead")
    with pytest.raises(AssertionError, match="the text says: SAT is ahead"):
        default.expect(False, "SAT is ahead")
