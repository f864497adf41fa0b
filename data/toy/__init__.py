"""Synthetic SYSU-MM01, RegDB and LLCM data sets, written in exactly the real on-disk layouts.

``describe`` draws the people, cameras and poses; ``render`` paints one image of them, part by
part; ``sysu``, ``regdb`` and ``llcm`` each lay one data set out on disk; ``common`` holds what the
layouts share (seeded random streams, identity splits, image counts, size checks, staged output);
``cli`` is the command line. Every file is a pure function of the seed and the arguments.

Usage: ``python -m data.toy --dataset sysu|regdb|llcm --out DIR [--seed 0] [...]``.
"""

from data.toy.cli import main
from data.toy.common import JPEG_QUALITY, MIN_HEIGHT, MIN_WIDTH
from data.toy.llcm import LLCM_INFRARED_CAMERAS, LLCM_VISIBLE_CAMERAS, make_llcm
from data.toy.regdb import REGDB_TRIALS, make_regdb
from data.toy.sysu import (
    SYSU_INFRARED_CAMERAS,
    SYSU_OUTDOOR_CAMERAS,
    SYSU_VISIBLE_CAMERAS,
    make_sysu,
)

__all__ = [
    "JPEG_QUALITY",
    "LLCM_INFRARED_CAMERAS",
    "LLCM_VISIBLE_CAMERAS",
    "MIN_HEIGHT",
    "MIN_WIDTH",
    "REGDB_TRIALS",
    "SYSU_INFRARED_CAMERAS",
    "SYSU_OUTDOOR_CAMERAS",
    "SYSU_VISIBLE_CAMERAS",
    "main",
    "make_llcm",
    "make_regdb",
    "make_sysu",
]
