"""Exact, fast CMC and mAP in our own vectorised code, installed into Torchreid in one place.

`evaluate_rank` has the signature and meaning of `torchreid.metrics.evaluate_rank`. Instead of
sorting every gallery row (Torchreid's way), each query's few true matches are sorted and every
other gallery item is only bucketed among them (`torch.searchsorted`): that is all CMC and AP
need. Queries are processed in chunks, so memory stays bounded for any gallery size.

Ties: a wrong match at exactly the same distance as a true match is ranked before it (the
pessimistic reading). Torchreid's unstable argsort orders ties arbitrarily, so results on
inputs with ties can differ from it in either direction; on tie-free inputs they are identical.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

# Queries per chunk: a chunk holds a few (chunk x gallery) arrays, ~0.6 GB at 128 x 100k.
QUERY_CHUNK = 128


def _as_tensor(array) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))


def _rank_chunk(dist: torch.Tensor, q_pids, g_pids, q_camids, g_camids):
    """For a chunk of queries: (first-match rank or -1, AP or nan) per query."""
    match = q_pids[:, None] == g_pids[None, :]
    same_camera = q_camids[:, None] == g_camids[None, :]
    positive = match & ~same_camera          # true matches seen by another camera
    negative = ~match                        # everything else that is kept; junk is dropped
    num_pos = positive.sum(1)
    most = int(num_pos.max()) if len(num_pos) else 0
    first = torch.full((len(dist),), -1, dtype=torch.long)
    ap = torch.full((len(dist),), float('nan'), dtype=torch.float64)
    if most == 0:
        return first, ap

    inf = torch.tensor(float('inf'), dtype=dist.dtype)
    pos_dist = torch.topk(torch.where(positive, dist, inf), most, dim=1, largest=False).values
    # bucket b of a wrong match = number of true matches strictly closer than it; it is then
    # ranked before true matches b, b+1, ... (ties count against us).
    bucket = torch.searchsorted(pos_dist.contiguous(), dist.contiguous(), side='left')
    per_bucket = torch.zeros(len(dist), most + 1, dtype=torch.int32)
    per_bucket.scatter_add_(1, bucket, negative.to(torch.int32))   # only wrong matches count
    negatives_before = per_bucket[:, :most].cumsum(1)

    order = torch.arange(most)
    rank = negatives_before + order + 1                      # 1-based rank of each true match
    valid = order[None, :] < num_pos[:, None]
    precision = torch.where(valid, (order + 1).double() / rank.double(), 0.0)
    has_match = num_pos > 0
    ap[has_match] = precision.sum(1)[has_match] / num_pos[has_match].double()
    first[has_match] = negatives_before[has_match, 0]
    return first, ap


def summarise_ranks(first: np.ndarray, ap: np.ndarray, max_rank: int):
    """(cmc, mAP) from each query's first-match rank (-1: no valid match) and AP."""
    kept = first >= 0
    if not kept.any():
        raise ValueError('Error: all query identities do not appear in gallery')
    hits = first[kept, None] <= np.arange(max_rank)[None, :]
    cmc = hits.astype(np.float32).sum(0) / float(kept.sum())
    return cmc, float(np.mean(ap[kept]))


def _rank_in_chunks(distance_rows, num_q: int, q_pids, g_pids, q_camids, g_camids,
                    chunk: int = QUERY_CHUNK):
    """Runs `_rank_chunk` over query chunks; `distance_rows(start, end)` gives their distances."""
    q_pids, g_pids = _as_tensor(q_pids), _as_tensor(g_pids)
    q_camids, g_camids = _as_tensor(q_camids), _as_tensor(g_camids)
    firsts, aps = [], []
    for start in range(0, num_q, chunk):
        end = min(start + chunk, num_q)
        first, ap = _rank_chunk(distance_rows(start, end), q_pids[start:end], g_pids,
                                q_camids[start:end], g_camids)
        firsts.append(first)
        aps.append(ap)
    return torch.cat(firsts).numpy(), torch.cat(aps).numpy()


def _evaluate_in_chunks(distance_rows, num_q: int, num_g: int, q_pids, g_pids, q_camids,
                        g_camids, max_rank: int, chunk: int):
    if num_g < max_rank:
        print(f'Note: number of gallery samples is quite small, got {num_g}')
        max_rank = num_g
    first, ap = _rank_in_chunks(distance_rows, num_q, q_pids, g_pids, q_camids, g_camids,
                                chunk)
    return summarise_ranks(first, ap, max_rank)


def rank_queries(distmat, q_pids, g_pids, q_camids, g_camids):
    """Per query: the 0-based rank of its first true match (-1: none) and its AP (nan: none),
    under the same protocol as `evaluate_rank`."""
    dist = _as_tensor(distmat)
    return _rank_in_chunks(lambda start, end: dist[start:end], dist.shape[0], q_pids, g_pids,
                           q_camids, g_camids)


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  use_metric_cuhk03: bool = False, use_cython: bool = True):
    """(cmc, mAP) under the Market-1501 protocol, as `torchreid.metrics.evaluate_rank`.

    A gallery item with the query's pid and camera is ignored; a query without any true match
    in another camera is skipped. `cmc[k]` is the fraction of kept queries whose first true
    match is within rank k+1 (float32 array of length min(max_rank, gallery size)); mAP is a
    float. `use_cython` is accepted for compatibility and ignored. With `use_metric_cuhk03`,
    the CMC is CUHK03's single-gallery-shot one (see `evaluate_single_gallery_shot`).
    """
    if use_metric_cuhk03:
        return evaluate_single_gallery_shot(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    dist = _as_tensor(distmat)
    return _evaluate_in_chunks(lambda start, end: dist[start:end], dist.shape[0], dist.shape[1],
                               q_pids, g_pids, q_camids, g_camids, max_rank, QUERY_CHUNK)


def _single_shot_cmc(before: np.ndarray, max_rank: int) -> np.ndarray:
    """P(rank < k+1), k < max_rank, averaged over the query's true matches, when each other
    identity's one sampled image comes before true match j with probability before[i, j]."""
    cmc = np.zeros(max_rank)
    for column in before.T:
        certain = int((column >= 1).sum())          # wholly ahead: a fixed shift of the rank
        if certain >= max_rank:
            continue
        rank = np.ones(1)
        for p in column[(column > 0) & (column < 1)]:
            rank = np.convolve(rank, [1 - p, p])[:max_rank - certain]
        cmc[certain:certain + len(rank)] += rank
    return np.cumsum(cmc) / before.shape[1]


def evaluate_single_gallery_shot(distmat, q_pids, g_pids, q_camids, g_camids,
                                 max_rank: int = 50):
    """(cmc, mAP) under CUHK03's single-gallery-shot protocol.

    The protocol samples one gallery image of every identity and ranks those; Torchreid
    estimates its CMC from 10 random samplings. This gives the exact expectation instead (each
    identity's image ranks ahead of a true match with probability = the share of its images
    that are closer), so it is deterministic and noise-free. mAP is over all kept images, as
    in Torchreid. Ties count against the true match, as in `evaluate_rank`.
    """
    dist = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_g = dist.shape[1]
    if num_g < max_rank:
        print(f'Note: number of gallery samples is quite small, got {num_g}')
        max_rank = num_g
    first, ap = rank_queries(dist, q_pids, g_pids, q_camids, g_camids)
    _, identity = np.unique(g_pids, return_inverse=True)
    cmcs = []
    for q in np.flatnonzero(first >= 0):
        kept = ~((g_pids == q_pids[q]) & (g_camids == q_camids[q]))
        positive = kept & (g_pids == q_pids[q])
        others = kept & ~positive
        true_match = np.sort(dist[q, positive])
        # bucket b: the number of true matches strictly closer; ahead of matches b, b+1, ...
        bucket = np.searchsorted(true_match, dist[q, others], side='left')
        ids, local = np.unique(identity[others], return_inverse=True)
        counts = np.zeros((len(ids), len(true_match) + 1))
        np.add.at(counts, (local, bucket), 1)
        ahead = np.cumsum(counts, axis=1)[:, :len(true_match)]
        cmcs.append(_single_shot_cmc(ahead / counts.sum(1, keepdims=True), max_rank))
    if not cmcs:
        raise ValueError('Error: all query identities do not appear in gallery')
    cmc = np.mean(cmcs, axis=0).astype(np.float32)
    return cmc, float(np.mean(ap[first >= 0]))


def same_person_same_camera(q_pids, g_pids, q_camids, g_camids) -> torch.Tensor:
    """(queries x gallery) True where a gallery item shows the query's person in the query's
    camera: such items are ignored by the evaluation, by visrank and by nothing else."""
    q_pids, g_pids = _as_tensor(q_pids), _as_tensor(g_pids)
    q_camids, g_camids = _as_tensor(q_camids), _as_tensor(g_camids)
    return (q_pids[:, None] == g_pids[None, :]) & (q_camids[:, None] == g_camids[None, :])


def squared_euclidean(query: torch.Tensor, gallery: torch.Tensor,
                      gallery_sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Squared euclidean distances (Torchreid's 'euclidean'), query rows x gallery rows.
    `gallery_sq_norms` may be passed when the same gallery is used for many query chunks."""
    if gallery_sq_norms is None:
        gallery_sq_norms = gallery.pow(2).sum(1)
    dist = query.pow(2).sum(1, keepdim=True) + gallery_sq_norms[None, :]
    return dist.addmm_(query, gallery.t(), beta=1, alpha=-2)


def distances(query: torch.Tensor, gallery: torch.Tensor, metric: str = 'euclidean',
              gallery_sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Squared euclidean (as Torchreid) or cosine distances, query rows x gallery rows."""
    if metric == 'cosine':
        return 1 - torch.nn.functional.normalize(query, dim=1) @ \
            torch.nn.functional.normalize(gallery, dim=1).t()
    if metric != 'euclidean':
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    return squared_euclidean(query, gallery, gallery_sq_norms)


def evaluate_features(query_features, gallery_features, q_pids, g_pids, q_camids, g_camids,
                      metric: str = 'euclidean', max_rank: int = 50, chunk: int = QUERY_CHUNK):
    """(cmc, mAP) straight from features, never holding the whole distance matrix.

    Distances are computed for `chunk` queries at a time, so memory is the features plus a
    few (chunk x gallery) arrays: MSMT17's 11,659 x 82,161 fits in a few GB instead of ~12 GB.
    """
    qf, gf = _as_tensor(query_features).float(), _as_tensor(gallery_features).float()
    if metric == 'cosine':
        qf, gf = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
        rows = lambda start, end: 1 - qf[start:end] @ gf.t()   # noqa: E731
    else:
        g_norms = gf.pow(2).sum(1)
        rows = lambda start, end: distances(qf[start:end], gf, metric, g_norms)  # noqa: E731
    return _evaluate_in_chunks(rows, len(qf), len(gf), q_pids, g_pids, q_camids, g_camids,
                               max_rank, chunk)


# --- installation into Torchreid -------------------------------------------------------------
_recorders: list[list] = []


def _evaluate_and_record(*args, **kwargs):
    cmc, mAP = evaluate_rank(*args, **kwargs)
    for results in _recorders:
        results.append((cmc, mAP))
    return cmc, mAP


def install() -> None:
    """Makes every Torchreid evaluation (engine.test, visrank, in-training) use ours.

    Torchreid's engine calls `torchreid.reid.metrics.evaluate_rank` through the package
    attribute, so replacing that attribute is enough; nothing else in Torchreid changes.
    """
    import torchreid.reid.metrics as torchreid_metrics
    torchreid_metrics.evaluate_rank = _evaluate_and_record


@contextlib.contextmanager
def record_evaluations() -> Iterator[list]:
    """Collects the (cmc, mAP) of every installed evaluation made inside the block."""
    results: list = []
    _recorders.append(results)
    try:
        yield results
    finally:
        _recorders.remove(results)
