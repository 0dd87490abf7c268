"""Throughput of training epochs and evaluations, as ratios measured in one run (not a test).

For each method the script times our training step (satlib's fast path for the device) and a plain
reference of the same method (a textbook PGD loop: parameters keep requiring gradients during the
attack, no autocast, no channels-last, no compile; same outer loss), on synthetic data of the
``quick`` or ``paper`` shape. It reports images per second, the FLOPs one step performs (counted with
``torch.utils.flop_counter``), and the achieved FLOP rate as a fraction of the device's dense matmul
rate, measured by the same script in the same run (the practical ceiling).

    python bench/throughput.py --shape paper --batches 3            # CPU, ResNet-18 at 32x32
    python bench/throughput.py --shape quick --batches 20
    python bench/throughput.py --shape paper --device cuda --batch-size 512 --batches 50
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
from satlib.models import conv_layers
from satlib.training import AWP, build_step, model_for, resolve_device

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


def time_steps(step, model, optimizer, x, y, batches: int, device, amp: bool) -> float:
    """Seconds per step, after one warm-up step."""
    def once():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            step(model, optimizer, x, y, 1, plain=model)
    once()
    sync(device)
    began = time.perf_counter()
    for _ in range(batches):
        once()
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


def bench_training(args, device, peak) -> list[dict]:
    rows = []
    fast = device.type == "cuda"
    for method in args.methods:
        cfg = resolve(SHAPES[args.shape]["preset"], method=method, device=device.type, batch_size=args.batch_size,
                      dataset="digits" if args.shape == "quick" else "cifar10")
        data = load("synthetic", "train", shape=SHAPES[args.shape]["shape"], n=cfg.batch_size).to(device)
        x, y = data.x, data.y
        results = {}
        for name in ("satlib", "plain"):
            torch.manual_seed(0)
            model = model_for(cfg, device).train()
            if name == "satlib" and fast:
                model = model.to(memory_format=torch.channels_last)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=(name == "satlib" and fast) or None)
            step = build_step(cfg, model, 10, amp=fast and name == "satlib")
            if name == "plain":
                step = PlainStep(step)
            xin = x.contiguous(memory_format=torch.channels_last) if name == "satlib" and fast else x
            if name == "satlib" and args.compile:
                model_c = torch.compile(model)
                run_step = lambda m, o, a, b, e, plain=None, s=step: s(model_c, o, a, b, e, plain=model_c)
            else:
                run_step = step
            seconds = time_steps(run_step, model, optimizer, xin, y, args.batches, device, amp=fast and name == "satlib")
            flops = step_flops(step, model, optimizer, x, y)
            results[name] = seconds
            rows.append({"what": f"train {method}", "impl": name, "img/s": cfg.batch_size / seconds,
                         "GFLOP/step": flops / 1e9, "GFLOP/s": flops / seconds / 1e9,
                         "of matmul": flops / seconds / peak})
        rows[-2]["speedup vs plain"] = results["plain"] / results["satlib"]
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

    amp = device.type == "cuda"
    record("PGD-100", lambda: PGD(cfg.eps, steps=100, amp=amp)(model, test.x, test.y), len(test))
    layers = conv_layers(model)
    train = load("synthetic", "train", shape=SHAPES[args.shape]["shape"], n=args.eval_size * 4).to(device)
    record("centroids + clu. acc. (17 layers)", lambda: clustering_accuracy(
        model, test, class_centroids(model, train, layers)), len(train) + len(test))
    if args.autoattack:
        record("AutoAttack (standard)", lambda: AutoAttack(cfg.eps, batch_size=len(test))(model, test.x, test.y),
               len(test))
    heads = train_heads(model, train, layers[-4:])
    record("LAFEAT-100", lambda: LAFEAT(cfg.eps, heads, steps=100)(model, test.x, test.y), len(test))
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
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the satlib path")
    p.add_argument("--skip-eval", action="store_true")
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


if __name__ == "__main__":
    main()
