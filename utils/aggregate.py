"""Average test.py result files over trials: mean and spread per protocol.

    python -m utils.aggregate results/regdb_trial*.json [--save_json summary.json]

Protocol names that differ only in their trial number (``regdb trial 3 v2i``) are grouped.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.evaluation.evaluate import FEATURES, format_table, mean_std

log = logging.getLogger(__name__)


def load_results(paths: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Read test.py JSON files and group their results by protocol, trial number removed."""
    groups: dict[str, list[dict[str, Any]]] = {}
    ema = set()
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
            results = payload["results"]
            for name, result in results.items():
                key = re.sub(r"\s*trial \d+", "", name)
                groups.setdefault(key, []).append({kind: result[kind] for kind in FEATURES})
        except FileNotFoundError:
            raise UserError(f"{path}: results file not found") from None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{path}: not a test.py --save_json file") from None
        ema.add(bool(payload.get("ema")))
    if len(ema) > 1:
        log.warning("the files mix EMA and live weights (test.py --ema in some runs only)")
    return groups


def main(argv: Sequence[str] | None = None) -> int:
    """Print a Markdown table of mean +- std over the given result files."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="test.py --save_json outputs")
    parser.add_argument("--save_json", default=None, help="write the summary here too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    groups = load_results(args.files)
    summary, rows = {}, []
    for name, runs in groups.items():
        summary[name] = mean_std(runs) | {"runs": len(runs)}
        rows += [(f"{name} {kind} (n={len(runs)})", summary[name][kind]) for kind in FEATURES]
    # std: the population standard deviation over the runs.
    sys.stdout.write(format_table(rows, title="mean ± std over runs") + "\n")
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
