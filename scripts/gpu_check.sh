#!/usr/bin/env bash
# The GPU checks, in one go on a CUDA machine: the CUDA tests, the GPU benchmark, and the TikTok comparison
# (docs/results.md). Usage: bash scripts/gpu_check.sh SHARED_DATA_DIR OUT_DIR [JOBS]
# SHARED_DATA_DIR holds tiktok/, baby/, sports/ (../shared/data beside the repository).
set -u
SHARED=$(realpath "${1:-../shared/data}")
OUT=$(realpath -m "${2:-gpu-check}")
JOBS=${3:-12}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; nproc; } | tee "$OUT/machine.txt"

echo "== CUDA tests"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_models.py tests/test_evaluate.py \
  2>&1 | tail -n 15 | tee "$OUT/pytest_cuda.txt"

echo "== GPU benchmark"
python3 scripts/bench.py --device cuda --datasets elec baby sports tiktok --shared-data "$SHARED" \
  --cache /tmp/msi-bench --out-json "$OUT/bench_gpu.json" --out-md "$OUT/bench_gpu.md" 2>&1 | tail -n 60

echo "== TikTok comparison ($JOBS runs at a time)"
TT="configs/tiktok.yaml configs/tiktok_bm3.yaml configs/tiktok_wo_s.yaml configs/tiktok_wo_i.yaml \
    configs/tiktok_wo_a.yaml configs/tiktok_wo_m.yaml configs/tiktok_lightgcn.yaml"
python3 scripts/compare.py --configs $TT --seeds 999 42 2026 \
  --grid loss.alpha=0.1,0.01 model.dropout=0.3,0.5 --grid-configs tiktok \
  --set data.root="$SHARED" train.checkpoint_every=25 --jobs "$JOBS" --device cuda \
  --out runs/tiktok --probe tiktok tiktok_bm3 --title "TikTok (image + audio)" --deadline "${DEADLINE:-330}" > "$OUT/compare_main.log" 2>&1 &
MAIN=$!
python3 scripts/compare.py --configs configs/tiktok.yaml --seeds 999 42 2026 \
  --set data.root="$SHARED" train.checkpoint_every=25 model.freeze_features=true --jobs 3 --device cuda \
  --out runs/tiktok_frozen --title "TikTok MSI, frozen features" --deadline "${DEADLINE:-330}" > "$OUT/compare_frozen.log" 2>&1 &
python3 scripts/compare.py --configs configs/tiktok.yaml --seeds 999 42 2026 \
  --set data.root="$SHARED" train.checkpoint_every=25 train.autocast=bf16 --jobs 3 --device cuda \
  --out runs/tiktok_bf16 --title "TikTok MSI, bf16 autocast" --deadline "${DEADLINE:-330}" > "$OUT/compare_bf16.log" 2>&1 &
wait
tail -n 60 "$OUT/compare_main.log"
for d in runs/tiktok runs/tiktok_frozen runs/tiktok_bf16; do n=$(basename $d)
  cp "$d/results.md" "$OUT/$n.md" 2>/dev/null; cp "$d/summary.json" "$OUT/$n.json" 2>/dev/null; done
tar czf "$OUT/tiktok_runs.tgz" runs/tiktok*/*/metrics.jsonl runs/tiktok*/*/results.json runs/tiktok*/*/stdout.log 2>/dev/null
ls -la "$OUT"
