#!/usr/bin/env bash
# Score RegDB checkpoints: 10 trials x both directions, then mean and spread over trials.
#   DATA_ROOT=/data/RegDB WEIGHTS='runs/regdb_trial{trial}/checkpoint_latest.pth' ./test_regdb.sh
# {trial} in WEIGHTS (and CONFIG, for the authors' per-trial config.cfg) becomes 1..10, so the
# authors' released per-trial folders work as they are. TRIALS="1 2" limits the trials; add
# --ema to use EMA weights. Results: $OUT/trial<t>.json and summary.json.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_ROOT="${DATA_ROOT:-/path/to/RegDB}"   # <- or edit this line
default_weights='runs/regdb_trial{trial}/checkpoint_latest.pth'   # train_regdb.sh's runs
WEIGHTS="${WEIGHTS:-$default_weights}"
TRIALS="${TRIALS:-1 2 3 4 5 6 7 8 9 10}"
OUT="${OUT:-results/regdb}"
PYTHON="${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}"
if [ ! -d "$DATA_ROOT" ]; then
  echo "error: RegDB not found at DATA_ROOT=$DATA_ROOT (set DATA_ROOT or edit test_regdb.sh)" >&2
  exit 2
fi
case "$WEIGHTS" in
  *"{trial}"*) ;;
  *) echo "error: WEIGHTS=$WEIGHTS has no {trial} placeholder (RegDB has one checkpoint per" \
       "trial, e.g. WEIGHTS='runs/regdb_trial{trial}/checkpoint_latest.pth')" >&2
     exit 2 ;;
esac
for trial in $TRIALS; do
  weights="${WEIGHTS//\{trial\}/$trial}"
  if [ ! -f "$weights" ]; then
    echo "error: no checkpoint for trial $trial at $weights (WEIGHTS=$WEIGHTS)" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
files=()
for trial in $TRIALS; do
  weights="${WEIGHTS//\{trial\}/$trial}"
  config_flag=()
  if [ -n "${CONFIG:-}" ]; then config_flag=(--config_path "${CONFIG//\{trial\}/$trial}"); fi
  "$PYTHON" "$HERE/test.py" --dataset regdb --data_root "$DATA_ROOT" --trial "$trial" \
    --weights "$weights" ${config_flag[@]+"${config_flag[@]}"} --direction both \
    --save_json "$OUT/trial${trial}.json" "$@"
  files+=("$OUT/trial${trial}.json")
done
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m utils.aggregate "${files[@]}" \
  --save_json "$OUT/summary.json"
