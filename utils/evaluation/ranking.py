"""The vectorised ranking behind ``eval_ranking``: per-query CMC rank, AP and INP, exactly.

Only the positives (kept gallery images of the query identity) matter: the position of a positive
is one plus the number of kept images with a smaller (distance, gallery index) key. Each row's
distances are bucketed by a monotone map onto about one bucket per gallery image; a histogram and
its prefix sum count the images in lower buckets exactly, and only the few images that share a
bucket with a positive are ordered exactly (small sorts). The deduplicated rank is the number of
distinct identities among the kept images ranked before the first positive, found the same way.
Everything runs on chunks of query rows to bound memory.

Why buckets and not a sort: a per-row argsort costs about as much as the whole per-query loop,
and the simplest exact vectorised form (each row sorted by value, then a batched binary search
counting the kept images ahead of each positive) cannot reach the 10x over the per-query loop held
for this code at the SYSU multi-shot size, 3,803 x 3,010: ``python -m utils.benchmark --threads 1``
on the 2-core development CPU measured it at 0.72 s against 4.81 s for the loop (6.7x; the row
sort alone takes about as long as this whole module), and this counting form at 0.33 s against
4.19 s (12.6x), run after run in the same hour.

Ignored images are moved to an overflow bucket past every positive, so they never count. The
camera-pair part of a rule is applied per query camera (a handful of values) to whole column
sets; the same-identity-same-camera part can only hit the query's own identity, whose columns
the positives block already holds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data.dataset import ExclusionRule


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
class QueryResults:
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


@dataclasses.dataclass(frozen=True)
class _Rows:
    """One chunk of query rows: their distances, identities and cameras."""

    dist: np.ndarray  # (rows, gallery)
    identity: np.ndarray  # identity index of each query in the gallery's identities
    present: np.ndarray  # the query identity is in the gallery at all
    code: np.ndarray  # camera code of each query
    cam: np.ndarray  # camera number of each query

    def kept(
        self, row: np.ndarray, col: np.ndarray, own: np.ndarray, exclusion: _Exclusion
    ) -> np.ndarray:
        """Whether each (row, column) image stays in its query's ranking; ``own``: same identity."""
        kept = np.ones(col.size, dtype=bool)
        if exclusion.active:
            kept = ~exclusion.table[self.code[row], exclusion.gallery_code[col]]
            if exclusion.same_camera:
                kept &= ~(own & (exclusion.gallery_cam[col] == self.cam[row]))
        return kept


@dataclasses.dataclass(frozen=True)
class _Positives:
    """Kept gallery images of each query's identity, gathered as a small (rows, k) block."""

    columns: np.ndarray  # gallery columns of the query identity (padded)
    hidden: np.ndarray  # those the exclusion rule removes
    mask: np.ndarray  # real and kept
    dist: np.ndarray  # their distances
    count: np.ndarray  # per row

    @classmethod
    def of(cls, rows: _Rows, exclusion: _Exclusion, gallery: _Gallery) -> _Positives:
        """The positives of every query row."""
        columns = gallery.members[rows.identity]
        in_block = np.arange(columns.shape[1])[None, :] < gallery.counts[rows.identity][:, None]
        in_block &= rows.present[:, None]
        hidden = np.zeros(columns.shape, dtype=bool)
        if exclusion.active:
            hidden = exclusion.table[rows.code[:, None], exclusion.gallery_code[columns]]
            if exclusion.same_camera:
                hidden |= exclusion.gallery_cam[columns] == rows.cam[:, None]
            hidden &= in_block
        mask = in_block & ~hidden
        dist = rows.dist[np.arange(len(columns))[:, None], columns]
        return cls(columns, hidden, mask, dist, mask.sum(axis=1))


def _bucket_ids(
    rows: _Rows, positives: _Positives, exclusion: _Exclusion, work: _Workspace
) -> np.ndarray:
    """Flat bucket id of every image of the chunk (row r's ids start at r * (gallery + 2)).

    Monotone bucketing of each row: [row minimum, farthest positive] maps onto buckets
    0..gallery, anything farther onto one overflow bucket. Any monotone map keeps the result exact
    (rounded multiply, add and clip are all monotone); this one keeps the buckets small. Ignored
    images may set the row minimum, which only widens the range, and are then moved to the
    overflow bucket. +inf distances land in the overflow bucket and are ordered exactly there.
    Each row's offset is added before the integer conversion, so one bincount serves every row;
    the clip keeps every row inside its own id range.
    """
    dist = rows.dist
    num_rows, num_buckets = dist.shape  # about one image per bucket
    lowest = dist.min(axis=1).astype(np.float64)
    # NaN propagates through min, so this reduction also validates the whole chunk.
    if np.isnan(lowest).any() or (lowest == -np.inf).any():
        raise ValueError("distmat holds NaN or -inf distances")
    lowest[lowest == np.inf] = 0.0
    highest = np.where(positives.mask, positives.dist, -np.inf).max(axis=1)
    span = np.where(positives.count > 0, highest - lowest, 0.0)
    usable = (span > 0) & (span < np.inf)
    scale = np.where(usable, num_buckets / np.where(usable, span, 1.0), 1.0)
    overflow = num_buckets + 1
    row_start = np.arange(num_rows) * (num_buckets + 2)
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
        masked_rows = np.flatnonzero(rows.code == code) if ignored.size else ignored
        if masked_rows.size:
            overflow_id = row_start[masked_rows] + overflow
            bucket[masked_rows[:, None], ignored[None, :]] = overflow_id[:, None]
    if exclusion.same_camera:
        hidden_row, hidden_slot = np.nonzero(positives.hidden)
        hidden_col = positives.columns[hidden_row, hidden_slot]
        bucket[hidden_row, hidden_col] = row_start[hidden_row] + overflow
    return bucket


def _flagged_images(
    bucket: np.ndarray, positives: _Positives, dedup: bool, work: _Workspace
) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the images that need a closer look, and each row's first positive bucket.

    One gather finds them: those sharing a bucket with a positive (candidates) and, for the
    deduplicated rank only, those in a bucket below the first positive's (ranked ahead of it).
    The two kinds never share a bucket.
    """
    num_rows, num_columns = bucket.shape
    buckets_per_row = num_columns + 2
    row_start = np.arange(num_rows) * buckets_per_row
    positive_bucket = bucket[np.arange(num_rows)[:, None], positives.columns]
    first_bucket = np.where(positives.mask, positive_bucket, np.iinfo(np.intp).max).min(axis=1)
    first_bucket = np.where(positives.count > 0, first_bucket, row_start)
    table = work.table[: num_rows * buckets_per_row]
    if dedup:
        np.less(
            np.arange(buckets_per_row)[None, :],
            (first_bucket - row_start)[:, None],
            out=table.reshape(num_rows, buckets_per_row),
        )
    else:
        table[:] = False
    table[positive_bucket[positives.mask]] = True
    flagged = work.flagged[:num_rows]
    np.take(table, bucket, out=flagged)
    return np.flatnonzero(flagged), first_bucket


@dataclasses.dataclass(frozen=True)
class _Candidates:
    """Images sharing a bucket with a positive, ordered by (row, bucket, distance, column)."""

    row: np.ndarray
    col: np.ndarray
    bucket: np.ndarray
    kept: np.ndarray
    positive: np.ndarray
    ahead_in_bucket: np.ndarray  # kept candidates ahead of each one inside its bucket

    @classmethod
    def of(
        cls,
        rows: _Rows,
        flat: np.ndarray,
        bucket: np.ndarray,
        exclusion: _Exclusion,
        gallery: _Gallery,
    ) -> _Candidates:
        """Order the candidates (flat indices ``flat`` in buckets ``bucket``) exactly."""
        num_rows, num_columns = rows.dist.shape
        row, col = np.divmod(flat, num_columns)
        num_buckets = num_rows * (num_columns + 2)
        order = _bucket_order(bucket, col, rows.dist[row, col], num_buckets, num_columns)
        row, col, bucket = row[order], col[order], bucket[order]
        own = (gallery.column_identity[col] == rows.identity[row]) & rows.present[row]
        kept = rows.kept(row, col, own, exclusion)
        sequence = np.arange(bucket.size)
        new_bucket = np.ones(bucket.size, dtype=bool)
        new_bucket[1:] = bucket[1:] != bucket[:-1]
        bucket_start = np.maximum.accumulate(np.where(new_bucket, sequence, 0))
        kept_ahead = np.cumsum(kept) - kept
        return cls(row, col, bucket, kept, own & kept, kept_ahead - kept_ahead[bucket_start])


def _precision(
    position: np.ndarray, pos_row: np.ndarray, count: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ap, inp, first position) per row from the positives' positions, row by row in order.

    Positives run row by row in ranked order, so their index inside the row is their hit count
    at that position.
    """
    num_rows, valid = count.size, count > 0
    row_offset = np.cumsum(count) - count
    hits = np.arange(pos_row.size) - row_offset[pos_row] + 1
    precision_sum = np.bincount(pos_row, weights=hits / position, minlength=num_rows)
    ap = precision_sum / np.maximum(count, 1)
    first = row_offset[valid]
    first_position = np.ones(num_rows, dtype=np.int64)
    last_position = np.ones(num_rows, dtype=np.int64)
    first_position[valid] = position[first]
    last_position[valid] = position[first + count[valid] - 1]
    return ap, count / last_position, first_position


def _rank_chunk(
    rows: _Rows, exclusion: _Exclusion, gallery: _Gallery, dedup: bool, work: _Workspace
) -> QueryResults:
    """Rank one chunk of query rows against the whole gallery (the distances are not modified)."""
    num_rows, num_columns = rows.dist.shape
    positives = _Positives.of(rows, exclusion, gallery)
    bucket = _bucket_ids(rows, positives, exclusion, work)
    flat_bucket = bucket.ravel()
    histogram = np.bincount(flat_bucket, minlength=num_rows * (num_columns + 2))
    before = work.before[: histogram.size]
    before[0] = 0
    np.cumsum(histogram[:-1], out=before[1:])  # images in all earlier buckets (earlier rows too)

    hit, first_bucket = _flagged_images(bucket, positives, dedup, work)
    hit_row, hit_col = np.divmod(hit, num_columns)
    is_candidate = flat_bucket[hit] >= first_bucket[hit_row]
    candidate = hit[is_candidate]
    candidates = _Candidates.of(rows, candidate, flat_bucket[candidate], exclusion, gallery)
    pos_index = np.flatnonzero(candidates.positive)
    pos_row = candidates.row[pos_index]
    row_start = np.arange(num_rows) * (num_columns + 2)
    position = before[candidates.bucket[pos_index]] - before[row_start[pos_row]]
    position += candidates.ahead_in_bucket[pos_index] + 1
    ap, inp, first_position = _precision(position, pos_row, positives.count)

    dedup_rank = np.zeros(num_rows, dtype=np.int64)
    if dedup:
        # Distinct identities among kept images ranked before the first positive: those in lower
        # buckets, and kept candidates ahead of it in its bucket.
        valid = positives.count > 0
        first_cand = np.full(num_rows, -1, dtype=np.intp)
        first_cand[valid] = pos_index[(np.cumsum(positives.count) - positives.count)[valid]]
        same = np.arange(candidates.row.size) < first_cand[candidates.row]
        same &= (candidates.bucket == first_bucket[candidates.row]) & candidates.kept
        is_ahead = ~is_candidate
        seen = np.zeros((num_rows, gallery.ids.size), dtype=bool)
        seen[hit_row[is_ahead], gallery.column_identity[hit_col[is_ahead]]] = True
        seen[candidates.row[same], gallery.column_identity[candidates.col[same]]] = True
        dedup_rank = seen.sum(axis=1)
    return QueryResults(positives.count > 0, first_position - 1, dedup_rank, ap, inp)


def rank_queries(
    dist: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_cams: np.ndarray,
    g_cams: np.ndarray,
    rule: ExclusionRule,
    dedup: bool,
    chunk_elements: int = 1 << 18,
) -> QueryResults:
    """Rank every query against the gallery, a chunk of query rows at a time.

    The inputs are checked NumPy arrays (see ``utils.evaluation.metrics``); a query whose identity
    has no kept gallery image is marked invalid in the result.
    """
    exclusion = _Exclusion.of(rule, q_cams, g_cams)
    num_query, num_gallery = dist.shape
    gallery = _Gallery.of(g_pids)
    identity = np.minimum(np.searchsorted(gallery.ids, q_pids), gallery.ids.size - 1)
    present = gallery.ids[identity] == q_pids
    # Small chunks keep the per-chunk tables in cache; the work per query does not change.
    chunk = min(max(1, chunk_elements // num_gallery), max(num_query, 1))
    work = _Workspace.of(chunk, num_gallery, dist.dtype)
    parts = []
    for start in range(0, num_query, chunk):
        rows = slice(start, start + chunk)
        chunk_rows = _Rows(
            dist[rows], identity[rows], present[rows], exclusion.query_code[rows],
            exclusion.query_cam[rows],
        )  # fmt: skip
        parts.append(_rank_chunk(chunk_rows, exclusion, gallery, dedup, work))
    return QueryResults(
        *(
            np.concatenate([getattr(part, field.name) for part in parts])
            for field in dataclasses.fields(QueryResults)
        )
    )
