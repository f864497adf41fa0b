#!/usr/bin/env bash
# Train CM-NAS on RegDB, one model per trial (1-10), with the paper's recipe.
#   DATA_ROOT=/data/RegDB ./train_regdb.sh [extra train.py flags]
# TRIALS="1 2" limits the trials; CONFIG may contain {trial} for per-trial architectures.
set -euo pipefail
cd "$(dirname "$0")"
DATA_ROOT="${DATA_ROOT:-/path/to/RegDB}"   # <- or edit this line
CONFIG="${CONFIG:-configs/all_split.json}"
SAVE="${SAVE:-runs}"
TRIALS="${TRIALS:-1 2 3 4 5 6 7 8 9 10}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
if [ ! -d "$DATA_ROOT" ]; then
  echo "error: RegDB not found at DATA_ROOT=$DATA_ROOT (set DATA_ROOT or edit train_regdb.sh)" >&2
  exit 2
fi
for trial in $TRIALS; do
  config="${CONFIG//\{trial\}/$trial}"
  "$PYTHON" train.py --dataset regdb --data_root "$DATA_ROOT" --trial "$trial" \
    --config_path "$config" --save "$SAVE" --note "regdb_trial${trial}" "$@"
done
