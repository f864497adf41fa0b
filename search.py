"""Search a BN separation scheme (shared or split per slot) for CM-NAS on SYSU-MM01 or RegDB.

    python search.py --data_root DATA/SYSU-MM01 --dataset sysu --depth 50

The authors never released their search; this is the project's reconstruction. Every slot of a
supernet mixes its shared and split BNs with ``softmax(alpha / tau)``; the network weights train
on one part of the training identities, the alphas on the other (see
:mod:`utils.engine.search`). The run writes ``arch.json`` (ready for ``train.py --config_path``),
``log.jsonl`` with the split probabilities of every epoch, and ``search_heatmap.png``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from utils.base.cli import run_cli
from utils.engine.options import (
    HelpFormatter,
    data_parser,
    model_parser,
    optim_parser,
    search_settings,
)
from utils.engine.search import SearchTrainer, search_parser
from utils.engine.trainer import run_trainer


def get_args_parser() -> argparse.ArgumentParser:
    """The search.py parser: the shared training parents plus the search options."""
    parser = argparse.ArgumentParser(
        description="Search the BN separation scheme of a CM-NAS network (shared/split per slot).",
        parents=[data_parser(), model_parser(), optim_parser(), search_parser()],
        formatter_class=HelpFormatter,
    )
    # The search builds its own supernet (--config_path is ignored) and never runs the test
    # protocol (--test_freq must stay 0).
    parser.set_defaults(epochs=40, test_freq=0, config_path=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, search, and write the derived architecture."""
    return run_trainer(SearchTrainer(search_settings(get_args_parser().parse_args(argv))))


if __name__ == "__main__":
    sys.exit(run_cli(main))
