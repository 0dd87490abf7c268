"""Throughput of training epochs and evaluations, as ratios measured in one run (not a test).

For each method the script times our training step as the trainer runs it on the device (on a GPU:
one CUDA graph of the whole step, bf16, channels-last, the attack through folded BatchNorms; on a
CPU: the eager step with the folded attack) and a plain reference of the same method (a textbook
PGD loop: parameters keep requiring gradients during the attack, fp32, no graph; same outer loss),
on synthetic data of the ``quick`` or ``paper`` shape. It reports images per second, the FLOPs one
step performs (counted with ``torch.utils.flop_counter``), and the achieved FLOP rate as a fraction
of the device's dense matmul rate, measured by the same script in the same run.

    python bench/throughput.py --shape paper --batches 3            # CPU, ResNet-18 at 32x32
    python bench/throughput.py --shape quick --batches 20
    python bench/throughput.py --shape paper --device cuda --batches 50 --autoattack
"""
from __future__ import annotations

import argparse
import platform
import time

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from satlib.attacks import LAFEAT, PGD, AutoAttack, project, train_heads
from satlib.clustering import class_centroids, clustering_accuracy
from satlib.config import resolve
from satlib.data import ArrayDataset, load
from satlib.evaluation import correct_mask
from satlib.models import conv_layers
from satlib.training import AWP, build_step, model_for, resolve_device
from satlib.training.graphs import GraphedStep, device_learning_rate

SHAPES = {"quick": dict(preset="quick", shape=(1, 8, 8)), "paper": dict(preset="paper", shape=(3, 32, 32))}
METHODS = ("standard", "pgd-at", "trades", "mart", "awp-at", "sat")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, seconds: float = 2.0) -> float:
    """Dense matmul FLOP/s: fp32 on CPU, bf16 on CUDA (the precision the fast path uses there)."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        a @ b
        reps += 1
        sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - began)


class PlainStep:
    """Reference implementation: textbook PGD (no parameter freezing, fp32) + the same outer loss."""

    def __init__(self, fast):
        self.fast = fast

    def __call__(self, model, optimizer, x, y, epoch, plain=None):
        attack = self.fast.attack
        x_adv = x
        if attack is not None:
            model.eval()
            ctx = attack.objective.prepare(model, x, y)
            x_adv = project(x + torch.empty_like(x).uniform_(-attack.eps, attack.eps), x, attack.eps)
            for _ in range(attack.steps):
                x_adv.requires_grad_(True)
                loss = attack.objective(model, x_adv, y, ctx).sum()
                grad, = torch.autograd.grad(loss, x_adv)
                x_adv = project(x_adv.detach() + attack.step_size * grad.sign(), x, attack.eps)
            model.train()
        applied = []
        if self.fast.awp is not None:
            applied = self.fast.awp.perturb(model, lambda: self.fast.objective(model, x, x_adv, y)[0])
        loss, terms, logits = self.fast.objective(model, x, x_adv, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        AWP.restore(applied)
        return loss.detach(), terms, logits.detach()


def time_steps(run_step, batches: int, device, warmup: int) -> float:
    """Seconds per step, after ``warmup`` untimed steps (a graphed step records its graph during them)."""
    for _ in range(warmup):
        run_step()
    sync(device)
    began = time.perf_counter()
    for _ in range(batches):
        run_step()
    sync(device)
    return (time.perf_counter() - began) / batches


class _GlobalOnly:
    """Stand-in for FlopCounterMode's module tracker, whose backward hooks ``torch.autograd.grad``
    (used by every attack) rejects; all FLOPs are then counted under "Global" only."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def flop_counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


def step_flops(step, model, optimizer, x, y) -> float:
    with flop_counter() as counter:
        step(model, optimizer, x, y, 1, plain=model)
    return float(counter.get_total_flops())


# Implementations timed per method: (name, fast path, CUDA graph, folded attack). The two ablations show
# what the graph and the folding each buy (``--ablate``; on a GPU).
IMPLEMENTATIONS = [("satlib", True, True, True), ("satlib, no graph", True, False, True),
                   ("satlib, graph, unfolded", True, True, False), ("plain", False, False, False)]


def make_runner(impl, cfg, device, x, y):
    """(run one step, the step, model, optimizer) for one implementation of ``cfg.method``."""
    _, fast, graph, fold = impl
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = model_for(cfg, device).train()
    if fast and cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=(fast and cuda) or None)
    step = build_step(cfg.replace(fold_bn=fold), model, 10, amp=fast and cuda)
    if not fast:
        plain = PlainStep(step)
        return (lambda: plain(model, optimizer, x, y, 1)), step, model, optimizer
    device_learning_rate(optimizer, device)
    if graph and cuda:
        graphed = GraphedStep(step, model, optimizer, capture=True)
        return (lambda: graphed(x, y, 1)), step, model, optimizer
    return (lambda: step(model, optimizer, x, y, 1)), step, model, optimizer


def bench_training(args, device, peak) -> list[dict]:
    rows = []
    cuda = device.type == "cuda"
    chosen = [i for i in IMPLEMENTATIONS if args.ablate and cuda or i[0] in ("satlib", "plain")]
    for method in args.methods:
        cfg = resolve(SHAPES[args.shape]["preset"], method=method, device=device.type, batch_size=args.batch_size,
                      dataset="digits" if args.shape == "quick" else "cifar10")
        data = load("synthetic", "train", shape=SHAPES[args.shape]["shape"], n=cfg.batch_size).to(device)
        seconds = {}
        for impl in chosen:
            run_step, step, model, optimizer = make_runner(impl, cfg, device, data.x, data.y)
            seconds[impl[0]] = time_steps(run_step, args.batches, device, warmup=4 if impl[2] and cuda else 1)
            flops = step_flops(step, model, optimizer, data.x, data.y)
            rows.append({"what": f"train {method}", "impl": impl[0], "img/s": cfg.batch_size / seconds[impl[0]],
                         "s/epoch (50k)": 50_000 * seconds[impl[0]] / cfg.batch_size, "GFLOP/step": flops / 1e9,
                         "GFLOP/s": flops / seconds[impl[0]] / 1e9, "of matmul": flops / seconds[impl[0]] / peak,
                         "speedup vs plain": float("nan")})
        for row in rows[-len(chosen):]:
            row["speedup vs plain"] = seconds["plain"] / seconds[row["impl"]]
    return rows


def bench_evaluation(args, device, peak) -> list[dict]:
    cfg = resolve(SHAPES[args.shape]["preset"], device=device.type, dataset="digits" if args.shape == "quick" else "cifar10")
    model = model_for(cfg, device).eval()
    test = load("synthetic", "test", shape=SHAPES[args.shape]["shape"], n=args.eval_size).to(device)
    rows = []

    def record(what, fn, n):
        torch.manual_seed(0)
        with flop_counter() as counter:
            fn()
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - began
        flops = float(counter.get_total_flops())
        rows.append({"what": what, "impl": "satlib", "img/s": n / seconds, "GFLOP/step": flops / 1e9,
                     "GFLOP/s": flops / seconds / 1e9, "of matmul": flops / seconds / peak})

    record("PGD-100 (fp32)", lambda: correct_mask(model, test, PGD(cfg.eps, steps=100)), len(test))
    layers = conv_layers(model)
    train = load("synthetic", "train", shape=SHAPES[args.shape]["shape"], n=args.eval_size * 4).to(device)
    record("centroids + clu. acc. (17 layers)", lambda: clustering_accuracy(
        model, test, class_centroids(model, train, layers)), len(train) + len(test))
    if args.autoattack:
        record("AutoAttack (standard, fp32)", lambda: correct_mask(model, test, AutoAttack(cfg.eps)), len(test))
    heads = train_heads(model, train, layers[-4:])
    record("LAFEAT-100 (fp32)", lambda: correct_mask(model, test, LAFEAT(cfg.eps, heads, steps=100)), len(test))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="paper")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=3, help="timed training steps per method (after one warm-up)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--autoattack", action="store_true", help="also time standard AutoAttack (slow on CPU)")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--ablate", action="store_true", help="on a GPU, also time the step without its graph and "
                   "without the folded attack")
    args = p.parse_args()
    device = resolve_device(args.device)
    peak = matmul_rate(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), threads: {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"dense matmul rate: {peak / 1e9:.1f} GFLOP/s")
    rows = bench_training(args, device, peak)
    if not args.skip_eval:
        rows += bench_evaluation(args, device, peak)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    speed = table[table.impl == "satlib"].set_index("what")["img/s"]
    if {"train pgd-at", "train sat"} <= set(speed.index):
        print(f"SAT step / PGD-AT step (time): {speed['train pgd-at'] / speed['train sat']:.2f}")


if __name__ == "__main__":
    main()
