"""Average test.py result files over trials or runs: mean and sample std per protocol and setting.

    python -m utils.aggregate results/regdb_trial*.json [--save_json summary.json]

Protocol names that differ only in their trial number (``regdb trial 3 v2i``) are grouped.
Results scored another way are never averaged together: each data set, test-time setting
(``--flip``, ``--rerank`` and its parameters) and, when the files hold several, image size is a
row of its own, marked as such. The spread is the sample standard deviation (n - 1 in the
denominator) over the n files of a row; a row of one file has none (0).
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
from utils.base.io import write_text_atomic
from utils.evaluation.evaluate import FEATURES, format_table, mean_std

log = logging.getLogger(__name__)

TITLE = "mean ± std over runs (sample std: n - 1 in the denominator; n runs per row)"


def read_result_file(path: str) -> dict[str, Any]:
    """One test.py ``--save_json`` file, or a UserError naming it and what is wrong."""
    file = Path(path)
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: results file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a test.py --save_json file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a test.py --save_json file (not UTF-8 text)") from None
    except json.JSONDecodeError:
        raise UserError(f"{path}: not a test.py --save_json file (not JSON)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), dict):
        raise UserError(f"{path}: not a test.py --save_json file (no 'results')")
    return payload


def setting_marks(payload: dict[str, Any], several_sizes: bool) -> str:
    """How a file was scored, as the row marks: flip, re-ranking, image size (if it varies)."""
    marks = " (flip)" if payload.get("flip") else ""
    rerank = payload.get("rerank")
    if isinstance(rerank, dict):
        marks += " (re-ranked " + " ".join(f"{k}={v}" for k, v in sorted(rerank.items())) + ")"
    size = payload.get("img_size")
    if several_sizes and isinstance(size, list):
        marks += " (" + "x".join(str(s) for s in size) + ")"
    return marks


def load_results(paths: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Read test.py JSON files and group their results by protocol (trial number removed),
    data set and test-time setting."""
    payloads = [(path, read_result_file(path)) for path in paths]
    sizes = {json.dumps(payload.get("img_size")) for _, payload in payloads}
    groups: dict[str, list[dict[str, Any]]] = {}
    for path, payload in payloads:
        marks = setting_marks(payload, len(sizes) > 1)
        try:
            for name, result in payload["results"].items():
                key = re.sub(r"\s*trial \d+", "", name)
                dataset = payload.get("dataset")
                if dataset and not key.startswith(str(dataset)):
                    key = f"{dataset} {key}"
                groups.setdefault(key + marks, []).append({kind: result[kind] for kind in FEATURES})
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"{path}: not a test.py --save_json file") from None
    if len({bool(payload.get("ema")) for _, payload in payloads}) > 1:
        log.warning("the files mix EMA and live weights (test.py --ema in some runs only)")
    return groups


def main(argv: Sequence[str] | None = None) -> int:
    """Print a Markdown table of mean +- sample std over the given result files."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="test.py --save_json outputs")
    parser.add_argument("--save_json", default=None, help="write the summary here too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    groups = load_results(args.files)
    summary, rows = {}, []
    for name, runs in groups.items():
        summary[name] = mean_std(runs, sample=True) | {"runs": len(runs), "std": "sample"}
        rows += [(f"{name} {kind} (n={len(runs)})", summary[name][kind]) for kind in FEATURES]
    sys.stdout.write(format_table(rows, title=TITLE) + "\n")
    if args.save_json:
        try:
            write_text_atomic(args.save_json, json.dumps(summary, indent=2) + "\n")
        except OSError as err:
            raise UserError(f"--save_json {args.save_json}: cannot write ({err})") from None
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
