"""Re-identification metrics: CMC, mAP and mINP under a protocol's exclusion rule.

Every protocol ranks the gallery by ascending distance with ties broken by gallery index (a
stable sort), after removing the gallery images its exclusion rule (``data.ExclusionRule``) makes
a query ignore: SYSU-MM01 removes camera-2 images from camera-3 queries (same location), LLCM the
images of the query's identity taken by the query's camera. SYSU-MM01 and LLCM use the
identity-deduplicated CMC (only the first image of each identity in the ranked gallery counts),
RegDB the standard CMC (position of the first correct match). In all, mAP is the usual mean
average precision over every kept gallery image, mINP the mean of (number of positives) /
(position of the last positive), and queries whose identity has no kept gallery image are skipped.

``eval_ranking`` is vectorised over queries and takes the rule as data; ``eval_sysu``,
``eval_regdb`` and ``eval_llcm`` fix the rule of their data set. ``eval_ranking_loop`` and its
``*_loop`` wrappers are per-query reference implementations of the same definitions, kept for
tests and as the benchmark baseline.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from data.dataset import NO_EXCLUSION, ExclusionRule
from data.llcm import SAME_IDENTITY_AND_CAMERA
from data.sysu import SAME_LOCATION


def _as_numpy(array: Any) -> np.ndarray:
    """Return ``array`` as a NumPy array, moving a torch tensor to the CPU first."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _check_inputs(
    distmat: Any, q_pids: Any, g_pids: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert the common inputs to NumPy and check that their shapes agree."""
    dist = _as_numpy(distmat)
    q = _as_numpy(q_pids).reshape(-1)
    g = _as_numpy(g_pids).reshape(-1)
    if dist.ndim != 2 or dist.shape != (q.size, g.size):
        raise ValueError(
            f"distmat has shape {dist.shape}, expected ({q.size}, {g.size}) from the query and "
            "gallery identities"
        )
    if dist.dtype not in (np.float32, np.float64):
        dist = dist.astype(np.float64)
    if dist.shape[1] == 0:
        raise ValueError("the gallery is empty; nothing to evaluate")
    return dist, q, g


def _check_cameras(
    exclusion: ExclusionRule, q_camids: Any, g_camids: Any, num_query: int, num_gallery: int
) -> tuple[np.ndarray, np.ndarray]:
    """Camera numbers as int64 arrays (zeros when the rule needs none and none are given)."""
    if q_camids is None or g_camids is None:
        if exclusion.needs_cameras:
            raise ValueError("this exclusion rule needs query and gallery camera ids")
        return np.zeros(num_query, dtype=np.int64), np.zeros(num_gallery, dtype=np.int64)
    q_cams = _as_numpy(q_camids).reshape(-1).astype(np.int64)
    g_cams = _as_numpy(g_camids).reshape(-1).astype(np.int64)
    if q_cams.size != num_query or g_cams.size != num_gallery:
        raise ValueError("camera ids must match the query and gallery identities in length")
    return q_cams, g_cams


def _reject_undefined(dist: np.ndarray) -> None:
    """Raise on NaN or -inf distances, which have no place in a ranking (+inf means "never")."""
    if np.isnan(dist).any() or np.isneginf(dist).any():
        raise ValueError("distmat holds NaN or -inf distances")


def _finish(
    ranks: np.ndarray, aps: np.ndarray, inps: np.ndarray, max_rank: int
) -> tuple[np.ndarray, float, float]:
    """Average per-query results of the valid queries into (cmc, mAP, mINP)."""
    if ranks.size == 0:
        raise ValueError("no query identity appears in the (kept) gallery; nothing to evaluate")
    # cmc[r] counts queries matched within the first r+1 entries; a query whose ranked list is
    # shorter than max_rank stays matched, which is the "pad with the last value" rule.
    cmc = (ranks[:, None] <= np.arange(max_rank)[None, :]).mean(axis=0)
    return cmc.astype(np.float64), float(np.mean(aps)), float(np.mean(inps))


# ---------------------------------------------------------------------------------------------
# Per-query reference implementations.
# ---------------------------------------------------------------------------------------------


def _ap_inp(matches: np.ndarray) -> tuple[float, float]:
    """Average precision and inverse negative penalty of one ranked boolean match list."""
    hits = np.cumsum(matches)
    positions = np.flatnonzero(matches) + 1
    ap = float(np.mean(hits[positions - 1] / positions))
    inp = float(hits[-1] / positions[-1])
    return ap, inp


def eval_ranking_loop(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    exclusion: ExclusionRule = NO_EXCLUSION,
    dedup_cmc: bool = False,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float]:
    """(cmc, mAP, mINP) computed one query at a time; the reference for eval_ranking."""
    dist, q_pids, g_pids = _check_inputs(distmat, q_pids, g_pids)
    _reject_undefined(dist)
    q_cams, g_cams = _check_cameras(exclusion, q_camids, g_camids, q_pids.size, g_pids.size)
    ranks, aps, inps = [], [], []
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        ignored = exclusion.ignored(q_pids[i], q_cams[i], g_pids[order], g_cams[order])
        ranked_pids = g_pids[order[~ignored]]
        matches = ranked_pids == q_pids[i]
        if not matches.any():
            continue
        if dedup_cmc:
            # np.unique gives each identity's first index; sorting those restores the order.
            _, first_index = np.unique(ranked_pids, return_index=True)
            distinct_pids = ranked_pids[np.sort(first_index)]
            ranks.append(int(np.flatnonzero(distinct_pids == q_pids[i])[0]))
        else:
            ranks.append(int(np.flatnonzero(matches)[0]))
        ap, inp = _ap_inp(matches)
        aps.append(ap)
        inps.append(inp)
    return _finish(np.asarray(ranks, dtype=np.int64), np.asarray(aps), np.asarray(inps), max_rank)


def eval_sysu_loop(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float]:
    """SYSU-MM01 (cmc, mAP, mINP) computed one query at a time; the reference for eval_sysu."""
    return eval_ranking_loop(
        distmat, q_pids, g_pids, q_camids, g_camids, SAME_LOCATION, True, max_rank
    )


def eval_llcm_loop(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float]:
    """LLCM (cmc, mAP, mINP) computed one query at a time; the reference for eval_llcm."""
    return eval_ranking_loop(
        distmat, q_pids, g_pids, q_camids, g_camids, SAME_IDENTITY_AND_CAMERA, True, max_rank
    )


def eval_regdb_loop(
    distmat: Any, q_pids: Any, g_pids: Any, max_rank: int = 20
) -> tuple[np.ndarray, float, float]:
    """RegDB (cmc, mAP, mINP) computed one query at a time; the reference for eval_regdb."""
    return eval_ranking_loop(distmat, q_pids, g_pids, max_rank=max_rank)


# ---------------------------------------------------------------------------------------------
# Vectorised implementation.
# ---------------------------------------------------------------------------------------------
#
# A full per-row argsort costs about as much as the whole per-query loop, so the ranking is done
# without one. Only the positives (kept gallery images of the query identity) matter: the position
# of a positive is one plus the number of kept images with a smaller (distance, gallery index)
# key. Each row's distances are bucketed by a monotone map onto about one bucket per gallery
# image; a histogram and its prefix sum count the images in lower buckets exactly, and only the
# few images that share a bucket with a positive are ordered exactly (small stable sorts). The
# deduplicated rank is the number of distinct identities among the kept images ranked before the
# first positive, found the same way. Everything runs on chunks of query rows to bound memory.
#
# Ignored images are moved to an overflow bucket past every positive, so they never count. The
# camera-pair part of a rule is applied per query camera (a handful of values) to whole column
# sets; the same-identity-same-camera part can only hit the query's own identity, whose columns
# the positives block already holds.


@dataclasses.dataclass(frozen=True)
class _Exclusion:
    """An exclusion rule prepared for one problem: camera codes and per-code ignored columns."""

    query_code: np.ndarray  # camera code of each query
    query_cam: np.ndarray  # camera number of each query
    gallery_code: np.ndarray  # camera code of each gallery column
    gallery_cam: np.ndarray
    table: np.ndarray  # (codes, codes): a query of code a ignores gallery images of code b
    ignored_columns: tuple[np.ndarray, ...]  # per query code, the gallery columns it ignores
    same_camera: bool  # same identity and same camera ignored

    @property
    def active(self) -> bool:
        """Whether any gallery image may be ignored."""
        return self.same_camera or any(cols.size for cols in self.ignored_columns)

    @classmethod
    def of(cls, rule: ExclusionRule, q_cams: np.ndarray, g_cams: np.ndarray) -> _Exclusion:
        """Prepare ``rule`` for queries from ``q_cams`` against a gallery from ``g_cams``."""
        cameras, codes = np.unique(np.concatenate([q_cams, g_cams]), return_inverse=True)
        codes = codes.reshape(-1)
        query_code, gallery_code = codes[: q_cams.size], codes[q_cams.size :]
        table = np.zeros((max(cameras.size, 1),) * 2, dtype=bool)
        position = {int(cam): code for code, cam in enumerate(cameras)}
        for query_cam, gallery_cam in rule.ignored_camera_pairs:
            if query_cam in position and gallery_cam in position:
                table[position[query_cam], position[gallery_cam]] = True
        ignored_columns = tuple(np.flatnonzero(row[gallery_code]) for row in table)
        return cls(
            query_code,
            q_cams,
            gallery_code,
            g_cams,
            table,
            ignored_columns,
            rule.same_identity_same_camera,
        )


@dataclasses.dataclass(frozen=True)
class _Gallery:
    """Gallery identities: an index per image and each identity's image columns."""

    ids: np.ndarray  # identity value of each identity index, ascending
    column_identity: np.ndarray  # identity index of each gallery column
    members: np.ndarray  # (identities, max images) columns of each identity, ascending, padded
    counts: np.ndarray  # images per identity

    @classmethod
    def of(cls, g_pids: np.ndarray) -> _Gallery:
        """Index the gallery identities."""
        ids, column_identity, counts = np.unique(g_pids, return_inverse=True, return_counts=True)
        column_identity = column_identity.reshape(-1)
        by_identity = np.argsort(column_identity, kind="stable")
        starts = np.cumsum(counts) - counts
        slot = np.arange(g_pids.size) - starts[column_identity[by_identity]]
        members = np.zeros((ids.size, counts.max()), dtype=np.intp)
        members[column_identity[by_identity], slot] = by_identity
        return cls(ids, column_identity, members, counts)


@dataclasses.dataclass(frozen=True)
class _Workspace:
    """Chunk-sized buffers reused by every chunk.

    Fresh multi-megabyte arrays per chunk cost page faults that can double the run time, so the
    large per-chunk arrays live here and each chunk takes views of its leading rows.
    """

    scaled: np.ndarray  # (rows, columns) distances mapped onto bucket values
    bucket: np.ndarray  # (rows, columns) flat bucket id of every image
    before: np.ndarray  # (rows * (columns + 2),) images in all earlier buckets
    table: np.ndarray  # (rows * (columns + 2),) buckets whose images need a closer look
    flagged: np.ndarray  # (rows, columns) images in a flagged bucket

    @classmethod
    def of(cls, rows: int, columns: int, dtype: np.dtype) -> _Workspace:
        """Allocate buffers for chunks of up to ``rows`` query rows."""
        buckets = rows * (columns + 2)
        # Flat bucket ids must be exact in the bucketing dtype; float32 is exact below 2**24.
        if buckets >= 1 << 24:
            dtype = np.dtype(np.float64)
        return cls(
            np.empty((rows, columns), dtype=dtype),
            np.empty((rows, columns), dtype=np.intp),
            np.empty(buckets, dtype=np.int64),
            np.empty(buckets, dtype=bool),
            np.empty((rows, columns), dtype=bool),
        )


@dataclasses.dataclass(frozen=True)
class _QueryResults:
    """Per-query results of the vectorised ranking; entries of invalid queries are meaningless."""

    valid: np.ndarray  # the query identity has at least one kept gallery image
    first_rank: np.ndarray  # 0-based position of the first positive among kept images
    dedup_rank: np.ndarray  # 0-based rank of the query identity among distinct kept identities
    ap: np.ndarray
    inp: np.ndarray


def _bucket_order(
    buckets: np.ndarray, cols: np.ndarray, dists: np.ndarray, num_buckets: int, num_columns: int
) -> np.ndarray:
    """Permutation sorting entries by (bucket, distance, column); entries arrive column-ascending.

    Buckets come first because ignored images sit in the overflow bucket whatever their distance.
    """
    bucket_bits = max(num_buckets - 1, 1).bit_length()
    col_bits = max(num_columns - 1, 1).bit_length()
    if dists.dtype == np.float32 and bucket_bits + 32 + col_bits <= 64:
        # One distinct 64-bit key per entry, so a fast unstable sort is exact. Adding 0.0 turns
        # -0.0 into +0.0 (equal distances); flipping negative floats entirely and setting the
        # sign bit of the others makes the bit patterns sort like the values.
        bits = (dists + np.float32(0.0)).view(np.uint32).astype(np.uint64)
        ordered = np.where(bits >> np.uint64(31), bits ^ np.uint64(0xFFFFFFFF), bits | (1 << 31))
        key = buckets.astype(np.uint64) << np.uint64(32 + col_bits)
        key |= ordered << np.uint64(col_bits)
        key |= cols.astype(np.uint64)
        return np.argsort(key)
    # Two stable sorts: equal distances keep the incoming column order.
    order = np.argsort(dists, kind="stable")
    return order[np.argsort(buckets[order], kind="stable")]


def _rank_chunk(
    dist: np.ndarray,
    rows: slice,
    query_identity: np.ndarray,
    present: np.ndarray,
    exclusion: _Exclusion,
    gallery: _Gallery,
    dedup: bool,
    work: _Workspace,
) -> _QueryResults:
    """Rank the query rows ``rows`` against the whole gallery (``dist`` is not modified)."""
    dist, query_identity, present = dist[rows], query_identity[rows], present[rows]
    query_code, query_cam = exclusion.query_code[rows], exclusion.query_cam[rows]
    num_rows, num_columns = dist.shape
    num_buckets = num_columns  # about one image per bucket
    row_index = np.arange(num_rows)

    # Positives: kept gallery images of the query identity, gathered as a small (rows, k) block.
    columns = gallery.members[query_identity]
    in_block = np.arange(columns.shape[1])[None, :] < gallery.counts[query_identity][:, None]
    in_block &= present[:, None]
    hidden = np.zeros(columns.shape, dtype=bool)  # positives the rule removes
    if exclusion.active:
        hidden = exclusion.table[query_code[:, None], exclusion.gallery_code[columns]]
        if exclusion.same_camera:
            hidden |= exclusion.gallery_cam[columns] == query_cam[:, None]
        hidden &= in_block
    is_positive = in_block & ~hidden
    num_positive = is_positive.sum(axis=1)
    valid = num_positive > 0
    positive_dist = dist[row_index[:, None], columns]

    # Monotone bucketing of each row: [row minimum, farthest positive] maps onto buckets
    # 0..num_buckets, anything farther onto one overflow bucket. Any monotone map keeps the result
    # exact (rounded multiply, add and clip are all monotone); this one keeps the buckets small.
    # Ignored images may set the row minimum, which only widens the range, and are then moved to
    # the overflow bucket. +inf distances land in the overflow bucket and are ordered exactly
    # there. Each row's offset is added before the integer conversion, giving flat bucket ids so
    # one bincount serves every row; the clip keeps every row inside its own id range.
    lowest = dist.min(axis=1).astype(np.float64)
    # NaN propagates through min, so this reduction also validates the whole chunk.
    if np.isnan(lowest).any() or (lowest == -np.inf).any():
        raise ValueError("distmat holds NaN or -inf distances")
    lowest[lowest == np.inf] = 0.0
    highest = np.where(is_positive, positive_dist, -np.inf).max(axis=1)
    span = np.where(valid, highest - lowest, 0.0)
    usable = (span > 0) & (span < np.inf)
    scale = np.where(usable, num_buckets / np.where(usable, span, 1.0), 1.0)
    buckets_per_row = num_buckets + 2
    overflow = num_buckets + 1
    row_start = row_index * buckets_per_row
    scaled = work.scaled[:num_rows]
    dtype = scaled.dtype
    np.multiply(dist, scale[:, None].astype(dtype), out=scaled)
    scaled += (row_start - lowest * scale)[:, None].astype(dtype)
    np.clip(
        scaled,
        row_start[:, None].astype(dtype),
        (row_start + overflow)[:, None].astype(dtype),
        out=scaled,
    )
    bucket = work.bucket[:num_rows]
    np.copyto(bucket, scaled, casting="unsafe")  # truncation is floor: values are >= 0
    for code, ignored in enumerate(exclusion.ignored_columns):
        masked_rows = np.flatnonzero(query_code == code) if ignored.size else ignored
        if masked_rows.size:
            overflow_id = row_start[masked_rows] + overflow
            bucket[masked_rows[:, None], ignored[None, :]] = overflow_id[:, None]
    if exclusion.same_camera:
        hidden_row, hidden_slot = np.nonzero(hidden)
        bucket[hidden_row, columns[hidden_row, hidden_slot]] = row_start[hidden_row] + overflow

    histogram = np.bincount(bucket.ravel(), minlength=num_rows * buckets_per_row)
    before = work.before[: histogram.size]
    before[0] = 0
    np.cumsum(histogram[:-1], out=before[1:])  # images in all earlier buckets (earlier rows too)

    # One gather finds the images that need a closer look: those sharing a bucket with a positive
    # (candidates) and, for the deduplicated rank only, those in a bucket below the first
    # positive's (ranked ahead of it). The two kinds never share a bucket.
    positive_bucket = bucket[row_index[:, None], columns]
    first_bucket = np.where(is_positive, positive_bucket, np.iinfo(np.intp).max).min(axis=1)
    first_bucket = np.where(valid, first_bucket, row_start)
    table = work.table[: histogram.size]
    if dedup:
        np.less(
            np.arange(buckets_per_row)[None, :],
            (first_bucket - row_start)[:, None],
            out=table.reshape(num_rows, buckets_per_row),
        )
    else:
        table[:] = False
    table[positive_bucket[is_positive]] = True
    flagged = work.flagged[:num_rows]
    np.take(table, bucket, out=flagged)
    hit = np.flatnonzero(flagged)
    hit_row, hit_col = np.divmod(hit, num_columns)
    is_candidate = bucket.ravel()[hit] >= first_bucket[hit_row]

    cand_row, cand_col = hit_row[is_candidate], hit_col[is_candidate]
    cand_bucket = bucket.ravel()[hit[is_candidate]]
    order = _bucket_order(
        cand_bucket, cand_col, dist[cand_row, cand_col], histogram.size, num_columns
    )
    cand_row, cand_col, cand_bucket = cand_row[order], cand_col[order], cand_bucket[order]
    cand_own = (gallery.column_identity[cand_col] == query_identity[cand_row]) & present[cand_row]
    cand_kept = np.ones(cand_col.size, dtype=bool)
    if exclusion.active:
        cand_kept = ~exclusion.table[query_code[cand_row], exclusion.gallery_code[cand_col]]
        if exclusion.same_camera:
            same_camera = exclusion.gallery_cam[cand_col] == query_cam[cand_row]
            cand_kept &= ~(cand_own & same_camera)
    cand_is_positive = cand_own & cand_kept
    # Kept candidates ahead of each candidate inside its own bucket.
    sequence = np.arange(cand_bucket.size)
    new_bucket = np.ones(cand_bucket.size, dtype=bool)
    new_bucket[1:] = cand_bucket[1:] != cand_bucket[:-1]
    bucket_start = np.maximum.accumulate(np.where(new_bucket, sequence, 0))
    kept_ahead = np.cumsum(cand_kept) - cand_kept
    ahead_in_bucket = kept_ahead - kept_ahead[bucket_start]

    pos_index = np.flatnonzero(cand_is_positive)
    pos_row = cand_row[pos_index]
    position = (
        before[cand_bucket[pos_index]] - before[row_start[pos_row]] + ahead_in_bucket[pos_index] + 1
    )

    # Positives now run row by row in ranked order, so their index inside the row is their hit
    # count at that position.
    row_offset = np.cumsum(num_positive) - num_positive
    hits = np.arange(pos_row.size) - row_offset[pos_row] + 1
    precision_sum = np.bincount(pos_row, weights=hits / position, minlength=num_rows)
    ap = precision_sum / np.maximum(num_positive, 1)
    first = row_offset[valid]
    first_position = np.ones(num_rows, dtype=np.int64)
    last_position = np.ones(num_rows, dtype=np.int64)
    first_position[valid] = position[first]
    last_position[valid] = position[first + num_positive[valid] - 1]
    inp = num_positive / last_position

    dedup_rank = np.zeros(num_rows, dtype=np.int64)
    if dedup:
        # The deduplicated rank counts distinct identities among kept images ranked before the
        # first positive: those in lower buckets, and kept candidates ahead of it in its bucket.
        first_cand = np.full(num_rows, -1, dtype=np.intp)
        first_cand[valid] = pos_index[first]
        same = (sequence < first_cand[cand_row]) & (cand_bucket == first_bucket[cand_row])
        same &= cand_kept
        is_ahead = ~is_candidate
        seen = np.zeros((num_rows, gallery.ids.size), dtype=bool)
        seen[hit_row[is_ahead], gallery.column_identity[hit_col[is_ahead]]] = True
        seen[cand_row[same], gallery.column_identity[cand_col[same]]] = True
        dedup_rank = seen.sum(axis=1)
    return _QueryResults(valid, first_position - 1, dedup_rank, ap, inp)


def _rank_queries(
    dist: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    exclusion: _Exclusion,
    dedup: bool,
    chunk_elements: int = 1 << 18,
) -> _QueryResults:
    """Rank every query against the gallery, a chunk of query rows at a time."""
    num_query, num_gallery = dist.shape
    gallery = _Gallery.of(g_pids)
    identity = np.minimum(np.searchsorted(gallery.ids, q_pids), gallery.ids.size - 1)
    present = gallery.ids[identity] == q_pids
    # Small chunks keep the per-chunk tables in cache; the work per query does not change.
    chunk = min(max(1, chunk_elements // num_gallery), max(num_query, 1))
    work = _Workspace.of(chunk, num_gallery, dist.dtype)
    parts = [
        _rank_chunk(
            dist,
            slice(start, start + chunk),
            identity,
            present,
            exclusion,
            gallery,
            dedup,
            work,
        )
        for start in range(0, num_query, chunk)
    ]
    return _QueryResults(
        *(
            np.concatenate([getattr(part, field.name) for part in parts])
            for field in dataclasses.fields(_QueryResults)
        )
    )


def eval_ranking(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    exclusion: ExclusionRule = NO_EXCLUSION,
    dedup_cmc: bool = False,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float]:
    """(cmc, mAP, mINP) with ``exclusion``'s ignored images removed from each query's ranking.

    ``dedup_cmc``: the CMC counts distinct identities (the SYSU-MM01 authors' rule); otherwise it
    is the position of the first correct match. Camera ids are needed when the rule reads them.
    """
    dist, q_pids, g_pids = _check_inputs(distmat, q_pids, g_pids)
    q_cams, g_cams = _check_cameras(exclusion, q_camids, g_camids, q_pids.size, g_pids.size)
    prepared = _Exclusion.of(exclusion, q_cams, g_cams)
    result = _rank_queries(dist, q_pids, g_pids, prepared, dedup=dedup_cmc)
    valid = result.valid
    ranks = result.dedup_rank if dedup_cmc else result.first_rank
    return _finish(ranks[valid], result.ap[valid], result.inp[valid], max_rank)


def eval_sysu(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float]:
    """SYSU-MM01 (cmc, mAP, mINP): cam3 queries ignore cam2, identity-deduplicated CMC."""
    return eval_ranking(distmat, q_pids, g_pids, q_camids, g_camids, SAME_LOCATION, True, max_rank)


def eval_llcm(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float]:
    """LLCM (cmc, mAP, mINP): a query ignores its identity in its camera; deduplicated CMC."""
    return eval_ranking(
        distmat, q_pids, g_pids, q_camids, g_camids, SAME_IDENTITY_AND_CAMERA, True, max_rank
    )


def eval_regdb(
    distmat: Any, q_pids: Any, g_pids: Any, max_rank: int = 20
) -> tuple[np.ndarray, float, float]:
    """RegDB (cmc, mAP, mINP) with the standard CMC (position of the first correct match)."""
    return eval_ranking(distmat, q_pids, g_pids, max_rank=max_rank)


def pairwise_distance(query_feats: Any, gallery_feats: Any, normalize: bool = True) -> np.ndarray:
    """Distance = minus the dot product of L2-normalised features, as a float32 NumPy array.

    Torch inputs are multiplied on their own device. Features are L2-normalised here unless
    ``normalize`` is False (normalising already-normalised features changes nothing).
    """
    if isinstance(query_feats, torch.Tensor) or isinstance(gallery_feats, torch.Tensor):
        q = torch.as_tensor(query_feats).detach().float()
        g = torch.as_tensor(gallery_feats).detach().float().to(q.device)
        if normalize:
            q = torch.nn.functional.normalize(q, dim=1)
            g = torch.nn.functional.normalize(g, dim=1)
        return (-(q @ g.T)).cpu().numpy().astype(np.float32, copy=False)
    q = np.asarray(query_feats, dtype=np.float32)
    g = np.asarray(gallery_feats, dtype=np.float32)
    if normalize:
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return (-(q @ g.T)).astype(np.float32, copy=False)


def summarize(cmc: np.ndarray, mAP: float, mINP: float) -> dict[str, float]:  # noqa: N803
    """Rank-1/5/10/20, mAP and mINP as percentages; ranks beyond len(cmc) are left out."""
    cmc = np.asarray(cmc)
    out = {f"rank{k}": 100.0 * float(cmc[k - 1]) for k in (1, 5, 10, 20) if k <= cmc.size}
    out["mAP"] = 100.0 * float(mAP)
    out["mINP"] = 100.0 * float(mINP)
    return out
