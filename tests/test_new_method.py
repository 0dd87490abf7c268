"""A new training method is one new row of ``satlib.catalog.METHODS``, and nothing else (Chapter 5)."""
from satlib import catalog
from satlib.catalog import Method
from satlib.config import resolve
from satlib.runs import RunStore
from satlib.training import train

ONE_TINY_EPOCH = dict(width=4, epochs=1, train_limit=128, batch_size=64, attack_steps=2, val_size=64, monitor_steps=1,
                      snapshot_epochs=())


def test_adding_a_row_is_the_only_edit_a_new_method_needs(monkeypatch, tmp_path):
    row = Method("ce", "mart", "uniform", awp=True, knobs=("mart_beta", "awp_gamma", "awp_warmup"))
    monkeypatch.setitem(catalog.METHODS, "mart-awp", row)
    cfg = resolve("quick", method="mart-awp", **ONE_TINY_EPOCH)

    def changed(**knob):
        return resolve("quick", method="mart-awp", **ONE_TINY_EPOCH, **knob).run_id()

    assert cfg.method == "mart-awp" and cfg.run_id().startswith("mart-awp-digits-resnet18-")
    # the run is keyed by the knobs the row declares, and by no other method's
    for knob, value in (("mart_beta", 2.0), ("awp_gamma", 0.02), ("awp_warmup", 1)):
        assert changed(**{knob: value}) != cfg.run_id(), knob
    for knob, value in (("trades_beta", 1.0), ("sat_lambda", 0.5), ("sat_beta", 0.2), ("sat_cluster_form", "code")):
        assert changed(**{knob: value}) == cfg.run_id(), knob
    assert "mart_beta" in cfg.training_key() and "trades_beta" not in cfg.training_key()
    run = train(cfg, store=RunStore(tmp_path), progress=False)
    metrics = run.metrics()
    assert run.finished and list(metrics.epoch) == [1] and metrics.loss.notna().all()
    assert list(RunStore(tmp_path).list().method) == ["mart-awp"]
