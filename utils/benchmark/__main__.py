"""``python -m utils.benchmark``: run the benchmark as a command-line tool."""

import sys

from utils.base.cli import run_cli
from utils.benchmark import main

sys.exit(run_cli(main))
