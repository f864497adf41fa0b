#!/usr/bin/env bash
# Train CM-NAS on SYSU-MM01 with the paper's recipe.
#   DATA_ROOT=/data/SYSU-MM01 ./train_sysu.sh [extra train.py flags]
# CONFIG picks the architecture (default: the all-split config; use your search result).
set -euo pipefail
cd "$(dirname "$0")"
DATA_ROOT="${DATA_ROOT:-/path/to/SYSU-MM01}"   # <- or edit this line
CONFIG="${CONFIG:-configs/all_split.json}"
SAVE="${SAVE:-runs}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
if [ ! -d "$DATA_ROOT" ]; then
  echo "error: SYSU-MM01 not found at DATA_ROOT=$DATA_ROOT (set DATA_ROOT or edit train_sysu.sh)" >&2
  exit 2
fi
exec "$PYTHON" train.py --dataset sysu --data_root "$DATA_ROOT" --config_path "$CONFIG" \
  --save "$SAVE" --note "sysu_$(basename "${CONFIG%.*}")" "$@"
