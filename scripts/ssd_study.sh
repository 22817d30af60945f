#!/usr/bin/env bash
# The SSD study on TikTok (docs/results.md): does superfluous semantics discarding help, under the paper's own
# search space and the readings the paper leaves open? Valid-only selection, seeds 999/42/2026, test read for
# selected points only. Every part is resumable: run the same command again after a crash or a kill.
#
# Usage: bash scripts/ssd_study.sh PART [STUDY_DIR] [SHARED_DATA]
#   PART a       the readings at the selected point (alpha 0.1, beta 1e-4, dropout 0.3): one folder per reading,
#                two queues side by side, one trial at a time each (scripts/sweep_fallback.py: msi-sweep's run
#                directories without Ray, so two sweeps share the CPU without two Ray instances)
#   PART b       MSI w/o S with a budget of its own: dropout {0.3, 0.5} x gamma {0.1, 0.01} x layers {1, 2}
#   PART c       the paper's alpha x beta grid {1e-1, 1e-2, 1e-3, 1e-4}^2 at dropout 0.3 under a reading
#                (READING="key=value ..." names it; default none, the faithful model); CONCURRENT=1 runs one
#                trial at a time (default 2)
#   PART baselines  the BM3 variant and LightGCN at their configs' settings, for the final table
#   PART e       the Gaussian encoder's initialisation at the selected point (issue 25, part 6): the default,
#                model.sigma_init=0.01, model.head_init=identity, and the selected w/o S (dropout 0.5, gamma 0.1,
#                2 layers), two queues side by side; then msi-compare of each reading against the default and
#                against w/o S on valid (STUDY_DIR/encoder_*.md)
#   PART report  one valid-only selection over every folder of (a) (and (b), (c) where present) per config,
#                then msi-compare of the selected MSI against each baseline on test
#   STUDY_DIR    where the run folders go (default runs/ssd_study); SHARED_DATA holds tiktok/ (default
#                ../shared/data beside the repository)
# Threads: one per trial (OMP_NUM_THREADS=1); a TikTok MSI trial is 150-300 epochs of about 2.5 s on a quiet core.
set -u
PART=${1:?usage: bash scripts/ssd_study.sh a|b|c|baselines|e|report [STUDY_DIR] [SHARED_DATA]}
HERE=$(cd "$(dirname "$0")/.." && pwd)
S=$(realpath -m "${2:-runs/ssd_study}")
SHARED=$(realpath "${3:-$HERE/../shared/data}")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$S/logs"
SEEDS=(999 42 2026)
COMMON=(--seeds "${SEEDS[@]}" --set data.root="$SHARED" train.checkpoint_every=10)

queue() {  # each argument: "NAME CONFIG [key=value ...]", one folder per reading, run in order
  for spec in "$@"; do
    read -r name config sets <<<"$spec"
    echo "[$(date +%H:%M:%S)] start $name ($config $sets)"
    # shellcheck disable=SC2086  # $sets is a list of key=value words
    python3 "$HERE/scripts/sweep_fallback.py" --config "$HERE/configs/$config" "${COMMON[@]}" $sets \
      --max-concurrent 1 --out "$S/$name" > "$S/logs/$name.out" 2>&1
    echo "[$(date +%H:%M:%S)] end $name rc=$?"
  done
}

case $PART in
  a)
    queue "base tiktok.yaml" "tau0.5 tiktok.yaml model.tau=0.5" "freeze tiktok.yaml model.freeze_features=true" \
      "mean tiktok.yaml model.code_placement=mean" "jsd tiktok.yaml model.mi_estimator=jsd" \
      "beta1e-2 tiktok.yaml loss.beta=1e-2 loss.beta_warmup=20" > "$S/logs/queue1.log" 2>&1 &
    queue "wos_base tiktok_wo_s.yaml" "views_all tiktok.yaml model.score_views=all" "tau1.0 tiktok.yaml model.tau=1.0" \
      "beta1e-1 tiktok.yaml loss.beta=1e-1 loss.beta_warmup=20" \
      "wos_freeze tiktok_wo_s.yaml model.freeze_features=true" \
      "wos_views_all tiktok_wo_s.yaml model.score_views=all" > "$S/logs/queue2.log" 2>&1 &
    wait
    ;;
  b)
    python3 "$HERE/scripts/sweep_fallback.py" --config "$HERE/configs/tiktok_wo_s.yaml" "${COMMON[@]}" \
      --grid model.dropout=0.3,0.5 loss.gamma=0.1,0.01 model.n_layers=1,2 --max-concurrent 2 --out "$S/wos_budget"
    ;;
  c)
    # beta outermost, largest first: the points where SSD's AKL term weighs most (and that no earlier grid had)
    # finish first, three seeds each, when the grid is run in several sittings
    # shellcheck disable=SC2086
    python3 "$HERE/scripts/sweep_fallback.py" --config "$HERE/configs/tiktok.yaml" "${COMMON[@]}" ${READING:-} \
      --grid loss.beta=1e-1,1e-2,1e-3,1e-4 loss.alpha=1e-1,1e-2,1e-3,1e-4 --max-concurrent "${CONCURRENT:-2}" \
      --out "$S/alpha_beta"
    ;;
  baselines)
    python3 "$HERE/scripts/sweep_fallback.py" --config "$HERE/configs/tiktok_bm3.yaml" \
      "$HERE/configs/tiktok_lightgcn.yaml" "${COMMON[@]}" --max-concurrent 2 --out "$S/baselines"
    ;;
  e)
    queue "e_base tiktok.yaml" "e_sigma0.01 tiktok.yaml model.sigma_init=0.01" > "$S/logs/queue_e1.log" 2>&1 &
    queue "e_wos tiktok_wo_s.yaml model.dropout=0.5 loss.gamma=0.1 model.n_layers=2" \
      "e_head_identity tiktok.yaml model.head_init=identity" > "$S/logs/queue_e2.log" 2>&1 &
    wait
    for reading in e_sigma0.01 e_head_identity; do
      msi-compare --a "$S/e_base:tiktok" --b "$S/$reading:tiktok" --split valid --out "$S/encoder_${reading}_vs_base.md"
      msi-compare --a "$S/e_wos:tiktok_wo_s" --b "$S/$reading:tiktok" --split valid \
        --out "$S/encoder_${reading}_vs_wos.md"
    done
    ;;
  report)
    mapfile -t FOLDERS < <(find "$S" -mindepth 2 -maxdepth 2 -name sweep.yaml -printf '%h\n' | sort)
    msi-sweep --report "${FOLDERS[@]}" --out "$S/union"
    ;;
  *)
    echo "unknown part $PART: a, b, c, baselines, e or report" >&2
    exit 2
    ;;
esac
