#!/usr/bin/env bash
# The GPU checks, in one go on a CUDA machine: the CUDA tests, the GPU benchmark, and the TikTok comparison
# (docs/results.md). Usage: bash scripts/gpu_check.sh SHARED_DATA_DIR OUT_DIR
# SHARED_DATA_DIR holds tiktok/, baby/, sports/ (../shared/data beside the repository).
# Environment: GPUS_PER_TRIAL (0.0625: 16 trials share the GPU), DEADLINE (seconds per sweep; unfinished trials
# stop, and re-running the script resumes them),
# RUNS (where run directories go, /dev/shm/msi-runs), SKIP_BENCH=1, EXTRA_SEEDS (seeds of the frozen-feature
# and bf16 runs, "999 42 2026").
set -u
SHARED=$(realpath "${1:-../shared/data}")
OUT=$(realpath -m "${2:-gpu-check}")
GPUS_PER_TRIAL=${GPUS_PER_TRIAL:-0.0625}; DEADLINE=${DEADLINE:-3000}; RUNS=${RUNS:-/dev/shm/msi-runs}; EXTRA_SEEDS=${EXTRA_SEEDS:-999 42 2026}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; nproc; } | tee "$OUT/machine.txt"

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== GPU benchmark"
  python3 scripts/bench.py --device cuda --datasets elec baby sports tiktok --shared-data "$SHARED" \
    --cache /tmp/msi-bench --out-json "$OUT/bench_gpu.json" --out-md "$OUT/bench_gpu.md" 2>&1 | tail -n 60
fi

echo "== CUDA tests (beside the comparison)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/pytest_cuda.txt" 2>&1 &
echo "== TikTok comparison (msi-sweep, $GPUS_PER_TRIAL GPU per trial)"
SWEEP=(python3 -m msi.cli sweep --set data.root="$SHARED" train.checkpoint_every=25 --gpus-per-trial "$GPUS_PER_TRIAL"
       --deadline "$DEADLINE")
"${SWEEP[@]}" --out "$RUNS/tiktok" --seeds 999 42 2026 \
  --config configs/tiktok_bm3.yaml configs/tiktok_wo_s.yaml configs/tiktok_wo_i.yaml configs/tiktok_wo_a.yaml \
           configs/tiktok_wo_m.yaml configs/tiktok_lightgcn.yaml > "$OUT/sweep_main.log" 2>&1
"${SWEEP[@]}" --out "$RUNS/tiktok_msi" --seeds 999 42 2026 --config configs/tiktok.yaml \
  --grid loss.alpha=0.1,0.01 model.dropout=0.3,0.5 > "$OUT/sweep_msi.log" 2>&1
for pair in frozen:model.freeze_features=true bf16:train.autocast=bf16; do
  "${SWEEP[@]}" --out "$RUNS/tiktok_${pair%%:*}" --seeds $EXTRA_SEEDS --config configs/tiktok.yaml \
    --set "${pair#*:}" > "$OUT/sweep_${pair%%:*}.log" 2>&1
done
python3 scripts/compare.py "$RUNS/tiktok" --probe tiktok_bm3 --device cuda > /dev/null
python3 scripts/compare.py "$RUNS/tiktok_msi" --probe tiktok --device cuda > /dev/null
wait
cat "$OUT/pytest_cuda.txt" | tail -n 5
for d in "$RUNS"/tiktok*; do cat "$d/results.md" "$d/probe.md" > "$OUT/$(basename "$d").md" 2>/dev/null; done
tar czf "$OUT/tiktok_runs.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d tiktok*/summary.json tiktok*/*/metrics.jsonl \
  tiktok*/*/results.json tiktok*/logs 2>/dev/null)
cat "$OUT"/tiktok*.md
