"""Faults and bad input, as a new user meets them: each gives one line on stderr and exit status 2, never a
traceback, and nothing already computed is lost. A full disk and a read-only store are injected by making
the store's writes fail with the operating system's error (ENOSPC, EROFS)."""
import errno
import os
import re
import shutil

import pytest
import torch

from satlib import storage
from satlib.__main__ import main
from satlib.config import resolve
from satlib.runs import RunStore, StorageError, safe_load
from satlib.training import train

TINY = dict(width=4, train_limit=160, val_size=32, batch_size=64, attack_steps=1, monitor_steps=1,
            snapshot_epochs=())
CLI_TINY = [arg for knob, value in TINY.items() if knob != "snapshot_epochs"
            for arg in ("--set", f"{knob}={value}")] + ["--set", "snapshot_epochs=()", "--epochs", "2"]
TINY_CFG = resolve("quick", epochs=2, **TINY)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # these tiny models train fastest on one thread, also on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("SATLIB_OFFLINE", "1")


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    train(TINY_CFG, store=RunStore(root), progress=False)
    return root


@pytest.fixture
def store(tmp_path, finished_store, monkeypatch):
    """A private copy of a store that holds the finished run of ``CLI_TINY``, named by SATLIB_RUNS."""
    root = tmp_path / "runs"
    shutil.copytree(finished_store, root)
    monkeypatch.setenv("SATLIB_RUNS", str(root))
    return root


def one_error_line(capsys, argv, fragment, after_progress=False):
    """Run the CLI; it must exit with status 2 and print exactly one line on stderr, containing ``fragment``
    (``after_progress``: after the progress bar of a training that had started)."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert (err.endswith(errors[0] + "\n") if after_progress else err == errors[0] + "\n"), err
    assert fragment in errors[0], err


def fail_writes(monkeypatch, code, root):
    """Make every file written under ``root`` fail as a full disk (ENOSPC) or a read-only filesystem (EROFS)
    would; a read-only filesystem refuses to remove files too, even missing ones."""
    def refused(path):
        return OSError(code, os.strerror(code), str(path))

    def open_file(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(root)) and set(mode) & set("wxa+"):
            raise refused(path)
        return open(path, mode, *args, **kwargs)

    def open_descriptor(path, flags, *args, **kwargs):
        if str(path).startswith(str(root)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise refused(path)
        return os_open(path, flags, *args, **kwargs)

    def unlink(path, *args, **kwargs):
        if str(path).startswith(str(root)):
            raise refused(path)
        return path_unlink(path, *args, **kwargs)

    os_open, path_unlink = os.open, storage.Path.unlink
    monkeypatch.setattr(storage, "open", open_file, raising=False)
    if code == errno.EROFS:
        monkeypatch.setattr(os, "open", open_descriptor)
        monkeypatch.setattr(storage.Path, "unlink", unlink)


@pytest.mark.parametrize("argv, fragment", [
    (["evaluate", "--n", "-5"], "argument --n: must be a positive integer, got -5"),
    (["evaluate", "--n", "0"], "argument --n: must be a positive integer, got 0"),
    (["evaluate", "--steps", "-1"], "argument --steps: must be a positive integer"),
    (["evaluate", "--restarts", "0"], "argument --restarts: must be a positive integer"),
    (["evaluate", "--attacks", ",,,"], "names no attack"),
    (["train", "--device", "cuda"], "no usable CUDA device"),
])
def test_bad_options_are_one_line(capsys, monkeypatch, tmp_path, argv, fragment):
    monkeypatch.setenv("SATLIB_RUNS", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_error_line(capsys, argv + CLI_TINY, fragment)
    assert list(tmp_path.iterdir()) == []                     # rejected before any work


def test_a_file_as_the_store_is_one_line(capsys, monkeypatch, tmp_path):
    (tmp_path / "runs").write_text("")
    monkeypatch.setenv("SATLIB_RUNS", str(tmp_path / "runs"))
    for command in (["runs"], ["train", *CLI_TINY]):
        one_error_line(capsys, command, "is a file, not a folder")


def test_a_failed_dataset_load_leaves_no_run_folder(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SATLIB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SATLIB_DATA", str(tmp_path / "data"))
    one_error_line(capsys, ["train", "--preset", "paper", "--epochs", "1"], "CIFAR-10")
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = RunStore(tmp_path).run(TINY_CFG)
    for epoch in (1, 2):
        run.save_checkpoint({"epoch": epoch, "model": {"w": torch.full((1000,), float(epoch))}})
    fail_writes(monkeypatch, errno.ENOSPC, tmp_path)
    with pytest.raises(StorageError, match=r"the disk is full: writing .*checkpoint.pt needs about 5 kB and "
                                           r"[\d.]+ .B are free; the files written before are kept") as err:
        run.save_checkpoint({"epoch": 3, "model": {"w": torch.zeros(1000)}})
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    assert run.load_checkpoint()["epoch"] == 2 and safe_load(run.previous_checkpoint_path)["epoch"] == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SATLIB_RUNS", str(tmp_path))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(storage.os, "fsync", full)            # the data are written, then the disk is full
    one_error_line(capsys, ["train", *CLI_TINY], "the disk is full: writing", after_progress=True)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_read_only_store_evaluates_a_finished_run_without_caching(capsys, monkeypatch, store):
    fail_writes(monkeypatch, errno.EROFS, store)
    assert main(["evaluate", *CLI_TINY, "--attacks", "fgsm", "--n", "16"]) == 0
    captured = capsys.readouterr()
    assert "worst case" in captured.out and "Traceback" not in captured.err
    warnings = captured.err.splitlines()
    assert len(warnings) == 2 and all("is used but not kept: cannot write" in w and "Read-only file system" in w
                                      for w in warnings)
    one_error_line(capsys, ["train", *CLI_TINY, "--seed", "1"], "Read-only file system")    # training must write


def test_a_damaged_cache_is_computed_again(capsys, store):
    assert main(["evaluate", *CLI_TINY, "--attacks", "fgsm", "--n", "16"]) == 0
    first = accuracies(capsys.readouterr().out)
    cached = sorted(store.glob("*/artifacts/correct-*.csv"))
    assert len(cached) == 2
    cached[0].write_bytes(b"\xff\xfe\x81" * 30)
    cached[1].write_bytes(b"")
    assert main(["evaluate", *CLI_TINY, "--attacks", "fgsm", "--n", "16"]) == 0
    captured = capsys.readouterr()
    assert accuracies(captured.out) == first and captured.err.count("computing it again") == 2


def accuracies(out):
    """The evaluation's accuracy per attack, from its progress lines (``FGSM: 0.5625 (0.3 s)``)."""
    return re.findall(r"^(\w+): ([\d.]+) \(", out, re.MULTILINE)


def test_wrong_contents_as_checkpoint_or_model_are_one_line(capsys, store):
    run = RunStore(store).run(TINY_CFG)
    torch.save({"model": "weights?"}, run.model_path)
    torch.save([1, 2, 3], run.checkpoint_path)
    run.previous_checkpoint_path.unlink(missing_ok=True)
    one_error_line(capsys, ["evaluate", *CLI_TINY], "has no readable checkpoint")
    torch.save({"epoch": 1, "model": {"fc.weight": torch.zeros(3)}}, run.checkpoint_path)
    one_error_line(capsys, ["evaluate", *CLI_TINY], "is from epoch 1 of 2; train run")
    one_error_line(capsys, ["train", *CLI_TINY], "do not fit its resnet18 model (missing key(s), unexpected key(s))")


def test_an_interrupt_is_one_line(capsys, monkeypatch, store):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("satlib.experiments.load_or_train", interrupted)
    assert main(["train", *CLI_TINY]) == 130
    assert capsys.readouterr().err == ("error: interrupted; run the same command again to resume from the last "
                                       "checkpoint.\n")


class Stop(Exception):
    """Raised by a callback to cut training short after some epochs."""


def stop_at(epoch):
    def callback(end):
        if end.epoch == epoch:
            raise Stop
    return callback


def test_corrupting_the_latest_checkpoint_twice_resumes_to_the_uninterrupted_weights(tmp_path):
    cfg = TINY_CFG.replace(epochs=4)
    store = RunStore(tmp_path / "faulty")
    run = store.run(cfg)
    with pytest.raises(Stop):
        train(cfg, store=store, progress=False, callbacks=[stop_at(3)])     # checkpoints of epochs 2 and 1
    for _ in range(2):
        run.checkpoint_path.write_bytes(b"\x00" * 256)
        with pytest.warns(UserWarning, match="resuming from the previous checkpoint"), pytest.raises(Stop):
            train(cfg, store=store, progress=False, callbacks=[stop_at(3)])
        assert safe_load(run.previous_checkpoint_path)["epoch"] == 1
    train(cfg, store=store, progress=False)
    clean = train(cfg, store=RunStore(tmp_path / "clean"), progress=False)
    resumed, uninterrupted = run.load_model_state(), clean.load_model_state()
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
