"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), sparse: memory grows with k x images.

`re_ranking` has the signature and result of `torchreid.reid.utils.re_ranking`: it takes the
three distance matrices (query-gallery, query-query, gallery-gallery) and returns the re-ranked
query x gallery distances. `re_ranking_features` gives the same result straight from features,
never holding more than the query x gallery result and a few (chunk x chunk) blocks, so it runs
at MSMT17 scale; the engine uses it.

Torchreid's algorithm, as both functions reproduce it, on all N = queries + gallery images:
- D is the N x N distance matrix of its inputs; original(i, j) = D(j, i)^2 / max_k D(k, i)^2
  (squared again, then each column scaled by its maximum, then transposed).
- initial_rank(i) = the images in order of original(i, .), i itself normally first.
- R(i, k) = the k-reciprocal set: j among i's k+1 nearest with i among j's k+1 nearest.
- The expansion set of i is R(i, k1) plus R(c, round(k1/2)) for each c in R(i, k1) sharing more
  than 2/3 of its members with R(i, k1); V(i, j) = exp(-original(i, j)) over that set,
  normalised to sum 1. With k2 > 1, V(i) becomes the mean of V over i's k2 nearest.
- jaccard(i, j) = 1 - s / (2 - s), s = sum_k min(V(i, k), V(j, k)); the result is
  (1 - lambda) * jaccard + lambda * original, the query rows and gallery columns.
Everything here is float32, like Torchreid's; sums may be added in another order (last-bit
differences). Ties among equal distances may order neighbours differently from Torchreid's
unstable argsort: results can then differ, as any two sorts' would.
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from reidkit.evaluate.metrics import check_finite, paired_squared_euclidean, squared_euclidean
from reidkit.run.errors import UserError

# Images per block of the neighbour search: a block pair holds a few (chunk x chunk) float32
# arrays, ~0.3 GB at 4096.
CHUNK = 4096
# Rows per step of the sparse stages, and (query, gallery) pairs per step of the Jaccard join:
# each bounds a few arrays of that many int64 entries.
ROW_CHUNK = 4096
PAIR_CHUNK = 1 << 22
# Query x gallery Jaccard sums accumulated at once (float32 each): 4 MB, so that the scattered
# additions into them stay in the cache.
JACCARD_CHUNK = 1 << 20
# Image pairs whose distance is computed from gathered features at once (2 x 32 MB at 2048-d).
GATHER_CHUNK = 4096

PairDistances = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (i, j) -> original


@dataclass(frozen=True)
class Reranking:
    """The parameters of k-reciprocal re-ranking (Torchreid's defaults): k1 neighbours make
    the reciprocal sets, k2 the query expansion; the result is (1 - lambda_value) * Jaccard
    + lambda_value * original distance. UserError when k1, k2 are not whole numbers >= 1 or
    lambda_value is not in [0, 1]."""
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self) -> None:
        for name, k in (('k1', self.k1), ('k2', self.k2)):
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                raise UserError(
                    f're-ranking needs {name} to be a whole number of at least 1 (it counts '
                    f'neighbours), got {k!r}. Torchreid\'s defaults are k1=20, k2=6.')
        lambda_value = self.lambda_value
        if isinstance(lambda_value, bool) or not isinstance(lambda_value, numbers.Real) \
                or not 0 <= lambda_value <= 1:
            raise UserError(
                f're-ranking needs lambda_value between 0 and 1 (the weight of the original '
                f'distance against the Jaccard distance), got {lambda_value!r}. Torchreid\'s '
                f'default is 0.3.')

    def __str__(self) -> str:
        """'k1=20, k2=6, lambda=0.3', as the evaluation line names them."""
        return f'k1={self.k1}, k2={self.k2}, lambda={self.lambda_value}'


@dataclass(frozen=True)
class _Neighbours:
    """Each image's nearest images by original distance (`index`, nearest first) with those
    distances (`original`), and `pair_original` for any other (i, j) pairs."""
    index: torch.Tensor
    original: torch.Tensor
    pair_original: PairDistances


@dataclass(frozen=True)
class _SparseRows:
    """An N x N matrix in CSR form: row i's columns and values lie at pointers[i]..[i+1]-1."""
    pointers: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor


def _check_column_maxima(maxima: torch.Tensor) -> None:
    """Scaling by each image's largest distance needs it finite and non-zero."""
    check_finite(maxima, 'largest re-ranking distances (squared distances, squared again)')
    zero = int((maxima <= 0).sum())
    if zero:
        raise UserError(
            f'{zero:,} images are at distance 0 from every image, so re-ranking (which divides '
            f'by each image\'s largest distance) is undefined. All features are identical: the '
            f'model collapsed, or the wrong features were passed. Check the model\'s features '
            f'or evaluate without re-ranking.')


@contextlib.contextmanager
def _exact_float32(device: torch.device):
    """Distances decide who is a neighbour: no TF32 or bfloat16 matmuls and no autograd,
    whatever the caller has set; the caller's settings come back afterwards."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def _reciprocal(knn: torch.Tensor, width: int) -> torch.Tensor:
    """(N x width) True where neighbour s of i has i among its own `width` nearest."""
    me = torch.arange(len(knn), device=knn.device)
    found = torch.empty(len(knn), width, dtype=torch.bool, device=knn.device)
    nearest = knn[:, :width]
    for start in range(0, len(knn), ROW_CHUNK):
        rows = nearest[start:start + ROW_CHUNK]
        found[start:start + ROW_CHUNK] = \
            (nearest[rows] == me[start:start + len(rows), None, None]).any(-1)
    return found


def _distinct_per_row(members: torch.Tensor, absent: int):
    """Each row's distinct members, ascending then padded with `absent`, and their count."""
    ordered = members.sort(1).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    ordered = ordered.masked_fill(repeat, absent).sort(1).values
    count = (ordered != absent).sum(1)
    return ordered[:, :int(count.max())], count


def _expansion_sets(knn: torch.Tensor, k1: int):
    """Each image's expansion set as (row, column) pairs, row-major, columns ascending."""
    n = len(knn)
    forward = min(k1 + 1, n)
    half = min(round(k1 / 2) + 1, n)        # Python's round, like numpy's: half to even
    reciprocal = _reciprocal(knn, forward)
    half_reciprocal = _reciprocal(knn, half)
    half_size = half_reciprocal.sum(1).double()
    rows, cols = [], []
    for start in range(0, n, ROW_CHUNK):
        near = knn[start:start + ROW_CHUNK, :forward]                      # B x F
        in_set = reciprocal[start:start + ROW_CHUNK]                       # R(i): B x F
        their_near = knn[near, :half]                                      # B x F x H
        their_set = half_reciprocal[near]                                  # R(c): B x F x H
        shared = ((their_near[..., None] == near[:, None, None, :])
                  & in_set[:, None, None, :]).any(-1) & their_set
        # Torchreid's test, in the same float64 arithmetic: |R(c) & R(i)| > 2/3 |R(c)|
        accept = in_set & (shared.sum(-1).double() > 2. / 3 * half_size[near])
        members = torch.cat([near.masked_fill(~in_set, n),
                             their_near.masked_fill(~(their_set & accept[..., None]), n)
                             .flatten(1)], 1)
        members, count = _distinct_per_row(members, n)
        valid = members < n
        rows.append(torch.arange(start, start + len(near), device=knn.device)
                    .repeat_interleave(count))
        cols.append(members[valid])
    return torch.cat(rows), torch.cat(cols)


def _lookup_or_compute(rows, cols, neighbours: _Neighbours):
    """original(rows, cols): from the neighbour lists where there, else `pair_original`."""
    values = torch.empty(len(rows), dtype=torch.float32, device=rows.device)
    for start in range(0, len(rows), PAIR_CHUNK // 16):
        r, c = rows[start:start + PAIR_CHUNK // 16], cols[start:start + PAIR_CHUNK // 16]
        hit = neighbours.index[r] == c[:, None]
        found = hit.any(1)
        chunk = neighbours.original[r].gather(1, hit.int().argmax(1, keepdim=True))[:, 0]
        missing = ~found
        if missing.any():
            chunk[missing] = neighbours.pair_original(r[missing], c[missing])
        values[start:start + len(r)] = chunk
    return values


def _row_pointers(rows: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([rows.new_zeros(1), torch.bincount(rows, minlength=n).cumsum(0)])


def _gather_segments(pointers, segments):
    """(owner, position): for each listed segment, every position pointers[s]..pointers[s+1]-1,
    owner = the segment's place in `segments`. (index_select: faster than [] on the CPU.)"""
    starts = pointers.index_select(0, segments)
    counts = pointers.index_select(0, segments + 1) - starts
    owner = torch.repeat_interleave(counts)
    shift = starts - (counts.cumsum(0) - counts)
    position = torch.arange(len(owner), device=owner.device).add_(shift.index_select(0, owner))
    return owner, position


def _query_expansion(v: _SparseRows, knn, k2: int) -> _SparseRows:
    """V(i) := mean of V over i's k2 nearest (i normally among them), sparse."""
    pointers, cols, vals = v.pointers, v.cols, v.vals
    n = len(pointers) - 1
    k2 = min(k2, n)
    new_rows, new_cols, new_vals = [], [], []
    for start in range(0, n, ROW_CHUNK):
        nearest = knn[start:start + ROW_CHUNK, :k2].flatten()
        owner, position = _gather_segments(pointers, nearest)
        key = (owner // k2 + start) * n + cols.index_select(0, position)
        key, inverse = torch.unique(key, sorted=True, return_inverse=True)
        total = torch.zeros(len(key), dtype=vals.dtype, device=vals.device)
        total.index_add_(0, inverse, vals.index_select(0, position))
        new_rows.append(key // n)
        new_cols.append(key % n)
        new_vals.append(total / k2)
    rows = torch.cat(new_rows)
    return _SparseRows(_row_pointers(rows, n), torch.cat(new_cols), torch.cat(new_vals))


def _combine_with_jaccard(result: torch.Tensor, scale: torch.Tensor, v: _SparseRows,
                          lambda_value: float) -> None:
    """result (query x gallery, squared distances squared on entry) := (1 - lambda) * jaccard
    + lambda * result / scale, Jaccard from the sparse V (query rows first)."""
    pointers, cols, vals = v.pointers, v.cols, v.vals
    n, device, num_query = len(pointers) - 1, vals.device, len(result)
    num_gallery = n - num_query
    scale = scale.to(device)
    # The gallery rows of V by column (an inverted index): which gallery images hold column k.
    g_start = int(pointers[num_query])
    g_rows = torch.arange(num_query, n, device=device).repeat_interleave(
        pointers[num_query + 1:] - pointers[num_query:-1]) - num_query
    by_col = torch.argsort(cols[g_start:], stable=True)
    g_rows, g_vals = g_rows[by_col], vals[g_start:][by_col]
    col_pointers = _row_pointers(cols[g_start:][by_col], n)
    rows_per_step = max(1, min(num_query, JACCARD_CHUNK // num_gallery))
    for start in range(0, num_query, rows_per_step):
        end = min(start + rows_per_step, num_query)
        lo, hi = int(pointers[start]), int(pointers[end])
        # each entry's place in `shared`, less the gallery image
        q_base = torch.arange(end - start, device=device).mul_(num_gallery).repeat_interleave(
            pointers[start + 1:end + 1] - pointers[start:end])
        q_cols, q_vals = cols[lo:hi], vals[lo:hi]
        pairs = (col_pointers[q_cols + 1] - col_pointers[q_cols]).cumsum(0)
        shared = torch.zeros((end - start) * num_gallery, dtype=vals.dtype, device=device)
        entry = 0
        while entry < len(q_cols):          # entries in groups of about PAIR_CHUNK pairs
            done = int(pairs[entry - 1]) if entry else 0
            stop = max(entry + 1, int(torch.searchsorted(pairs, done + PAIR_CHUNK, right=True)))
            owner, position = _gather_segments(col_pointers, q_cols[entry:stop])
            shared.index_add_(0, q_base[entry:stop].index_select(0, owner)
                              .add_(g_rows.index_select(0, position)),
                              torch.minimum(q_vals[entry:stop].index_select(0, owner),
                                            g_vals.index_select(0, position)))
            entry = stop
        shared = shared.view(end - start, num_gallery)
        jaccard = 1 - shared / (2. - shared)
        original = result[start:end].to(device) / scale[start:end, None]
        result[start:end] = (jaccard * (1 - lambda_value) + original * lambda_value).cpu()


def _rerank(neighbours: _Neighbours, result: torch.Tensor, scale: torch.Tensor,
            parameters: Reranking) -> np.ndarray:
    """The shared second half: from each image's nearest neighbours (queries first) to the
    re-ranked result, written into `result` (query x gallery; see `_combine_with_jaccard`,
    `scale`: the queries' largest distances)."""
    n = len(neighbours.index)
    rows, cols = _expansion_sets(neighbours.index, parameters.k1)
    weights = torch.exp(-_lookup_or_compute(rows, cols, neighbours))
    sums = torch.zeros(n, dtype=weights.dtype, device=weights.device).index_add_(0, rows, weights)
    v = _SparseRows(_row_pointers(rows, n), cols, weights / sums[rows])
    if parameters.k2 != 1:
        v = _query_expansion(v, neighbours.index, parameters.k2)
    _combine_with_jaccard(result, scale, v, parameters.lambda_value)
    return result.numpy()


def _neighbour_count(n: int, parameters: Reranking) -> int:
    return min(n, max(parameters.k1 + 1, parameters.k2))


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3) -> np.ndarray:
    """Torchreid's `re_ranking`, same arguments and float32 result, vectorised and sparse.

    The three distance matrices (numpy arrays or tensors) are those Torchreid's engine passes:
    squared euclidean (or cosine) query x gallery, query x query and gallery x gallery. The
    (queries + gallery)^2 matrix is built once (Torchreid builds several); for galleries where
    that is too large, use `re_ranking_features`. NaN or infinite distances raise
    `NonFiniteError`; k1, k2 < 1 or lambda_value outside [0, 1] raise `UserError`.
    """
    parameters = Reranking(k1, k2, lambda_value)
    blocks = [torch.as_tensor(np.asarray(d) if not isinstance(d, torch.Tensor) else d).cpu()
              for d in (q_g_dist, q_q_dist, g_g_dist)]
    q_g, q_q, g_g = blocks
    num_query, num_gallery = q_g.shape
    if q_q.shape != (num_query, num_query) or g_g.shape != (num_gallery, num_gallery):
        raise UserError(
            f're-ranking needs a query x gallery, a query x query and a gallery x gallery '
            f'distance matrix; got shapes {tuple(q_g.shape)}, {tuple(q_q.shape)} and '
            f'{tuple(g_g.shape)}. Pass them in that order, all from the same features.')
    for d, what in zip(blocks, ('query-gallery', 'query-query', 'gallery-gallery')):
        check_finite(d, f'{what} distances')
    # Squared in the inputs' common precision, then float32, as numpy does for Torchreid.
    dtype = torch.promote_types(torch.promote_types(q_g.dtype, q_q.dtype), g_g.dtype)
    n = num_query + num_gallery
    squared = torch.empty(n, n)
    for rows, cols, block in ((slice(0, num_query), slice(0, num_query), q_q),
                              (slice(0, num_query), slice(num_query, n), q_g),
                              (slice(num_query, n), slice(0, num_query), q_g.t()),
                              (slice(num_query, n), slice(num_query, n), g_g)):
        squared[rows, cols] = block.to(dtype).square()
    col_max = squared.amax(0)
    _check_column_maxima(col_max)
    # original(i, j) = squared(j, i) / col_max(i): row i is column i, so rows come in blocks.
    count = _neighbour_count(n, parameters)
    knn = torch.empty(n, count, dtype=torch.long)
    knn_original = torch.empty(n, count)
    for start in range(0, n, CHUNK):
        end = min(start + CHUNK, n)
        original = (squared[:, start:end] / col_max[start:end]).t()
        knn_original[start:end], knn[start:end] = torch.topk(original, count, 1, largest=False)
    result = squared[num_query:, :num_query].t().contiguous()
    neighbours = _Neighbours(knn, knn_original, lambda i, j: squared[j, i] / col_max[i])
    return _rerank(neighbours, result, col_max[:num_query], parameters)


def _merge_nearest(best_dist, best_index, dist, offset: int):
    """Keeps, per row, the `count` smallest of the running best and this block's columns."""
    count = best_dist.shape[1]
    block_dist, block_index = torch.topk(dist, min(count, dist.shape[1]), 1, largest=False)
    merged = torch.cat([best_dist, block_dist], 1)
    merged_index = torch.cat([best_index, block_index + offset], 1)
    best_dist, chosen = torch.topk(merged, count, 1, largest=False)
    return best_dist, merged_index.gather(1, chosen)


def _nearest_in_blocks(features, sq_norms, num_query, count, result, chunk):
    """One pass over the upper triangle of (chunk x chunk) blocks of the squared-squared
    distances: each image's `count` nearest, each image's largest distance, and the
    query x gallery block into `result`. Each block serves its rows and (transposed) its
    columns, so each distance is computed once and the matrix is symmetric bit for bit."""
    n, device = len(features), features.device
    best_dist = torch.full((n, count), float('inf'), device=device)
    best_index = torch.zeros(n, count, dtype=torch.long, device=device)
    largest = torch.zeros(n, device=device)
    for a in range(0, n, chunk):
        a_end = min(a + chunk, n)
        for b in range(a, n, chunk):
            b_end = min(b + chunk, n)
            dist = squared_euclidean(features[a:a_end], features[b:b_end],
                                     query_sq_norms=sq_norms[a:a_end],
                                     gallery_sq_norms=sq_norms[b:b_end]).square_()
            largest[a:a_end] = torch.maximum(largest[a:a_end], dist.amax(1))
            best_dist[a:a_end], best_index[a:a_end] = _merge_nearest(
                best_dist[a:a_end], best_index[a:a_end], dist, b)
            if b != a:
                largest[b:b_end] = torch.maximum(largest[b:b_end], dist.amax(0))
                best_dist[b:b_end], best_index[b:b_end] = _merge_nearest(
                    best_dist[b:b_end], best_index[b:b_end], dist.t().contiguous(), a)
            # query rows x gallery columns: a <= b, so always in this orientation
            rows, cols = slice(a, min(a_end, num_query)), slice(max(b, num_query), b_end)
            if rows.start < rows.stop and cols.start < cols.stop:
                result[rows, cols.start - num_query:cols.stop - num_query].copy_(
                    dist[rows.start - a:rows.stop - a, cols.start - b:cols.stop - b])
    return best_dist, best_index, largest


def re_ranking_features(query_features, gallery_features,
                        parameters: Reranking = Reranking(),
                        device: torch.device | str | None = None,
                        chunk: int = CHUNK, metric: str = 'euclidean') -> np.ndarray:
    """Re-ranked query x gallery distances (float32 numpy) straight from features.

    The result is `re_ranking(qg, qq, gg)` on the distance matrices of these features that
    Torchreid's engine passes (`compute_distance_matrix(..., metric)`): squared euclidean
    ('euclidean'), or 1 - cosine similarity ('cosine'). The original distance inside is that
    distance squared, scaled by each image's largest. For 'cosine' the features are
    L2-normalised first: their squared euclidean distances are then exactly 2 x the cosine
    distances, and re-ranking (which only ever divides an image's distances by its largest)
    gives the same result from them, up to float rounding. Neither the (queries + gallery)^2 nor the gallery^2 matrix is built: the
    neighbour search runs over (chunk x chunk) blocks and keeps only each image's nearest; V
    is sparse. Memory: the query x gallery result, a copy of the features, and
    O(images x k1 x k2) (MSMT17's 11,659 x 82,161 at 2048-d: about 4.5 GB besides the caller's
    features, 3.8 GB of it the result). Runs where `device` says (default: where the features
    are); the result comes back to the CPU. NaN or infinite features raise
    `NonFiniteError`; bad shapes raise `UserError` (as bad parameters do, in `Reranking`);
    a metric other than 'euclidean' or 'cosine' raises ValueError.
    """
    if metric not in ('euclidean', 'cosine'):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    qf, gf = (f if isinstance(f, torch.Tensor) else torch.from_numpy(np.asarray(f))
              for f in (query_features, gallery_features))
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1] or not len(qf) \
            or not len(gf):
        raise UserError(
            f're-ranking needs query and gallery features as two non-empty (images x '
            f'dimensions) arrays of the same width; got shapes {tuple(qf.shape)} and '
            f'{tuple(gf.shape)}.')
    check_finite(qf, 'query feature values')
    check_finite(gf, 'gallery feature values')
    device = torch.device(device) if device is not None else qf.device
    with _exact_float32(device):
        features = torch.cat([qf.to(device, torch.float32), gf.to(device, torch.float32)])
        if metric == 'cosine':
            features = torch.nn.functional.normalize(features, dim=1)
        return _re_ranking_features(features, len(qf), parameters, chunk)


def _re_ranking_features(features: torch.Tensor, num_query: int, parameters: Reranking,
                         chunk: int) -> np.ndarray:
    """`re_ranking_features` on the queries' then the gallery's features, one tensor."""
    n = len(features)
    result = torch.empty(num_query, n - num_query)              # always on the CPU
    sq_norms = features.pow(2).sum(1)
    knn_dist, knn, largest = _nearest_in_blocks(features, sq_norms, num_query,
                                                _neighbour_count(n, parameters), result, chunk)
    _check_column_maxima(largest)

    def pair_original(i, j):        # the same formula as the blocks, a few pairs at a time
        dist = torch.cat([paired_squared_euclidean(features[i[s]], features[j[s]],
                                                   sq_norms[i[s]], sq_norms[j[s]])
                          for s in (slice(start, start + GATHER_CHUNK)
                                    for start in range(0, len(i), GATHER_CHUNK))])
        return dist.square_() / largest[i]

    return _rerank(_Neighbours(knn, knn_dist / largest[:, None], pair_original), result,
                   largest[:num_query].cpu(), parameters)
