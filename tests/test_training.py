"""The trainer: every method runs, a killed run resumes to identical weights, divergence stops cleanly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from satlib.catalog import METHODS
from satlib.config import resolve
from satlib.runs import RunStore, safe_load
from satlib.training import TrainingDiverged, train
from satlib.training import methods as methods_module

TINY = dict(width=4, epochs=3, train_limit=192, batch_size=64, attack_steps=2, val_size=64, monitor_steps=2,
            snapshot_epochs=[1, 3])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_is_stored(tmp_path, method):
    cfg = resolve("quick", method=method, **TINY)
    run = train(cfg, store=RunStore(tmp_path), progress=False)
    metrics = run.metrics()
    assert run.finished and list(metrics.epoch) == [1, 2, 3] and metrics.loss.notna().all()
    assert run.snapshot_epochs() == [1, 3]
    if method.startswith("sat"):
        assert (metrics.cluster > 0).all()
    again = train(cfg, store=RunStore(tmp_path), progress=False)        # loads, does not retrain
    assert again.metrics().equals(metrics)


CLI_TINY = ["--set", "width=8", "--set", "train_limit=256", "--set", "batch_size=64", "--set", "attack_steps=3",
            "--set", "val_size=64", "--set", "monitor_steps=2", "--epochs", "6"]


def _train_cli(store, *extra):
    # One thread each: the resumed and the uninterrupted run train side by side, and two OpenMP teams
    # of two threads on two cores spin against each other (measured: 52 s for this test, against 10 s).
    env = {**os.environ, "SATLIB_RUNS": str(store), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "satlib", "train", *CLI_TINY, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    killed_store, clean_store = tmp_path / "killed", tmp_path / "clean"
    proc = _train_cli(killed_store)
    status = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list(killed_store.glob("*/status.json"))
        if found:
            status = json.loads(found[0].read_text())
            if status.get("epoch", 0) >= 2:
                break
        time.sleep(0.02)
    time.sleep(0.15)                                     # now inside a later epoch
    assert proc.poll() is None, "training finished before it could be killed; make the test run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = next(killed_store.iterdir())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"
    assert not (run_dir / "model.pt").exists()

    resumed = _train_cli(killed_store)
    uninterrupted = _train_cli(clean_store)
    for p in (resumed, uninterrupted):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    a = safe_load(run_dir / "model.pt")
    b = safe_load(next(clean_store.iterdir()) / "model.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ma = json.loads((run_dir / "metrics.json").read_text())
    mb = json.loads((next(clean_store.iterdir()) / "metrics.json").read_text())
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = resolve("quick", **TINY)
    original = methods_module.TrainingStep.__call__

    def poisoned(self, model, optimizer, x, y, epoch, **kwargs):
        loss, terms, logits = original(self, model, optimizer, x, y, epoch, **kwargs)
        return (loss * float("nan") if epoch == 2 else loss), terms, logits

    monkeypatch.setattr(methods_module.TrainingStep, "__call__", poisoned)
    store = RunStore(tmp_path)
    with pytest.raises(TrainingDiverged, match="diverged in epoch 2") as err:
        train(cfg, store=store, progress=False)
    assert "epoch 1" in str(err.value) and "\n" not in str(err.value)
    run = store.run(cfg)
    assert not run.finished and run.load_checkpoint()["epoch"] == 1
    monkeypatch.setattr(methods_module.TrainingStep, "__call__", original)
    assert train(cfg, store=store, progress=False).finished              # resumes from epoch 1


def test_cli_train_evaluate_and_list(tmp_path):
    env = {**os.environ, "SATLIB_RUNS": str(tmp_path)}
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "satlib", *args], env=env, capture_output=True, text=True,
                              timeout=600)
    small = ["--set", "width=4", "--set", "train_limit=128", "--set", "val_size=32", "--epochs", "1"]
    out = cli("train", *small)
    assert out.returncode == 0, out.stderr
    out = cli("evaluate", *small, "--attacks", "fgsm,pgd", "--steps", "3", "--n", "40")
    assert out.returncode == 0, out.stderr
    assert "worst case" in out.stdout and "FGSM" in out.stdout
    listing = cli("runs")
    assert "pgd-at" in listing.stdout and "finished" in listing.stdout
    assert cli("--help").returncode == 0


@pytest.mark.parametrize("args, fragment", [
    (("train", "--method", "foo"), "method must be one of"),
    (("train", "--preset", "huge"), "preset must be one of"),
    (("train", "--eps", "-1"), "eps must be zero or positive"),
    (("evaluate", "--set", "epochs=1", "--attacks", "magic"), "unknown attack"),
    (("train", "--preset", "paper", "--set", "epochs=1"), "CIFAR-10"),
])
def test_cli_errors_are_one_clear_line(args, fragment, capsys, monkeypatch):
    from satlib.__main__ import main
    monkeypatch.setenv("SATLIB_OFFLINE", "1")
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_rejects_a_badly_typed_option(capsys):
    from satlib.__main__ import main
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--epochs", "five"])
    assert exit_.value.code == 2 and "invalid int value" in capsys.readouterr().err
