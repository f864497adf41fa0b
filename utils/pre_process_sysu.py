"""Build the SYSU-MM01 training image cache up front (the authors' ``pre_process_sysu.py`` step).

Usage: ``python -m utils.pre_process_sysu --data_root DIR [--img_h 256 --img_w 128
--cache_dir D]``. Training builds the same cache on first use; this just does it ahead of time.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from data.trainset import load_train_set
from utils.base.cli import run_cli

logger = logging.getLogger("pre_process_sysu")


def _main(argv: Sequence[str] | None) -> int:
    """Build (or verify) the cache; UserError and Ctrl-C propagate to run_cli."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Decode and resize the SYSU-MM01 training images into a reusable cache.",
    )
    parser.add_argument("--data_root", required=True, help="SYSU-MM01 folder (cam1..cam6, exp/)")
    parser.add_argument("--img_h", type=int, default=256, help="image height after resizing")
    parser.add_argument("--img_w", type=int, default=128, help="image width after resizing")
    parser.add_argument(
        "--cache_dir", default=None, help="cache folder (default <data_root>/cache, or ./cache)"
    )
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    start = time.perf_counter()
    train_set = load_train_set(
        "sysu",
        args.data_root,
        img_size=(args.img_h, args.img_w),
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        mmap=True,
    )
    logger.info(
        "SYSU-MM01 cache ready in %.1f s: %d identities, %d visible + %d infrared images",
        time.perf_counter() - start,
        train_set.num_classes,
        len(train_set.visible_labels),
        len(train_set.infrared_labels),
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with one error line, 130 on Ctrl-C)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
