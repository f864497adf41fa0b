#!/usr/bin/env bash
# Score a SYSU-MM01 checkpoint: all/indoor search x single/multi-shot, 10 trials each.
#   DATA_ROOT=/data/SYSU-MM01 WEIGHTS=runs/sysu_all_split/checkpoint_latest.pth ./test_sysu.sh
# For the authors' checkpoints also set CONFIG=path/to/config.cfg; add --ema to use EMA weights.
# Results: $OUT/{all,indoor}_shot{1,10}.json and summary.json (default OUT: next to WEIGHTS).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_ROOT="${DATA_ROOT:-/path/to/SYSU-MM01}"   # <- or edit this line
WEIGHTS="${WEIGHTS:-runs/sysu_all_split/checkpoint_latest.pth}"
OUT="${OUT:-$(dirname "$WEIGHTS")/test_sysu}"
PYTHON="${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}"
if [ ! -d "$DATA_ROOT" ]; then
  echo "error: SYSU-MM01 not found at DATA_ROOT=$DATA_ROOT (set DATA_ROOT or edit test_sysu.sh)" >&2
  exit 2
fi
if [ ! -f "$WEIGHTS" ]; then
  echo "error: no checkpoint at WEIGHTS=$WEIGHTS (set WEIGHTS to a checkpoint file)" >&2
  exit 2
fi
config_flag=()
if [ -n "${CONFIG:-}" ]; then config_flag=(--config_path "$CONFIG"); fi
mkdir -p "$OUT"
for mode in all indoor; do
  for shot in 1 10; do
    "$PYTHON" "$HERE/test.py" --dataset sysu --data_root "$DATA_ROOT" --weights "$WEIGHTS" \
      ${config_flag[@]+"${config_flag[@]}"} --mode "$mode" --shot "$shot" \
      --save_json "$OUT/${mode}_shot${shot}.json" "$@"
  done
done
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m utils.aggregate \
  "$OUT/all_shot1.json" "$OUT/all_shot10.json" "$OUT/indoor_shot1.json" \
  "$OUT/indoor_shot10.json" --save_json "$OUT/summary.json"
