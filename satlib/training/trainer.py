"""The one training loop shared by all eight methods (Chapters 1, 2 and 5), on one device or many.

``train(cfg)`` trains the run of ``cfg`` in the run store, resuming from its last checkpoint, and
returns the finished ``Run``. Per epoch it records the loss terms, training accuracy on the inputs
it trained on, and clean and PGD accuracy on the ``val_size`` validation images held out of the
training split; it keeps the weights of the epoch with the best validation PGD accuracy beside the
last ones (robust overfitting, Chapter 5), and writes a checkpoint (model, optimiser, schedule,
metrics) atomically. Every random number of an epoch comes
from generators seeded by (seed, epoch, rank), so a killed process resumes to exactly the weights of
an uninterrupted run. A non-finite loss stops training with ``TrainingDiverged`` and leaves the last
good checkpoint in place.

On one GPU the data stay on the device, shuffled and augmented there, the training step runs in bf16
with channels-last convolutions and a fused optimiser, and every full batch replays one CUDA graph
of the whole step (``GraphedStep``: the last, partial batch of an epoch runs eagerly). The only host
synchronisation of an epoch is at its end. The per-epoch monitor, like every reported number, is
computed in fp32.

Started by ``torchrun`` (``WORLD_SIZE`` > 1) the loop runs data-parallel: DistributedDataParallel
(NCCL on GPUs with SyncBatchNorm, gloo on CPUs), each process trains on its shard of the same
permutation with ``batch_size / world_size`` samples per step, and only rank 0 writes to the store.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..attacks import PGD
from ..config import Config
from ..data import DATASETS, ArrayDataset, holdout, load
from ..batching import batches
from ..errors import SatlibError
from ..evaluation import correct_mask
from ..models import build_model
from ..progress import bar
from ..runs import Run, RunLocked, RunStore
from .graphs import GraphedStep, device_learning_rate
from .methods import build_step


class TrainingDiverged(SatlibError, RuntimeError):
    """The training loss became NaN or infinite; the run keeps its last good checkpoint."""


@dataclass
class EpochEnd:
    """What a per-epoch callback sees: return a dict of extra metrics to record, or None."""

    epoch: int
    model: nn.Module
    cfg: Config
    run: Run
    val: ArrayDataset


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


def training_data(cfg: Config) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, validation)``: the training split less its ``val_size`` held-out images (``data.holdout``),
    then its first ``train_limit`` images if that is set."""
    train, val = holdout(load(cfg.dataset, "train"), cfg.val_size)
    return (train.subset(cfg.train_limit) if cfg.train_limit else train), val


def learning_rate_schedule(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: ``step`` (times ``lr_decay`` at ``lr_decay_at``) or ``cosine`` (to 0 at the end)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones(), gamma=cfg.lr_decay)


def monitor_row(model: nn.Module, val: ArrayDataset, attack: PGD | None) -> dict[str, float]:
    """Clean and PGD accuracy on the validation images, in fp32 (NaN without images or attack)."""
    if not len(val):
        return {"val_clean_acc": float("nan"), "val_pgd_acc": float("nan")}
    clean = correct_mask(model, val).float().mean().item()
    robust = correct_mask(model, val, attack).float().mean().item() if attack is not None else float("nan")
    return {"val_clean_acc": clean, "val_pgd_acc": robust}


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def train(cfg: Config, *, store: RunStore | None = None, progress: bool = True,
          callbacks: Sequence[EpochCallback] = (), wait: bool = True) -> Run:
    """Train (or resume, or just return) the run of ``cfg``; see the module docstring.

    If another live process is training the same run, wait for it to finish (``wait``) or raise
    ``RunLocked``.
    """
    run = (store or RunStore()).run(cfg)
    job = Distributed.from_env()
    started_group = job.active and not dist.is_initialized()
    if started_group:
        cuda = resolve_device(cfg.device).type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        if job.rank == 0:
            _claim(run, wait)
        job.barrier()
        if not run.finished:
            try:
                _train(cfg, run, job, progress and job.rank == 0, callbacks)
            finally:
                if job.rank == 0:
                    run.unlock()
        job.barrier()
    finally:
        if started_group:
            dist.destroy_process_group()
    return run


def _claim(run: Run, wait: bool) -> None:
    """Take the run's lock unless it is finished; wait while another live process holds it."""
    told = False
    while not run.finished:
        try:
            run.lock()
            return
        except RunLocked as err:
            if not wait:
                raise
            if not told:
                print(f"{err} Waiting for it.", flush=True)
                told = True
            time.sleep(2)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def _train(cfg: Config, run: Run, job: Distributed, progress: bool, callbacks: Sequence[EpochCallback]) -> None:
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    if cuda and job.active:
        device = torch.device("cuda", job.local_rank)
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)                       # identical initial weights on every rank
    train_data, val = training_data(cfg)
    train_data, val = train_data.to(device), val.to(device)

    model = model_for(cfg, device)
    # channels-last on GPUs only: on CPUs oneDNN's channels-last kernels are faster but not deterministic
    # with several threads, and a resumed run must equal an uninterrupted one bit for bit
    channels_last = cfg.channels_last and cuda
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cuda and job.active:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                fused=cuda or None)
    device_learning_rate(optimizer, device)
    schedule = learning_rate_schedule(cfg, optimizer)

    metrics: list[dict[str, Any]] = []
    best = {"epoch": 0, "val_pgd_acc": float("-inf")}
    start = 1
    state = run.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        device_learning_rate(optimizer, device)       # a loaded learning rate arrives on the CPU
        schedule.load_state_dict(state["schedule"])
        metrics, start = list(state["metrics"]), state["epoch"] + 1
        best = dict(state.get("best", best))

    forward = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None) if job.active else model
    step = build_step(cfg, model, train_data.num_classes, amp=cfg.amp and cuda)
    graphs = not job.active and (cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and cuda))
    graphed = GraphedStep(step, model, optimizer, capture=cuda) if graphs else None
    monitor = PGD(cfg.eps, steps=cfg.monitor_steps) if cfg.monitor_steps else None
    per_rank_batch = max(1, cfg.batch_size // job.world_size)

    epochs = bar(range(start, cfg.epochs + 1), desc=run.id, enabled=progress, initial=start - 1,
                  total=cfg.epochs, unit="epoch")
    with _cudnn_benchmark(cuda):
        for epoch in epochs:
            began = time.perf_counter()
            torch.manual_seed(_epoch_seed(cfg.seed, epoch, job.rank))     # attack starts of this epoch
            shuffle = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch)
            model.train()
            totals: dict[str, torch.Tensor] = {}
            correct = torch.zeros((), device=device)
            seen = torch.zeros((), device=device)
            for x, y in batches(train_data, per_rank_batch, shuffle=True, generator=shuffle,
                                augment=cfg.augment,
                                rank=job.rank, world_size=job.world_size):
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if graphed is not None:
                    loss, terms, logits = graphed(x, y, epoch)
                else:
                    loss, terms, logits = step(forward, optimizer, x, y, epoch, plain=model)
                n = len(y)
                for k, v in {"loss": loss, **terms}.items():
                    totals[k] = totals.get(k, 0) + v.float() * n
                correct += (logits.argmax(1) == y).sum()
                seen += n
            lr = float(optimizer.param_groups[0]["lr"])   # the rate this epoch trained with
            schedule.step()
            keys = sorted(totals)
            summed = torch.stack([totals[k] for k in keys] + [correct.float(), seen.float()])
            if job.active:
                dist.all_reduce(summed)
            summed = summed.tolist()                   # the epoch's one host synchronisation
            row: dict[str, Any] = {k: v / summed[-1] for k, v in zip(keys, summed)}
            if any(v != v or abs(v) == float("inf") for v in row.values()):
                kept = (f"its last good checkpoint (epoch {epoch - 1}) is kept in {run.dir}" if epoch > 1
                        else f"no checkpoint of it was written (folder {run.dir})")
                raise TrainingDiverged(f"training of run {run.id} diverged in epoch {epoch} (mean loss {row['loss']}); "
                                       f"{kept}; try a smaller lr than {cfg.lr}.")
            if job.rank == 0:
                row = {"epoch": epoch, "lr": lr, "loss": row.pop("loss"), **row,
                       "train_acc": summed[-2] / summed[-1],
                       **monitor_row(model, val, monitor)}
                for callback in callbacks:
                    row.update(callback(EpochEnd(epoch, model, cfg, run, val)) or {})
                row["seconds"] = time.perf_counter() - began
                metrics.append(row)
                epochs.set_postfix(loss=f"{row['loss']:.3f}", clean=f"{row['val_clean_acc']:.3f}",
                                   pgd=f"{row['val_pgd_acc']:.3f}")
                if epoch in cfg.snapshot_epochs:
                    run.save_snapshot(epoch, model.state_dict())
                if row["val_pgd_acc"] > best["val_pgd_acc"]:          # NaN (no validation) never is
                    best = {"epoch": epoch, "val_pgd_acc": row["val_pgd_acc"]}
                    run.save_best(model.state_dict(), epoch)
                run.save_checkpoint({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "schedule": schedule.state_dict(), "metrics": metrics, "best": best})
                run.write_metrics(metrics)
            job.barrier()
    if job.rank == 0:
        run.finish(model.state_dict(), metrics)


@contextmanager
def _cudnn_benchmark(enabled: bool):
    """Let cuDNN time its algorithms for the fixed training shapes (restored afterwards)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
