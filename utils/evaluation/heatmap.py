"""Heat map of the search: each slot's split probability per epoch, drawn with Pillow.

Blue is shared (0), white undecided (0.5), red split (1).
``python -m utils.evaluation.heatmap RUN_DIR``
redraws ``RUN_DIR/search_heatmap.png`` from the run's ``log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from utils.base.errors import UserError
from utils.evaluation.draw import BACKGROUND, INK, font, text_size

log = logging.getLogger(__name__)

HEATMAP_NAME = "search_heatmap.png"
# ColorBrewer RdBu end points and centre: readable, and colour-blind safe.
_BLUE = (33, 102, 172)
_WHITE = (247, 247, 247)
_RED = (178, 24, 43)
_MISSING = (200, 200, 200)
_GRID = (255, 255, 255)
_STAGE_LINE = (90, 90, 90)
_MARGIN = 12
_LEGEND_W = 110  # the colour bar and its scale


def colour(value: float) -> tuple[int, int, int]:
    """Blue (0, shared) -> white (0.5) -> red (1, split); grey for NaN."""
    if not math.isfinite(value):
        return _MISSING
    value = min(max(value, 0.0), 1.0)
    low, high, t = (_BLUE, _WHITE, value * 2) if value < 0.5 else (_WHITE, _RED, value * 2 - 1)
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True)
class _Grid:
    """Where the cells lie: the top-left corner, the size of a cell and of all of them."""

    x: int
    y: int
    cell_w: int
    cell_h: int
    width: int
    height: int


def _draw_rows(
    draw: ImageDraw.ImageDraw, matrix: np.ndarray, row_labels: Sequence[str], grid: _Grid
) -> None:
    """Each slot's label, its cells, its last value in figures, and lines between stages."""
    face, small = font(12), font(11)
    # Narrow cells lose too much colour to an outline: separate rows only.
    outline = _GRID if grid.cell_w >= 10 else None
    for r, label in enumerate(row_labels):
        y = grid.y + r * grid.cell_h
        text_w, text_h = text_size(draw, label, face)
        xy = (grid.x - 8 - text_w, y + (grid.cell_h - text_h) // 2 - 1)
        draw.text(xy, label, fill=INK, font=face)
        for c in range(matrix.shape[1]):
            x = grid.x + c * grid.cell_w
            cell = (x, y, x + grid.cell_w - 1, y + grid.cell_h - 1)
            draw.rectangle(cell, fill=colour(matrix[r, c]), outline=outline)
        bottom = y + grid.cell_h - 1
        if outline is None:
            draw.line((grid.x, bottom, grid.x + grid.width - 1, bottom), fill=_GRID)
        final = matrix[r, -1]
        if math.isfinite(final):
            text = f"{final:.2f} {'split' if final > 0.5 else 'shared'}"
            _, text_h = text_size(draw, text, small)
            xy = (grid.x + grid.width + 6, y + (grid.cell_h - text_h) // 2 - 2)
            draw.text(xy, text, fill=INK, font=small)
        # A line between stages (``layer2`` of ``layer2.0.bn1``).
        if r and label.split(".", 1)[0] != row_labels[r - 1].split(".", 1)[0]:
            draw.line((grid.x - 4, y, grid.x + grid.width, y), fill=_STAGE_LINE, width=1)


def _draw_epochs(
    draw: ImageDraw.ImageDraw, col_labels: Sequence[str], grid: _Grid, step: int, needed: int
) -> None:
    """Epoch numbers every ``step`` columns (never overlapping), plus the first; the caption."""
    face, small = font(12), font(11)
    shown = {0} | {c for c in range(len(col_labels)) if (c + 1) % step == 0}
    if 0 < step - 1 < needed:
        shown.discard(step - 1)
    axis_y = grid.y + grid.height + 4
    for c in sorted(shown):
        text = col_labels[c]
        text_w, _ = text_size(draw, text, small)
        x = grid.x + c * grid.cell_w + grid.cell_w // 2
        draw.line((x, axis_y - 3, x, axis_y), fill=INK)
        draw.text((x - text_w // 2, axis_y + 1), text, fill=INK, font=small)
    caption_w, _ = text_size(draw, "epoch", face)
    xy = (grid.x + (grid.width - caption_w) // 2, axis_y + 18)
    draw.text(xy, "epoch", fill=INK, font=face)


def _draw_legend(draw: ImageDraw.ImageDraw, bar_x: int, grid: _Grid) -> None:
    """A vertical colour bar from shared (bottom) to split (top), with its scale."""
    face, small = font(12), font(11)
    bar_w = 16
    bar_top, bar_h = grid.y + 26, max(80, min(grid.height - 26, 220))
    draw.text((bar_x, grid.y), "P(split)", fill=INK, font=face)
    for i in range(bar_h):
        y = bar_top + i
        draw.line((bar_x, y, bar_x + bar_w, y), fill=colour(1 - i / (bar_h - 1)))
    draw.rectangle((bar_x, bar_top, bar_x + bar_w, bar_top + bar_h - 1), outline=INK)
    for value, name in ((1.0, "split"), (0.5, ""), (0.0, "shared")):
        y = bar_top + round((1 - value) * (bar_h - 1))
        draw.line((bar_x + bar_w, y, bar_x + bar_w + 4, y), fill=INK)
        text = f"{value:.1f} {name}".rstrip()
        _, text_h = text_size(draw, text, small)
        draw.text((bar_x + bar_w + 7, y - text_h // 2 - 2), text, fill=INK, font=small)


def save_heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "",
    col_labels: Sequence[int | str] | None = None,
) -> Path:
    """Draw ``matrix`` (slots x epochs, values in [0, 1]) as a labelled PNG heat map."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != len(row_labels) or 0 in matrix.shape:
        raise ValueError(
            f"matrix has shape {matrix.shape}, expected ({len(row_labels)}, epochs >= 1)"
        )
    rows, cols = matrix.shape
    col_labels = [str(c) for c in (col_labels if col_labels is not None else range(1, cols + 1))]
    if len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
    face, small, bold = font(12), font(11), font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(text_size(probe, label, face)[0] for label in row_labels)
    title_h = text_size(probe, title or "Ag", bold)[1] + 14 if title else 4
    # Wide enough for the numbers when there are few epochs, narrower (down to 6 px) when many.
    cell_w = int(min(24, max(6, 900 // cols)))
    grid = _Grid(_MARGIN + label_w + 8, _MARGIN + title_h, cell_w, 14, cols * cell_w, rows * 14)
    number_w = max(text_size(probe, c, small)[0] for c in col_labels)
    needed = math.ceil((number_w + 6) / cell_w)
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 10**9) if s >= needed)
    # The last column's values in figures: near 0.5 the colours alone hardly differ.
    final_w = text_size(probe, "0.00 shared", small)[0] + 12
    legend_x = grid.x + grid.width + final_w + 24
    width = legend_x + _LEGEND_W
    height = max(grid.y + grid.height + 48, grid.y + 26 + 80 + 16)
    width = max(width, _MARGIN * 2 + text_size(probe, title, bold)[0]) if title else width

    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((_MARGIN, _MARGIN), title, fill=INK, font=bold)
    _draw_rows(draw, matrix, row_labels, grid)
    _draw_epochs(draw, col_labels, grid, step, needed)
    _draw_legend(draw, legend_x, grid)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def read_split_history(run_dir: str | os.PathLike[str]) -> tuple[list[str], list[int], np.ndarray]:
    """Slots, epochs and the (slots x epochs) split probabilities logged in ``log.jsonl``."""
    source = Path(run_dir) / "log.jsonl"
    try:
        lines = source.read_text().splitlines()
    except OSError as err:
        raise UserError(f"{source}: cannot read the run's log ({err.strerror})") from None
    by_epoch: dict[int, dict[str, float]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{source}: line {number} is not JSON") from None
        if isinstance(record, dict) and isinstance(record.get("split_probability"), dict):
            # A resumed run logs an epoch again: the later record wins.
            by_epoch[int(record["epoch"])] = record["split_probability"]
    if not by_epoch:
        raise UserError(f"{source}: no split_probability records (not a search run?)")
    epochs = sorted(by_epoch)
    slots = list(by_epoch[epochs[-1]])
    matrix = np.array([[float(by_epoch[e].get(slot, math.nan)) for e in epochs] for slot in slots])
    return slots, epochs, matrix


def heatmap_from_jsonl(run_dir: str | os.PathLike[str], path: str | None = None) -> Path:
    """Draw ``RUN_DIR/search_heatmap.png`` (or ``path``) from the run's ``log.jsonl``."""
    run_dir = Path(run_dir)
    slots, epochs, matrix = read_split_history(run_dir)
    title = f"Split probability per BN slot - {run_dir.name}"
    out = save_heatmap(matrix, slots, path or run_dir / HEATMAP_NAME, title, epochs)
    log.info("heat map of %d slots x %d epochs: %s", len(slots), len(epochs), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Redraw the heat map of a search run."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Draw a search run's split-probability map."
    )
    parser.add_argument("run_dir", help="search run folder holding log.jsonl")
    parser.add_argument("--out", help=f"PNG to write (default RUN_DIR/{HEATMAP_NAME})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    heatmap_from_jsonl(args.run_dir, args.out)
    return 0


if __name__ == "__main__":
    from utils.base.cli import run_cli

    sys.exit(run_cli(main))
