"""The run store: atomic checkpoints, recovery that keeps the good backup, locks, listing, caches."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from satlib.config import resolve
from satlib.runs import CheckpointError, Run, RunLocked, RunStore, StorageError, atomic_save, safe_load


@pytest.fixture
def run(tmp_path):
    r = RunStore(tmp_path).run(resolve("quick", epochs=3))
    r.prepare()
    return r


def state(epoch):
    return {"epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}}


def test_atomic_save_leaves_no_temp_files(tmp_path):
    atomic_save({"a": torch.ones(3)}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert torch.equal(safe_load(tmp_path / "x.pt")["a"], torch.ones(3))


def test_checkpoint_keeps_previous_and_falls_back(run):
    run.save_checkpoint(state(1))
    run.save_checkpoint(state(2))
    assert run.load_checkpoint()["epoch"] == 2
    run.checkpoint_path.write_bytes(run.checkpoint_path.read_bytes()[:50])          # truncated
    with pytest.warns(UserWarning, match="previous checkpoint"):
        assert run.load_checkpoint()["epoch"] == 1
    run.checkpoint_path.write_bytes(b"garbage" * 100)
    with pytest.warns(UserWarning):
        assert run.load_checkpoint()["epoch"] == 1


def test_rotation_never_replaces_a_readable_backup(run):
    run.save_checkpoint(state(1))
    run.save_checkpoint(state(2))
    run.checkpoint_path.write_bytes(b"\x00" * 64)
    with pytest.warns(UserWarning, match="previous checkpoint"):
        assert run.load_checkpoint()["epoch"] == 1
    with pytest.warns(UserWarning, match="stays the previous checkpoint"):
        run.save_checkpoint(state(2))                                                # redone from epoch 1
    assert safe_load(run.previous_checkpoint_path)["epoch"] == 1
    run.checkpoint_path.write_bytes(b"\x00" * 64)                                    # corrupted a second time
    with pytest.warns(UserWarning, match="previous checkpoint"):
        assert run.load_checkpoint()["epoch"] == 1


@pytest.mark.parametrize("contents", [{"x": 1}, torch.zeros(3), [1, 2], {"epoch": 2, "model": {"w": "no tensor"}},
                                      {"epoch": "2", "model": {"w": torch.ones(1)}}])
def test_a_torch_file_with_other_contents_is_not_a_checkpoint(run, contents):
    run.save_checkpoint(state(1))
    run.save_checkpoint(state(2))
    torch.save(contents, run.checkpoint_path)
    with pytest.warns(UserWarning, match="not a training checkpoint|does not hold model weights"):
        assert run.load_checkpoint()["epoch"] == 1
    run.previous_checkpoint_path.unlink()
    with pytest.raises(CheckpointError, match="not a training checkpoint|does not hold model weights") as err:
        run.load_checkpoint()
    assert "\n" not in str(err.value)


def test_both_checkpoints_unreadable_is_a_clear_error(run):
    run.save_checkpoint(state(1))
    run.save_checkpoint(state(2))
    run.checkpoint_path.write_bytes(b"\x80\x04garbage")
    run.previous_checkpoint_path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as err:
        run.load_checkpoint()
    assert str(run.dir) in str(err.value)


def test_pickled_code_is_refused_in_one_sentence_without_torch_advice(run):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"epoch": 1, "x": Evil()}, run.checkpoint_path)
    with pytest.raises(CheckpointError, match="system") as err:
        run.load_checkpoint()
    for damaged in (b"garbage" * 100, b"", b"PK\x03\x04" + b"\x00" * 40):
        run.checkpoint_path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="damaged, cut short or not a torch file") as more:
            run.load_checkpoint()
        assert "weights_only" not in str(more.value) and "\n" not in str(more.value)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_unreadable_model_is_rebuilt_from_the_final_checkpoint(run):
    weights = state(3)["model"]
    run.save_checkpoint(state(3))
    run.finish(weights, [])
    run.model_path.write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning, match="rebuilt from the final checkpoint"):
        assert torch.equal(run.load_model_state()["w"], weights["w"])
    assert torch.equal(safe_load(run.model_path)["w"], weights["w"])                # stored again


def test_unreadable_model_without_a_final_checkpoint_reopens_the_run(run):
    run.save_checkpoint(state(1))
    run.save_checkpoint(state(2))
    run.finish(state(3)["model"], [])                 # as if the final checkpoint had been lost
    torch.save({"w": "not weights"}, run.model_path)
    with pytest.raises(CheckpointError, match="from epoch 2 of 3; train run") as err:
        run.load_model_state()
    assert "\n" not in str(err.value)
    assert not run.finished and run.status == {"state": "running", "epoch": 2}


def test_best_weights_are_kept_with_their_epoch(run):
    run.save_best(state(2)["model"], 2)
    run.save_checkpoint(state(3))
    run.finish(state(3)["model"], [])
    assert run.status == {"state": "finished", "epoch": 3, "best_epoch": 2}
    assert torch.equal(run.load_model_state("best")["w"], state(2)["model"]["w"])
    assert torch.equal(run.load_model_state()["w"], state(3)["model"]["w"])
    run.best_path.unlink()
    with pytest.raises(CheckpointError, match="kept no best weights"):
        run.load_model_state("best")


def test_unfinished_run_has_no_model(run):
    with pytest.raises(CheckpointError, match="has not finished"):
        run.load_model_state()
    with pytest.raises(CheckpointError, match="kept no weights"):
        run.load_snapshot(3)


# ---------------------------------------------------------------- the lock

HOLDER = """
import sys, time
from satlib.config import resolve
from satlib.runs import RunStore
run = RunStore(sys.argv[1]).run(resolve("quick", epochs=3)).lock()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(run):
    """Another process that holds the lock of ``run``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run.dir.parent)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_lock_names_its_live_holder_and_outlives_no_killed_one(run, holder):
    with pytest.raises(RunLocked, match=rf"process {holder.pid} on this host \(.*\) since 20") as err:
        run.lock()
    assert "\n" not in str(err.value)
    note = run.dir / "train.lock"
    recorded = note.read_text()
    note.write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "since": "2026-01-31T09:00:00+00:00"}))
    with pytest.raises(RunLocked, match="process 4242 on host gpu-node-7 since 2026-01-31"):
        run.lock()                                               # a holder on another host is named as such
    note.write_text(recorded)
    run.save_checkpoint(state(1))
    assert RunStore(run.dir.parent).list().state.tolist() == ["running"]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert RunStore(run.dir.parent).list().state.tolist() == ["interrupted"]
    run.lock()                                                   # the holder died with its lock: no stale lock
    assert RunStore(run.dir.parent).list().state.tolist() == ["running"]
    run.unlock()


def test_a_second_run_object_in_the_same_process_is_refused(run):
    run.lock()
    with pytest.raises(RunLocked):
        Run(run.cfg, run.dir.parent).lock()
    run.unlock()
    Run(run.cfg, run.dir.parent).lock().unlock()


def test_lock_stress_never_two_holders(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "lock_stress.py"
    spec = importlib.util.spec_from_file_location("lock_stress", path)
    stress = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stress)
    assert stress.contend(str(tmp_path), trials=40, processes=6) == {1: 40}


def test_locking_creates_no_run_folder_and_removes_orphans(tmp_path):
    run = RunStore(tmp_path).run(resolve("quick"))
    run.lock().unlock()
    assert not run.dir.exists()                           # a run that never trained leaves nothing behind
    run.prepare()
    orphans = [run.dir / ".checkpoint.pt.1a2b3c4d.tmp", run.dir / "snapshots" / ".epoch_001.pt.5e6f7a8b.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"\x00" * 100)
    run.lock()
    assert not any(orphan.exists() for orphan in orphans)
    run.unlock()


# ---------------------------------------------------------------- listing and caches

def test_store_listing_states_and_knobs(tmp_path, run):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    slow = RunStore(tmp_path).run(resolve("quick", method="mart", lr=0.01, width=8))
    slow.finish(state(3)["model"], [{"val_clean_acc": 0.9, "val_pgd_acc": 0.5}])
    table = RunStore(tmp_path).list().set_index("run")
    assert set(table.index) == {run.id, slow.id, "junk"}
    assert table.loc[slow.id, "knobs"] == "width=8 lr=0.01" and table.loc[slow.id, "state"] == "finished"
    assert table.loc[run.id, "knobs"] == "" and table.loc[run.id, "state"] == "new"
    assert (table.loc[slow.id, "clean_acc"], table.loc[slow.id, "pgd_acc"]) == (0.9, 0.5)


def test_a_file_as_store_is_one_clear_error(tmp_path):
    (tmp_path / "store").write_text("not a folder")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        RunStore(tmp_path / "store")


def test_cached_artifacts_compute_once(run):
    calls = []
    frame = lambda: calls.append(1) or pd.DataFrame({"a": [1, 2]})
    assert run.cached_frame("t", frame).a.tolist() == [1, 2]
    assert run.cached_frame("t", frame).a.tolist() == [1, 2] and len(calls) == 1
    tensors = lambda: calls.append(2) or {"c": torch.arange(3)}
    run.cached_tensors("c", tensors)
    assert torch.equal(run.cached_tensors("c", tensors)["c"], torch.arange(3)) and calls.count(2) == 1


@pytest.mark.parametrize("damage, problem", [(b"\xff\xfe\x00\x81" * 20, "cannot be read"),
                                             (b"", "cannot be read"),
                                             (b"corr\x00ct,seconds\n1,0.5\n", "lacks the column")])
def test_a_damaged_cached_frame_is_computed_again(run, damage, problem):
    compute = lambda: pd.DataFrame({"correct": [True, False], "seconds": 0.5})
    run.cached_frame("correct-x", compute, columns=["correct"])
    (run.dir / "artifacts" / "correct-x.csv").write_bytes(damage)
    with pytest.warns(UserWarning, match=problem):
        assert run.cached_frame("correct-x", compute, columns=["correct"]).correct.tolist() == [True, False]
    assert run.cached_frame("correct-x", compute, columns=["correct"]).correct.tolist() == [True, False]
