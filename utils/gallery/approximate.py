"""Approximate search with faiss (an optional extra: ``pip install faiss-cpu``).

An inverted-file index of the normalised gallery features (faiss ``IndexIVFFlat``, inner product):
k-means splits the gallery into about sqrt(N) lists; a query is compared only with the images of
its ``probes`` nearest lists, so it reads about ``probes / lists`` of the gallery. The rankings
can miss true neighbours (the benchmark reports recall@10 against exact search); distances are
``sqrt(2 - 2 q.g)`` of faiss's inner products. The faiss index is kept in the gallery index
(``approximate.faiss`` with ``approximate.json``) and rebuilt when the gallery changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from utils.base.errors import UserError
from utils.base.io import fsync_dir, write_text_atomic
from utils.evaluation.topk import Ranking
from utils.gallery.store import GalleryIndex, Record, Shard

log = logging.getLogger("gallery")
FAISS_FILE, FAISS_INFO = "approximate.faiss", "approximate.json"
# k-means samples per list (faiss warns below 39; more costs training time, barely recall).
SAMPLES_PER_LIST = 64


def faiss_module(flag: str = "--approximate") -> ModuleType:
    """The faiss module, or one line saying what to install."""
    try:
        import faiss
    except ImportError:
        raise UserError(f"{flag} needs faiss: pip install faiss-cpu") from None
    return faiss


def list_count(count: int) -> int:
    """Inverted lists for ``count`` images: about sqrt(count), each with enough samples."""
    return max(1, min(round(math.sqrt(count)), count // 39))


def content_key(shards: list[Shard]) -> str:
    """A key of the index's content: every change writes a shard or a features file anew."""
    names = [f"{shard.number}:{shard.features}" for shard in shards]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def build(features: np.ndarray, lists: int, seed: int = 0) -> Any:
    """An IVF-Flat inner-product index of unit ``features`` (float32, C-contiguous)."""
    faiss = faiss_module()
    dim = features.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    take = min(len(features), lists * SAMPLES_PER_LIST)
    sample = np.sort(rng.choice(len(features), take, replace=False))
    index.train(np.ascontiguousarray(features[sample]))
    index.add(features)
    return index


@dataclass
class Approximate:
    """A gallery's records and the faiss index over their features (ids = record positions)."""

    records: list[Record]
    index: Any
    lists: int


def load_or_build(gallery: GalleryIndex, unit: Any) -> Approximate:
    """The gallery's faiss index, read back when it matches the gallery, else built and saved.

    ``unit(features)`` normalises the loaded features in place, as exact search does.
    """
    faiss = faiss_module()
    shards = gallery.shards()
    live = gallery.live(shards)
    records = [s.records[r] for s, rows in zip(shards, live, strict=True) for r in rows]
    key = content_key(shards)
    info_path, index_path = gallery.folder / FAISS_INFO, gallery.folder / FAISS_FILE
    try:
        info = json.loads(info_path.read_text())
        if info.get("key") == key and index_path.is_file():
            return Approximate(records, faiss.read_index(str(index_path)), int(info["lists"]))
    except (OSError, ValueError, KeyError, RuntimeError):
        pass
    lists = list_count(len(records))
    log.info("building the approximate index: %d images in %d lists", len(records), lists)
    _, features = gallery.load()
    index = build(unit(features), lists)
    del features
    tmp = gallery.folder / f".{FAISS_FILE}.{os.getpid()}.tmp"
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, index_path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        log.warning("could not keep the approximate index in %s (%s)", gallery.folder, err)
        return Approximate(records, index, lists)
    fsync_dir(gallery.folder)
    write_text_atomic(info_path, json.dumps({"key": key, "lists": lists}) + "\n")
    return Approximate(records, index, lists)


def search(approximate: Approximate, query: np.ndarray, k: int, probes: int) -> Ranking:
    """Each unit ``query`` row's (about) ``k`` nearest gallery images, nearest first."""
    k = min(k, len(approximate.records))
    approximate.index.nprobe = min(probes, approximate.lists)
    similarity, ids = approximate.index.search(np.ascontiguousarray(query, np.float32), k)
    if (ids < 0).any():
        raise UserError(
            f"--probes {probes}: some queries' {probes} nearest lists hold fewer than {k} images; "
            "raise --probes or lower --topk"
        )
    distances = np.sqrt(np.clip(2.0 - 2.0 * similarity, 0.0, None)).astype(np.float32)
    return Ranking(ids.astype(np.int64), distances)
