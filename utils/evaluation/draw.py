"""Ink, paper and text shared by every picture (curves, heat map, rank lists), drawn with Pillow."""

from __future__ import annotations

import functools
from typing import Any

from PIL import ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
Box = tuple[int, int, int, int]  # left, top, right, bottom


@functools.cache
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px (the fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, face: Any) -> tuple[int, int]:
    """Width and height of ``text`` drawn in ``face``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    return int(right - left), int(bottom - top)
