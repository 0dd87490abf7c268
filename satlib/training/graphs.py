"""A whole training step as one CUDA graph (Chapters 1 and 5 at the paper's batch size).

At batch 128 an adversarial-training step of a ResNet-18 on a GPU is bound by kernel launches and
Python, not by arithmetic: a PGD-10 step is eleven forward and backward passes of a few hundred
small kernels each. A CUDA graph records the whole step once (the attack's iterations, the outer
loss, its backward pass and the optimiser's update) and replays it with a single launch.

A graph replays fixed kernels on fixed memory, so ``GraphedStep``

- copies each batch into static input buffers and returns the step's outputs in static tensors,
  which the next replay overwrites (the trainer accumulates them at once);
- relies on the learning rate being a device tensor that the schedule updates in place
  (``device_learning_rate``), so the recorded update reads the current value;
- runs a batch of any other size eagerly on the same weights: the last, partial batch of an epoch
  is trained on, not dropped;
- runs its first ``warmup`` full batches eagerly on a side stream (cuDNN chooses its kernels, the
  optimiser creates its momentum buffers), then records the next one and replays it;
- records one graph per variant of the step's Python branches (AWP before and after its warm-up).

On a CPU (``capture=False``) the same static-buffer plumbing runs without recording, so tests can
compare it step for step with the eager loop. Random numbers drawn inside a graph come from the
device generator as in eager mode, but from other offsets: graphed and eager runs agree in
distribution (accuracy within seed noise), not bit for bit.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .methods import TrainingStep

StepOutputs = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]


def device_learning_rate(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Hold every parameter group's learning rate in a tensor on ``device`` (schedules update it in place)."""
    for group in optimizer.param_groups:
        group["lr"] = torch.as_tensor(float(group["lr"]), dtype=torch.float32, device=device)


class GraphedStep:
    """Run ``step`` on full batches through recorded CUDA graphs, other batches eagerly (see module doc)."""

    def __init__(self, step: TrainingStep, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 capture: bool, warmup: int = 2):
        self.step, self.model, self.optimizer = step, model, optimizer
        self.capture, self.warmup = capture, warmup
        self.batch_size: int | None = None
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None
        self._replays: dict[bool, Callable[[], StepOutputs]] = {}
        self._pool = None
        self._warmed = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> StepOutputs:
        if self.batch_size is None:
            self.batch_size = len(y)
            self._static = (torch.empty_like(x), torch.empty_like(y))
        if len(y) != self.batch_size:
            return self._eager(x, y, epoch)
        if self._warmed < self.warmup:
            self._warmed += 1
            return self._eager(x, y, epoch, side_stream=self.capture)
        variant = self.step.variant(epoch)
        if variant not in self._replays:
            self._replays[variant] = self._record(epoch)
        static_x, static_y = self._static
        static_x.copy_(x)
        static_y.copy_(y)
        return self._replays[variant]()

    def _eager(self, x, y, epoch, side_stream: bool = False) -> StepOutputs:
        if not side_stream:
            return self.step(self.model, self.optimizer, x, y, epoch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.step(self.model, self.optimizer, x, y, epoch)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _record(self, epoch: int) -> Callable[[], StepOutputs]:
        static_x, static_y = self._static

        def run() -> StepOutputs:
            return self.step(self.model, self.optimizer, static_x, static_y, epoch)

        if not self.capture:
            return run
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)      # gradients are allocated inside the graph's memory
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = run()
        self._pool = graph.pool()                        # both variants share one memory pool

        def replay() -> StepOutputs:
            graph.replay()
            return outputs
        return replay
