#!/usr/bin/env bash
# The GPU check: everything a GPU figure needs, in one command that one `device` call runs (at most 8 minutes
# on one H100/H200). Prints and writes to $OUT (default: a new temporary folder):
#   1. the precision line (device, dtype and why);
#   2. the CPU-independent tests, on the GPU machine's torch;
#   3. bench_train.py --device=cuda (the tutorial's loop against ours);
#   4. step_cost.py on CUDA: widths, plain layout, torch.compile and compile with CUDA graphs (reduce-overhead);
#   5. the default run, timed, with its FID per epoch (metrics.csv) and `evaluate` on fresh draws.
#
#   DATA_DIR=<folder holding MNIST/raw/> bash benchmarks/gpu_check.sh          # on the GPU
#   DATA_DIR=<folder> CACHE_DIR=<judge cache> bash benchmarks/gpu_check.sh --dry   # the same steps, tiny, on CPU
#
# MNIST/raw/ may hold the four files gzipped (*.gz): a device call carries at most 64 MiB, and the plain files
# are 53 MiB. They are unpacked into $OUT/data.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT="${OUT:-$(mktemp -d)}"
DATA="${DATA_DIR:?set DATA_DIR to the folder that holds MNIST/raw/}"
CACHE="${CACHE_DIR:-$OUT/cache}"
PY="${PYTHON:-python3}"
if ls "$DATA"/MNIST/raw/*.gz >/dev/null 2>&1; then
  mkdir -p "$OUT/data/MNIST/raw"
  for f in "$DATA"/MNIST/raw/*.gz; do gunzip -c "$f" > "$OUT/data/MNIST/raw/$(basename "${f%.gz}")"; done
  DATA="$OUT/data"
fi
if [ "$DRY" = 1 ]; then
  DEV=cpu; RUN=(--epochs=1 --max_batches=3 --batch_size=16 --eval_every=1 --eval_samples=200 --eval_draws=1)
  STEPS=(--steps=1 --rounds=1); EVAL=(--n=200)
else
  DEV=cuda; RUN=(); STEPS=(--steps=30 --rounds=3); EVAL=(--n=10000)
fi
echo "== 1. precision"
"$PY" -c "import torch, dcgan_mnist as dm; d = dm.pick_device('$DEV'); print('torch', torch.__version__, d,
  torch.cuda.get_device_name() if d.type == 'cuda' else torch.backends.cpu.get_cpu_capability(), '|', dm.precision(d)[1])"
echo "== 2. tests"
if [ "$DRY" = 0 ]; then
  DCGAN_DATA_DIR="$DATA" timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_machines.py tests/test_speed.py \
    tests/test_core.py 2>&1 | tail -3 || echo "(tests: failed or cut at 150 s)"
else
  echo "(skipped in --dry: the suite is what runs --dry)"
fi
echo "== 3. bench_train.py"
"$PY" benchmarks/bench_train.py --data_dir="$DATA" --device="$DEV" "${STEPS[@]}" 2>&1 | tail -4
echo "== 4. step_cost.py"
ONLY="G64 D32"
[ "$DRY" = 0 ] && ONLY="G64 D64,G64 D64 plain layout,G64 D32,G32 D32,G64 D32 compile,G64 D32 compile CUDA graphs"
timeout 200 "$PY" benchmarks/step_cost.py --data_dir="$DATA" --device="$DEV" "${STEPS[@]}" --only="$ONLY" 2>&1 \
  | tail -8 || echo "(step_cost: failed or cut at 200 s)"
echo "== 5. the default run"
START=$(date +%s)
"$PY" dcgan_mnist.py --data_dir="$DATA" --device="$DEV" --output_dir="$OUT/run" --cache_dir="$CACHE" "${RUN[@]}" \
  2>&1 | tee "$OUT/run.log" | grep -v "^\s*$"
echo "run: $(( $(date +%s) - START )) s in all (the judge's training included, on a first run)"
"$PY" dcgan_mnist.py evaluate --n_train=0 "${EVAL[@]}" --data_dir="$DATA" --device="$DEV" --output_dir="$OUT/run" \
  --cache_dir="$CACHE" --seed=1 2>&1 | grep -v "^\s*$"
cp "$OUT/run/metrics.csv" "$OUT/metrics.csv"
echo "gpu_check done: $OUT"
