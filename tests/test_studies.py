"""The two studies of Chapter 5 on a tiny scale: the tuning protocol picks, per method, the grid point with the
best validation PGD accuracy (SAT variants after the lambda search, inheriting their base's weight), and the
long-training study evaluates the last and the best weights of each run."""
import pytest

from satlib import studies

TINY = dict(width=4, epochs=2, train_limit=128, val_size=64, monitor_steps=1, attack_steps=1, eval_steps=2,
            eval_size=32)


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(studies, "LEARNING_RATES", (0.02, 0.1))
    monkeypatch.setattr(studies, "SCORE_STEPS", 2)
    monkeypatch.setattr(studies, "GRID", {"pgd-at": {}, "trades": {"trades_beta": (1.0, 6.0)},
                                          "sat-trades": {"sat_beta": (0.001, 0.01)}})


def test_tuning_chooses_the_best_validation_point_of_each_method(small_grid):
    frame = studies.tuning("quick", methods=("pgd-at", "trades", "sat-trades"), **TINY)
    assert sorted(frame.method.unique()) == ["pgd-at", "sat-trades", "trades"]
    assert frame.groupby("method").size().to_dict() == {"pgd-at": 2, "sat-trades": 4, "trades": 4}
    chosen = frame[frame.chosen]
    assert len(chosen) == 3
    for method, part in frame.groupby("method"):
        assert chosen.set_index("method").loc[method, "val_pgd"] == part["val_pgd"].max()
    sat = frame[frame.method == "sat-trades"]
    assert (sat["trades_beta"] == chosen.set_index("method").loc["trades", "value"]).all()
    assert sat["sat_lambda"].nunique() == 1 and (sat["sat_lambda"] >= 0).all()


def test_long_training_reports_last_and_best_weights():
    frame = studies.long_training("quick", seeds=(0,), methods=("pgd-at",), **{**TINY, "epochs": 2})
    assert sorted(frame.weights) == ["best", "last"]
    assert frame.best_epoch.between(1, 2).all()
    assert (frame["worst case"] <= frame[["PGD", "CW-inf", "LAFEAT"]].min(axis=1) + 1e-9).all()
