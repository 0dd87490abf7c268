"""The run store: atomic checkpoints, fallback on corruption, locks, caches."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from satlib.config import resolve
from satlib.runs import CheckpointError, RunLocked, RunStore, atomic_save, safe_load


@pytest.fixture
def run(tmp_path):
    r = RunStore(tmp_path).run(resolve("quick"))
    r.prepare()
    return r


def test_atomic_save_leaves_no_temp_files(tmp_path):
    atomic_save({"a": torch.ones(3)}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert torch.equal(safe_load(tmp_path / "x.pt")["a"], torch.ones(3))


def test_checkpoint_keeps_previous_and_falls_back(run):
    run.save_checkpoint({"epoch": 1, "w": torch.zeros(2)})
    run.save_checkpoint({"epoch": 2, "w": torch.ones(2)})
    assert run.load_checkpoint()["epoch"] == 2
    run.checkpoint_path.write_bytes(run.checkpoint_path.read_bytes()[:50])          # truncated
    with pytest.warns(UserWarning, match="previous checkpoint"):
        assert run.load_checkpoint()["epoch"] == 1
    run.checkpoint_path.write_bytes(b"garbage" * 100)
    with pytest.warns(UserWarning):
        assert run.load_checkpoint()["epoch"] == 1


def test_both_checkpoints_unreadable_is_a_clear_error(run):
    run.save_checkpoint({"epoch": 1})
    run.save_checkpoint({"epoch": 2})
    run.checkpoint_path.write_bytes(b"\x80\x04garbage")
    run.previous_checkpoint_path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as err:
        run.load_checkpoint()
    assert str(run.dir) in str(err.value)


def test_pickled_code_is_refused(run, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"epoch": 1, "x": Evil()}, run.checkpoint_path)
    with pytest.raises(CheckpointError):
        run.load_checkpoint()


def test_lock_refuses_a_live_owner_and_takes_a_dead_ones(run):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run.dir / "train.lock").write_text(str(sleeper.pid))
        with pytest.raises(RunLocked, match=str(sleeper.pid)):
            run.lock()
    finally:
        sleeper.kill()
        sleeper.wait()
    run.lock()                                   # the owner died: the lock is taken over
    assert (run.dir / "train.lock").read_text() == str(os.getpid())
    run.unlock()


def test_cached_artifacts_compute_once(run):
    calls = []
    frame = lambda: calls.append(1) or pd.DataFrame({"a": [1, 2]})
    assert run.cached_frame("t", frame).a.tolist() == [1, 2]
    assert run.cached_frame("t", frame).a.tolist() == [1, 2] and len(calls) == 1
    tensors = lambda: calls.append(2) or {"c": torch.arange(3)}
    run.cached_tensors("c", tensors)
    assert torch.equal(run.cached_tensors("c", tensors)["c"], torch.arange(3)) and calls.count(2) == 1


def test_unfinished_run_has_no_model(run):
    with pytest.raises(CheckpointError, match="has not finished"):
        run.load_model_state()
    with pytest.raises(CheckpointError, match="kept no weights"):
        run.load_snapshot(3)


def test_store_listing(tmp_path, run):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    table = RunStore(tmp_path).list()
    assert set(table.run) == {run.id, "junk"}
