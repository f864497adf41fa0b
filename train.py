"""Train a CM-NAS network (identity + triplet + SP + CMMD losses, EMA) on SYSU-MM01 or RegDB.

    python train.py --data_root DATA/SYSU-MM01 --dataset sysu --config_path configs/all_split.json

Defaults are the paper's recipe; ``--help`` lists every option. The run folder
(``--save/--note``) gets log.txt, log.jsonl (one line per epoch), checkpoint_latest.pth and a
checkpoint every ``--save_freq`` epochs, and the final results. Ctrl-C, SIGTERM or SIGHUP stop
after the current step with a resumable checkpoint (exit status 128 + signal; a second signal
stops at once); continue with ``--resume RUN/checkpoint_latest.pth``, which picks up at that
step in the same folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from utils.base.cli import run_cli
from utils.engine.options import parse_flags, train_parser, training_settings

log = logging.getLogger("train")


def get_args_parser() -> argparse.ArgumentParser:
    """The train.py parser, generated from the declared settings."""
    return train_parser("Train a CM-NAS network for visible-infrared re-identification.")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, train, and run the final evaluation."""
    settings = training_settings(parse_flags(get_args_parser, argv)[0])
    from utils.engine.trainer import Trainer, run_trainer

    return run_trainer(Trainer(settings))


if __name__ == "__main__":
    sys.exit(run_cli(main))
