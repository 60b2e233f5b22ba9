"""Exact, fast CMC, mAP and mINP in our own vectorised code; the distances and flip test the
evaluation and search share.

The labels of an evaluation are built once (`Labels`: query and gallery person and camera ids),
and one function per input kind scores them: `evaluate_distances` (a distance matrix) and
`evaluate_features` (features; distances made in query chunks), each returning `Scores` (CMC,
mAP and mINP together). `evaluate_rank` is the adapter with the signature and meaning of
`torchreid.metrics.evaluate_rank`. Instead of sorting every gallery row (Torchreid's way), each
query's few true matches are sorted and every other gallery item is only bucketed among them
(`torch.searchsorted`): that is all CMC and AP need. Queries are processed in chunks, so memory
stays bounded for any gallery size.

A query is never matched with its own image file: where a file is listed both as query and as
gallery (a duplicate CSV row, a link; with unknown cameras nothing else would keep it out),
`Labels` carry file ids and that gallery item is left out of the query's ranking, as an image
of the query's person from its own camera is. Where no file repeats, nothing changes.

mINP (Ye et al., "Deep Learning for Person Re-identification", TPAMI 2021) is the mean over kept
queries of (number of true matches) / (1-based rank of the last, hardest true match): how much of
the list a person must check to find every match. CUHK03's single-gallery-shot protocol has
none (`Scores.mINP` is None there).

Ties: a wrong match at exactly the same distance as a true match is ranked before it (the
pessimistic reading). Torchreid's unstable argsort orders ties arbitrarily, so results on
inputs with ties can differ from it in either direction; on tie-free inputs they are identical.

NaN or infinite distances are an error (`NonFiniteError`): every comparison with NaN is false,
so they would otherwise give made-up numbers (all-NaN scored 100% here, ~5% in Torchreid).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import numpy as np
import torch

from reidkit.data.checks import DIST_METRICS
from reidkit.data.files import file_ids
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
    evaluation and passed whole instead of four parallel arrays. `q_files`/`g_files`, where
    some query's image file is also in the gallery: int64 file ids, equal for one file (see
    `reidkit.data.files.file_ids`), so that a query is never matched with its own file; None
    otherwise."""
    q_pids: torch.Tensor
    g_pids: torch.Tensor
    q_camids: torch.Tensor
    g_camids: torch.Tensor
    q_files: torch.Tensor | None = None
    g_files: torch.Tensor | None = None

    @classmethod
    def of(cls, q_pids, g_pids, q_camids, g_camids) -> Labels:
        """From arrays, lists or tensors (one id per image)."""
        return cls(_as_tensor(q_pids), _as_tensor(g_pids), _as_tensor(q_camids),
                   _as_tensor(g_camids))

    @classmethod
    def of_items(cls, query, gallery) -> Labels:
        """From Torchreid's dataset items, (path, pid, camid, ...) each, with file ids."""
        labels = cls.of(*(np.array([item[k] for item in items])
                          for k, items in ((1, query), (1, gallery), (2, query), (2, gallery))))
        return labels.with_files([item[0] for item in query], [item[0] for item in gallery])

    def with_files(self, query_paths, gallery_paths) -> Labels:
        """These labels, with the file ids of the images' paths (one per query and gallery
        image, in order) where a query's file is also in the gallery (`file_ids`)."""
        ids = file_ids(query_paths, gallery_paths)
        if ids is None:
            return self
        return replace(self, q_files=torch.from_numpy(ids[0]).to(self.q_pids.device),
                       g_files=torch.from_numpy(ids[1]).to(self.g_pids.device))

    @property
    def num_queries(self) -> int:
        return len(self.q_pids)

    @property
    def num_gallery(self) -> int:
        return len(self.g_pids)

    def counts(self) -> dict[str, int]:
        """How many query and gallery images, and how many identities among each."""
        return {'num_query': self.num_queries, 'num_gallery': self.num_gallery,
                'num_query_ids': len(torch.unique(self.q_pids)),
                'num_gallery_ids': len(torch.unique(self.g_pids))}

    def to(self, device: torch.device) -> Labels:
        return Labels(*(None if ids is None else ids.to(device) for ids in
                        (self.q_pids, self.g_pids, self.q_camids, self.g_camids, self.q_files,
                         self.g_files)))

    def queries(self, start: int, end: int) -> Labels:
        """The labels of queries start..end-1 (one chunk) against the whole gallery."""
        return Labels(self.q_pids[start:end], self.g_pids, self.q_camids[start:end],
                      self.g_camids, None if self.q_files is None else self.q_files[start:end],
                      self.g_files)

    def same_person(self) -> torch.Tensor:
        return self.q_pids[:, None] == self.g_pids[None, :]

    def ignored(self) -> torch.Tensor:
        """(queries x gallery) True where a gallery item shows the query's person in the
        query's camera, or is the query's own file: such items are ignored by the evaluation,
        by visrank and by nothing else."""
        ignored = self.same_person() & (self.q_camids[:, None] == self.g_camids[None, :])
        if self.q_files is not None:
            ignored |= self.q_files[:, None] == self.g_files[None, :]
        return ignored


class Scores(NamedTuple):
    """One evaluation's result. `cmc[k]`: the fraction of kept queries whose first true match
    is within rank k+1 (float32 array, length min(max_rank, gallery size)); mAP and mINP:
    floats in [0, 1]; mINP is None under CUHK03's single-gallery-shot protocol (it has none)."""
    cmc: np.ndarray
    mAP: float
    mINP: float | None


class QueryRanks(NamedTuple):
    """Per query: `first`, the 0-based rank of its first true match (-1: none in another
    camera: the query is not kept), its `ap` and its `inp` (nan where not kept)."""
    first: np.ndarray
    ap: np.ndarray
    inp: np.ndarray

    def kept(self) -> np.ndarray:
        kept = self.first >= 0
        if not kept.any():
            raise ValueError('Error: all query identities do not appear in gallery')
        return kept

    def scores(self, max_rank: int) -> Scores:
        """CMC to `max_rank`, mAP and mINP over the kept queries; ValueError if none is kept."""
        kept = self.kept()
        hits = self.first[kept, None] <= np.arange(max_rank)[None, :]
        cmc = hits.astype(np.float32).sum(0) / float(kept.sum())
        return Scores(cmc, float(np.mean(self.ap[kept])), float(np.mean(self.inp[kept])))


# (a chunk's distances, its positive pairs, its negative pairs: masks as _rank_chunk keeps them)
Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def _rank_chunk(dist: torch.Tensor, labels: Labels, observe: Observer | None = None):
    """For a chunk of queries: (first-match rank or -1, AP or nan, INP or nan) per query.
    `observe(dist, positive, negative)`, if given, sees the chunk's pairs as they are split."""
    match = labels.same_person()
    ignored = labels.ignored()
    positive = match & ~ignored              # true matches seen by another camera
    negative = ~(match | ignored)            # everything else that is kept (not the query's file)
    if observe is not None:
        observe(dist, positive, negative)
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


DistanceRows = Callable[[int, int], torch.Tensor]   # (start, end) -> those queries' distances


def _rank_in_chunks(distance_rows: DistanceRows, labels: Labels,
                    chunk: int = QUERY_CHUNK, observe: Observer | None = None) -> QueryRanks:
    """`_rank_chunk` over query chunks; NonFiniteError if any distance is NaN or inf.
    `observe`, if given, sees each chunk's distances and pairs too (reidkit.evaluate.
    verification's pairs are collected in the same pass)."""
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
        first, ap, inp = _rank_chunk(dist, labels.queries(start, end), observe)
        firsts.append(first)
        aps.append(ap)
        inps.append(inp)
    if non_finite:
        raise _non_finite_error(non_finite, labels.num_queries * labels.num_gallery,
                                'query-gallery distances')
    return QueryRanks(*(torch.cat(values).cpu().numpy() for values in (firsts, aps, inps)))


def _gallery_max_rank(labels: Labels, max_rank: int) -> int:
    if labels.num_gallery < max_rank:
        print(f'Note: number of gallery samples is quite small, got {labels.num_gallery}')
        return labels.num_gallery
    return max_rank


def matrix_rows(distmat) -> DistanceRows:
    dist = _as_tensor(distmat)
    return lambda start, end: dist[start:end]


def rank_queries(distmat, labels: Labels) -> QueryRanks:
    """Each query's first-match rank, AP and INP from a (queries x gallery) distance matrix,
    under the same protocol as `evaluate_distances`. NaN or inf distances: NonFiniteError."""
    return _rank_in_chunks(matrix_rows(distmat), labels)


def evaluate_distances(distmat, labels: Labels, max_rank: int = 50,
                       single_gallery_shot: bool = False) -> Scores:
    """CMC, mAP and mINP of a (queries x gallery) distance matrix (numpy or a tensor, on any
    device), under the Market-1501 protocol: a gallery item with the query's pid and camera
    is ignored; a query without any true match in another camera is skipped (ValueError if
    all are). With `single_gallery_shot`, CUHK03's protocol (see `_single_gallery_shot`; no
    mINP). NaN or infinite distances raise `NonFiniteError`."""
    max_rank = _gallery_max_rank(labels, max_rank)
    if single_gallery_shot:
        return _single_gallery_shot(_as_tensor(distmat).cpu(), labels, max_rank)
    return rank_queries(distmat, labels).scores(max_rank)


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  use_metric_cuhk03: bool = False, use_cython: bool = True):
    """(cmc, mAP), as `torchreid.metrics.evaluate_rank`: `evaluate_distances` on these ids.
    `use_cython` is accepted for compatibility and ignored."""
    labels = Labels.of(q_pids, g_pids, q_camids, g_camids)
    return evaluate_distances(distmat, labels, max_rank, use_metric_cuhk03)[:2]


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


def _single_gallery_shot(distmat: torch.Tensor, labels: Labels, max_rank: int) -> Scores:
    """CUHK03's single-gallery-shot protocol: one gallery image of every identity is sampled
    and ranked. Torchreid estimates its CMC from 10 random samplings; this is the exact
    expectation (each identity's image ranks ahead of a true match with probability = the
    share of its images that are closer): deterministic and noise-free. mAP is over all kept
    images, as in Torchreid. Ties count against the true match, as everywhere here."""
    ranks = rank_queries(distmat, labels)          # also checks for NaN/inf
    dist = distmat.numpy()
    _, identity = np.unique(labels.g_pids.numpy(), return_inverse=True)
    cmcs = []
    for q in np.flatnonzero(ranks.kept()):
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
    cmc = np.mean(cmcs, axis=0).astype(np.float32)
    return Scores(cmc, float(np.mean(ranks.ap[ranks.first >= 0])), None)


def squared_euclidean(query: torch.Tensor, gallery: torch.Tensor, *,
                      query_sq_norms: torch.Tensor | None = None,
                      gallery_sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Squared euclidean distances (Torchreid's 'euclidean'), query rows x gallery rows:
    |q|^2 + |g|^2 - 2 q.g. The squared row norms may be passed when the same rows are used
    for many chunks."""
    if query_sq_norms is None:
        query_sq_norms = query.pow(2).sum(1)
    if gallery_sq_norms is None:
        gallery_sq_norms = gallery.pow(2).sum(1)
    dist = query_sq_norms[:, None] + gallery_sq_norms[None, :]
    return dist.addmm_(query, gallery.t(), beta=1, alpha=-2)


def paired_squared_euclidean(a: torch.Tensor, b: torch.Tensor, a_sq_norms: torch.Tensor,
                             b_sq_norms: torch.Tensor) -> torch.Tensor:
    """|a_k - b_k|^2 for each pair of rows k (a, b: pairs x dimensions), by the formula of
    `squared_euclidean`, from the rows' squared norms."""
    return (a_sq_norms + b_sq_norms).add_((a * b).sum(1), alpha=-2)


# Rows shorter than this count as zero when made unit length (torch.nn.functional.normalize's).
UNIT_EPS = 1e-12


def _check_metric(metric: str) -> None:
    if metric not in DIST_METRICS:
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")


def distance_rows(query: torch.Tensor, gallery: torch.Tensor, metric: str) -> DistanceRows:
    """Distances of query rows start..end-1 to the whole gallery, squared euclidean (as
    Torchreid) or cosine (1 - cosine similarity, as Torchreid's `compute_distance_matrix(...,
    'cosine')`; a zero row is at distance 1 from everything). ValueError for another metric."""
    _check_metric(metric)
    if metric == 'cosine':
        query = torch.nn.functional.normalize(query, dim=1, eps=UNIT_EPS)
        gallery_t = torch.nn.functional.normalize(gallery, dim=1, eps=UNIT_EPS).t()
        return lambda start, end: 1 - query[start:end] @ gallery_t
    norms = gallery.pow(2).sum(1)
    return lambda start, end: squared_euclidean(query[start:end], gallery,
                                                gallery_sq_norms=norms)


def distances(query: torch.Tensor, gallery: torch.Tensor,
              metric: str = 'euclidean') -> torch.Tensor:
    """Squared euclidean (as Torchreid) or cosine distances, query rows x gallery rows."""
    return distance_rows(query, gallery, metric)(0, len(query))


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """float32 (n, d) rows divided by their L2 norms (by UNIT_EPS where smaller), as
    `distance_rows` normalises them for the cosine distance: what search's index holds and
    is searched with for DIST_METRIC='cosine'."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.sqrt(np.einsum('ij,ij->i', rows, rows))
    return rows / np.maximum(norms, UNIT_EPS)[:, None]


def one_query_distances(query: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """The distances of `distances` from one query (d,) to a few rows (n, d), float32 numpy,
    in numpy's single-threaded loops: search re-ranks each query's few hundred candidates
    with it, where torch's threads would only wait for each other on a busy machine. Squared
    euclidean as |g|^2 - 2 g.q + |q|^2, or 1 - cosine similarity. ValueError for another
    metric."""
    _check_metric(metric)
    if metric == 'cosine':      # each row's dot product divided by its norm: no unit copy
        norms = np.sqrt(np.einsum('ij,ij->i', rows, rows))
        return 1 - (rows @ unit_rows(query[None])[0]) / np.maximum(norms, UNIT_EPS)
    return np.einsum('ij,ij->i', rows, rows) - 2 * np.einsum('ij,j->i', rows, query) + \
        np.dot(query, query)


def evaluate_features(query_features, gallery_features, labels: Labels,
                      metric: str = 'euclidean', max_rank: int = 50,
                      chunk: int = QUERY_CHUNK, observe: Observer | None = None) -> Scores:
    """CMC, mAP and mINP (as `evaluate_distances`) straight from (images x dimensions)
    features, never holding the whole distance matrix.

    Distances are computed for `chunk` queries at a time, where the features are, so memory
    is the features plus a few (chunk x gallery) arrays: MSMT17's 11,659 x 82,161 fits in a
    few GB instead of ~12 GB. NaN or infinite features (or distances that overflow) raise
    `NonFiniteError`. `observe`: see `_rank_in_chunks`.
    """
    qf, gf = _as_tensor(query_features).float(), _as_tensor(gallery_features).float()
    # Checked here first: cheaper than the distances, and the count is of what went wrong.
    non_finite = _count_non_finite(qf) + _count_non_finite(gf)
    if non_finite:
        raise _non_finite_error(non_finite, qf.numel() + gf.numel(),
                                'query and gallery feature values')
    max_rank = _gallery_max_rank(labels, max_rank)
    return _rank_in_chunks(distance_rows(qf, gf, metric), labels, chunk,
                           observe).scores(max_rank)


def flip_averaged(extract: Callable[[torch.Tensor], torch.Tensor],
                  images: torch.Tensor) -> torch.Tensor:
    """The flip test (as fast-reid's): the mean, in float32, of the features `extract` gives
    for a batch of NCHW images and for their mirror images (flipped left-right)."""
    return (extract(images).float() + extract(images.flip(3)).float()) / 2
