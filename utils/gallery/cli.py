"""``python -m utils.gallery add | info | remove | search``: the commands on a gallery index."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
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
from utils.evaluation.rerank import RerankSettings
from utils.evaluation.topk import unit_rows
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
    check_settings,
    checkpoint_source,
    feature_settings,
    index_extractor,
)
from utils.gallery.store import HEADER, GalleryIndex, Record, stat_record
from utils.match import (
    Side,
    add_result_options,
    check_args,
    check_labels,
    check_results_folder,
    extract_side,
    identities_of,
    match_rows,
    rank,
    report,
    score,
    write_results,
)

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
        return GalleryIndex.create(folder, header | {"checkpoint": checkpoint_source(extractor)})
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


def add(args: argparse.Namespace) -> int:
    """Extract the images not yet indexed (or changed) into the index."""
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: expected at least 1")
    folder = Path(args.index)
    check_index_folder(folder)
    files = image_files(args.images, "--images")
    extractor = FeatureExtractor(**{flag: getattr(args, flag) for flag in EXTRACTOR_FLAGS})
    with RunLock(folder):
        index = open_for_adding(folder, extractor, args.modality)
        index.tidy()
        todo = pending(files, {record.resolved: record for record in index.records()})
        log.info("%d of %d images to extract into %s", len(todo), len(files), folder)
        skipped = extract_batches(index, extractor, todo, args.modality)
        index.tidy()  # drops the out-of-date records of changed images
        (folder / SKIPPED).unlink(missing_ok=True)
        if todo:
            report_skipped(skipped, folder / SKIPPED, args.modality)
        total = len(index.records())
    done = (len(todo) - len(skipped), len(files) - len(todo), folder, total)
    log.info("added %d images (%d already indexed); %s holds %d", *done)
    return 0


# --------------------------------------------------------------------------------------------
# info and remove
# --------------------------------------------------------------------------------------------
def info(args: argparse.Namespace) -> int:
    """Print what the index holds and how it was made."""
    index = GalleryIndex.open(args.index)
    records = index.records()
    settings, source = index.header["settings"], index.header["checkpoint"]
    size = index.disk_bytes()
    per_image = f", {size / len(records):,.0f} bytes per image" if records else ""
    height, width = settings["img_size"]
    lines = [
        f"index: {index.folder}",
        f"images: {len(records)} {index.header['modality']}",
        f"features: {index.dim}-d float32, {settings['feature']}, flip {settings['flip']}, "
        f"images resized to {height}x{width}",
        f"checkpoint: {source['path']} ({settings['weights']} weights, sha256 "
        f"{settings['weights_sha256'][:12]})",
        f"disk: {size / 2**20:,.1f} MiB in {len(index.shards())} shard(s){per_image}",
    ]
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


def remove(args: argparse.Namespace) -> int:
    """Drop the images named (or under the folders named) from the index."""
    index = GalleryIndex.open(args.index)
    targets = removal_targets(args.images)
    folders = tuple(target.rstrip(os.sep) + os.sep for target in targets)
    with RunLock(index.folder):
        index.tidy()
        chosen = set(targets)
        drop = {
            r.resolved
            for r in index.records()
            if r.resolved in chosen or r.resolved.startswith(folders)
        }
        if not drop:
            raise UserError(
                f"--images: none of the {len(targets)} paths is in --index {index.folder}"
            )
        removed = index.remove(drop)
        total = len(index.records())
    log.info("removed %d images; %s holds %d", removed, index.folder, total)
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


def check_search_args(args: argparse.Namespace) -> RerankSettings | None:
    """``utils.match``'s checks, and what approximate search cannot do; returns the re-ranking
    the flags ask for."""
    rerank = check_args(vars(args))
    if args.probes < 1:
        raise UserError(f"--probes {args.probes}: expected at least 1")
    if args.approximate and (args.rerank or args.labels_from_folders):
        flag = "--rerank" if args.rerank else "--labels_from_folders"
        raise UserError(f"--approximate: {flag} needs every query's full ranking; drop one")
    if args.approximate:
        approximate.faiss_module()
    return rerank


def search(args: argparse.Namespace) -> int:
    """Rank the index's images for every query image and write what ``utils.match`` writes."""
    rerank = check_search_args(args)
    out = Path(args.out)
    index = GalleryIndex.open(args.index)
    files = image_files(args.images, "--images")
    searched = {"--images": args.images, "--index": [args.index]}
    weights = args.weights or index.header["checkpoint"]["path"]
    check_results_folder(out, searched, {"the index's checkpoint": weights}, files)
    where = f"--index {index.folder}"
    extractor = index_extractor(index.header, where, args.weights, args.batch_size, args.device)
    if args.approximate:
        found = approximate.load_or_build(index, normalise_in_place)
        records, features = found.records, torch.empty((len(found.records), 0))
    else:
        records, loaded = index.load()
        features = torch.from_numpy(loaded)
    if not records:
        raise UserError(f"{where} holds no images; add some first")
    gallery = gallery_side(records, features, index.header["modality"], args.labels_from_folders)
    if args.labels_from_folders:
        check_labels(files, gallery.files)
    query = extract_side(extractor, files, args.modality, "images")
    if args.labels_from_folders:
        query.identities = identities_of([query.files[i] for i in query.extraction.kept])
    if args.approximate:
        unit = unit_rows(query.extraction.features).numpy()
        ranking = approximate.search(found, unit, args.topk, args.probes)
        probed = min(args.probes, found.lists)
        how = f"approximate (faiss IVF-Flat, {found.lists} lists, {probed} probed)"
    else:
        # The gallery's loaded features are this run's own: normalised where they are.
        ranking = rank(query, gallery, args.topk, rerank, inplace=True)
        how = "exact"
    entries = match_rows(ranking, query, gallery)
    what = "re-ranked distance" if rerank else "Euclidean distance of L2-normalised features"
    settings = {**extractor.describe(), "distance": what, "topk": args.topk}
    settings |= {
        "rerank": rerank.as_dict() if rerank else False,
        "index": str(index.folder),
        "search": how,
    }
    ema = " (EMA)" if settings["weights"] == "ema" else ""
    title = f"{extractor.weights}{ema}: {len(entries)} {args.modality} queries against "
    title += f"{len(records)} {gallery.modality} images of {index.folder}"
    metrics = score(ranking)
    pages = (title, args.pictures, args.per_page)
    write_results(out, extractor, (query, gallery), entries, settings, metrics, pages)
    report(out, metrics, title)
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
        sub = commands.add_parser(
            name, help=text, description=text, parents=parents, formatter_class=HelpFormatter,
            allow_abbrev=False,
        )  # fmt: skip
        sub.add_argument("--index", required=True, metavar="DIR", help="the gallery index folder")
        return sub

    adding = command("add", "extract the images not yet indexed", [extractor_parser("index with")])
    adding.add_argument(
        "--images", nargs="+", required=True, metavar="PATH", help="files, folders, .txt lists"
    )
    adding.add_argument("--modality", choices=MODALITIES, required=True, help="of every image")
    command("info", "print what the index holds", [])
    dropping = command("remove", "drop images from the index", [])
    dropping.add_argument(
        "--images", nargs="+", required=True, metavar="PATH",
        help="files, folders (everything under them) and .txt lists of paths",
    )  # fmt: skip
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
    group = searching.add_argument_group("approximate search")
    group.add_argument(
        "--approximate", action="store_true", help="faiss inverted lists (pip install faiss-cpu)"
    )
    group.add_argument("--probes", type=int, default=32, help="lists searched per query")
    return parser


COMMANDS = {"add": add, "info": info, "remove": remove, "search": search}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one gallery command."""
    args = get_args_parser().parse_args(argv)
    setup_logging()
    return COMMANDS[args.command](args)
