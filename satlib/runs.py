"""The run store: trained models keyed by their configuration, resumable and shared (Chapter 1, "run store").

``RunStore().run(cfg)`` names a folder ``<root>/<cfg.run_id()>`` (root: ``SATLIB_RUNS`` or ``runs/``
beside the package) that holds

- ``config.json``: the full resolved configuration;
- ``checkpoint.pt`` and ``checkpoint.prev.pt``: the latest and the previous training state (a dict
  with at least ``epoch`` and the ``model`` weights), read with ``torch.load(weights_only=True)``; a
  latest file that cannot be read falls back to the previous one with a warning, and a save never
  turns an unreadable latest file into the previous one, so recovery keeps the good copy;
- ``model.pt`` and ``status.json`` once training finished (an unreadable ``model.pt`` is rebuilt
  from the final checkpoint, which holds the same weights); ``metrics.json``: one row per epoch;
  ``best.pt``: the weights of the epoch with the best validation accuracy (its number in the status);
- ``snapshots/epoch_NNN.pt``: weights after chosen epochs; ``artifacts/``: cached analyses, which a
  read-only store computes without keeping (with a warning).

Every file is written atomically (``storage.atomic_write_bytes``); temporary files of writes that a
crash cut short are removed when the run is next locked. Exclusive training: ``Run.lock`` holds an
OS lock on ``train.lock`` (``storage.ProcessLock``), which ends with its holder, so a killed trainer
leaves no stale lock and ``RunStore.list`` shows its run as ``interrupted``; ``config.json`` and the
rest appear with the first file training writes, so a run that fails before (a dataset that cannot
be loaded, say) leaves no folder behind. Storage only: this module never imports the trainer.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .artifacts import Artifacts, keep
from .checkpoints import CheckpointError, safe_load, state_dict_of
from .config import Config, distinct_knobs, resolve
from .errors import SatlibError
from .storage import ProcessLock, StorageError, atomic_save, atomic_write_text, make_folder, serialised, staged

__all__ = ["CheckpointError", "Run", "RunLocked", "RunStore", "StorageError", "atomic_save", "atomic_write_text",
           "runs_root", "safe_load"]


class RunLocked(SatlibError, RuntimeError):
    """Another live process is training the same run; the message says which process, where and since when."""


def runs_root(root: str | os.PathLike | None = None) -> Path:
    """Explicit ``root`` > environment variable ``SATLIB_RUNS`` > ``runs/`` in the repository."""
    if root is not None:
        return Path(root)
    if os.environ.get("SATLIB_RUNS"):
        return Path(os.environ["SATLIB_RUNS"])
    return Path(__file__).resolve().parents[1] / "runs"


def _training_state(path: Path) -> dict[str, Any]:
    """The training state in ``path``, checked to have an epoch number and model weights."""
    state = safe_load(path)
    if not isinstance(state, Mapping) or type(state.get("epoch")) is not int or "model" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint (a dict with an epoch number and model weights)")
    state_dict_of(state["model"], path)
    return dict(state)


class Run:
    """One trained (or training) model in the store."""

    def __init__(self, cfg: Config, root: Path):
        self.cfg = cfg
        self.id = cfg.run_id()
        self.dir = Path(root) / self.id
        self._lock = ProcessLock(self.dir / "train.lock")
        self.artifacts = Artifacts(self.dir / "artifacts", prepare=self._folder)

    # -- paths ------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    @property
    def previous_checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.prev.pt"

    @property
    def model_path(self) -> Path:
        return self.dir / "model.pt"

    @property
    def best_path(self) -> Path:
        return self.dir / "best.pt"

    # -- status -----------------------------------------------------------------------------------
    @property
    def status(self) -> dict[str, Any]:
        path = self.dir / "status.json"
        return json.loads(path.read_text()) if path.exists() else {"state": "new"}

    @property
    def finished(self) -> bool:
        return self.status.get("state") == "finished" and self.model_path.exists()

    def state(self) -> str:
        """``new``, ``running`` (a live process holds the lock), ``interrupted`` (its trainer died) or ``finished``."""
        state = self.status.get("state", "new")
        held = self._lock.held()
        if held:
            return "running"
        return "interrupted" if state == "running" and held is False else state

    def _set_status(self, **changes: Any) -> None:
        atomic_write_text(self.dir / "status.json", json.dumps({**self.status, **changes}, indent=1))

    def prepare(self) -> None:
        """Create the folder and record the configuration."""
        make_folder(self.dir / "snapshots")
        make_folder(self.dir / "artifacts")
        atomic_write_text(self.dir / "config.json", json.dumps(self.cfg.as_dict(), indent=1))

    def _folder(self) -> Path:
        """The run's folder, created with its configuration by the first write."""
        if not (self.dir / "config.json").exists():
            self.prepare()
        return self.dir

    # -- exclusive training -----------------------------------------------------------------------
    def lock(self) -> "Run":
        """Claim the run for this process, or raise ``RunLocked`` naming the live holder."""
        if not self._lock.acquire():
            raise RunLocked(f"run {self.id} is being trained by {self._lock.holder()}; wait for it to finish or "
                            f"stop that process (lock file {self._lock.path}).")
        for folder in (self.dir, self.dir / "snapshots"):       # only the lock holder writes here
            for orphan in folder.glob(".*.tmp"):
                orphan.unlink(missing_ok=True)
        return self

    def unlock(self) -> None:
        """Give up the claim of ``lock`` (the operating system ends it too when this process dies); the folder
        goes too if training wrote nothing into it (a dataset that could not be loaded, say)."""
        self._lock.release()
        with suppress(OSError):
            self.dir.rmdir()

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically; the checkpoint it replaces becomes the previous one if it is readable."""
        self._folder()
        latest, previous = self.checkpoint_path, self.previous_checkpoint_path
        with staged(latest, serialised(state)) as tmp:
            if latest.exists():
                try:
                    _training_state(latest)
                    os.replace(latest, previous)
                except CheckpointError as err:
                    warnings.warn(f"{err}; it is overwritten, and {previous.name} stays the previous checkpoint.",
                                  stacklevel=2)
            os.replace(tmp, latest)
        self._set_status(state="running", epoch=state.get("epoch"))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The latest readable training state, or ``None`` if training never saved one."""
        errors = []
        for path in (self.checkpoint_path, self.previous_checkpoint_path):
            if not path.exists():
                continue
            try:
                state = _training_state(path)
            except CheckpointError as err:
                errors.append(str(err))
                continue
            if errors:
                warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {path.name} "
                              f"(epoch {state['epoch']}).", stacklevel=2)
            return state
        if errors:
            raise CheckpointError(f"run {self.id} has no readable checkpoint: {'; '.join(errors)}; delete the folder "
                                  f"{self.dir} to train it again from scratch.")
        return None

    def finish(self, model_state: dict[str, torch.Tensor], metrics: list[dict[str, Any]]) -> None:
        """Store the final weights and mark the run finished."""
        self._folder()
        atomic_save(model_state, self.model_path)
        self.write_metrics(metrics)
        self._set_status(state="finished", epoch=self.cfg.epochs)

    def save_best(self, model_state: dict[str, torch.Tensor], epoch: int) -> None:
        """Keep the weights of the epoch with the best validation accuracy so far (Chapter 5, "Robust overfitting")."""
        self._folder()
        atomic_save(model_state, self.best_path)
        self._set_status(best_epoch=epoch)

    def load_model_state(self, weights: str = "last") -> dict[str, torch.Tensor]:
        """The final weights (``"last"``), or the best epoch's (``"best"``); an unreadable ``model.pt`` is rebuilt
        from the final checkpoint, with a warning."""
        if weights not in ("last", "best"):
            raise ValueError(f"weights must be 'last' or 'best', got {weights!r}")
        if not self.finished:
            raise CheckpointError(f"run {self.id} has not finished training ({self.status}); train it first "
                                  f"with `python -m satlib train` or satlib.experiments.load_or_train.")
        if weights == "best":
            if not self.best_path.exists():
                raise CheckpointError(f"run {self.id} kept no best weights: no epoch was scored on validation "
                                      f"images (val_size={self.cfg.val_size}); use its last weights.")
            return state_dict_of(safe_load(self.best_path), self.best_path)
        try:
            return state_dict_of(safe_load(self.model_path), self.model_path)
        except CheckpointError as err:
            problem = str(err)
        state = self.load_checkpoint()
        if state is None or state["epoch"] != self.cfg.epochs:
            with suppress(SatlibError, OSError):    # reopen the run, so that training it again resumes it
                self._set_status(state="running", epoch=state["epoch"] if state else 0)
                self.model_path.unlink()
            last = (f"its last readable checkpoint is from epoch {state['epoch']} of {self.cfg.epochs}" if state
                    else "it has no checkpoint")
            raise CheckpointError(f"{problem}, and {last}; train run {self.id} again to redo the missing epochs.")
        warnings.warn(f"{problem}; it is rebuilt from the final checkpoint (epoch {state['epoch']}), which holds the "
                      f"same weights.", stacklevel=2)
        keep(self.model_path, lambda path: atomic_save(state["model"], path), prepare=self._folder)
        return state["model"]

    # -- metrics and snapshots --------------------------------------------------------------------
    def write_metrics(self, metrics: list[dict[str, Any]]) -> None:
        atomic_write_text(self._folder() / "metrics.json", json.dumps(metrics, indent=1))

    def metrics(self) -> pd.DataFrame:
        """Per-epoch training metrics (loss terms, clean and PGD accuracy on the monitor subset)."""
        path = self.dir / "metrics.json"
        return pd.DataFrame(json.loads(path.read_text()) if path.exists() else [])

    def snapshot_path(self, epoch: int) -> Path:
        return self.dir / "snapshots" / f"epoch_{epoch:03d}.pt"

    def save_snapshot(self, epoch: int, model_state: dict[str, torch.Tensor]) -> None:
        self._folder()
        atomic_save(model_state, self.snapshot_path(epoch))

    def snapshot_epochs(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in (self.dir / "snapshots").glob("epoch_*.pt"))

    def load_snapshot(self, epoch: int) -> dict[str, torch.Tensor]:
        path = self.snapshot_path(epoch)
        if not path.exists():
            raise CheckpointError(f"run {self.id} kept no weights after epoch {epoch}; it kept epochs "
                                  f"{self.snapshot_epochs()} (the config knob snapshot_epochs chooses them).")
        return state_dict_of(safe_load(path), path)

    # -- cached analyses --------------------------------------------------------------------------
    def cached_frame(self, name: str, compute: Callable[[], pd.DataFrame],
                     columns: Sequence[str] = ()) -> pd.DataFrame:
        """A DataFrame computed once and kept as ``artifacts/<name>.csv`` (chapters reuse evaluations); a kept
        copy that lacks one of ``columns`` is computed again (``satlib.artifacts.Artifacts``)."""
        return self.artifacts.cached_frame(name, compute, columns)

    def cached_tensors(self, name: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """A dict of tensors computed once and kept as ``artifacts/<name>.pt``."""
        return self.artifacts.cached_tensors(name, compute)


class RunStore:
    """The collection of runs under one root folder."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = runs_root(root)
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"the run store {self.root} is a file, not a folder; set SATLIB_RUNS (or the root "
                               f"argument) to a folder.")

    def run(self, cfg: Config) -> Run:
        return Run(cfg, self.root)

    def list(self) -> pd.DataFrame:
        """One row per run: id, method, the knobs that set it apart, dataset, model, seed, epochs, state, last
        epoch and final accuracies (``state`` is ``interrupted`` for a run whose trainer died)."""
        rows = []
        for cfg_path in sorted(self.root.glob("*/config.json")):
            try:
                cfg = resolve(**json.loads(cfg_path.read_text()))
            except Exception as err:  # a folder from an older or broken layout: list it, do not crash
                rows.append({"run": cfg_path.parent.name, "state": f"unreadable config ({type(err).__name__})"})
                continue
            run = Run(cfg, self.root)
            metrics = run.metrics()
            last = metrics.iloc[-1].to_dict() if len(metrics) else {}
            rows.append({"run": run.id, "method": cfg.method, "knobs": distinct_knobs(cfg), "dataset": cfg.dataset,
                         "model": cfg.model, "seed": cfg.seed, "epochs": cfg.epochs, "state": run.state(),
                         "epoch": run.status.get("epoch"), "clean_acc": last.get("val_clean_acc"),
                         "pgd_acc": last.get("val_pgd_acc")})
        return pd.DataFrame(rows, columns=["run", "method", "knobs", "dataset", "model", "seed", "epochs", "state",
                                           "epoch", "clean_acc", "pgd_acc"])

