"""Synthetic SYSU-MM01, RegDB and LLCM data sets, written in exactly the real on-disk layouts.

``describe`` draws the people, cameras and poses; ``render`` paints one image of them, part by
part; ``layouts`` lays each data set out on disk; this module is the command line:
``python -m data.toy --dataset sysu|regdb|llcm --out DIR [--seed 0] [...]``.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from collections.abc import Callable, Sequence

from data.toy.layouts import (
    LLCM_INFRARED_CAMERAS,
    SYSU_INFRARED_CAMERAS,
    SYSU_VISIBLE_CAMERAS,
    make_llcm,
    make_regdb,
    make_sysu,
)
from utils.base.cli import run_cli

__all__ = [
    "LLCM_INFRARED_CAMERAS",
    "SYSU_INFRARED_CAMERAS",
    "SYSU_VISIBLE_CAMERAS",
    "main",
    "make_llcm",
    "make_regdb",
    "make_sysu",
]

_LAYOUTS: dict[str, Callable[..., dict]] = {
    "sysu": make_sysu,
    "regdb": make_regdb,
    "llcm": make_llcm,
}
# The layouts' integer options by help group: (name, help); defaults are the layouts' own.
_OPTIONS: dict[str | None, tuple[tuple[str, str], ...]] = {
    None: (
        ("seed", "random seed"),
        ("height", "image height in pixels"),
        ("width", "image width in pixels"),
    ),
    "SYSU-MM01 and LLCM": (
        ("train_ids", "training identities"),
        ("val_ids", "SYSU-MM01 only"),
        ("test_ids", "test identities"),
        ("images_per_camera", "minimum per visible camera folder"),
    ),
    "RegDB": (
        ("ids", "identities, split in half per trial"),
        ("images_per_id", "per modality"),
    ),
}


def _default(name: str) -> object:
    """The default of the layout parameter ``name`` (the layouts that take it agree on it)."""
    for make in _LAYOUTS.values():
        parameter = inspect.signature(make).parameters.get(name)
        if parameter is not None:
            return parameter.default
    raise KeyError(name)


def _parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m data.toy",
        description="Write a synthetic SYSU-MM01, RegDB or LLCM data set in its real layout.",
    )
    parser.add_argument("--dataset", required=True, choices=tuple(_LAYOUTS), help="layout to write")
    parser.add_argument("--out", required=True, help="folder to create (must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    for title, options in _OPTIONS.items():
        group = parser.add_argument_group(title) if title else parser
        for name, text in options:
            group.add_argument(
                f"--{name}", type=int, default=_default(name), help=f"{text} (default %(default)s)"
            )
    return parser


def _main(argv: Sequence[str] | None) -> int:
    """Parse the arguments and write the data set; UserError propagates to run_cli."""
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    make = _LAYOUTS[args.dataset]
    # Every parameter of a layout has the flag of its name; flags of the other layouts stay out.
    make(**{name: getattr(args, name) for name in inspect.signature(make).parameters})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with one error line on bad input)."""
    return run_cli(_main, argv)
