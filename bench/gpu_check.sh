#!/usr/bin/env bash
# One prepared check of the CUDA path, end to end, on a machine with one GPU (at most 7 minutes):
#   1. the throughput table (paper shape, every method, the trainer's graphed step against a plain one),
#      alone on the GPU so that its timings mean something;
#   2. then, side by side: the GPU-marked tests; every chapter through papermill at `-p epochs 2`;
#      the command line (train, then evaluate, on CUDA); and the quick PGD-AT model's accuracies
#      evaluated on the CPU and on the GPU from the same weights, which must agree within 1 point.
# It prints one table at the end. Logs and executed notebooks go to $OUT (default gpu-check/).
# Machines without papermill, a Jupyter kernel or pyautoattack can bring them as wheels in .whl/
# (see the README's GPU section); they are installed into a private folder first.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT/notebooks"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl \
        && export PYTHONPATH=/tmp/gpu-check-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 SATLIB_OFFLINE=1 TQDM_DISABLE=1
export SATLIB_RUNS=$(mktemp -d)
results="$OUT/results.tsv"
: > "$results"

step() {   # step NAME TIMEOUT COMMAND...: run one check, log it, record pass/fail and seconds
    local name=$1 limit=$2; shift 2
    local began=$SECONDS
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then status=pass; else status="FAIL($?)"; fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - began))" >> "$results"
}

step throughput 120 python3 bench/throughput.py --shape paper --device cuda --batches 20 --skip-eval --ablate

step gpu-tests 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_path.py &
for nb in chapters/0*.ipynb; do
    name=$(basename "$nb" .ipynb)
    OMP_NUM_THREADS=2 step "$name" 290 python3 -m papermill "$nb" "$OUT/notebooks/$name.ipynb" -k python3 \
        -p epochs 2 --cwd chapters &
done
step cli-train-evaluate 200 bash -c "python3 -m satlib train --preset quick --method sat --device cuda \
    && python3 -m satlib evaluate --preset quick --method sat --device cuda" &
step cpu-vs-gpu 290 python3 bench/cpu_vs_gpu.py &
wait

printf '\n%-32s %-10s %s\n' check status seconds
while IFS=$'\t' read -r name status seconds; do printf '%-32s %-10s %s\n' "$name" "$status" "$seconds"; done < "$results"
echo
grep -E "^ *train |SAT step" "$OUT/throughput.log"
echo
tail -n 12 "$OUT/cpu-vs-gpu.log"
! grep -q FAIL "$results"
