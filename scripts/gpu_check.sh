#!/usr/bin/env bash
# The GPU checks in one go on a CUDA machine, each step bounded so the whole ends by END seconds:
#   1. a CUDA smoke run of the trainer (10 TikTok epochs alone on the GPU): its epoch times are the
#      one-trial-at-a-time reference for packing
#   2. the GPU benchmark: our MSI and BM3 variant beside MMRec's own BM3 (scripts/bench.py --mmrec-bm3)
#   3. the TikTok grid of full MSI (msi-sweep, valid-only selection) beside the baselines, with the CUDA tests
#      running alongside; unfinished trials stop at the deadline and resume when the script is run again
#   4. msi-plot of the grid and of the selected runs' curves, the modality probe, and one archive of the records
# Usage: bash scripts/gpu_check.sh SHARED_DATA_DIR OUT_DIR [END_SECONDS]
#   SHARED_DATA_DIR holds tiktok/ and baby/ (../shared/data beside the repository); MMREC (default
#   .ref/mmrec-bm3) is a copy of ../shared/reference/mmrec-bm3; RUNS (default runs/gpu) receives the run directories.
set -u
T0=$(date +%s)
SHARED=$(realpath "${1:-../shared/data}")
OUT=$(realpath -m "${2:-gpu-check}")
END=${3:-3000}
RUNS=$(realpath -m "${RUNS:-runs/gpu}")
MMREC=${MMREC:-.ref/mmrec-bm3}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
left() { echo $((END - ($(date +%s) - T0))); }
say() { echo "[$(($(date +%s) - T0))s] $*"; }
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

say "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
python3 -c "import ray; print('ray', ray.__version__)" || say "ray is not importable: the sweeps use the fallback"
nproc

say "== 1. CUDA smoke: 10 TikTok epochs through msi-train, alone on the GPU"
timeout 120 python3 -m msi.cli train --config configs/tiktok.yaml data.root="$SHARED" train.epochs=10 \
  --out "$RUNS/smoke" --overwrite --quiet --device cuda > "$RUNS/smoke.log" 2>&1
rc=$?
tail -n 3 "$RUNS/smoke.log"
say "smoke rc=$rc"

say "== 2. GPU benchmark (tiktok, baby; MMRec's BM3 in the same run)"
timeout 200 python3 scripts/bench.py --device cuda --datasets tiktok baby --shared-data "$SHARED" \
  --mmrec-bm3 "$MMREC" --mmrec-timeout 90 --out-json "$OUT/bench_gpu.json" --out-md "$OUT/bench_gpu.md" \
  > "$RUNS/bench.log" 2>&1
say "bench rc=$?"
tail -n 40 "$OUT/bench_gpu.md" 2>/dev/null || tail -n 20 "$RUNS/bench.log"

sweep() {  # msi-sweep, or without Ray the same trials as plain msi-train processes (same run directories)
  if python3 -c "import ray" 2>/dev/null; then
    python3 -m msi.cli sweep "$@"
  else
    python3 scripts/sweep_fallback.py "$@"
  fi
}

DEADLINE=$(($(left) - 45))
say "== 3. TikTok grid (deadline ${DEADLINE}s) and baselines; CUDA tests alongside"
timeout $((DEADLINE + 30)) python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  > "$RUNS/pytest_cuda.txt" 2>&1 &
PIDS=($!)
COMMON=(--set data.root="$SHARED" train.checkpoint_every=25 --seeds 999 42 2026
        --gpus-per-trial 0.0625 --deadline "$DEADLINE")
sweep --config configs/tiktok.yaml "${COMMON[@]}" --max-concurrent 11 --out "$RUNS/tiktok_msi" \
  --grid loss.alpha=0.1,0.01,0.001 loss.beta=1e-4,1e-3,0 model.code_placement=sample,mean \
  --set model.dropout=0.5 > "$RUNS/sweep_msi.log" 2>&1 &
PIDS+=($!)
sweep --config configs/tiktok_wo_s.yaml configs/tiktok_bm3.yaml configs/tiktok_lightgcn.yaml "${COMMON[@]}" \
  --max-concurrent 4 --out "$RUNS/tiktok_base" > "$RUNS/sweep_base.log" 2>&1 &
PIDS+=($!)
wait "${PIDS[@]}"  # not a bare wait: bash would also wait for the tee behind this script's output, forever
say "CUDA tests:"; tail -n 3 "$RUNS/pytest_cuda.txt"
for s in tiktok_msi tiktok_base; do say "$s"; grep -E "trials|unfinished|FAILED|failed" "$RUNS/sweep_${s#tiktok_}.log" | tail -n 3
  cat "$RUNS/$s/results.md" 2>/dev/null; done

say "== 4. plots, probe, archive"
timeout 60 python3 -m msi.cli plot "$RUNS/tiktok_msi" --out "$OUT/tiktok_grid.png"
SEL=$(python3 -c "import json,sys; s=json.load(open('$RUNS/tiktok_msi/summary.json'))['configs']['tiktok']['selected']; print(' '.join(s['run_dirs']) if s else '')" 2>/dev/null)
[ -n "$SEL" ] && timeout 60 python3 -m msi.cli plot $SEL --out "$OUT/tiktok_curves.png"
[ -n "$SEL" ] && timeout 60 python3 scripts/probe.py "$RUNS/tiktok_msi" --probe tiktok --device cuda
timeout 60 python3 scripts/probe.py "$RUNS/tiktok_base" --probe tiktok_bm3 tiktok_wo_s --device cuda
(cd "$RUNS" && tar czf "$OUT/runs.tgz" --exclude='*.pt' --exclude='.tune' --exclude='tensorboard' .)
say "done"
