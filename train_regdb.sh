#!/usr/bin/env bash
# Train CM-NAS on RegDB, one model per trial (1-10), with the paper's recipe.
#   DATA_ROOT=/data/RegDB ./train_regdb.sh [extra train.py flags]
# TRIALS="1 2" limits the trials; CONFIG may contain {trial} for per-trial architectures.
# Trial t goes to $SAVE/regdb_trial<t>, the WEIGHTS pattern test_regdb.sh expects by default.
# Relative paths are taken from where you run it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_ROOT="${DATA_ROOT:-/path/to/RegDB}"   # <- or edit this line
CONFIG="${CONFIG:-$HERE/configs/all_split.json}"
SAVE="${SAVE:-runs}"
TRIALS="${TRIALS:-1 2 3 4 5 6 7 8 9 10}"
PYTHON="${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}"
if [ ! -d "$DATA_ROOT" ]; then
  echo "error: RegDB not found at DATA_ROOT=$DATA_ROOT (set DATA_ROOT or edit train_regdb.sh)" >&2
  exit 2
fi
for trial in $TRIALS; do
  config="${CONFIG//\{trial\}/$trial}"
  "$PYTHON" "$HERE/train.py" --dataset regdb --data_root "$DATA_ROOT" --trial "$trial" \
    --config_path "$config" --save "$SAVE" --note "regdb_trial${trial}" "$@"
done
