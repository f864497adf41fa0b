"""Score a checkpoint with the SYSU-MM01 or RegDB protocol (this project's or the authors').

    python test.py --dataset sysu --data_root DATA/SYSU-MM01 --weights runs/x/checkpoint_latest.pth
    python test.py --dataset regdb --data_root DATA/RegDB --trial 3 --weights ckpt.pth.tar \
        --config_path config.cfg --ema

This project's checkpoints carry their architecture, class count, image size and RegDB trial, so
``--weights`` alone rebuilds the network; the authors' need their ``config.cfg``.
SYSU: all 10 gallery trials in one run (query features extracted once), or ``--trial k``.
RegDB: both directions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model import CMNASNet, build_model, load_arch, load_checkpoint, read_checkpoint
from model.arch import Arch, arch_from_dict
from model.checkpoint import is_authors_checkpoint, is_search_checkpoint
from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.base.io import write_text_atomic
from utils.base.logger import setup_logging
from utils.engine.options import (
    HelpFormatter,
    check_common,
    check_data_root,
    data_parser,
    select_device,
)

log = logging.getLogger("test")
# Image size of the paper (and of the authors' checkpoints).
DEFAULT_IMG_SIZE = (256, 128)


def get_args_parser() -> argparse.ArgumentParser:
    """The test.py parser (the authors' flag names plus a few of this project's)."""
    parser = argparse.ArgumentParser(
        description="Evaluate a checkpoint with the SYSU-MM01 or RegDB protocol.",
        parents=[data_parser()],
        formatter_class=HelpFormatter,
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
        help="write rank-list PNGs for K queries into rank_lists/ next to --save_json (or ./)",
    )
    # None: the checkpoint's (this project's), else the paper's 256x128; --trial: SYSU gallery
    # trial 0-9 (default all 10), RegDB split 1-10 (default the checkpoint's, else 1).
    parser.set_defaults(img_h=None, img_w=None)
    return parser


def check_output_file(path: str, flag: str) -> None:
    """Fail before any work unless ``path`` can be written (its folder exists and is writable)."""
    out = Path(path)
    folder = out.parent
    if out.is_dir():
        raise UserError(f"{flag} {out}: is a folder, expected a file name")
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{flag} {out}: folder {folder} {what}")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"{flag} {out}: not writable")


def _slot_difference(given: Arch, stored: Arch) -> str:
    """The slots where two architectures differ, for error messages."""
    if given.depth != stored.depth:
        return f"ResNet-{given.depth} vs ResNet-{stored.depth}"
    differ = [name for name in stored.slots if given.slots[name] != stored.slots[name]]
    shown = ", ".join(f"{n} ({given.slots[n]} vs {stored.slots[n]})" for n in differ[:4])
    return f"{len(differ)} slot(s): {shown}{', ...' if len(differ) > 4 else ''}"


def resolve_options(args: argparse.Namespace, checkpoint: dict[str, Any]) -> None:
    """Fill image size and RegDB trial from the checkpoint's training options when not given."""
    trained = checkpoint.get("args") if not is_authors_checkpoint(checkpoint) else None
    trained = trained if isinstance(trained, dict) else {}
    for flag, fallback in zip(("img_h", "img_w"), DEFAULT_IMG_SIZE, strict=True):
        if getattr(args, flag) is None:
            setattr(args, flag, int(trained.get(flag) or fallback))
    if args.img_h < 32 or args.img_w < 16:
        raise UserError(f"--img_h/--img_w {args.img_h}x{args.img_w}: expected at least 32x16")
    if args.dataset != "regdb":
        return
    trained_trial = trained.get("trial") if trained.get("dataset") == "regdb" else None
    if args.trial is None:
        args.trial = int(trained_trial or 1)
    elif trained_trial is not None and int(trained_trial) != args.trial:
        log.warning(
            "%s was trained on RegDB trial %s; the test identities of trial %d may include "
            "its training identities",
            args.weights,
            trained_trial,
            args.trial,
        )


def build_from_checkpoint(
    args: argparse.Namespace, checkpoint: dict[str, Any] | None = None
) -> tuple[CMNASNet, dict[str, Any]]:
    """Rebuild the network a checkpoint was trained with and load its weights."""
    if checkpoint is None:
        checkpoint = read_checkpoint(args.weights)
    if is_authors_checkpoint(checkpoint):
        if not args.config_path:
            raise UserError(
                f"--weights {args.weights}: an authors' checkpoint needs "
                "--config_path (their config.cfg)"
            )
        arch = load_arch(args.config_path)
        classifier = checkpoint["model"].get("module.classifier.weight")
        if not isinstance(classifier, torch.Tensor) or classifier.dim() != 2:
            raise UserError(f"--weights {args.weights}: no module.classifier.weight matrix")
        num_classes, last_stride = int(classifier.shape[0]), args.last_stride or 1
    else:
        if is_search_checkpoint(checkpoint):
            raise UserError(
                f"--weights {args.weights}: a search checkpoint (a supernet); train its "
                "arch.json with train.py and test that checkpoint"
            )
        for key in ("arch", "num_classes"):
            if key not in checkpoint:
                raise UserError(f"--weights {args.weights}: checkpoint has no '{key}' entry")
        arch = arch_from_dict(checkpoint["arch"], f"{args.weights} (architecture)")
        if args.config_path:
            given = load_arch(args.config_path)
            if given.slots != arch.slots:
                raise UserError(
                    f"--config_path {args.config_path} differs from the architecture stored in "
                    f"{args.weights} in {_slot_difference(given, arch)} (config vs checkpoint); "
                    "leave --config_path out for this project's checkpoints"
                )
        num_classes = int(checkpoint["num_classes"])
        last_stride = args.last_stride or int(checkpoint.get("last_stride", 1))
    model = build_model(arch, num_classes, last_stride)
    load_checkpoint(model, checkpoint, ema=args.ema, source=args.weights)
    log.info("model: %s, %d classes, last stride %d", arch.summary(), num_classes, last_stride)
    return model, checkpoint


def run_tests(
    args: argparse.Namespace,
    model: CMNASNet,
    device: torch.device,
    keep: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, dict[str, float]]]]:
    """Run the protocol the options name; returns the results and the table rows."""
    from utils.evaluation.evaluate import evaluate_regdb, evaluate_sysu

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
            keep=keep,
        )
        name = f"sysu {args.mode} {'single' if args.shot == 1 else 'multi'}-shot"
        results = {name: result}
        rows += [(f"{name} {kind}", result[kind]) for kind in ("pool", "bnneck")]
        return results, rows
    direction = "i2v" if args.tvsearch else args.direction
    result = evaluate_regdb(
        model,
        args.data_root,
        args.trial,
        direction,
        device,
        img_size,
        args.test_batch,
        amp,
        keep=keep,
    )
    results = {f"regdb trial {args.trial} {d}": r for d, r in result.items()}
    for name, res in results.items():
        rows += [(f"{name} {kind}", res[kind]) for kind in ("pool", "bnneck")]
    return results, rows


def write_rank_lists(args: argparse.Namespace, features: dict[str, Any]) -> None:
    """Rank-list pictures of ``--visualize`` queries for each evaluated direction."""
    from utils.evaluation.visualize import save_rank_lists

    root = Path(args.save_json).parent if args.save_json else Path(".")
    if args.dataset == "sysu":
        jobs = [("sysu", "query", "gallery", "infrared", "visible", True)]
    else:
        direction = "i2v" if args.tvsearch else args.direction
        jobs = []
        if direction in ("v2i", "both"):
            jobs.append(("regdb_v2i", "visible", "infrared", "visible", "infrared", False))
        if direction in ("i2v", "both"):
            jobs.append(("regdb_i2v", "infrared", "visible", "infrared", "visible", False))
    for name, query, gallery, query_label, gallery_label, same_location in jobs:
        save_rank_lists(
            features[query],
            features[gallery],
            root / "rank_lists" / name,
            args.visualize,
            query_label=query_label,
            gallery_label=gallery_label,
            ignore_same_location=same_location,
        )


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` through a temporary file and a rename (never half a file)."""
    try:
        write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
    except OSError as err:
        raise UserError(f"--save_json {path}: cannot write ({err.strerror})") from None


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
        check_output_file(args.save_json, "--save_json")
    device = select_device(args.device)
    checkpoint = read_checkpoint(args.weights)
    resolve_options(args, checkpoint)
    check_data_root(args, splits=("test",))
    model, _ = build_from_checkpoint(args, checkpoint)
    model.to(device).eval()
    features: dict[str, Any] | None = {} if args.visualize else None
    results, rows = run_tests(args, model, device, features)
    table = format_results(rows, args)
    log.info("results:\n%s", table)
    sys.stdout.write(table + "\n")
    if args.save_json:
        payload = {
            "weights": args.weights,
            "ema": args.ema,
            "dataset": args.dataset,
            "img_size": [args.img_h, args.img_w],
            "results": results,
        }
        _write_json(args.save_json, payload)
        log.info("wrote %s", args.save_json)
    if features:
        write_rank_lists(args, features)
    return 0


def format_results(rows: list[tuple[str, dict[str, float]]], args: argparse.Namespace) -> str:
    """The printed table, titled with the weights it scored."""
    from utils.evaluation.evaluate import format_table

    return format_table(rows, title=f"{args.weights}{' (EMA)' if args.ema else ''}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
