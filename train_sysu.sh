#!/usr/bin/env bash
# Train CM-NAS on SYSU-MM01 with the paper's recipe.
#   DATA_ROOT=/data/SYSU-MM01 ./train_sysu.sh [extra train.py flags]
# CONFIG picks the architecture (default: the all-split config; use your search result);
# the run goes to $SAVE/sysu_<config name>. Relative paths are taken from where you run it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_ROOT="${DATA_ROOT:-/path/to/SYSU-MM01}"   # <- or edit this line
CONFIG="${CONFIG:-$HERE/configs/all_split.json}"
SAVE="${SAVE:-runs}"
PYTHON="${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}"
if [ ! -d "$DATA_ROOT" ]; then
  echo "error: SYSU-MM01 not found at DATA_ROOT=$DATA_ROOT (set DATA_ROOT or edit train_sysu.sh)" >&2
  exit 2
fi
exec "$PYTHON" "$HERE/train.py" --dataset sysu --data_root "$DATA_ROOT" --config_path "$CONFIG" \
  --save "$SAVE" --note "sysu_$(basename "${CONFIG%.*}")" "$@"
