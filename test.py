"""Score a checkpoint with the SYSU-MM01 or RegDB protocol (this project's or the authors').

    python test.py --dataset sysu --data_root DATA/SYSU-MM01 --weights runs/x/checkpoint_latest.pth
    python test.py --dataset regdb --data_root DATA/RegDB --trial 3 --weights ckpt.pth.tar \
        --config_path config.cfg --ema

SYSU: all 10 gallery trials in one run (query features extracted once). RegDB: both directions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model import CMNASNet, build_model, load_arch, load_checkpoint, read_checkpoint
from model.arch import arch_from_dict
from model.weights import is_authors_checkpoint
from utils.cli import run_cli
from utils.errors import UserError
from utils.logger import setup_logging
from utils.options import check_common, data_parser

log = logging.getLogger("test")


def get_args_parser() -> argparse.ArgumentParser:
    """The test.py parser (the authors' flag names plus a few of this project's)."""
    parser = argparse.ArgumentParser(
        description="Evaluate a checkpoint with the SYSU-MM01 or RegDB protocol.",
        parents=[data_parser()],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--weights", required=True, help="checkpoint file (ours or the authors')")
    parser.add_argument(
        "--config_path",
        default=None,
        help="architecture (.json or the authors' config.cfg); needed for the "
        "authors' checkpoints, ours carry their architecture",
    )
    parser.add_argument(
        "--last_stride",
        type=int,
        choices=(1, 2),
        default=None,
        help="layer4 stride for the authors' checkpoints (default 1)",
    )
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--mode", choices=("all", "indoor"), default="all", help="SYSU mode")
    parser.add_argument(
        "--shot",
        type=int,
        choices=(1, 10),
        default=1,
        help="SYSU gallery images per identity and camera",
    )
    parser.add_argument(
        "--direction",
        choices=("both", "v2i", "i2v"),
        default="both",
        help="RegDB query -> gallery direction(s)",
    )
    parser.add_argument(
        "--tvsearch",
        action="store_true",
        help="RegDB: thermal-to-visible only (same as --direction i2v)",
    )
    parser.add_argument("--save_json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--visualize",
        type=int,
        default=0,
        metavar="K",
        help="write rank-list PNGs for K queries next to --save_json (or ./)",
    )
    return parser


def build_from_checkpoint(args: argparse.Namespace) -> tuple[CMNASNet, dict[str, Any]]:
    """Rebuild the network a checkpoint was trained with and load its weights."""
    checkpoint = read_checkpoint(args.weights)
    if is_authors_checkpoint(checkpoint):
        if not args.config_path:
            raise UserError(
                f"--weights {args.weights}: an authors' checkpoint needs "
                "--config_path (their config.cfg)"
            )
        arch = load_arch(args.config_path)
        classifier = checkpoint["model"].get("module.classifier.weight")
        if classifier is None:
            raise UserError(f"--weights {args.weights}: no module.classifier.weight entry")
        num_classes, last_stride = int(classifier.shape[0]), args.last_stride or 1
    else:
        arch = arch_from_dict(checkpoint["arch"], f"{args.weights} (architecture)")
        if args.config_path:
            given = load_arch(args.config_path)
            if given.slots != arch.slots:
                raise UserError(
                    f"--config_path {args.config_path} differs from the "
                    f"architecture stored in {args.weights}"
                )
        num_classes = int(checkpoint["num_classes"])
        last_stride = args.last_stride or int(checkpoint.get("last_stride", 1))
    model = build_model(arch, num_classes, last_stride)
    load_checkpoint(model, checkpoint, ema=args.ema, source=args.weights)
    log.info("model: %s, %d classes, last stride %d", arch.summary(), num_classes, last_stride)
    return model, checkpoint


def run_tests(
    args: argparse.Namespace, model: CMNASNet, device: torch.device
) -> tuple[dict[str, Any], list[tuple[str, dict[str, float]]]]:
    """Run the protocol the options name; returns the results and the table rows."""
    from utils.evaluation import evaluate_regdb, evaluate_sysu

    img_size = (args.img_h, args.img_w)
    amp = args.amp if device.type == "cuda" else "none"
    rows: list[tuple[str, dict[str, float]]] = []
    if args.dataset == "sysu":
        trials = list(range(10)) if args.trial is None else [args.trial]
        result, _ = evaluate_sysu(
            model,
            args.data_root,
            args.mode,
            args.shot,
            trials,
            device,
            img_size,
            args.test_batch,
            amp,
        )
        name = f"sysu {args.mode} {'single' if args.shot == 1 else 'multi'}-shot"
        results = {name: result}
        rows += [(f"{name} {kind}", result[kind]) for kind in ("pool", "bnneck")]
        return results, rows
    trial = args.trial or 1
    direction = "i2v" if args.tvsearch else args.direction
    result = evaluate_regdb(
        model, args.data_root, trial, direction, device, img_size, args.test_batch, amp
    )
    results = {f"regdb trial {trial} {d}": r for d, r in result.items()}
    for name, res in results.items():
        rows += [(f"{name} {kind}", res[kind]) for kind in ("pool", "bnneck")]
    return results, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, rebuild the model from its checkpoint, evaluate and report."""
    args = get_args_parser().parse_args(argv)
    setup_logging()
    check_common(args)
    if args.dataset == "sysu" and args.trial is not None and not 0 <= args.trial <= 9:
        raise UserError(f"--trial {args.trial}: SYSU gallery trials are 0-9 (default: all 10)")
    if args.visualize < 0:
        raise UserError(f"--visualize {args.visualize}: expected a number of queries >= 0")
    if args.save_json:
        out = Path(args.save_json)
        if out.parent and not out.parent.exists():
            raise UserError(f"--save_json {out}: folder {out.parent} does not exist")
    from utils.engine import select_device
    from utils.evaluation import format_table

    device = select_device(args.device)
    model, _ = build_from_checkpoint(args)
    model.to(device).eval()
    results, rows = run_tests(args, model, device)
    table = format_table(rows, title=f"{args.weights}{' (EMA)' if args.ema else ''}")
    log.info("results:\n%s", table)
    sys.stdout.write(table + "\n")
    if args.save_json:
        payload = {"weights": args.weights, "ema": args.ema, "results": results}
        Path(args.save_json).write_text(json.dumps(payload, indent=2) + "\n")
        log.info("wrote %s", args.save_json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
