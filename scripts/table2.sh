#!/usr/bin/env bash
# The paper's Table 2 on TikTok, honestly (issue 25, part 5): every baseline selected on valid over its own search,
# MMRec's published grid (configs/model/<NAME>.yaml of MMRec) in our keys, with a documented budget:
#   screen   every grid point once, seed 999 (MMRec's own seed), early stopping as the config says (patience 20);
#   confirm  the two points best on valid (TOP=N: N points; scripts/table2_top.py; test is not read) with seeds 999,
#            42, 2026;
#   report   one valid-only selection over every model's confirm folders and the SSD study's selected MSI and w/o S
#            (scripts/ssd_study.sh part e: e_base and e_wos of SSD_STUDY, default STUDY_DIR/../ssd_study) into
#            STUDY_DIR/table2 (msi-sweep --report), and
#            each model's screen folder with --mmrec-rule: what MMRec's rule (the point best on test, one seed)
#            would report, beside ours;
#   compare  msi-compare of the selected MSI against every other selected row on test (all, warm and cold items) into
#            STUDY_DIR/compare, and the table split by warm and cold test items (scripts/table2_split.py) into
#            STUDY_DIR/table2/split.md.
# Every part is resumable: run the same command again after a crash or a kill (finished trials are kept). A part
# stops at its first failing step, with that step's exit status.
#
# Usage: bash scripts/table2.sh screen|confirm MODEL [STUDY_DIR] [SHARED_DATA]
#        bash scripts/table2.sh report|compare [STUDY_DIR] [SHARED_DATA]
#   MODEL        bpr vbpr lightgcn mmgcn grcn dualgnn lattice freedom buir bm3 (popularity has nothing to search: the
#                report's floor row is it)
#   STUDY_DIR    where the folders go (default runs/table2); SHARED_DATA holds tiktok/ (default ../shared/data)
# EPOCHS=N (environment) caps every run of that call at N epochs (train.epochs; patience still applies); TOP=N
# confirms the N points best on valid instead of 2.
# Threads: one per trial (OMP_NUM_THREADS=1), CONCURRENT trials at a time (default 2). CPU cost of a screen, from
# the epoch times in docs/models.md (busy 2-core CPU): minutes for bpr, vbpr, freedom; hours for mmgcn, grcn,
# dualgnn, lattice (25 to 30 points of tens of seconds an epoch).
set -euo pipefail  # a part stops at its first failing step
PART=${1:?usage: bash scripts/table2.sh screen|confirm MODEL [STUDY_DIR] [SHARED_DATA] | report [STUDY_DIR]}
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [ "$PART" = report ] || [ "$PART" = compare ]; then MODEL=""; S=$(realpath -m "${2:-runs/table2}"); SHARED=$(realpath "${3:-$HERE/../shared/data}")
else MODEL=${2:?name a model}; S=$(realpath -m "${3:-runs/table2}"); SHARED=$(realpath "${4:-$HERE/../shared/data}"); fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$S"
# EPOCHS caps train.epochs (a budget for the slow screens: docs/results.md says which model ran under which cap)
SET=(--set data.root="$SHARED" train.checkpoint_every=10 ${EPOCHS:+train.epochs=$EPOCHS})

grid() {  # MMRec's hyper_parameters grid of MODEL in our keys (docs/models.md names each key's MMRec name)
  case $1 in
    bpr|vbpr) echo "loss.gamma=2.0,1.0,0.1,0.01,0.001,0.0001,0.00001" ;;
    lightgcn) echo "model.n_layers=1,2,3,4 loss.gamma=0.01,0.001,0.0001,0.00001,0.000001" ;;
    mmgcn) echo "loss.gamma=0,0.00001,0.0001,0.001,0.01,0.1 train.lr=0.0001,0.0005,0.001,0.005,0.01" ;;
    # MMRec's learning rate 1 is left out: an Adam step of 1 diverges (docs/models.md, grcn); n_routing: our
    # default routes, MMRec's arithmetic does not (0)
    grcn) echo "loss.gamma=0.1,0.01,0.001,0.0001,0.00001 train.lr=0.1,0.01,0.001,0.0001 model.n_routing=0,3" ;;
    # MMRec's reg_weight r is our gamma r * ln 2 (its BPR uses log2; docs/models.md, dualgnn); learning rate 0.1
    # diverges at MMRec's first point (NaN in epoch 0) and is left out
    dualgnn) echo "loss.gamma=0.0693,0.00693,0.000693,0.0000693,0.00000693 train.lr=0.01,0.001,0.0001,0.00001" ;;
    lattice) echo "loss.gamma=0.0,0.00001,0.0001,0.001 train.lr=0.0001,0.0005,0.001,0.005" ;;
    freedom) echo "model.dropout=0.8,0.9 loss.modality_weight=0.0,0.00001,0.0001,0.001" ;;
    # BUIR is not in MMRec: its paper's momentum values and two learning rates
    buir) echo "model.momentum=0.9,0.99,0.995 train.lr=0.001,0.0001" ;;
    # BM3 is MSI w/o S & I (configs/tiktok_bm3.yaml); MMRec's reg_weight is our gamma (docs/results.md, SSD study)
    bm3) echo "model.n_layers=1,2 loss.gamma=0.1,0.01 model.dropout=0.3,0.5" ;;
    *) echo "unknown model $1: bpr vbpr lightgcn mmgcn grcn dualgnn lattice freedom buir bm3" >&2; exit 2 ;;
  esac
}

fallback() {  # msi-sweep's trials without Ray, one folder
  python3 "$HERE/scripts/sweep_fallback.py" --max-concurrent "${CONCURRENT:-2}" "$@"
}

case $PART in
  screen)
    # shellcheck disable=SC2046  # the grid's words are separate --grid items
    fallback --config "$HERE/configs/tiktok_$MODEL.yaml" --grid $(grid "$MODEL") --seeds 999 "${SET[@]}" \
      --out "$S/screen_$MODEL"
    msi-sweep --report "$S/screen_$MODEL" --mmrec-rule > /dev/null
    ;;
  confirm)
    msi-sweep --report "$S/screen_$MODEL" > /dev/null || exit 2
    i=0
    while read -r point; do
      i=$((i + 1))
      # the point as a one-value grid, so that its runs are named by it and the union report tells the points apart
      # shellcheck disable=SC2086  # the point's key=value words
      fallback --config "$HERE/configs/tiktok_$MODEL.yaml" --grid $point --seeds 999 42 2026 "${SET[@]}" \
        --out "$S/confirm_${MODEL}_$i"
    done < <(python3 "$HERE/scripts/table2_top.py" "$S/screen_$MODEL" "${TOP:-2}")
    ;;
  report)
    mapfile -t FOLDERS < <(find "$S" -mindepth 1 -maxdepth 1 -name 'confirm_*' -type d | sort)
    SSD=$(realpath -m "${SSD_STUDY:-$S/../ssd_study}")
    for f in e_base e_wos; do [ -d "$SSD/$f" ] && FOLDERS+=("$SSD/$f"); done
    msi-sweep --report "${FOLDERS[@]}" --out "$S/table2"
    shopt -s nullglob  # no screen folder: no --mmrec-rule report
    for screen in "$S"/screen_*/; do msi-sweep --report "${screen%/}" --mmrec-rule > /dev/null; done
    ;;
  compare)
    # MSI (the SSD study's selected point, config tiktok) against every other row of the union report, on test (each
    # side already selected on valid), on all, warm and cold items; then the Table split by warm and cold items
    mkdir -p "$S/compare"
    runs() { python3 -c 'import json, sys
row = json.load(open(sys.argv[1]))["configs"].get(sys.argv[2], {}).get("selected")
print(" ".join(row["run_dirs"]) if row else "")' "$S/table2/summary.json" "$1"; }
    read -ra MSI <<< "$(runs tiktok)"
    [ ${#MSI[@]} -gt 0 ] || { echo "no selected MSI (config tiktok) in $S/table2/summary.json" >&2; exit 2; }
    for config in $(python3 -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["configs"]))' \
        "$S/table2/summary.json"); do
      [ "$config" = tiktok ] && continue
      read -ra B <<< "$(runs "$config")"
      [ ${#B[@]} -gt 0 ] || continue
      for items in all warm cold; do
        msi-compare --a "${MSI[@]}" --b "${B[@]}" --split test --items $items --quiet \
          --out "$S/compare/msi_vs_${config}_$items.md" --json "$S/compare/msi_vs_${config}_$items.json" > /dev/null \
         
      done
    done
    python3 "$HERE/scripts/table2_split.py" "$S/table2" --out "$S/table2/split.md" > /dev/null
    ;;
  *)
    echo "unknown part $PART: screen, confirm, report or compare" >&2
    exit 2
    ;;
esac
