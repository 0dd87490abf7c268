"""The one training loop shared by all eight methods (Chapters 1, 2 and 5).

``train(cfg)`` trains the run of ``cfg`` in the run store, resuming from its last checkpoint, and
returns the finished ``Run``. Per epoch it records the loss terms, training accuracy on the inputs
it trained on, and clean and PGD accuracy on the first ``monitor_size`` test samples; it writes a
checkpoint (model, optimiser, schedule, RNG states, metrics) atomically, so a killed process resumes
to the same weights as an uninterrupted run. A non-finite loss stops training with
``TrainingDiverged`` and leaves the last good checkpoint in place.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..attacks import PGD
from ..config import Config
from ..data import DATASETS, ArrayDataset, batches, load
from ..evaluation import correct_mask
from ..models import build_model
from ..runs import Run, RunLocked, RunStore
from .methods import build_step


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the run keeps its last good checkpoint."""


@dataclass
class EpochEnd:
    """What a per-epoch callback sees: return a dict of extra metrics to record, or None."""

    epoch: int
    model: nn.Module
    cfg: Config
    run: Run
    test: ArrayDataset


EpochCallback = Callable[[EpochEnd], "dict[str, Any] | None"]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but no CUDA device is available; use device='auto' or 'cpu'.")
    return torch.device(name)


def model_for(cfg: Config, device: torch.device | str = "cpu") -> nn.Module:
    """A freshly initialised model of ``cfg`` on ``device``."""
    info = DATASETS[cfg.dataset]
    return build_model(cfg.model, num_classes=info.num_classes, in_channels=info.channels,
                       width=cfg.width).to(device)


def accuracy(model: nn.Module, data: ArrayDataset, attack: PGD | None = None, amp: bool = False) -> float:
    """Fraction of ``data`` classified correctly, on clean inputs or under ``attack``."""
    return correct_mask(model, data, attack, amp=amp).float().mean().item()


def train(cfg: Config, *, store: RunStore | None = None, progress: bool = True,
          callbacks: Sequence[EpochCallback] = (), wait: bool = True) -> Run:
    """Train (or resume, or just return) the run of ``cfg``; see the module docstring.

    If another live process is training the same run, wait for it to finish (``wait``) or raise
    ``RunLocked``.
    """
    run = (store or RunStore()).run(cfg)
    told = False
    while not run.finished:
        try:
            run.lock()
            break
        except RunLocked as err:
            if not wait:
                raise
            if not told:
                print(f"{err} Waiting for it.", flush=True)
                told = True
            time.sleep(2)
    if run.finished:
        return run
    try:
        _train(cfg, run, progress, callbacks)
    finally:
        run.unlock()
    return run


def _train(cfg: Config, run: Run, progress: bool, callbacks: Sequence[EpochCallback]) -> None:
    device = resolve_device(cfg.device)
    amp = cfg.amp and device.type == "cuda"
    torch.manual_seed(cfg.seed)
    train_data = load(cfg.dataset, "train")
    if cfg.train_limit:
        train_data = train_data.subset(cfg.train_limit)
    train_data = train_data.to(device)
    test = load(cfg.dataset, "test").subset(cfg.monitor_size).to(device)

    model = model_for(cfg, device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones(), gamma=cfg.lr_decay)
    forward = torch.compile(model) if cfg.compile else model
    step = build_step(cfg, forward, train_data.num_classes, amp=amp)
    monitor = PGD(cfg.eps, steps=cfg.monitor_steps, amp=amp) if cfg.monitor_steps else None

    metrics: list[dict[str, Any]] = []
    start = 1
    state = run.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        metrics, start = list(state["metrics"]), state["epoch"] + 1

    epochs = tqdm(range(start, cfg.epochs + 1), desc=run.id, disable=not progress, initial=start - 1,
                  total=cfg.epochs, unit="epoch")
    for epoch in epochs:
        began = time.perf_counter()
        model.train()
        shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        totals: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device)
        seen = 0
        for x, y in batches(train_data, cfg.batch_size, shuffle=True, generator=shuffle,
                            augment=None if cfg.augment == "none" else cfg.augment):
            if cfg.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss, terms, logits = step(forward, optimizer, x, y, epoch)
            n = len(y)
            for k, v in {"loss": loss, **terms}.items():
                totals[k] = totals.get(k, 0) + v.float() * n
            correct += (logits.argmax(1) == y).sum()
            seen += n
        schedule.step()
        row: dict[str, Any] = {k: (v / seen).item() for k, v in totals.items()}
        if any(v != v or abs(v) == float("inf") for v in row.values()):
            raise TrainingDiverged(
                f"training of run {run.id} diverged in epoch {epoch} (mean loss {row['loss']}); its last good "
                f"checkpoint (epoch {epoch - 1}) is kept in {run.dir}; try a smaller lr than {cfg.lr}.")
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **row,
               "train_acc": (correct / seen).item(),
               "test_clean_acc": accuracy(model, test, amp=amp),
               "test_pgd_acc": accuracy(model, test, monitor, amp=amp) if monitor else float("nan")}
        for callback in callbacks:
            row.update(callback(EpochEnd(epoch, model, cfg, run, test)) or {})
        row["seconds"] = time.perf_counter() - began
        metrics.append(row)
        epochs.set_postfix(loss=f"{row['loss']:.3f}", clean=f"{row['test_clean_acc']:.3f}",
                           pgd=f"{row['test_pgd_acc']:.3f}")
        if epoch in cfg.snapshot_epochs:
            run.save_snapshot(epoch, model.state_dict())
        run.save_checkpoint({
            "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [], "metrics": metrics})
        run.write_metrics(metrics)
    run.finish(model.state_dict(), metrics)
