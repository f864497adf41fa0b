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
import shlex
import sys
from collections.abc import Sequence

from data.registry import get_dataset
from utils.base.cli import default_of, run_cli
from utils.engine.options import parse_flags, search_settings, train_parser
from utils.engine.search import ARCH_FILE, SearchTrainer
from utils.engine.settings import DataSettings
from utils.engine.trainer import run_trainer


def get_args_parser() -> argparse.ArgumentParser:
    """The search.py parser: train.py's flags plus the search's own."""
    parser = train_parser(
        "Search the BN separation scheme of a CM-NAS network (shared/split per slot).", search=True
    )
    # The search builds its own supernet (--config_path is ignored) and never runs the test
    # protocol (--test_freq must stay 0).
    parser.set_defaults(epochs=40, test_freq=0, config_path=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, search, and write the derived architecture."""
    trainer = SearchTrainer(search_settings(parse_flags(get_args_parser, argv)[0]))
    code = run_trainer(trainer)
    if code == 0 and (trainer.out / ARCH_FILE).is_file():
        sys.stdout.write(f"train the architecture found with:\n  {train_command(trainer)}\n")
    return code


def train_command(trainer: SearchTrainer) -> str:
    """The train.py command line for the architecture the search wrote (same data, images and
    plugins)."""
    data = trainer.settings.data
    words = ["python", "train.py", "--data_root", data.data_root, "--dataset", data.dataset]
    if get_dataset(data.dataset).num_splits > 1:
        words += ["--trial", str(data.trial)]
    if data.img_size != tuple(default_of(DataSettings, flag) for flag in ("img_h", "img_w")):
        words += ["--img_h", str(data.img_h), "--img_w", str(data.img_w)]
    words += [word for plugin in trainer.settings.plugin for word in ("--plugin", plugin)]
    return shlex.join([*words, "--config_path", str(trainer.out / ARCH_FILE)])


if __name__ == "__main__":
    sys.exit(run_cli(main))
