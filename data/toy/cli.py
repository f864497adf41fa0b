"""The command line of the synthetic generator: ``python -m data.toy --dataset NAME --out DIR``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from data.toy.llcm import make_llcm
from data.toy.regdb import make_regdb
from data.toy.sysu import make_sysu
from utils.base.cli import run_cli


def _parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m data.toy",
        description="Write a synthetic SYSU-MM01, RegDB or LLCM data set in its real layout.",
    )
    parser.add_argument(
        "--dataset", required=True, choices=("sysu", "regdb", "llcm"), help="layout to write"
    )
    parser.add_argument("--out", required=True, help="folder to create (must be new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--height", type=int, default=128, help="image height in pixels (default %(default)s)"
    )
    parser.add_argument(
        "--width", type=int, default=64, help="image width in pixels (default %(default)s)"
    )
    split = parser.add_argument_group("SYSU-MM01 and LLCM")
    split.add_argument(
        "--train_ids", type=int, default=24, help="training identities (default %(default)s)"
    )
    split.add_argument(
        "--val_ids", type=int, default=8, help="SYSU-MM01 only (default %(default)s)"
    )
    split.add_argument(
        "--test_ids", type=int, default=16, help="test identities (default %(default)s)"
    )
    split.add_argument(
        "--images_per_camera",
        type=int,
        default=10,
        help="minimum per visible camera folder (default %(default)s)",
    )
    regdb = parser.add_argument_group("RegDB")
    regdb.add_argument(
        "--ids",
        type=int,
        default=40,
        help="identities, split in half per trial (default %(default)s)",
    )
    regdb.add_argument(
        "--images_per_id", type=int, default=10, help="per modality (default %(default)s)"
    )
    return parser


def _main(argv: Sequence[str] | None) -> int:
    """Parse the arguments and write the data set; UserError propagates to run_cli."""
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = {"height": args.height, "width": args.width, "overwrite": args.overwrite}
    per_camera = {
        "train_ids": args.train_ids,
        "test_ids": args.test_ids,
        "images_per_camera": args.images_per_camera,
    }
    if args.dataset == "sysu":
        make_sysu(args.out, args.seed, val_ids=args.val_ids, **per_camera, **size)
    elif args.dataset == "llcm":
        make_llcm(args.out, args.seed, **per_camera, **size)
    else:
        make_regdb(args.out, args.seed, ids=args.ids, images_per_id=args.images_per_id, **size)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with one error line on bad input)."""
    return run_cli(_main, argv)
