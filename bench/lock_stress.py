"""Stress test of the run lock: several processes call ``Run.lock()`` on the same run at the same instant.

Each trial releases all the processes from a barrier at once; each one tries the lock once and
holds it, if it got it, until every process has tried. A trial must end with exactly one holder.
Trials come in pairs on one run: in the first the lock file and the run folder do not exist yet; in
the second the winner of the first lets go (removing the lock file and the empty folder) at the
instant the others try, and then tries again itself.

    python bench/lock_stress.py --trials 200 --processes 6
"""
from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from collections import Counter

from satlib.config import resolve
from satlib.runs import RunLocked, RunStore


def _contender(root: str, trials: int, barrier, holders) -> None:
    store = RunStore(root)
    held = None
    for trial in range(trials):
        run = store.run(resolve("quick", seed=trial // 2))
        barrier.wait()
        if held is not None:                      # the first trial's winner lets go as the second starts
            held.unlock()
        try:
            held = run.lock()
        except RunLocked:
            held = None
        if held is not None:
            with holders.get_lock():
                holders[trial] += 1
        barrier.wait()                            # everyone has tried while the winner still holds the lock
        if held is not None and trial % 2:
            held.unlock()
            held = None


def contend(root: str, trials: int, processes: int) -> Counter:
    """How many trials ended with 0, 1, 2, ... holders (``{1: trials}`` when the lock holds)."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(processes, timeout=60)      # a failed process breaks it
    holders = context.Array("i", trials)
    workers = [context.Process(target=_contender, args=(root, trials, barrier, holders)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if any(worker.exitcode for worker in workers):
        raise RuntimeError(f"a contending process failed (exit codes {[w.exitcode for w in workers]})")
    return Counter(holders[:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--processes", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        began = time.perf_counter()
        counts = contend(root, args.trials, args.processes)
        seconds = time.perf_counter() - began
    double = sum(n for holders, n in counts.items() if holders > 1)
    print(f"{args.trials} trials x {args.processes} processes in {seconds:.1f} s: {double} with two or more "
          f"holders, {counts.get(0, 0)} with none, {counts.get(1, 0)} with exactly one")


if __name__ == "__main__":
    main()
