"""``python -m utils.gallery add | info | remove | search``: the commands on a gallery index."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from utils.base.errors import UserError
from utils.base.io import check_out_dir
from utils.base.lock import RunLock
from utils.base.logger import setup_logging
from utils.engine.options import HelpFormatter
from utils.evaluation.topk import Ranking, unit_rows
from utils.extract import (
    EXTRACTOR_FLAGS,
    MODALITIES,
    Extraction,
    FeatureExtractor,
    extractor_parser,
    image_files,
    report_skipped,
)
from utils.gallery import approximate
from utils.gallery.settings import (
    calibration_record,
    check_settings,
    checkpoint_source,
    feature_settings,
    index_extractor,
)
from utils.gallery.store import HEADER, GalleryIndex, Record, stat_record
from utils.match import (
    Results,
    Side,
    add_result_options,
    check_labels,
    check_results_folder,
    extract_side,
    identities_of,
    publish,
    rank,
)
from utils.precision import PRECISIONS

log = logging.getLogger("gallery")
SKIPPED = "skipped.txt"


# --------------------------------------------------------------------------------------------
# add
# --------------------------------------------------------------------------------------------
def open_for_adding(folder: Path, extractor: FeatureExtractor, modality: str) -> GalleryIndex:
    """The index in ``folder``, created with this run's settings, or refused when they differ."""
    settings = feature_settings(extractor)
    if not (folder / HEADER).exists():
        header = {"modality": modality, "dim": extractor.dim, "settings": settings}
        header |= {"checkpoint": checkpoint_source(extractor), **calibration_record(extractor)}
        return GalleryIndex.create(folder, header)
    index = GalleryIndex.open(folder)
    stored = index.header["modality"]
    if stored != modality:
        raise UserError(f"--index {folder} holds {stored} images; --modality is {modality}")
    check_settings(index.header["settings"], settings, f"--index {folder}", extractor.weights)
    return index


def check_index_folder(folder: Path) -> None:
    """Fail before any work unless ``folder`` is an index, or new, or empty."""
    check_out_dir(folder, "--index")
    if (
        folder.is_dir()
        and not (folder / HEADER).exists()
        and any(p.name != ".lock" for p in folder.iterdir())
    ):
        raise UserError(
            f"--index {folder}: not a gallery index (no {HEADER}) and not empty; expected an "
            "index, a new folder or an empty one"
        )


def pending(files: list[tuple[str, str]], indexed: dict[str, Record]) -> list[Record]:
    """The images to extract: new ones and those whose size or modification time changed."""
    todo: dict[str, Record] = {}
    for path, resolved in files:
        now = stat_record(path, resolved) or Record(path, resolved, -1, -1)
        known = indexed.get(resolved)
        if resolved not in todo and (
            known is None or (known.size, known.mtime_ns) != (now.size, now.mtime_ns)
        ):
            todo[resolved] = now
    return list(todo.values())


def extract_batches(
    index: GalleryIndex, extractor: FeatureExtractor, todo: list[Record], modality: str
) -> dict[str, str]:
    """Extract ``todo`` a batch at a time, each batch committed as a shard, then merge those
    shards (one per run keeps the file count low); returns the unreadable images."""
    shards, skipped = [], {}
    with tqdm(total=len(todo), desc="add", unit="img", disable=None) as bar:
        for start in range(0, len(todo), extractor.batch_size):
            batch = todo[start : start + extractor.batch_size]
            extraction = extractor([r.resolved for r in batch], modality, on_error="skip")
            skipped |= {batch[i].path: why for i, why in extraction.skipped.items()}
            if extraction.kept:
                kept = [batch[i] for i in extraction.kept]
                shards.append(index.append(kept, extraction.features.numpy()))
            bar.update(len(batch))
    index.merge(shards)
    return skipped


def add(index: str, images: Sequence[str], modality: str, **extractor_flags: Any) -> int:
    """Extract the images not yet indexed (or changed) into the index (``extractor_flags``:
    ``FeatureExtractor``'s arguments, by their flag names)."""
    if extractor_flags["batch_size"] < 1:
        raise UserError(f"--batch_size {extractor_flags['batch_size']}: expected at least 1")
    folder = Path(index)
    check_index_folder(folder)
    files = image_files(images, "--images")
    int8 = extractor_flags["precision"] == "int8" and not extractor_flags["calibration"]
    if int8 and (folder / HEADER).exists():
        # An int8 index keeps its calibration images: more images are quantized alike.
        extractor_flags["calibration"] = GalleryIndex.open(folder).header.get("calibration")
    extractor = FeatureExtractor(**{flag: extractor_flags[flag] for flag in EXTRACTOR_FLAGS})
    with RunLock(folder):
        index = open_for_adding(folder, extractor, modality)
        index.tidy()
        todo = pending(files, {record.resolved: record for record in index.records()})
        log.info("%d of %d images to extract into %s", len(todo), len(files), folder)
        skipped = extract_batches(index, extractor, todo, modality)
        index.tidy()  # drops the out-of-date records of changed images
        (folder / SKIPPED).unlink(missing_ok=True)
        if todo:
            report_skipped(skipped, folder / SKIPPED, modality)
        total = len(index.records())
    done = (len(todo) - len(skipped), len(files) - len(todo), folder, total)
    log.info("added %d images (%d already indexed); %s holds %d", *done)
    return 0


# --------------------------------------------------------------------------------------------
# info and remove
# --------------------------------------------------------------------------------------------
def info(index: str) -> int:
    """Print what the index holds and how it was made."""
    gallery = GalleryIndex.open(index)
    records = gallery.records()
    settings, source = gallery.header["settings"], gallery.header["checkpoint"]
    size = gallery.disk_bytes()
    per_image = f", {size / len(records):,.0f} bytes per image" if records else ""
    height, width = settings["img_size"]
    lines = [
        f"index: {gallery.folder}",
        f"images: {len(records)} {gallery.header['modality']}",
        f"features: {gallery.dim}-d float32, {settings['feature']}, flip {settings['flip']}, "
        f"images resized to {height}x{width}",
        f"checkpoint: {source['path']} ({settings['weights']} weights, sha256 "
        f"{settings['weights_sha256'][:12]})",
        f"disk: {size / 2**20:,.1f} MiB in {len(gallery.shards())} shard(s){per_image}",
    ]
    if "precision" in settings:
        calibrated = (
            f" (calibration: {settings['calibration']})" if "calibration" in settings else ""
        )
        lines.insert(3, f"precision: {settings['precision']}{calibrated}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def removal_targets(paths: Sequence[str]) -> list[str]:
    """The paths of ``--images`` (files, folders, ``.txt`` lists), absolute."""
    targets = []
    for given in paths:
        path = Path(given)
        if path.suffix.lower() == ".txt" and path.is_file():
            try:
                lines = path.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise UserError(f"--images {path}: cannot read the list ({err})") from None
            targets += [
                str((path.parent / line.strip()).resolve()) for line in lines if line.strip()
            ]
        else:
            targets.append(str(path.resolve()))
    return targets


def remove(index: str, images: Sequence[str]) -> int:
    """Drop the images named (or under the folders named) from the index."""
    gallery = GalleryIndex.open(index)
    targets = removal_targets(images)
    folders = tuple(target.rstrip(os.sep) + os.sep for target in targets)
    with RunLock(gallery.folder):
        gallery.tidy()
        chosen = set(targets)
        drop = {
            r.resolved
            for r in gallery.records()
            if r.resolved in chosen or r.resolved.startswith(folders)
        }
        if not drop:
            raise UserError(
                f"--images: none of the {len(targets)} paths is in --index {gallery.folder}"
            )
        removed = gallery.remove(drop)
        total = len(gallery.records())
    log.info("removed %d images; %s holds %d", removed, gallery.folder, total)
    return 0


# --------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------
def gallery_side(records: list[Record], features: Any, modality: str, labelled: bool) -> Side:
    """The indexed gallery as ``utils.match``'s gallery (its features stay out of features.npz)."""
    files = [(record.path, record.resolved) for record in records]
    extraction = Extraction(features, list(range(len(records))))
    side = Side(files, modality, extraction, saved=False)
    if labelled:
        side.identities = identities_of(files)
    return side


def normalise_in_place(features: np.ndarray) -> np.ndarray:
    """Loaded features normalised as exact search normalises them, in their own memory."""
    return unit_rows(torch.from_numpy(features), inplace=True).numpy()


@dataclass(frozen=True)
class Search:
    """What ``search`` is asked: the queries, the index, how to extract and how to search."""

    index: str
    images: tuple[str, ...]
    modality: str
    results: Results
    weights: str | None
    batch_size: int
    device: str | None
    precision: str | None
    calibration: tuple[str, ...] | None
    approximate: bool
    probes: int

    def __post_init__(self) -> None:
        if self.probes < 1:
            raise UserError(f"--probes {self.probes}: expected at least 1")
        if self.approximate and (self.results.rerank or self.results.labels_from_folders):
            flag = "--rerank" if self.results.rerank else "--labels_from_folders"
            raise UserError(f"--approximate: {flag} needs every query's full ranking; drop one")
        if self.approximate:
            approximate.faiss_module()

    @classmethod
    def of_flags(cls, values: dict[str, Any]) -> Search:
        """The search of parsed flag ``values``, checked (``utils.match``'s checks first)."""
        results = Results.of_flags(values)
        flags = ("weights", "batch_size", "device", "precision", "calibration", "approximate")
        given = {flag: values[flag] for flag in flags} | {"probes": values["probes"]}
        listed = {name: tuple(values[name] or ()) or None for name in ("images", "calibration")}
        given |= listed | {"index": values["index"], "modality": values["modality"]}
        return cls(results=results, **given)


def search_extractor(request: Search, index: GalleryIndex) -> FeatureExtractor:
    """The index's extractor: its weights, settings and precision (int8: its calibration)."""
    calibration = list(request.calibration) if request.calibration else None
    return index_extractor(
        index.header,
        f"--index {index.folder}",
        request.weights,
        request.batch_size,
        request.device,
        request.precision,
        calibration,
    )


def rank_queries(
    request: Search, index: GalleryIndex, query: Side, gallery: Side, found: Any
) -> tuple[Ranking, str]:
    """Exact (or approximate) ranking of the index for ``query``, and how it was searched."""
    results = request.results
    if not request.approximate:
        # The gallery's loaded features are this run's own: normalised where they are.
        return rank(query, gallery, results, inplace=True), "exact"
    unit = unit_rows(query.extraction.features).numpy()
    probed = min(request.probes, found.lists)
    how = f"approximate (faiss IVF-Flat, {found.lists} lists, {probed} probed)"
    return approximate.search(found, unit, results.topk, request.probes), how


def search(request: Search) -> int:
    """Rank the index's images for every query image and write what ``utils.match`` writes."""
    results = request.results
    index = GalleryIndex.open(request.index)
    files = image_files(request.images, "--images")
    searched = {"--images": request.images, "--index": [request.index]}
    weights = request.weights or index.header["checkpoint"]["path"]
    check_results_folder(results.out, searched, {"the index's checkpoint": weights}, files)
    extractor = search_extractor(request, index)
    found = None
    if request.approximate:
        found = approximate.load_or_build(index, normalise_in_place)
        records, features = found.records, torch.empty((len(found.records), 0))
    else:
        records, loaded = index.load()
        features = torch.from_numpy(loaded)
    if not records:
        raise UserError(f"--index {index.folder} holds no images; add some first")
    labelled = results.labels_from_folders
    gallery = gallery_side(records, features, index.header["modality"], labelled)
    if labelled:
        check_labels(files, gallery.files)
    query = extract_side(extractor, files, request.modality, "images", labelled)
    ranking, how = rank_queries(request, index, query, gallery, found)
    where = (f" of {index.folder}", {"index": str(index.folder), "search": how})
    publish(results, extractor, (query, gallery), ranking, where)
    return 0


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    """The ``python -m utils.gallery`` parser and its four commands."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.gallery",
        description="A gallery index: extract images once, add as they come, search any day.",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, parents: list[argparse.ArgumentParser]) -> Any:
        shown = {"help": text, "description": text, "formatter_class": HelpFormatter}
        sub = commands.add_parser(name, parents=parents, allow_abbrev=False, **shown)
        sub.add_argument("--index", required=True, metavar="DIR", help="the gallery index folder")
        return sub

    adding = command("add", "extract the images not yet indexed", [extractor_parser("index with")])
    adding.add_argument(
        "--images", nargs="+", required=True, metavar="PATH", help="files, folders, .txt lists"
    )
    adding.add_argument("--modality", choices=MODALITIES, required=True, help="of every image")
    command("info", "print what the index holds", [])
    dropping = command("remove", "drop images from the index", [])
    listed = "files, folders (everything under them) and .txt lists of paths"
    dropping.add_argument("--images", nargs="+", required=True, metavar="PATH", help=listed)
    searching = command("search", "rank the index's images for query images", [])
    searching.add_argument(
        "--images", nargs="+", required=True, metavar="PATH", help="query files, folders, lists"
    )
    searching.add_argument(
        "--modality", choices=MODALITIES, required=True, help="of every query image"
    )
    add_result_options(searching)
    group = searching.add_argument_group("features")
    group.add_argument(
        "--weights",
        default=None,
        help="the index's checkpoint where it is now (default: where it was)",
    )
    group.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA if any)")
    group.add_argument("--precision", choices=PRECISIONS, help="default: the index's")
    group.add_argument(
        "--calibration", nargs="+", metavar="PATH", help="int8 (default: the index's images)"
    )
    group = searching.add_argument_group("approximate search")
    group.add_argument(
        "--approximate", action="store_true", help="faiss inverted lists (pip install faiss-cpu)"
    )
    group.add_argument("--probes", type=int, default=32, help="lists searched per query")
    return parser


# The commands whose flags are their arguments, by the same names.
COMMANDS: dict[str, Any] = {"add": add, "info": info, "remove": remove}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one gallery command."""
    values = vars(get_args_parser().parse_args(argv))
    setup_logging()
    command = values.pop("command")
    if command == "search":
        return search(Search.of_flags(values))
    return COMMANDS[command](**values)
