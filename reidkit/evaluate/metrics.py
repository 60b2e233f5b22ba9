"""Exact, fast CMC, mAP and mINP in our own vectorised code, installed into Torchreid in one place.

`evaluate_rank` has the signature and meaning of `torchreid.metrics.evaluate_rank`. Instead of
sorting every gallery row (Torchreid's way), each query's few true matches are sorted and every
other gallery item is only bucketed among them (`torch.searchsorted`): that is all CMC and AP
need. Queries are processed in chunks, so memory stays bounded for any gallery size.

mINP (Ye et al., "Deep Learning for Person Re-identification", TPAMI 2021) is the mean over kept
queries of (number of true matches) / (1-based rank of the last, hardest true match): how much of
the list a person must check to find every match. `evaluate_rank_all` and
`evaluate_features_all` report it beside CMC and mAP; CUHK03's single-shot mode does not.

Ties: a wrong match at exactly the same distance as a true match is ranked before it (the
pessimistic reading). Torchreid's unstable argsort orders ties arbitrarily, so results on
inputs with ties can differ from it in either direction; on tie-free inputs they are identical.

NaN or infinite distances are an error (`NonFiniteError`): every comparison with NaN is false,
so they would otherwise give made-up numbers (all-NaN scored 100% here, ~5% in Torchreid).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from reidkit.run.errors import UserError

# Queries per chunk: a chunk holds a few (chunk x gallery) arrays, ~0.6 GB at 128 x 100k.
QUERY_CHUNK = 128


class NonFiniteError(UserError):
    """Distances or features that are NaN or infinite: the model diverged."""


def _as_tensor(array) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))


def _count_non_finite(values: torch.Tensor) -> int:
    if not values.is_floating_point():
        return 0
    if values.device.type != 'cpu':            # counted where the values are: one number back
        return int((~torch.isfinite(values)).sum())
    # numpy's isfinite is ~30x faster than torch's on the CPU; this runs on every chunk.
    finite = np.isfinite(values.detach().cpu().numpy())
    return finite.size - int(np.count_nonzero(finite))


def _non_finite_error(bad: int, total: int, what: str) -> NonFiniteError:
    return NonFiniteError(
        f'{bad:,} of the {total:,} {what} are NaN or infinite, so no ranking, Rank-1 or mAP '
        f'can be computed (they would be made-up numbers). The model\'s features are NaN/inf (or so '
        f'large that distances overflow): training diverged. Retrain with a lower learning rate '
        f'(--LR=..., e.g. a tenth), or, if WEIGHTS names a checkpoint, use one saved before it '
        f'diverged.'
    )


def check_finite(values, what: str) -> None:
    """NonFiniteError naming how many of `values` (e.g. 'query-gallery distances') are NaN
    or infinite, if any are."""
    values = _as_tensor(values)
    bad = _count_non_finite(values)
    if bad:
        raise _non_finite_error(bad, values.numel(), what)


@dataclass(frozen=True)
class Labels:
    """Person and camera ids of the queries and of the gallery, as tensors: built once per
    evaluation and passed whole instead of four parallel arrays."""
    q_pids: torch.Tensor
    g_pids: torch.Tensor
    q_camids: torch.Tensor
    g_camids: torch.Tensor

    @classmethod
    def of(cls, q_pids, g_pids, q_camids, g_camids) -> Labels:
        return cls(_as_tensor(q_pids), _as_tensor(g_pids), _as_tensor(q_camids),
                   _as_tensor(g_camids))

    @property
    def num_queries(self) -> int:
        return len(self.q_pids)

    @property
    def num_gallery(self) -> int:
        return len(self.g_pids)

    def to(self, device: torch.device) -> Labels:
        return Labels(*(ids.to(device) for ids in (self.q_pids, self.g_pids, self.q_camids,
                                                   self.g_camids)))

    def queries(self, start: int, end: int) -> Labels:
        """The labels of queries start..end-1 (one chunk) against the whole gallery."""
        return Labels(self.q_pids[start:end], self.g_pids, self.q_camids[start:end],
                      self.g_camids)

    def same_person(self) -> torch.Tensor:
        return self.q_pids[:, None] == self.g_pids[None, :]

    def ignored(self) -> torch.Tensor:
        return same_person_same_camera(self.q_pids, self.g_pids, self.q_camids, self.g_camids)


def _rank_chunk(dist: torch.Tensor, labels: Labels):
    """For a chunk of queries: (first-match rank or -1, AP or nan, INP or nan) per query."""
    match = labels.same_person()
    positive = match & ~labels.ignored()     # true matches seen by another camera
    negative = ~match                        # everything else that is kept; junk is dropped
    num_pos = positive.sum(1)
    most = int(num_pos.max()) if len(num_pos) else 0
    device = dist.device                     # the CPU, or a GPU where the features are
    first = torch.full((len(dist),), -1, dtype=torch.long, device=device)
    ap = torch.full((len(dist),), float('nan'), dtype=torch.float64, device=device)
    inp = ap.clone()
    if most == 0:
        return first, ap, inp

    inf = torch.tensor(float('inf'), dtype=dist.dtype, device=device)
    pos_dist = torch.topk(torch.where(positive, dist, inf), most, dim=1, largest=False).values
    # bucket b of a wrong match = number of true matches strictly closer than it; it is then
    # ranked before true matches b, b+1, ... (ties count against us).
    bucket = torch.searchsorted(pos_dist.contiguous(), dist.contiguous(), side='left')
    per_bucket = torch.zeros(len(dist), most + 1, dtype=torch.int32, device=device)
    per_bucket.scatter_add_(1, bucket, negative.to(torch.int32))   # only wrong matches count
    negatives_before = per_bucket[:, :most].cumsum(1)

    order = torch.arange(most, device=device)
    rank = negatives_before + order + 1                      # 1-based rank of each true match
    valid = order[None, :] < num_pos[:, None]
    precision = torch.where(valid, (order + 1).double() / rank.double(), 0.0)
    has_match = num_pos > 0
    ap[has_match] = precision.sum(1)[has_match] / num_pos[has_match].double()
    first[has_match] = negatives_before[has_match, 0]
    last_rank = rank.gather(1, (num_pos - 1).clamp(min=0)[:, None])[:, 0]   # hardest match
    inp[has_match] = num_pos[has_match].double() / last_rank[has_match].double()
    return first, ap, inp


def summarise_ranks(first: np.ndarray, ap: np.ndarray, max_rank: int):
    """(cmc, mAP) from each query's first-match rank (-1: no valid match) and AP."""
    kept = first >= 0
    if not kept.any():
        raise ValueError('Error: all query identities do not appear in gallery')
    hits = first[kept, None] <= np.arange(max_rank)[None, :]
    cmc = hits.astype(np.float32).sum(0) / float(kept.sum())
    return cmc, float(np.mean(ap[kept]))


def mean_inp(first: np.ndarray, inp: np.ndarray) -> float:
    """mINP over the kept queries (those with a valid match, as in `summarise_ranks`)."""
    return float(np.mean(inp[first >= 0]))


DistanceRows = Callable[[int, int], torch.Tensor]   # (start, end) -> those queries' distances


def _rank_in_chunks(distance_rows: DistanceRows, labels: Labels, chunk: int = QUERY_CHUNK):
    """(first, AP, INP) per query from `_rank_chunk` over query chunks; NonFiniteError if
    any distance is NaN or inf."""
    firsts, aps, inps = [], [], []
    non_finite = 0
    for start in range(0, labels.num_queries, chunk):
        end = min(start + chunk, labels.num_queries)
        dist = distance_rows(start, end)
        non_finite += _count_non_finite(dist)
        if non_finite:
            continue                # rank no more, but count the rest for the message
        if labels.q_pids.device != dist.device:     # distances on a GPU: rank them there
            labels = labels.to(dist.device)
        first, ap, inp = _rank_chunk(dist, labels.queries(start, end))
        firsts.append(first)
        aps.append(ap)
        inps.append(inp)
    if non_finite:
        raise _non_finite_error(non_finite, labels.num_queries * labels.num_gallery,
                                'query-gallery distances')
    return tuple(torch.cat(values).cpu().numpy() for values in (firsts, aps, inps))


def _gallery_max_rank(labels: Labels, max_rank: int) -> int:
    if labels.num_gallery < max_rank:
        print(f'Note: number of gallery samples is quite small, got {labels.num_gallery}')
        return labels.num_gallery
    return max_rank


def _evaluate_in_chunks(distance_rows: DistanceRows, labels: Labels, max_rank: int,
                        chunk: int = QUERY_CHUNK):
    """(cmc, mAP, mINP)."""
    max_rank = _gallery_max_rank(labels, max_rank)
    first, ap, inp = _rank_in_chunks(distance_rows, labels, chunk)
    return (*summarise_ranks(first, ap, max_rank), mean_inp(first, inp))


def _matrix_rows(distmat) -> DistanceRows:
    dist = _as_tensor(distmat)
    return lambda start, end: dist[start:end]


def rank_queries(distmat, q_pids, g_pids, q_camids, g_camids):
    """Per query: the 0-based rank of its first true match (-1: none), its AP and its INP
    (nan: none), under the same protocol as `evaluate_rank`."""
    return _rank_in_chunks(_matrix_rows(distmat), Labels.of(q_pids, g_pids, q_camids, g_camids))


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  use_metric_cuhk03: bool = False, use_cython: bool = True):
    """(cmc, mAP) under the Market-1501 protocol, as `torchreid.metrics.evaluate_rank`.

    A gallery item with the query's pid and camera is ignored; a query without any true match
    in another camera is skipped. `cmc[k]` is the fraction of kept queries whose first true
    match is within rank k+1 (float32 array of length min(max_rank, gallery size)); mAP is a
    float. `use_cython` is accepted for compatibility and ignored. With `use_metric_cuhk03`,
    the CMC is CUHK03's single-gallery-shot one (see `evaluate_single_gallery_shot`).
    NaN or infinite distances raise `NonFiniteError`.
    """
    labels = Labels.of(q_pids, g_pids, q_camids, g_camids)
    if use_metric_cuhk03:
        return _single_gallery_shot(distmat, labels, max_rank)
    return _evaluate_in_chunks(_matrix_rows(distmat), labels, max_rank)[:2]


def evaluate_rank_all(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50):
    """(cmc, mAP, mINP) under the Market-1501 protocol: `evaluate_rank` plus mINP, the mean
    over kept queries of (true matches) / (1-based rank of the last true match)."""
    return _evaluate_in_chunks(_matrix_rows(distmat),
                               Labels.of(q_pids, g_pids, q_camids, g_camids), max_rank)


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
    return _single_gallery_shot(distmat, Labels.of(q_pids, g_pids, q_camids, g_camids),
                                max_rank)


def _single_gallery_shot(distmat, labels: Labels, max_rank: int):
    max_rank = _gallery_max_rank(labels, max_rank)
    first, ap, _ = _rank_in_chunks(_matrix_rows(distmat), labels)   # also checks for NaN/inf
    dist = np.asarray(distmat)
    g_pids = labels.g_pids.numpy()
    _, identity = np.unique(g_pids, return_inverse=True)
    cmcs = []
    for q in np.flatnonzero(first >= 0):
        query = labels.queries(q, q + 1)
        kept = ~query.ignored()[0].numpy()
        positive = kept & query.same_person()[0].numpy()
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
    NaN or infinite features (or distances that overflow) raise `NonFiniteError`.
    """
    return evaluate_features_all(query_features, gallery_features, q_pids, g_pids, q_camids,
                                 g_camids, metric, max_rank, chunk)[:2]


def evaluate_features_all(query_features, gallery_features, q_pids, g_pids, q_camids,
                          g_camids, metric: str = 'euclidean', max_rank: int = 50,
                          chunk: int = QUERY_CHUNK):
    """(cmc, mAP, mINP) straight from features: `evaluate_features` plus mINP."""
    qf, gf = _as_tensor(query_features).float(), _as_tensor(gallery_features).float()
    # Checked here first: cheaper than the distances, and the count is of what went wrong.
    non_finite = _count_non_finite(qf) + _count_non_finite(gf)
    if non_finite:
        raise _non_finite_error(non_finite, qf.numel() + gf.numel(),
                                'query and gallery feature values')
    if metric == 'cosine':
        qf, gf = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
        rows = lambda start, end: 1 - qf[start:end] @ gf.t()   # noqa: E731
    else:
        g_norms = gf.pow(2).sum(1)
        rows = lambda start, end: distances(qf[start:end], gf, metric, g_norms)  # noqa: E731
    return _evaluate_in_chunks(rows, Labels.of(q_pids, g_pids, q_camids, g_camids), max_rank,
                               chunk)
