import pytest

from satlib.config import PRESETS, Config, ConfigError, resolve


def test_presets_resolve_and_match_the_paper():
    for name in PRESETS:
        assert isinstance(resolve(name), Config)
    paper = resolve("paper")
    assert (paper.dataset, paper.model, paper.width, paper.epochs, paper.batch_size) == ("cifar10", "resnet18", 64, 200, 128)
    assert paper.eps == pytest.approx(8 / 255) and paper.step_size == pytest.approx(2 / 255) and paper.attack_steps == 10
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.augment) == (0.1, 0.9, 5e-4, "none")
    assert paper.milestones() == [100, 150]
    assert resolve("paper-wrn").model == "wrn-28-10"
    assert resolve("paper-cifar100").dataset == "cifar100" and resolve("paper-svhn").dataset == "svhn"
    assert resolve("quick").dataset == "digits"


def test_none_keeps_the_preset_value_and_milestones_scale():
    assert resolve("quick", epochs=None).epochs == resolve("quick").epochs
    assert resolve("quick", epochs=200).milestones() == [100, 150]
    assert resolve("quick", epochs=8).milestones() == [4, 6]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(preset="nope"), "preset must be one of"),
    (dict(method="foo"), "method must be one of"),
    (dict(eps=-0.1), "eps must be zero or positive"),
    (dict(eps=8), "at most 1"),
    (dict(epochs="5"), "epochs must be an integer"),
    (dict(epochs=2.5), "epochs must be an integer"),
    (dict(epochs=0), "epochs must be positive"),
    (dict(epochs=True), "epochs must be an integer"),
    (dict(lr=float("nan")), "finite"),
    (dict(amp="yes"), "True or False"),
    (dict(snapshot_epochs=[0]), "snapshot_epochs"),
    (dict(bogus=1), "unknown parameter 'bogus'"),
])
def test_bad_knobs_fail_with_one_sentence(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        resolve(**kwargs)
    message = str(err.value)
    assert fragment in message and "\n" not in message and message.endswith(".")


def test_run_id_depends_only_on_what_changes_the_weights():
    base = resolve("quick")
    assert base.run_id() == resolve("quick").run_id()
    assert base.run_id() == resolve("quick", device="cpu", monitor_steps=3, eval_steps=7, snapshot_epochs=[2]).run_id()
    assert base.run_id() == resolve("quick", sat_beta=0.5).run_id()          # pgd-at does not use it
    assert base.run_id() != resolve("quick", seed=1).run_id()
    assert base.run_id() != resolve("quick", eps=0.1).run_id()
    assert resolve("quick", method="sat").run_id() != resolve("quick", method="sat", sat_beta=0.5).run_id()
    assert resolve("quick", method="standard").run_id() == resolve("quick", method="standard", eps=0.1).run_id()


def test_replace_validates():
    cfg = resolve("quick")
    assert cfg.replace(epochs=3).epochs == 3
    with pytest.raises(ConfigError):
        cfg.replace(epochs=-3)


def test_tuned_values_are_the_chosen_points_of_the_committed_grid():
    import pandas as pd
    from pathlib import Path
    from satlib.config import TUNED
    grid = pd.read_csv(Path(__file__).resolve().parents[1] / "data" / "tuning_quick.csv")
    chosen = grid[grid.chosen].set_index("method")
    assert set(chosen.index) == set(TUNED["quick"])
    for method, values in TUNED["quick"].items():
        row = chosen.loc[method]
        expected = {"lr": row["lr"], **({row["knob"]: row["value"]} if isinstance(row["knob"], str) else {})}
        expected.update({k: row[k] for k in ("sat_lambda", "trades_beta", "awp_gamma")
                         if k in row and row[k] == row[k]})
        assert values == pytest.approx(expected), method


def test_changing_the_method_takes_its_tuned_values_unless_set_explicitly():
    pgd = resolve("quick")
    assert pgd.replace(method="mart").lr == 0.05 and pgd.replace(method="mart").mart_beta == 3.0
    assert resolve("quick", lr=0.02).replace(method="mart").lr == 0.02


def test_replace_keeps_the_method_and_its_tuned_values():
    sat = resolve("quick", method="sat")
    beta = sat.replace(sat_beta=0.1)
    assert (beta.method, beta.sat_beta, beta.sat_lambda, beta.lr) == ("sat", 0.1, sat.sat_lambda, sat.lr)
    assert beta.run_id() != sat.run_id() and beta.run_id().startswith("sat-")
    assert resolve("quick", method="mart").replace(lr=0.1).method == "mart"
    assert resolve("paper", method="trades").trades_beta == 6.0          # the paper keeps the reference values
