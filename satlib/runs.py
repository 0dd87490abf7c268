"""The run store: trained models keyed by their configuration, resumable and shared (DESIGN "Run store").

``RunStore().run(cfg)`` names a folder ``<root>/<cfg.run_id()>`` (root: ``SATLIB_RUNS`` or ``runs/``
beside the package) that holds

- ``config.json``: the full resolved configuration;
- ``checkpoint.pt`` and ``checkpoint.prev.pt``: the latest and the previous training state, written
  atomically (temp file + rename) and read with ``torch.load(weights_only=True)``; a latest file that
  cannot be read falls back to the previous one with a warning, never to a pickle traceback;
- ``model.pt`` and ``status.json`` once training finished; ``metrics.json``: one row per epoch;
- ``snapshots/epoch_NNN.pt``: weights after chosen epochs; ``artifacts/``: cached analyses.

Storage only: this module never imports the trainer.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from .config import Config, resolve


class CheckpointError(RuntimeError):
    """No readable checkpoint although one was written; the message says which files and what to do."""


class RunLocked(RuntimeError):
    """Another live process is training the same run."""


def runs_root(root: str | os.PathLike | None = None) -> Path:
    """Explicit ``root`` > environment variable ``SATLIB_RUNS`` > ``runs/`` in the repository."""
    if root is not None:
        return Path(root)
    if os.environ.get("SATLIB_RUNS"):
        return Path(os.environ["SATLIB_RUNS"])
    return Path(__file__).resolve().parents[1] / "runs"


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, flush to disk, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` that turns any unreadable file into ``CheckpointError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, pickle errors: all mean "unreadable"
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'})") from err


class Run:
    """One trained (or training) model in the store."""

    def __init__(self, cfg: Config, root: Path):
        self.cfg = cfg
        self.id = cfg.run_id()
        self.dir = root / self.id

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

    # -- status -----------------------------------------------------------------------------------
    @property
    def status(self) -> dict[str, Any]:
        path = self.dir / "status.json"
        return json.loads(path.read_text()) if path.exists() else {"state": "new"}

    @property
    def finished(self) -> bool:
        return self.status.get("state") == "finished" and self.model_path.exists()

    def _set_status(self, **status: Any) -> None:
        atomic_write_text(self.dir / "status.json", json.dumps(status, indent=1))

    def prepare(self) -> None:
        """Create the folder and record the configuration."""
        (self.dir / "snapshots").mkdir(parents=True, exist_ok=True)
        (self.dir / "artifacts").mkdir(exist_ok=True)
        atomic_write_text(self.dir / "config.json", json.dumps(self.cfg.as_dict(), indent=1))

    # -- exclusive training -----------------------------------------------------------------------
    def lock(self) -> "Run":
        """Claim the run for this process; a lock left by a dead process is taken over."""
        self.prepare()
        path = self.dir / "train.lock"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise RunLocked(f"run {self.id} is being trained by process {pid}; wait for it or stop it "
                                    f"(lock file {path}).") from None
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise RunLocked(f"could not take the lock {path} of run {self.id}.")

    def unlock(self) -> None:
        (self.dir / "train.lock").unlink(missing_ok=True)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically, keeping the one it replaces as the previous checkpoint."""
        tmp = self.dir / ".checkpoint.next.pt"
        atomic_save(state, tmp)
        if self.checkpoint_path.exists():
            os.replace(self.checkpoint_path, self.previous_checkpoint_path)
        os.replace(tmp, self.checkpoint_path)
        self._set_status(state="running", epoch=state.get("epoch"))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The latest readable training state, or ``None`` if training never saved one."""
        candidates = [p for p in (self.checkpoint_path, self.previous_checkpoint_path) if p.exists()]
        errors = []
        for path in candidates:
            try:
                state = safe_load(path)
            except CheckpointError as err:
                errors.append(str(err))
                continue
            if errors:
                warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {path.name} "
                              f"(epoch {state.get('epoch')}).", stacklevel=2)
            return state
        if errors:
            raise CheckpointError(f"run {self.id} has no readable checkpoint: {'; '.join(errors)}. Delete the folder "
                                  f"{self.dir} to train it again from scratch.")
        return None

    def finish(self, model_state: dict[str, torch.Tensor], metrics: list[dict[str, Any]]) -> None:
        """Store the final weights and mark the run finished."""
        atomic_save(model_state, self.model_path)
        self.write_metrics(metrics)
        self._set_status(state="finished", epoch=self.cfg.epochs)

    def load_model_state(self) -> dict[str, torch.Tensor]:
        if not self.finished:
            raise CheckpointError(f"run {self.id} has not finished training ({self.status}); train it first "
                                  f"with `python -m satlib train` or satlib.experiments.load_or_train.")
        return safe_load(self.model_path)

    # -- metrics and snapshots --------------------------------------------------------------------
    def write_metrics(self, metrics: list[dict[str, Any]]) -> None:
        atomic_write_text(self.dir / "metrics.json", json.dumps(metrics, indent=1))

    def metrics(self) -> pd.DataFrame:
        """Per-epoch training metrics (loss terms, clean and PGD accuracy on the monitor subset)."""
        path = self.dir / "metrics.json"
        return pd.DataFrame(json.loads(path.read_text()) if path.exists() else [])

    def snapshot_path(self, epoch: int) -> Path:
        return self.dir / "snapshots" / f"epoch_{epoch:03d}.pt"

    def save_snapshot(self, epoch: int, model_state: dict[str, torch.Tensor]) -> None:
        atomic_save(model_state, self.snapshot_path(epoch))

    def snapshot_epochs(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in (self.dir / "snapshots").glob("epoch_*.pt"))

    def load_snapshot(self, epoch: int) -> dict[str, torch.Tensor]:
        path = self.snapshot_path(epoch)
        if not path.exists():
            raise CheckpointError(f"run {self.id} kept no weights after epoch {epoch}; it kept epochs "
                                  f"{self.snapshot_epochs()} (the config knob snapshot_epochs chooses them).")
        return safe_load(path)

    # -- cached analyses --------------------------------------------------------------------------
    def cached_frame(self, name: str, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        """A DataFrame computed once and kept as ``artifacts/<name>.csv`` (Chapters reuse evaluations)."""
        path = self.dir / "artifacts" / f"{name}.csv"
        if path.exists():
            return pd.read_csv(path)
        frame = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, frame.to_csv(index=False))
        return frame

    def cached_tensors(self, name: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """A dict of tensors computed once and kept as ``artifacts/<name>.pt``."""
        path = self.dir / "artifacts" / f"{name}.pt"
        if path.exists():
            try:
                return safe_load(path)
            except CheckpointError as err:
                warnings.warn(f"{err}; computing it again.", stacklevel=2)
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(value, path)
        return value


class RunStore:
    """The collection of runs under one root folder."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = runs_root(root)

    def run(self, cfg: Config) -> Run:
        return Run(cfg, self.root)

    def list(self) -> pd.DataFrame:
        """One row per run: id, method, dataset, model, seed, epochs, state, last epoch, final accuracies."""
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
            rows.append({"run": run.id, "method": cfg.method, "dataset": cfg.dataset, "model": cfg.model,
                         "seed": cfg.seed, "epochs": cfg.epochs, "state": run.status.get("state"),
                         "epoch": run.status.get("epoch"), "clean_acc": last.get("test_clean_acc"),
                         "pgd_acc": last.get("test_pgd_acc")})
        return pd.DataFrame(rows, columns=["run", "method", "dataset", "model", "seed", "epochs", "state", "epoch",
                                           "clean_acc", "pgd_acc"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
