"""Rank lists as pictures: a query image next to its top-ranked gallery images.

Each gallery thumbnail gets a green frame when it shows the query's identity and a red one when it
does not, with its modality, identity, camera (when known) and rank written underneath. Ranking is
the evaluation's (``pairwise_distance`` on one feature kind, ties broken by gallery order), with
the protocol's exclusion rule applied when given. :func:`draw_rank_list` draws any row of framed,
captioned images: ``test.py --visualize`` and the page of ``python -m utils.match`` both use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from data.dataset import ExclusionRule
from utils.base.errors import UserError
from utils.evaluation.draw import BACKGROUND, INK, Box, font, text_size
from utils.evaluation.evaluate import FEATURES, Features
from utils.evaluation.metrics import pairwise_distance

log = logging.getLogger(__name__)

MATCH_COLOUR = (44, 160, 44)
MISMATCH_COLOUR = (214, 39, 40)
QUERY_COLOUR = (70, 70, 70)
UNLABELLED_COLOUR = (160, 160, 160)  # a result whose identity is unknown
PAD_COLOUR = (235, 235, 235)  # fills the sides of a thumbnail whose aspect differs


@dataclass(frozen=True)
class RankListLayout:
    """Geometry of a rank-list picture; slot 0 is the query, slot i the i-th gallery result."""

    thumb: tuple[int, int] = (96, 192)  # (width, height), the usual 1:2 person crop
    frame: int = 5
    gap: int = 8
    query_gap: int = 30  # sets the query apart from its results
    margin: int = 12
    title_h: int = 30
    caption_lines: int = 3
    line_h: int = 15

    def frame_box(self, slot: int) -> Box:
        """Outer corners (left, top, right, bottom, inclusive) of the frame around ``slot``."""
        cell_w = self.thumb[0] + 2 * self.frame
        left = self.margin + slot * (cell_w + self.gap) + (self.query_gap - self.gap if slot else 0)
        top = self.margin + self.title_h
        return left, top, left + cell_w - 1, top + self.thumb[1] + 2 * self.frame - 1

    def size(self, slots: int) -> tuple[int, int]:
        """Picture (width, height) holding ``slots`` framed images and their captions."""
        right, bottom = self.frame_box(max(slots, 1) - 1)[2:]
        return right + 1 + self.margin, bottom + 6 + self.caption_lines * self.line_h + self.margin


def spread_indices(n: int, k: int) -> list[int]:
    """``k`` distinct indices spread evenly over ``range(n)`` (all of them when k >= n)."""
    if k < 0:
        raise UserError(f"the number of rank lists must be >= 0, got {k}")
    if k >= n:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, num=k).round()]


def rank_gallery(
    distances: np.ndarray,
    query_camid: int | None = None,
    gallery_camids: np.ndarray | None = None,
    exclusion: ExclusionRule | None = None,
    query_pid: int | None = None,
    gallery_pids: np.ndarray | None = None,
) -> np.ndarray:
    """Gallery indices by ascending distance (stable), without those ``exclusion`` ignores."""
    order = np.argsort(np.asarray(distances), kind="stable")
    if exclusion is None or not exclusion.needs_cameras:
        return order
    if query_camid is None or gallery_camids is None:
        raise UserError("the exclusion rule needs camera ids for query and gallery")
    if exclusion.same_identity_same_camera and (query_pid is None or gallery_pids is None):
        raise UserError("the exclusion rule needs identities for query and gallery")
    g_pids = np.asarray(gallery_pids) if gallery_pids is not None else np.zeros(order.size)
    pid = -1 if query_pid is None else int(query_pid)
    ignored = exclusion.ignored(pid, int(query_camid), g_pids, np.asarray(gallery_camids))
    return order[~ignored[order]]


def _thumbnail(path: str, size: tuple[int, int]) -> Image.Image:
    try:
        with Image.open(path) as image:
            return ImageOps.pad(image.convert("RGB"), size, color=PAD_COLOUR)
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"{path}: cannot read the image ({err})") from None


@dataclass(frozen=True)
class Cell:
    """One framed image of a rank list: the file, its frame colour and its caption lines."""

    path: str
    colour: tuple[int, int, int]
    lines: tuple[str, ...]


def _cell(features: Features, index: int, colour: tuple[int, int, int], *lines: str) -> Cell:
    """Image ``index`` of ``features`` captioned with ``lines``, its identity and camera."""
    camera = "" if features.camids is None else f"  cam {int(features.camids[index])}"
    return Cell(features.paths[index], colour, (*lines, f"id {int(features.pids[index])}{camera}"))


def draw_rank_list(
    cells: Sequence[Cell], title: str, layout: RankListLayout | None = None
) -> Image.Image:
    """The picture of ``cells`` in a row (the query first, set apart) under ``title``."""
    layout = layout or RankListLayout()
    title_font, caption_font = font(15), font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width, height = layout.size(len(cells))
    width = max(width, 2 * layout.margin + text_size(probe, title, title_font)[0])
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((layout.margin, layout.margin), title, fill=INK, font=title_font)
    for slot, cell in enumerate(cells):
        box = layout.frame_box(slot)
        draw.rectangle(box, fill=cell.colour)
        thumb = _thumbnail(cell.path, layout.thumb)
        image.paste(thumb, (box[0] + layout.frame, box[1] + layout.frame))
        for line_no, line in enumerate(cell.lines[: layout.caption_lines]):
            text_w = text_size(draw, line, caption_font)[0]
            x = (box[0] + box[2] + 1 - text_w) // 2
            y = box[3] + 6 + line_no * layout.line_h
            draw.text((x, y), line, fill=INK, font=caption_font)
    return image


def rank_list_image(
    query: Features,
    gallery: Features,
    index: int,
    ranked: Sequence[int],
    query_label: str = "infrared",
    gallery_label: str = "visible",
    title: str = "",
    layout: RankListLayout | None = None,
) -> Image.Image:
    """The picture of query ``index`` followed by the gallery images ``ranked`` (best first)."""
    query_pid = int(query.pids[index])
    cells = [_cell(query, index, QUERY_COLOUR, "query", query_label)]
    for rank, g in enumerate(ranked, start=1):
        colour = MATCH_COLOUR if int(gallery.pids[g]) == query_pid else MISMATCH_COLOUR
        cells.append(_cell(gallery, int(g), colour, f"rank {rank}", gallery_label))
    return draw_rank_list(cells, title or f"query {index}", layout)


def _check_features(features: Features, role: str) -> None:
    count = len(features.pids)
    for what, values in (("image paths", features.paths), ("camera ids", features.camids)):
        if values is not None and len(values) != count:
            raise UserError(f"{role} features carry {len(values)} {what} for {count} images")


def save_rank_lists(
    query: Features,
    gallery: Features,
    out_dir: str | os.PathLike[str],
    k: int,
    query_label: str = "infrared",
    gallery_label: str = "visible",
    kind: str = "bnneck",
    top: int = 10,
    exclusion: ExclusionRule | None = None,
) -> list[Path]:
    """Write one rank-list PNG for each of ``k`` queries spread evenly over the query set."""
    if k < 0:
        raise UserError(f"the number of rank lists must be >= 0, got {k}")
    if top < 1:
        raise UserError(f"the rank list must show at least one gallery image, got top={top}")
    if kind not in FEATURES:
        raise UserError(f"unknown feature kind {kind!r}; expected one of {', '.join(FEATURES)}")
    _check_features(query, "query")
    _check_features(gallery, "gallery")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out_dir}: cannot create the output folder ({err.strerror})") from None
    # Queries are usually sorted by identity, so the first k would show one or two people.
    indices = spread_indices(len(query.pids), k)
    if not indices:
        return []
    rows = torch.as_tensor(indices, dtype=torch.long, device=query.get(kind).device)
    distmat = pairwise_distance(query.get(kind)[rows], gallery.get(kind))
    rule = f", {exclusion.describe()}" if exclusion is not None and exclusion.needs_cameras else ""
    written = []
    for row, index in enumerate(indices):
        camid = None if query.camids is None else int(query.camids[index])
        pid = int(query.pids[index])
        order = rank_gallery(distmat[row], camid, gallery.camids, exclusion, pid, gallery.pids)
        title = (
            f"query {index} ({query_label}, id {pid}) against the "
            f"{gallery_label} gallery: {kind} features{rule}"
        )
        image = rank_list_image(
            query, gallery, index, order[:top].tolist(), query_label, gallery_label, title
        )
        path = out_dir / f"query{index:05d}_id{pid}.png"
        try:
            image.save(path, format="PNG")
        except OSError as err:
            raise UserError(f"{path}: cannot write the rank list ({err.strerror or err})") from None
        written.append(path)
    log.info("%d rank lists (top %d, %s features) in %s", len(written), top, kind, out_dir)
    return written
