"""``python -m utils.gallery``: see :mod:`utils.gallery`."""

import sys

from utils.base.cli import run_cli
from utils.gallery.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
