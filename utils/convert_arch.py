"""Convert an architecture between the authors' ``config.cfg`` and this project's JSON.

python -m utils.convert_arch config.cfg arch.json     # .cfg -> JSON
python -m utils.convert_arch arch.json config.cfg     # JSON -> .cfg
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from model.arch import DEPTHS, load_arch, save_arch
from utils.base.cli import run_cli
from utils.base.errors import UserError

log = logging.getLogger(__name__)


def check_writable(dst: str | os.PathLike[str]) -> None:
    """Fail before any work unless ``dst`` can be written: not a folder, its folder writable."""
    target = Path(dst)
    if target.is_dir():
        raise UserError(f"{target}: is a folder, expected a file name")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # save_arch creates the missing folders below this one
    if not folder.is_dir():
        raise UserError(f"{target}: cannot write ({folder} is a file, not a folder)")
    if not os.access(folder, os.W_OK | os.X_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        raise UserError(f"{target}: cannot write (folder {folder} is not writable)")


def main(argv: Sequence[str] | None = None) -> int:
    """Read ``src`` (JSON or .cfg) and write ``dst`` in the format its extension names."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("src", help="architecture to read (.json or the authors' .cfg)")
    parser.add_argument("dst", help="file to write: .cfg for the authors' format, else JSON")
    parser.add_argument(
        "--depth",
        type=int,
        choices=DEPTHS,
        default=None,
        help="expected ResNet depth (default: inferred)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_writable(args.dst)
    arch = load_arch(args.src, args.depth)
    try:
        save_arch(arch, args.dst)
    except UserError:  # a full disk (DiskFull is an OSError too) keeps its own message
        raise
    except OSError as err:
        raise UserError(f"{args.dst}: cannot write ({err.strerror or err})") from None
    log.info("%s -> %s (%s)", args.src, args.dst, arch.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
