"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), vectorised and chunked.

The definition is the one of the authors' released implementation, which the re-ID toolboxes
carry and whose numbers the field publishes:

1. The query-query, query-gallery and gallery-gallery distances form one (n x n) matrix over all
   n = num_query + num_gallery images. Its entries are squared (in float32), every column is
   divided by its maximum and the result is transposed: ``original[i, j] = d(j, i)**2 / max_r
   d(r, i)**2``. Each row is ranked by ascending value (ties by index: a stable sort).
2. ``R(i, k)``, the k-reciprocal set of image i, keeps those j among the first ``k`` of i's
   ranking that have i among their own first ``k``. For every candidate c of ``R(i, k1 + 1)``,
   ``R(c, round(k1 / 2) + 1)`` (rounding half to even) joins i's set when more than two thirds of
   it lies in ``R(i, k1 + 1)``.
3. ``V[i, j] = exp(-original[i, j])`` over that expanded set, normalised to sum 1 per row.
4. Unless ``k2 == 1``, each row of V is replaced by the mean of the rows of its first ``k2``
   neighbours (local query expansion).
5. ``jaccard[i, j] = 1 - m / (2 - m)`` with ``m = sum_k min(V[i, k], V[j, k])``, and the result is
   ``(1 - lambda) * jaccard + lambda * original``, returned for query rows and gallery columns.

``rerank`` ranks row blocks with a partial sort, keeps V as sorted sparse coordinates and does
the expansion and overlaps as gathers and scatter-adds; the per-image loop the tests compare
against is ``utils.benchmark.ranking.rerank_reference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Elements (of the largest temporary) one chunk may hold: 2**25 float32 values are 128 MiB.
DEFAULT_CHUNK_ELEMENTS = 2**25
# Rows of the original matrix ranked per step (at most; fewer when the chunk budget says so).
RANK_ROWS = 256


def check_distances(
    q_g_dist: Any, q_q_dist: Any, g_g_dist: Any, k1: int, k2: int, lambda_value: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate the three blocks and the parameters; return the blocks in one float dtype."""
    blocks = []
    for name, value in (("q_g_dist", q_g_dist), ("q_q_dist", q_q_dist), ("g_g_dist", g_g_dist)):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.ndim != 2:
            raise ValueError(f"{name} must be a 2-D distance matrix, got shape {array.shape}")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{name} must hold numbers, got dtype {array.dtype}")
        blocks.append(array)
    q_g, q_q, g_g = blocks
    num_query, num_gallery = q_g.shape
    if num_query == 0 or num_gallery == 0:
        raise ValueError(f"q_g_dist has shape {q_g.shape}: need at least one query and gallery")
    if q_q.shape != (num_query, num_query):
        raise ValueError(
            f"q_q_dist has shape {q_q.shape}, expected ({num_query}, {num_query}) "
            f"(query x query, from q_g_dist's {num_query} queries)"
        )
    if g_g.shape != (num_gallery, num_gallery):
        raise ValueError(
            f"g_g_dist has shape {g_g.shape}, expected ({num_gallery}, {num_gallery}) "
            f"(gallery x gallery, from q_g_dist's {num_gallery} gallery images)"
        )
    _check_parameters(k1, k2, lambda_value)
    # Squaring happens in the blocks' common precision, as when they are concatenated.
    dtype = np.result_type(q_g.dtype, q_q.dtype, g_g.dtype, np.float32)
    q_g, q_q, g_g = (block.astype(dtype, copy=False) for block in (q_g, q_q, g_g))
    for name, block in (("q_g_dist", q_g), ("q_q_dist", q_q), ("g_g_dist", g_g)):
        # A sum is NaN or infinite when any entry is, and needs no mask as large as the block.
        if not np.isfinite(block.sum(dtype=np.float64)):
            raise ValueError(f"{name} holds NaN or infinite distances")
    return q_g, q_q, g_g


def _check_parameters(k1: int, k2: int, lambda_value: float) -> None:
    """Raise ValueError unless k1 and k2 are integers >= 1 and lambda_value lies in [0, 1]."""
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value!r}")


def half_width(k1: int) -> int:
    """Neighbourhood size of the expansion candidates: round(k1 / 2) + 1, halves to even."""
    return int(np.around(k1 / 2.0)) + 1


@dataclass
class _Blocks:
    """The three distance blocks on one device, with the column maxima of the squared matrix."""

    q_g: torch.Tensor
    q_q: torch.Tensor
    g_g: torch.Tensor

    @property
    def num_query(self) -> int:
        return self.q_g.shape[0]

    @property
    def count(self) -> int:
        return self.q_g.shape[0] + self.q_g.shape[1]

    def columns(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Columns ``start:stop`` of the (n x n) distance matrix as absolute values, into ``out``.

        Squaring is monotone on absolute values: ranking them ranks the squared matrix.
        """
        nq = self.num_query
        if stop <= nq:
            parts = (self.q_q[:, start:stop].T, self.q_g[start:stop])
        else:
            parts = (self.q_g[:, start - nq : stop - nq].T, self.g_g[:, start - nq : stop - nq].T)
        return torch.cat(parts, dim=1, out=out).abs_()

    def full_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Entries ``full[rows, cols]`` of the (n x n) distance matrix the blocks form."""
        nq = self.num_query
        row_query, col_query = rows < nq, cols < nq
        rq, rg = rows.clamp(max=nq - 1), (rows - nq).clamp(min=0)
        cq, cg = cols.clamp(max=nq - 1), (cols - nq).clamp(min=0)
        top = torch.where(col_query, self.q_q[rq, cq], self.q_g[rq, cg])
        bottom = torch.where(col_query, self.q_g[cq, rg], self.g_g[rg, cg])
        return torch.where(row_query, top, bottom)


def _row_ranges(blocks: _Blocks, rows_per_chunk: int) -> list[tuple[int, int]]:
    """Row chunks that never straddle the query/gallery boundary."""
    ranges = []
    for begin, end in ((0, blocks.num_query), (blocks.num_query, blocks.count)):
        for start in range(begin, end, rows_per_chunk):
            ranges.append((start, min(start + rows_per_chunk, end)))
    return ranges


def _rank_rows(
    blocks: _Blocks, width: int, rows_per_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``width`` columns of every row's stable ascending order, and the column maxima.

    A partial sort of the absolute distances picks the ``width + 1`` smallest; only those are
    squared and normalised. Squaring and dividing by a row's constant keep the order but may
    round distinct values to equal ones: a row whose picked normalised values hold a tie (where
    the partial sort's order is unspecified) is normalised and sorted in full, stably.
    """
    count = blocks.count
    device, dtype = blocks.q_g.device, blocks.q_g.dtype
    ranks = torch.empty((count, width), dtype=torch.long, device=device)
    col_max = torch.empty(count, dtype=torch.float32, device=device)
    pick = min(width + 1, count)

    def normalised(distances: torch.Tensor, maxima: torch.Tensor) -> torch.Tensor:
        return (distances * distances).to(torch.float32) / maxima

    # One buffer for every chunk: a fresh (chunk x n) allocation per chunk costs more than the
    # arithmetic on it.
    buffer = torch.empty((min(rows_per_chunk, count), count), dtype=dtype, device=device)
    for start, stop in _row_ranges(blocks, rows_per_chunk):
        distances = blocks.columns(start, stop, buffer[: stop - start])
        largest = distances.amax(dim=1)
        maxima = col_max[start:stop] = (largest * largest).to(torch.float32)
        values, order = torch.topk(distances, pick, dim=1, largest=False, sorted=True)
        values = normalised(values, maxima[:, None])
        ties = (values[:, 1:] == values[:, :-1]).any(dim=1)
        if pick == count:
            ties |= True
        tied = torch.nonzero(ties).flatten()
        if tied.numel():
            original = normalised(distances[tied], maxima[tied, None])
            order[tied] = torch.sort(original, dim=1, stable=True).indices[:, :pick]
        ranks[start:stop] = order[:, :width]
    return ranks, col_max


def _mutual(ranks: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """``mask[r, t]``: row ``rows[r]`` is among the first ``width`` of its t-th neighbour."""
    ahead = ranks[rows, :width]
    return (ranks[ahead, :width] == rows[:, None, None]).any(dim=2)


def _weights(
    blocks: _Blocks, ranks: torch.Tensor, col_max: torch.Tensor, k1: int, rows_per_chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V as sorted coordinates (rows, cols, values): expanded k-reciprocal sets, exp-weighted."""
    count = blocks.count
    device = ranks.device
    width = min(k1 + 1, count)
    half = min(half_width(k1), count)
    everyone = torch.arange(count, device=device)
    # Every image's own half-width reciprocal set, computed once: a mask over its first `half`.
    half_mask = torch.cat(
        [_mutual(ranks, everyone[a:b], half) for a, b in _row_ranges(blocks, rows_per_chunk)]
    )
    half_size = half_mask.sum(dim=1).to(torch.float64)
    out_rows, out_cols, out_vals = [], [], []
    for start, stop in _row_ranges(blocks, rows_per_chunk):
        rows = everyone[start:stop]
        chunk = stop - start
        ahead = ranks[start:stop, :width]
        core_mask = _mutual(ranks, rows, width)
        # Membership of the core set as a dense (chunk x n) mask, plus a spare last column that
        # collects the writes of entries which are not members.
        member = torch.zeros((chunk, count + 1), dtype=torch.bool, device=device)
        member.scatter_(1, torch.where(core_mask, ahead, count), True)
        near = ranks[ahead, :half]
        near_mask = half_mask[ahead]
        inside = member.gather(1, near.reshape(chunk, -1)).view_as(near) & near_mask
        overlap = inside.sum(dim=2).to(torch.float64)
        accept = core_mask & (overlap > (2.0 / 3.0) * half_size[ahead])
        joined = near_mask & accept[:, :, None]
        expanded = member.clone()
        expanded.scatter_(1, torch.where(joined, near, count).reshape(chunk, -1), True)
        local, cols = torch.nonzero(expanded[:, :count], as_tuple=True)
        rows_global = local + start
        squared = blocks.full_at(cols, rows_global)
        original = (squared * squared).to(torch.float32) / col_max[rows_global]
        closeness = torch.exp(-original)
        totals = torch.zeros(chunk, dtype=torch.float64, device=device)
        totals.index_add_(0, local, closeness.to(torch.float64))
        out_rows.append(rows_global)
        out_cols.append(cols)
        out_vals.append(closeness / totals[local].to(torch.float32))
    return torch.cat(out_rows), torch.cat(out_cols), torch.cat(out_vals)


def _query_expansion(
    rows: torch.Tensor,
    cols: torch.Tensor,
    vals: torch.Tensor,
    ranks: torch.Tensor,
    k2: int,
    element_budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each row of V by the mean of the rows of its first ``k2`` neighbours."""
    count = ranks.shape[0]
    take = min(k2, count)
    row_len = torch.bincount(rows, minlength=count)
    row_start = torch.cumsum(row_len, 0) - row_len
    sources = ranks[:, :take]
    gathered = row_len[sources].sum(dim=1)
    out_rows, out_cols, out_vals = [], [], []
    for start, stop in _budget_ranges(gathered, element_budget):
        src = sources[start:stop].reshape(-1)
        # Each gathered entry's source row (segment) and its offset within that row.
        counts = row_len[src]
        segment = torch.repeat_interleave(torch.arange(counts.numel(), device=rows.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        offset = torch.arange(segment.numel(), device=rows.device) - starts[segment]
        position = row_start[src][segment] + offset
        target = torch.arange(start, stop, device=rows.device).repeat_interleave(take)[segment]
        keys = target * count + cols[position]
        unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        sums = torch.zeros(unique.numel(), dtype=torch.float32, device=rows.device)
        sums.index_add_(0, inverse, vals[position])
        out_rows.append(unique // count)
        out_cols.append(unique % count)
        out_vals.append(sums / take)
    return torch.cat(out_rows), torch.cat(out_cols), torch.cat(out_vals)


def _budget_ranges(cost: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Consecutive index ranges whose summed ``cost`` stays within ``budget`` (at least 1 each)."""
    total = torch.cumsum(cost.to(torch.int64), 0).cpu().numpy()
    ranges, start, done = [], 0, 0
    while start < total.size:
        stop = int(np.searchsorted(total, done + budget, side="right"))
        stop = max(stop, start + 1)
        ranges.append((start, stop))
        done, start = int(total[stop - 1]), stop
    return ranges


def _jaccard(
    rows: torch.Tensor,
    cols: torch.Tensor,
    vals: torch.Tensor,
    num_query: int,
    count: int,
    element_budget: int,
) -> torch.Tensor:
    """``1 - m / (2 - m)`` with ``m[i, j] = sum_k min(V[i, k], V[j, k])``, query i, gallery j.

    Every (query non-zero, gallery non-zero) pair of a shared column adds its minimum to the
    overlap of its two images: the pairs are expanded a chunk of query rows at a time.
    """
    num_gallery = count - num_query
    device = rows.device
    is_query = rows < num_query
    q_rows, q_cols, q_vals = rows[is_query], cols[is_query], vals[is_query]
    # The gallery rows of V by column (an inverted index): which gallery images weight column k.
    g_rows, g_cols, g_vals = rows[~is_query], cols[~is_query], vals[~is_query]
    by_col = torch.argsort(g_cols, stable=True)
    # Pair indices in int32 halve most of the memory traffic; they stay far below 2**31 (a chunk's
    # overlaps, V's non-zeros).
    g_rows, g_vals = (g_rows[by_col] - num_query).int(), g_vals[by_col]
    col_len = torch.bincount(g_cols, minlength=count)
    pairs = col_len[q_cols]
    pair_start = (torch.cumsum(col_len, 0) - col_len).int()[q_cols]
    q_local = q_rows.int()
    per_query = torch.zeros(num_query, dtype=torch.int64, device=device)
    per_query.index_add_(0, q_rows, pairs)
    query_end = torch.cumsum(torch.bincount(q_rows, minlength=num_query), 0).cpu().numpy()
    # A chunk holds its overlaps (rows x gallery) and its pairs; small chunks stay in cache.
    cost = per_query + num_gallery
    jaccard = torch.empty((num_query, num_gallery), dtype=torch.float32, device=device)
    for start, stop in _budget_ranges(cost, min(element_budget, 2**22)):
        first = int(query_end[start - 1]) if start else 0
        last = int(query_end[stop - 1])
        counts = pairs[first:last]
        total = int(counts.sum())
        offsets = (torch.cumsum(counts, 0) - counts).int()
        position = torch.repeat_interleave(
            pair_start[first:last] - offsets, counts, output_size=total
        )
        position += torch.arange(total, dtype=torch.int32, device=device)
        base = (q_local[first:last] - start) * num_gallery
        target = torch.repeat_interleave(base, counts, output_size=total)
        target += g_rows[position]
        own = torch.repeat_interleave(q_vals[first:last], counts, output_size=total)
        overlap = torch.zeros((stop - start) * num_gallery, dtype=torch.float32, device=device)
        overlap.index_add_(0, target, torch.minimum(own, g_vals[position]))
        overlap = overlap.view(stop - start, num_gallery)
        jaccard[start:stop] = 1.0 - overlap / (2.0 - overlap)
    return jaccard


def rerank(
    q_g_dist: Any,
    q_q_dist: Any,
    g_g_dist: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    device: str | torch.device | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> np.ndarray:
    """k-reciprocal re-ranked (query x gallery) distances as a float32 NumPy array.

    ``q_g_dist``, ``q_q_dist``, ``g_g_dist`` are the query-gallery, query-query and
    gallery-gallery distances (NumPy arrays or tensors); k1=20, k2=6, lambda_value=0.3 are the
    paper's parameters; lambda_value=1 returns the (normalised, squared) original distances.
    Distances must be non-negative with smaller meaning closer (e.g. Euclidean), since they
    are squared. ``device`` runs the work there (default: the CPU). No (n x n) matrix is formed:
    besides the caller's blocks, about 0.75 GiB was measured for a 13,909 x 1,608 problem.
    """
    q_g, q_q, g_g = check_distances(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    target = torch.device(device) if device is not None else torch.device("cpu")
    blocks = _Blocks(
        *(torch.from_numpy(np.ascontiguousarray(b)).to(target) for b in (q_g, q_q, g_g))
    )
    count, num_query = blocks.count, blocks.num_query
    rows_per_chunk = max(1, chunk_elements // count)
    width = min(max(k1 + 1, k2), count)
    # Ranking touches every entry once; rows of a few MiB keep its chunk buffer in cache.
    ranks, col_max = _rank_rows(blocks, width, min(rows_per_chunk, RANK_ROWS))
    # Each row's neighbour lookups hold about width**2 entries; keep a chunk within the budget.
    neighbour_rows = max(1, chunk_elements // (width * (width + half_width(k1) + 1)))
    rows, cols, vals = _weights(blocks, ranks, col_max, k1, min(rows_per_chunk, neighbour_rows))
    if k2 != 1:
        rows, cols, vals = _query_expansion(rows, cols, vals, ranks, k2, chunk_elements)
    jaccard = _jaccard(rows, cols, vals, num_query, count, chunk_elements)
    squared = blocks.q_g * blocks.q_g
    original = squared.to(torch.float32) / col_max[:num_query, None]
    final = jaccard * (1.0 - lambda_value) + original * lambda_value
    return final.cpu().numpy()


@dataclass(frozen=True)
class RerankSettings:
    """The parameters of a re-ranked evaluation (the paper's by default)."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self) -> None:
        _check_parameters(self.k1, self.k2, self.lambda_value)

    def as_dict(self) -> dict[str, float]:
        """The parameters by name, as results record them."""
        return {"k1": int(self.k1), "k2": int(self.k2), "lambda_value": float(self.lambda_value)}

    def describe(self) -> str:
        """A short phrase for titles: "re-ranked k1=20 k2=6 lambda=0.3"."""
        return f"re-ranked k1={self.k1} k2={self.k2} lambda={self.lambda_value:g}"


def rerank_features(
    query: Any, gallery: Any, settings: RerankSettings, device: str | torch.device | None = None
) -> np.ndarray:
    """Re-ranked (query x gallery) distances of L2-normalised feature rows (arrays or tensors).

    The three blocks are the Euclidean distances of the features (non-negative, smaller is
    closer), as the re-ranking's definition expects.
    """
    q, g = (
        x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        for x in (query, gallery)
    )
    blocks = (euclidean_distances(a, b) for a, b in ((q, g), (q, q), (g, g)))
    return rerank(*blocks, settings.k1, settings.k2, settings.lambda_value, device=device)


def euclidean_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` and ``b`` (float32), the usual input here."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)


__all__ = ["rerank"]
