"""Convert an architecture between the authors' ``config.cfg`` and this project's JSON.

python -m utils.convert_arch config.cfg arch.json     # .cfg -> JSON
python -m utils.convert_arch arch.json config.cfg     # JSON -> .cfg
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from model.arch import DEPTHS, load_arch, save_arch
from utils.base.cli import run_cli

log = logging.getLogger(__name__)


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
    arch = load_arch(args.src, args.depth)
    save_arch(arch, args.dst)
    log.info("%s -> %s (%s)", args.src, args.dst, arch.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
