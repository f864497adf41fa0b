"""Ranked matches between two sets of your own images (e.g. infrared and visible crops).

    python -m utils.match --weights runs/x/checkpoint_latest.pth --ema \
        --query ir_crops/ --query_modality infrared \
        --gallery rgb_crops/ --gallery_modality visible --out matches/ [--topk 10] [--flip] \
        [--rerank] [--labels_from_folders]

``--query`` and ``--gallery`` take image files, folders (searched recursively, sorted) and
``.txt`` lists, as ``python -m utils.extract`` does. ``--out`` receives:

- ``matches.csv``: ``query``, ``rank`` (1-based), ``gallery``, ``distance``, one row per query
  and rank up to ``--topk``; the distance is the Euclidean distance of the L2-normalised
  features (0 to 2, smaller is more similar), or the re-ranked distance with ``--rerank``;
- ``matches.json``: the same per query, with the settings (and the metrics when labelled);
- ``features.npz``: ``query_*`` and ``gallery_*`` (``features``, ``paths``,
  ``resolved_paths``, ``modality``, with labels ``identity``) and the description of
  ``python -m utils.extract``'s ``.npz``;
- ``index.html``: a static page (no scripts, relative links, viewable offline) with a rank-list
  picture per query (``rank_lists/``), drawn by the code of ``test.py --visualize``; at most
  ``--pictures`` queries spread over the query set, ``--per_page`` per page;
- ``skipped.txt``: the unreadable images, when there were any (they are left out).

The folder is written aside and swapped in whole: it never mixes two runs (an earlier run's files
go), and an interrupted run leaves the earlier results as they were. An ``--out`` inside a
searched folder, or holding an input or other files than these, is refused.

With ``--labels_from_folders`` each image's identity is the name of its parent folder
(``<identity>/<image>``): the pictures frame each result green (same identity) or red, and
Rank-1/5/10, mAP and mINP (``eval_ranking`` of the ranked distances, no exclusion rule) are
printed and written to ``metrics.json``.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import logging
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from utils.base.cli import run_cli
from utils.base.errors import UserError
from utils.base.io import (
    check_not_input,
    check_out_dir,
    check_replaceable,
    folder_aside,
    write_text_atomic,
)
from utils.base.logger import setup_logging
from utils.engine.eval_settings import rerank_of_flags
from utils.engine.options import HelpFormatter
from utils.evaluation.metrics import summarize
from utils.evaluation.rerank import RerankSettings
from utils.evaluation.topk import Ranking, rank_features_or_rerank
from utils.evaluation.visualize import (
    MATCH_COLOUR,
    MISMATCH_COLOUR,
    QUERY_COLOUR,
    UNLABELLED_COLOUR,
    Cell,
    draw_rank_list,
    spread_indices,
)
from utils.extract import (
    EXTRACTOR_FLAGS,
    MODALITIES,
    Extraction,
    FeatureExtractor,
    checkpoint_inputs,
    extractor_parser,
    feature_arrays,
    image_files,
    none_read,
    report_skipped,
    write_npz,
)

log = logging.getLogger("match")
METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
# A file name longer than this is shortened in a picture's caption.
CAPTION_CHARS = 16
# What --out holds, all written by a run: an earlier run's files are replaced, others refused.
OUT_FILES = re.compile(
    r"matches\.csv|matches\.json|features\.npz|metrics\.json|skipped\.txt|index\.html"
    r"|page\d+\.html|rank_lists"
)


@dataclass
class Side:
    """The images of one side (query or gallery) that were read, with their features."""

    files: list[tuple[str, str]]
    modality: str
    extraction: Extraction
    identities: list[str] | None = None
    # Whether features.npz holds this side's features (an indexed gallery keeps its own).
    saved: bool = True

    @cached_property
    def paths(self) -> list[str]:
        """The kept images' paths as listed."""
        return [self.files[i][0] for i in self.extraction.kept]

    @cached_property
    def resolved(self) -> list[str]:
        """The kept images' absolute paths."""
        return [self.files[i][1] for i in self.extraction.kept]

    @cached_property
    def resolved_of(self) -> dict[str, str]:
        """Each kept image's absolute path by its path as listed."""
        return dict(zip(self.paths, self.resolved, strict=True))


def get_args_parser() -> argparse.ArgumentParser:
    """The ``python -m utils.match`` parser."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.match",
        description="Rank the gallery images for every query image with a trained checkpoint.",
        parents=[extractor_parser("match with")],
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    for role in ("query", "gallery"):
        parser.add_argument(
            f"--{role}", nargs="+", required=True, metavar="PATH", help="files, folders, lists"
        )
        parser.add_argument(
            f"--{role}_modality", choices=MODALITIES, required=True, help=f"of every {role} image"
        )
    add_result_options(parser)
    return parser


def add_result_options(parser: argparse.ArgumentParser) -> None:
    """The options of what is ranked and written (``utils.gallery search`` has them too)."""
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the results")
    parser.add_argument("--topk", type=int, default=10, help="gallery images listed per query")
    parser.add_argument(
        "--labels_from_folders",
        action="store_true",
        help="identity = parent folder name: score Rank-1/5/10, mAP, mINP; frame green/red",
    )
    parser.add_argument("--pictures", type=int, default=100, help="queries shown on the page")
    parser.add_argument("--per_page", type=int, default=20, help="queries per page")
    group = parser.add_argument_group("re-ranking")
    group.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    # None: not given (refused without --rerank); rerank_of_flags fills them in.
    for flag, kind, text in (
        ("k1", int, "k-reciprocal neighbours"),
        ("k2", int, "local query expansion"),
        ("lambda_value", float, "original-distance weight"),
    ):
        default = getattr(RerankSettings(), flag)
        group.add_argument(f"--{flag}", type=kind, help=f"{text} (default: {default})")


@dataclass(frozen=True)
class Results:
    """What is ranked and written: the options of :func:`add_result_options`, checked
    (:meth:`of_flags`: one-line errors for values that cannot work)."""

    out: Path
    topk: int
    labels_from_folders: bool
    pictures: int
    per_page: int
    rerank: RerankSettings | None

    @classmethod
    def of_flags(cls, values: Mapping[str, Any]) -> Results:
        """The options among parsed flag ``values`` (``--batch_size`` checked too)."""
        for flag in ("topk", "per_page", "batch_size"):
            if values[flag] < 1:
                raise UserError(f"--{flag} {values[flag]}: expected at least 1")
        if values["pictures"] < 0:
            raise UserError(f"--pictures {values['pictures']}: expected a number >= 0")
        flags = ("topk", "labels_from_folders", "pictures", "per_page")
        return cls(Path(values["out"]), *(values[flag] for flag in flags), rerank_of_flags(values))


def check_results_folder(
    out: Path,
    searched: dict[str, Sequence[str]],
    named: dict[str, str | None],
    images: list[tuple[str, str]],
) -> None:
    """``out`` outside every ``searched`` folder, no input (``named`` files, ``images``), and
    holding nothing but earlier results (``utils.gallery search`` checks its ``--out`` so too)."""
    check_out_dir(out)
    target = out.resolve()
    for flag, paths in searched.items():
        for given in paths:
            folder = Path(given).resolve()
            if folder.is_dir() and folder in (target, *target.parents):
                raise UserError(
                    f"--out {out}: inside the {flag} folder {given} (a later run would search "
                    "its pictures); expected a folder outside it"
                )
    check_not_input(out, named, images)
    check_replaceable(out, OUT_FILES.fullmatch, "utils.match's results", "earlier results")


def warn_shared(files: tuple[list[tuple[str, str]], ...]) -> None:
    """Warn when query images are also in the gallery: each is matched against itself."""
    shared = {real for _, real in files[0]} & {real for _, real in files[1]}
    if shared:
        log.warning(
            "--query and --gallery share %d of the %d query images: each of them is matched "
            "against itself (expected two different sets of images)",
            len(shared),
            len(files[0]),
        )


def identities_of(files: Sequence[tuple[str, str]]) -> list[str]:
    """Each image's identity under ``--labels_from_folders``: its parent folder's name."""
    return [Path(given).parent.name for given, _ in files]


def check_labels(query: list[tuple[str, str]], gallery: list[tuple[str, str]]) -> None:
    """Fail before extraction when no query identity has a gallery image to be found."""
    shared = set(identities_of(query)) & set(identities_of(gallery))
    if not shared:
        raise UserError(
            "--labels_from_folders: no query identity (parent folder name) has an image in the "
            "gallery; expected --query and --gallery to hold <identity>/<image> folders"
        )


def extract_side(
    extractor: FeatureExtractor,
    files: list[tuple[str, str]],
    modality: str,
    role: str,
    labelled: bool = False,
) -> Side:
    """Features of one side (``labelled``: with its folder-name identities); fails when none of
    its images could be read."""
    extraction = extractor([real for _, real in files], modality, on_error="skip")
    if not extraction.kept:
        raise none_read(f"--{role}", extraction.skipped)
    side = Side(files, modality, extraction)
    if labelled:
        side.identities = identities_of([files[i] for i in extraction.kept])
    return side


def rank(query: Side, gallery: Side, results: Results, inplace: bool = False) -> Ranking:
    """Each query's top-k gallery images, and Rank-k, mAP and mINP when both sides are labelled
    with identities (numbered here; see :func:`rank_features_or_rerank`; ``inplace``: normalise
    the gallery's own features)."""
    labels = None
    if query.identities is not None and gallery.identities is not None:
        names = sorted({*query.identities, *gallery.identities})
        numbers = {name: i for i, name in enumerate(names)}
        labels = tuple(np.asarray([numbers[n] for n in s.identities]) for s in (query, gallery))
    q, g = query.extraction.features, gallery.extraction.features
    return rank_features_or_rerank(q, g, results.topk, results.rerank, labels, inplace)


def match_rows(ranking: Ranking, query: Side, gallery: Side) -> list[dict[str, Any]]:
    """One entry per query: its path and its top-k gallery paths with their distances."""
    entries = []
    for row, path in enumerate(query.paths):
        nearest = ranking.indices[row].tolist()
        found = zip(nearest, ranking.distances[row].tolist(), strict=True)
        ranked = [
            {"rank": rank, "gallery": gallery.paths[g], "distance": distance}
            for rank, (g, distance) in enumerate(found, start=1)
        ]
        entry: dict[str, Any] = {"query": path, "matches": ranked}
        if query.identities is not None and gallery.identities is not None:
            entry["identity"] = query.identities[row]
            for match, g in zip(ranked, nearest, strict=True):
                match["identity"] = gallery.identities[g]
        entries.append(entry)
    return entries


def csv_text(entries: list[dict[str, Any]]) -> str:
    """``matches.csv``: query, rank, gallery, distance."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["query", "rank", "gallery", "distance"])
    for entry in entries:
        for match in entry["matches"]:
            writer.writerow([entry["query"], match["rank"], match["gallery"], match["distance"]])
    return buffer.getvalue()


def short_name(path: str) -> str:
    """A file name short enough for a caption."""
    name = Path(path).name
    return name if len(name) <= CAPTION_CHARS else name[: CAPTION_CHARS - 1] + "~"


def picture_cells(entry: dict[str, Any], query: Side, gallery: Side, row: int) -> list[Cell]:
    """The framed images of one query's rank list, with distances in the captions."""
    labelled = "identity" in entry
    first = f"id {entry['identity']}" if labelled else short_name(entry["query"])
    cells = [Cell(query.resolved[row], QUERY_COLOUR, ("query", query.modality, first))]
    resolved = gallery.resolved_of
    for match in entry["matches"]:
        colour = UNLABELLED_COLOUR
        if labelled:
            colour = MATCH_COLOUR if match["identity"] == entry["identity"] else MISMATCH_COLOUR
        last = f"id {match['identity']}" if labelled else short_name(match["gallery"])
        lines = (f"rank {match['rank']}", f"d {match['distance']:.3f}", last)
        cells.append(Cell(resolved[match["gallery"]], colour, lines))
    return cells


def page_html(title: str, body: list[str]) -> str:
    """A self-contained HTML page (no scripts, no links outside the output folder)."""
    style = (
        "body{font-family:sans-serif;margin:1.5em;color:#222}img{max-width:100%}"
        "nav a{margin-right:.6em}figure{margin:1.2em 0}figcaption{font-size:.9em}"
    )
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{style}</style>'
    return (
        f"<!DOCTYPE html>\n<html><head>{head}</head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def page_name(page: int) -> str:
    """The file of page ``page`` (0-based): ``index.html``, then ``page2.html``, ..."""
    return "index.html" if page == 0 else f"page{page + 1}.html"


def draw_pictures(
    out: Path, entries: list[dict[str, Any]], query: Side, gallery: Side, count: int
) -> list[int]:
    """Rank-list PNGs of ``count`` queries spread over the list, into ``out/rank_lists``."""
    shown = spread_indices(len(entries), count)
    folder = out / "rank_lists"
    folder.mkdir()
    for row in shown:
        title = f"query {row + 1} of {len(entries)}: {entries[row]['query']}"
        image = draw_rank_list(picture_cells(entries[row], query, gallery, row), title)
        image.save(folder / f"query{row + 1:05d}.png", format="PNG")
    return shown


def write_pages(
    out: Path, entries: list[dict[str, Any]], shown: list[int], per_page: int, heading: list[str]
) -> None:
    """``index.html`` and its following pages, ``per_page`` pictured queries each."""
    pages = max(1, math.ceil(len(shown) / per_page))
    nav = " ".join(f'<a href="{page_name(p)}">{p + 1}</a>' for p in range(pages))
    intro = [f"<h1>{html.escape(heading[0])}</h1>"] + [
        f"<p>{html.escape(x)}</p>" for x in heading[1:]
    ]
    for page in range(pages):
        body = [*intro, f"<nav>pages: {nav}</nav>"] if pages > 1 else list(intro)
        for row in shown[page * per_page : (page + 1) * per_page]:
            entry = entries[row]
            name = f"rank_lists/query{row + 1:05d}.png"
            listed = "; ".join(
                f"{m['rank']}. {m['gallery']} ({m['distance']:.4f})" for m in entry["matches"]
            )
            body.append(
                f'<figure><img src="{html.escape(name)}" alt="rank list of query {row + 1}">'
                f"<figcaption>{html.escape(entry['query'])}: {html.escape(listed)}</figcaption>"
                "</figure>"
            )
        write_text_atomic(out / page_name(page), page_html(heading[0], body))


def side_arrays(extractor: FeatureExtractor, side: Side, role: str) -> dict[str, np.ndarray]:
    """One side's ``features.npz`` arrays, prefixed with ``role``; the description unprefixed."""
    arrays = feature_arrays(extractor, side.files, side.extraction, side.modality)
    described = extractor.describe()
    named = {k: v for k, v in arrays.items() if k in described}
    named |= {f"{role}_{k}": v for k, v in arrays.items() if k not in described}
    if side.identities is not None:
        named[f"{role}_identity"] = np.asarray(side.identities, dtype=np.str_).reshape(-1)
    return named


def write_results(
    results: Results,
    extractor: FeatureExtractor,
    sides: tuple[Side, Side],
    entries: list[dict[str, Any]],
    settings: dict[str, Any],
    metrics: dict[str, float] | None,
    title: str,
) -> None:
    """Write every file of ``--out``.

    The folder is written aside and swapped in whole for an earlier one (a failure or a stop
    leaves that one as it was).
    """
    query, gallery, out = *sides, results.out
    heading = [
        title,
        f"{settings['distance']}; top {settings['topk']}; every query is in matches.csv",
    ]
    if metrics is not None:
        heading.append(", ".join(f"{k} {metrics[k]:.2f}" for k in METRICS if k in metrics))
    skipped = {
        side.files[i][0]: why for side in sides for i, why in side.extraction.skipped.items()
    }
    payload = {**settings, "metrics": metrics, "queries": entries}
    arrays = side_arrays(extractor, query, "query")
    if gallery.saved:
        arrays |= side_arrays(extractor, gallery, "gallery")
    try:
        with folder_aside(out) as folder:
            write_text_atomic(folder / "matches.csv", csv_text(entries))
            write_text_atomic(folder / "matches.json", json.dumps(payload, indent=1) + "\n")
            write_npz(folder / "features.npz", arrays, "--out")
            if metrics is not None:
                write_text_atomic(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            shown = draw_pictures(folder, entries, query, gallery, results.pictures)
            write_pages(folder, entries, shown, results.per_page, heading)
            report_skipped(
                skipped, folder / "skipped.txt", "query and gallery", out / "skipped.txt"
            )
    except OSError as err:
        raise UserError(f"--out {out}: cannot write ({err.strerror or err})") from None


def publish(
    results: Results,
    extractor: FeatureExtractor,
    sides: tuple[Side, Side],
    ranking: Ranking,
    where: tuple[str, dict[str, Any]] = ("", {}),
) -> None:
    """Write ``results.out`` from ``ranking``, print the metrics (when labelled) and say where
    the results are (``where``: the gallery's place in the title, and settings to add)."""
    query, gallery = sides
    entries = match_rows(ranking, query, gallery)
    metrics = None if ranking.metrics is None else summarize(*ranking.metrics)
    rerank = results.rerank
    what = "re-ranked distance" if rerank else "Euclidean distance of L2-normalised features"
    settings = {**extractor.describe(), "distance": what, "topk": results.topk}
    settings |= {"rerank": rerank.as_dict() if rerank else False, **where[1]}
    title = f"{extractor.weights}{' (EMA)' if extractor.ema else ''}: {len(entries)} "
    title += f"{query.modality} queries against {len(gallery.paths)} {gallery.modality} images"
    title += where[0]
    write_results(results, extractor, sides, entries, settings, metrics, title)
    if metrics is not None:  # the Markdown table of --labels_from_folders
        cells = " | ".join(f"{metrics[key]:.2f}" for key in METRICS if key in metrics)
        header = "| Rank-1 | Rank-5 | Rank-10 | mAP | mINP |\n|---|---|---|---|---|"
        table = f"{title}\n{header}\n| {cells} |"
        log.info("results:\n%s", table)
        sys.stdout.write(table + "\n")
    log.info("wrote %s (open %s)", results.out, results.out / "index.html")


def main(argv: Sequence[str] | None = None) -> int:
    """Extract both sides' features, rank the gallery for every query and write the results."""
    args = get_args_parser().parse_args(argv)
    setup_logging()
    results = Results.of_flags(vars(args))
    files = image_files(args.query, "--query"), image_files(args.gallery, "--gallery")
    # Fail before any work unless --out can be replaced whole without touching an input.
    searched = {"--query": args.query, "--gallery": args.gallery}
    checkpoint = checkpoint_inputs(args.weights, args.config_path)
    check_results_folder(results.out, searched, checkpoint, [*files[0], *files[1]])
    warn_shared(files)
    if args.labels_from_folders:
        check_labels(*files)
    extractor = FeatureExtractor(**{flag: getattr(args, flag) for flag in EXTRACTOR_FLAGS})
    labelled = args.labels_from_folders
    query = extract_side(extractor, files[0], args.query_modality, "query", labelled)
    gallery = extract_side(extractor, files[1], args.gallery_modality, "gallery", labelled)
    publish(results, extractor, (query, gallery), rank(query, gallery, results))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
