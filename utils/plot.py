"""Training curves of a run (losses, learning rate, Rank-1, mAP), drawn with Pillow.

    python -m utils.plot RUN_DIR [--out PATH]

reads ``RUN_DIR/log.jsonl`` (one JSON record per epoch) and writes ``RUN_DIR/curves.png``. Each
record names its loss terms (``loss_terms``), so a plugin's terms are drawn without the plugin;
older logs fall back on the loss table.
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
from typing import Any

from PIL import Image, ImageDraw

from model.losses import LOSS_TERMS
from utils.base.cli import add_plugin_flag, load_plugins, run_cli
from utils.base.errors import UserError
from utils.evaluation.draw import BACKGROUND, INK, Box, font, text_size

log = logging.getLogger(__name__)

CURVES_NAME = "curves.png"
FIGURE_SIZE = (1400, 900)
METRIC_SUFFIXES = ("_rank1", "_mAP")

GRID = (228, 228, 228)
MUTED = (120, 120, 120)
# Tableau 10: distinct on white and widely used, so curves read the same as in other tools.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
_PAD = 10
_INSET = 8  # keeps the first and last points off the axis frame
_MAX_DOTS = 60  # above this many points a series is a line only; dots would merge into a blur
_SWATCH = 18  # legend colour sample, pixels

Series = dict[str, list[tuple[float, float]]]


def scale(value: float, lo: float, hi: float, start: float, end: float) -> float:
    """Map ``value`` linearly from [lo, hi] to [start, end] (end may be below start)."""
    if hi == lo:
        return (start + end) / 2
    return start + (value - lo) / (hi - lo) * (end - start)


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (first tick <= lo, last >= hi), about ``count``
    intervals of 1, 2 or 5 times a power of ten."""
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * 0.999)
    if integer:
        step = max(step, 1.0)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    # Multiplying an integer index by the step avoids accumulating rounding error.
    return [i * step for i in range(first, last + 1)]


def format_tick(value: float, step: float) -> str:
    """A tick label with just enough digits to tell neighbouring ticks apart."""
    if abs(value) < step * 1e-6:
        return "0"
    magnitude = max(abs(value), step)
    if magnitude < 1e-2 or magnitude >= 1e5:
        digits = max(0, math.floor(math.log10(magnitude)) - math.floor(math.log10(step) + 1e-9))
        mantissa, exponent = f"{value:.{digits}e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


def _fit(draw: ImageDraw.ImageDraw, text: str, face: Any, width: int) -> str:
    """``text``, shortened with ".." at the end when it is wider than ``width``."""
    if text_size(draw, text, face)[0] <= width:
        return text
    while text and text_size(draw, text + "..", face)[0] > width:
        text = text[:-1]
    return text + ".."


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """Widen a zero-width range so a single value still gets an axis."""
    if hi > lo:
        return lo, hi
    half = abs(lo) * 0.1 or 1.0
    return lo - half, hi + half


@dataclass(frozen=True)
class ChartFrame:
    """Where a chart's data landed: the plot area in pixels and the data ranges it shows."""

    plot_box: Box
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """Pixel position of data point (x, y); larger y is higher up (smaller row)."""
        left, top, right, bottom = self.plot_box
        return (
            scale(x, *self.x_range, left + _INSET, right - _INSET),
            scale(y, *self.y_range, bottom - _INSET, top + _INSET),
        )


def _finite_series(series: Series) -> Series:
    """Each series' finite points, sorted by x; series left without points are dropped."""
    clean = {
        name: sorted(
            (float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)
        )
        for name, points in series.items()
    }
    return {name: points for name, points in clean.items() if points}


Ticks = list[tuple[float, str]]


def _axes(
    clean: Series, x_range: tuple[float, float] | None
) -> tuple[tuple[float, float], Ticks, Ticks]:
    """The x range and the labelled x and y ticks covering ``clean``; ``x_range`` fixes x."""
    xs = [x for points in clean.values() for x, _ in points]
    ys = [y for points in clean.values() for _, y in points]
    # The x axis spans the data exactly (epochs start at 1, not at a round 0), so ticks outside
    # it are dropped; the y axis is widened to round ticks instead.
    x_range = _padded(*(x_range or (min(xs), max(xs))))
    x_ticks = nice_ticks(*x_range, count=6, integer=all(x.is_integer() for x in xs))
    x_ticks = [t for t in x_ticks if x_range[0] - 1e-9 <= t <= x_range[1] + 1e-9]
    y_ticks = nice_ticks(*_padded(min(ys), max(ys)), count=5)
    labelled = []
    for ticks in (x_ticks, y_ticks):
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        labelled.append([(tick, format_tick(tick, step)) for tick in ticks])
    return x_range, *labelled


def _draw_series(
    draw: ImageDraw.ImageDraw, frame: ChartFrame, clean: Series, legend_w: int, label_h: int
) -> None:
    """Each series as a coloured line (dots when few points), with its legend entry."""
    label_font, swatch = font(13), _SWATCH
    _, p_top, p_right, _ = frame.plot_box
    legend_x = p_right + 14
    for i, (name, points) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        pixels = [frame.to_pixel(x, y) for x, y in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2, joint="curve")
        if len(pixels) <= _MAX_DOTS:
            for x, y in pixels:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        legend_y = p_top + i * (label_h + 10)
        mid = legend_y + label_h // 2 + 2
        draw.line((legend_x, mid, legend_x + swatch - 4, mid), fill=colour, width=3)
        text = _fit(draw, name, label_font, legend_w - swatch)
        draw.text((legend_x + swatch, legend_y), text, fill=INK, font=label_font)


def draw_line_chart(
    draw: ImageDraw.ImageDraw,
    box: Box,
    series: Series,
    title: str,
    y_label: str,
    x_label: str = "epoch",
    x_range: tuple[float, float] | None = None,
) -> ChartFrame | None:
    """Draw a titled line chart of ``series`` (name -> [(x, y)]) inside ``box``.

    Non-finite points are skipped. With no points at all only the title and a note are drawn
    and None is returned; otherwise the returned frame maps data to pixels. ``x_range`` fixes
    the x axis (so stacked charts line up); by default it spans the data.
    """
    left, top, right, bottom = box
    title_font, label_font, tick_font = font(16), font(13), font(12)
    draw.rectangle(box, outline=GRID)
    draw.text((left + _PAD, top + _PAD), title, fill=INK, font=title_font)
    title_h = text_size(draw, title or "Ag", title_font)[1]
    clean = _finite_series(series)
    if not clean:
        note = "nothing logged"
        width, height = text_size(draw, note, label_font)
        centre = ((left + right - width) // 2, (top + bottom - height) // 2)
        draw.text(centre, note, fill=MUTED, font=label_font)
        return None

    x_range, x_ticks, y_ticks = _axes(clean, x_range)
    # Legend column on the right, as wide as the longest name (capped so the plot keeps room).
    legend_w = max(text_size(draw, name, label_font)[0] for name in clean) + _SWATCH + 6
    legend_w = min(legend_w, (right - left) // 3)
    y_text_w = max(text_size(draw, text, tick_font)[0] for _, text in y_ticks)
    tick_h = text_size(draw, "0", tick_font)[1]
    label_h = text_size(draw, y_label or "Ag", label_font)[1]
    plot_box = (
        left + _PAD + y_text_w + 8,
        top + _PAD + title_h + 10 + label_h + 8,
        right - _PAD - legend_w - 14,
        bottom - _PAD - tick_h - 10 - label_h - 8,
    )
    frame = ChartFrame(plot_box, x_range, (y_ticks[0][0], y_ticks[-1][0]))
    p_left, p_top, p_right, p_bottom = plot_box
    draw.text((p_left - y_text_w - 8, p_top - label_h - 8), y_label, fill=INK, font=label_font)
    for tick, text in y_ticks:
        y = round(frame.to_pixel(x_range[0], tick)[1])
        draw.line((p_left, y, p_right, y), fill=GRID)
        draw.line((p_left - 4, y, p_left, y), fill=INK)
        width, height = text_size(draw, text, tick_font)
        draw.text((p_left - 7 - width, y - height // 2 - 2), text, fill=INK, font=tick_font)
    for tick, text in x_ticks:
        x = round(frame.to_pixel(tick, y_ticks[0][0])[0])
        draw.line((x, p_bottom, x, p_bottom + 4), fill=INK)
        width, _ = text_size(draw, text, tick_font)
        draw.text((x - width // 2, p_bottom + 6), text, fill=INK, font=tick_font)
    width, _ = text_size(draw, x_label, label_font)
    xy = ((p_left + p_right - width) // 2, p_bottom + tick_h + 14)
    draw.text(xy, x_label, fill=INK, font=label_font)
    draw.rectangle(plot_box, outline=INK)
    _draw_series(draw, frame, clean, legend_w, label_h)
    return frame


def read_log(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch records of ``RUN_DIR/log.jsonl``, one per epoch (a resumed epoch: the last)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    source = run_dir / "log.jsonl"
    try:
        lines = source.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"{source}: no log.jsonl in the run directory") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{source}: cannot read the log ({err})") from None
    by_epoch: dict[float, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        where = f"{source}:{number}"
        if not line.strip():
            raise UserError(f"{where}: empty line (expected one JSON record per line)")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        epoch = record.get("epoch")
        if not _is_number(epoch):
            raise UserError(f"{where}: record has no numeric 'epoch'")
        by_epoch[float(epoch)] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def collect_series(records: Sequence[dict[str, Any]]) -> dict[str, Series]:
    """Split log records into the panels' series: loss, lr, rank1 and mAP (name -> points)."""
    panels: dict[str, Series] = {"loss": {}, "lr": {}, "rank1": {}, "mAP": {}}
    terms: list[str] = []
    extra_losses: list[str] = []
    for record in records:
        epoch = float(record["epoch"])
        named = record.get("loss_terms", list(LOSS_TERMS))
        terms += [str(term) for term in named if term not in terms]
        for key, value in record.items():
            if not _is_number(value):
                continue
            if key == "lr":
                panel, name = "lr", "lr"
            # The total, a term the record names (else the loss table's), or a key named as one.
            elif key == "loss" or key in terms or key.startswith("loss_") or key.endswith("_loss"):
                panel, name = "loss", "total" if key == "loss" else key
                if key != "loss" and key not in terms and key not in extra_losses:
                    extra_losses.append(key)
            elif key.endswith(METRIC_SUFFIXES):
                name, _, panel = key.rpartition("_")
            else:
                continue
            panels[panel].setdefault(name, []).append((epoch, float(value)))
    # The terms' order (total first), whatever order the keys had in the records.
    order = ["total", *terms, *extra_losses]
    panels["loss"] = {name: panels["loss"][name] for name in order if name in panels["loss"]}
    # Sorted names group a protocol's pool and BNNeck lines next to each other in the legend.
    for panel in ("rank1", "mAP"):
        panels[panel] = dict(sorted(panels[panel].items()))
    return panels


def plot_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw the training curves of ``run_dir`` into a PNG (default ``RUN_DIR/curves.png``)."""
    run_dir = Path(run_dir)
    records = read_log(run_dir)
    panels = collect_series(records)
    if not any(panels.values()):
        raise UserError(
            f"{run_dir / 'log.jsonl'}: nothing to plot (no loss, lr, *_rank1 or *_mAP values)"
        )
    # One epoch axis for every panel, so an evaluation lines up with the loss at that epoch.
    epochs = (float(records[0]["epoch"]), float(records[-1]["epoch"]))
    width, height = FIGURE_SIZE
    image = Image.new("RGB", FIGURE_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    heading = f"{run_dir.resolve().name}: {len(records)} epochs"
    draw.text((_PAD * 2, _PAD * 2), heading, fill=INK, font=font(20))
    header = _PAD * 2 + text_size(draw, heading, font(20))[1] + _PAD * 2
    half_w, half_h = (width - 3 * _PAD) // 2, (height - header - 2 * _PAD) // 2
    charts = (
        ("loss", "Loss", "loss"),
        ("lr", "Learning rate", "lr"),
        ("rank1", "Rank-1", "Rank-1 (%)"),
        ("mAP", "mAP", "mAP (%)"),
    )
    for i, (key, title, y_label) in enumerate(charts):
        x0 = _PAD + (i % 2) * (half_w + _PAD)
        y0 = header + (i // 2) * (half_h + _PAD)
        box = (x0, y0, x0 + half_w, y0 + half_h)
        draw_line_chart(draw, box, panels[key], title, y_label, x_range=epochs)
    path = Path(out) if out is not None else run_dir / CURVES_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
    except OSError as err:
        raise UserError(f"{path}: cannot write the figure ({err.strerror or err})") from None
    log.info("curves of %d epochs: %s", len(records), path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Draw a run's training curves from its log.jsonl."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Draw a run's training curves."
    )
    parser.add_argument("run_dir", help="run folder holding log.jsonl")
    parser.add_argument("--out", default=None, help=f"PNG to write (default RUN_DIR/{CURVES_NAME})")
    add_plugin_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_plugins(args.plugin)
    plot_run(args.run_dir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
