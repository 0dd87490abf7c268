"""The quick PGD-AT model's reported accuracies evaluated on the CPU and on a GPU (a check, not a test).

Trains (or loads) the quick preset's PGD-AT run on the CPU, then evaluates the same weights with the same
seeded attacks once on the CPU and once on CUDA, both in fp32, and prints the two columns, their
difference and each attack's time. Numbers the book reports must not depend on the device: every
difference must be within 1 point (the script exits non-zero otherwise). Random starts are drawn on
each device's own generator, so PGD-type columns can differ by a few samples.

    python bench/cpu_vs_gpu.py                      # on a machine with a GPU
"""
from __future__ import annotations

import copy
import sys

import pandas as pd
import torch

from satlib.attacks import ATTACKS, make_attack
from satlib.config import resolve
from satlib.evaluation import evaluate
from satlib.experiments import load_or_train


def main() -> int:
    cfg = resolve("quick", method="pgd-at", device="cpu")
    trained = load_or_train(cfg, progress=False)
    test = trained.test_set()
    names = [a for a in ATTACKS if a != "lafeat"]
    columns = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(trained.model).to(device).eval()
        attacks = {a.name: a for a in (make_attack(n, eps=cfg.eps, steps=cfg.eval_steps, seed=cfg.seed)
                                       for n in names)}
        frame = evaluate(model, test.to(device), attacks, seed=cfg.seed).set_index("attack")
        columns[f"{device} accuracy"] = 100 * frame["accuracy"]
        columns[f"{device} seconds"] = frame["seconds"]
    table = pd.DataFrame(columns)
    table["difference (points)"] = table["cuda accuracy"] - table["cpu accuracy"]
    print(f"quick PGD-AT, {len(test)} test digits, {torch.cuda.get_device_name()}")
    print(table.round(2).to_string())
    return 0 if (table["difference (points)"].abs() <= 1.0).all() else 1


if __name__ == "__main__":
    sys.exit(main())
