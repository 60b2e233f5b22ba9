"""Is it the same person? Verification (pair) scores and open-set identification, exact, on
the distances an evaluation ranks with, in bounded memory.

Pairs are those the CMC/mAP protocol scores (`metrics.Labels.ignored`): each query against
every gallery image it is ranked against, the same person from the same camera, junk and the
query's own file left out. Same person: a positive pair, anyone else: a negative one; every
query's pairs count (a query with no cross-camera mate adds negatives only). A pair matches
when its distance is <= the threshold.

Verification: ROC AUC, the equal error rate (EER) and its distance, TPR at FPR 1e-1, 1e-2,
1e-3 with their distances. Every positive pair's distance is a threshold candidate; TPR(t)
and FPR(t) count distances <= t. AUC counts a tie between a positive and a negative as 1/2:
it is then exactly the Mann-Whitney U statistic over (positives x negatives), divided by
their product (Mann & Whitney 1947; Hanley & McNeil 1982). The EER is the mean of FPR and
FNR at the candidate minimising |FPR - FNR| (the smallest such distance). A TPR at FPR r is
reported only when r x negatives >= 10 (else 'not enough negatives').

Open-set identification (NIST FRVT's vocabulary: "Face Recognition Vendor Test, Part 2:
Identification", NISTIR 8271, FPIR / FNIR; DIR = 1 - FNIR): each query's identity is left out
of the gallery in turn. A query's *impostor score* is its smallest distance to a gallery image
of anyone else. FPIR(t) = share of all queries whose impostor score is <= t (a search for an
absent person returns a false match); DIR(t) = share of mated queries (those with a true match
from another camera, NIST's mated searches) whose rank-1 is a true match (strictly nearer than
every stranger: ties rank the stranger first, as in `metrics`) at distance <= t. Reported: DIR
at FPIR 1e-1 and 1e-2 with their distances, each only when >= 10 queries resolve it (else
'not enough queries'); the MATCH_FPIR threshold (the largest t with FPIR(t) <= MATCH_FPIR,
just below the next impostor score); and an honest held-out estimate: queries split in two by
a hash of their identity seeded with SEED (the gallery stays whole), t picked on one half,
FPIR and DIR measured on the other, both ways.

Why a per-pair FPR of 1% is not a 1% false-alarm rate for a search: a search compares the
query with all G strangers of a gallery and reports the best of them, so it raises a false
alarm when *any* one of them is within t: roughly 1 - (1 - FPR)^G, near certainty for G in the
thousands. FPIR measures that best stranger directly, and so depends on the gallery's size
(more strangers, lower impostor scores): a threshold holds for galleries like the one it was
calibrated on, whose size is stored with it.

Memory and time: never a list of all pairs, and one pass over query chunks (the CMC/mAP pass
itself, through its `observe` hook, or a pass of its own). Before it, the positive pairs are
listed from the labels (few: queries x their matches) and their distances computed by the
pass's own code (`PairScores.expect`). The pass then collects each query's impostor score and
nearest true match, checks its positive distances against those expected, and counts each
chunk's negatives against the sorted positives (`_NegativeCounter`) and into the pictures'
fine bins. Where a positive distance differs from the one expected, `finish` counts the
negatives again in a second pass: exact either way. With re-ranking, distances depend on the
whole gallery while a search never re-ranks: verification is reported on them, open-set
numbers are not (None).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from reidkit.evaluate.metrics import QUERY_CHUNK, DistanceRows, Labels
from reidkit.run.words import counted

FPR_LEVELS = (1e-1, 1e-2, 1e-3)
FPIR_LEVELS = (1e-1, 1e-2)
MIN_RESOLVING = 10                # errors a rate must rest on: negatives, or queries
HISTOGRAM_BINS = 120
PICTURE_SHIFT = 13                # the pictures' fine bins: 2^10 in each power of two
PICTURE_BINS = 1 << (31 - PICTURE_SHIFT)
_INF_BIN = 0x7F800000 >> PICTURE_SHIFT     # where +inf falls
MIN_COLUMNS = 512                 # gallery columns of `expect`'s products (see PairScores)
KEYS_PER_POSITIVE = 16            # bins of `_NegativeCounter` per positive pair ...
MAX_KEYS = 1 << 22                # ... and at most (32 MB of counts)
ROC_POINTS = 2000                 # points of the ROC curve kept for roc.png
NOT_ENOUGH_NEGATIVES = 'not enough negatives'
NOT_ENOUGH_QUERIES = 'not enough queries'
RERANK_NOTE = ('open-set scores and the match threshold are not computed with RERANK: '
               're-ranked distances depend on the whole gallery, and search never re-ranks')


def _key(rate: float) -> str:
    return f'{rate:g}'             # '0.1', '0.01', '0.001': metrics.json's keys


def _below(value: float, dtype) -> float:
    """The largest number of the distances' dtype strictly below `value`, so that a distance
    equal to `value` does not match (a threshold compared in float32 stays below it)."""
    dtype = np.dtype(dtype)
    return float(np.nextafter(dtype.type(value), dtype.type(-np.inf)))


@dataclass
class Curves:
    """What distances.png and roc.png draw (not written to metrics.json): histogram `edges`
    (bins + 1) and counts of positive pairs, negative pairs and impostor scores; the ROC's
    `fpr`/`tpr` (at most ROC_POINTS + 1 points, at positive distances); `distance`: the
    distance's name for an axis; `marks`: {label: distance} of the reported thresholds."""
    edges: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    impostor: np.ndarray | None
    fpr: np.ndarray
    tpr: np.ndarray
    eer: float | None
    distance: str
    marks: dict = field(default_factory=dict)


@dataclass
class _Expected:
    """The positive pairs, listed from the labels before the pass (`_positive_pairs`), and
    their distances computed then by the pass's own code: pairs of queries a..b-1 are
    offsets[a]:offsets[b]."""
    q_idx: torch.Tensor
    g_idx: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor


@dataclass
class PairScores:
    """Collects one evaluation's pairs, chunk by chunk (`observe`), then `finish`es.

    `expect(rows, chunk)` first lists the positive pairs from the labels (few: queries x
    their matches) and computes their distances by the pass's own code: `rows` on the same
    query chunks, against only those pairs' gallery columns (at least MIN_COLUMNS, so that
    the matrix product takes the same path). `observe(dist, positive, negative)` takes one
    query chunk's (chunk x gallery) distances and its pairs (boolean masks, as `metrics`
    keeps them), on any device, in query order; it is the `observe` hook of
    `metrics.evaluate_features`, or `collect` runs both over a `DistanceRows` itself. Each
    chunk's negatives are then counted against the expected positives in that same pass
    (`_NegativeCounter`): exact, because each chunk's positive distances are checked to
    equal those expected, bit for bit. Where one does not (a matrix product whose rounding
    depends on the number of columns, as a GPU's may), or without `expect`, `finish` counts
    the negatives in a second pass over `rows`: exact either way."""
    labels: Labels
    _expected: _Expected | None = None
    _counter: _NegativeCounter | None = None
    _positives: list = field(default_factory=list)
    _impostor: list = field(default_factory=list)
    _nearest_true: list = field(default_factory=list)
    _picture: np.ndarray = field(default_factory=lambda: np.zeros(PICTURE_BINS, np.int64))
    _negatives: int = 0
    _seen: int = 0                   # queries observed so far
    _dtype: torch.dtype = torch.float32

    def expect(self, rows: DistanceRows, chunk: int = QUERY_CHUNK) -> PairScores:
        """Lists the positive pairs and computes their distances before the pass (see the
        class); `chunk`: the pass's queries per chunk."""
        q_idx, g_idx = _positive_pairs(self.labels)
        offsets = torch.searchsorted(q_idx, torch.arange(self.labels.num_queries + 1))
        padding = torch.arange(min(MIN_COLUMNS, self.labels.num_gallery))
        values = []
        for start in range(0, self.labels.num_queries, chunk):
            end = min(start + chunk, self.labels.num_queries)
            first, last = int(offsets[start]), int(offsets[end])
            if first < last:
                columns, column = torch.unique(g_idx[first:last], return_inverse=True)
                dist = rows(start, end, torch.cat([columns, padding]))
                values.append(dist[(q_idx[first:last] - start).to(dist.device),
                                   column.to(dist.device)])
        values = torch.cat(values) if values else torch.zeros(0)
        if not torch.isfinite(values).all():
            return self     # counted in a second pass, if at all: the CMC pass names the cause
        self._expected = _Expected(q_idx, g_idx, offsets, values)
        self._counter = _NegativeCounter(torch.sort(values).values)
        return self

    @property
    def one_pass(self) -> bool:
        """Whether the pass has counted every negative (`finish` then reads no distances)."""
        return self._counter is not None and self._seen == self.labels.num_queries

    def observe(self, dist: torch.Tensor, positive: torch.Tensor,
                negative: torch.Tensor) -> None:
        start, end = self._seen, self._seen + len(dist)
        self._seen, self._dtype = end, dist.dtype
        inf = torch.tensor(float('inf'), dtype=dist.dtype, device=dist.device)
        negatives = torch.where(negative, dist, inf)           # the others: +inf
        self._impostor.append(negatives.amin(1).cpu())
        self._picture += _picture_counts(negatives)
        count = int(torch.count_nonzero(negative))
        self._negatives += count
        listed = self._listed(start, end, positive)
        if listed is None:                 # the masks' own pairs; negatives: a second pass
            q_local = positive.nonzero()[:, 0]
            values = dist[positive]
            self._counter = None
        else:
            q_local, g_idx, expected = listed
            values = dist[q_local, g_idx]
            if self._counter is not None and not torch.equal(values, expected):
                self._counter = None
        self._positives.append(values.cpu())
        self._nearest_true.append(torch.full((len(dist),), float('inf'), dtype=dist.dtype)
                                  .scatter_reduce_(0, q_local.cpu(), values.cpu(), 'amin'))
        if self._counter is not None:
            self._counter.add(negatives, count)

    def _listed(self, start: int, end: int, positive: torch.Tensor):
        """(query in the chunk, gallery item, expected distance) of the chunk's listed
        positive pairs, on the masks' device, when they are the mask's pairs; else None."""
        if self._expected is None:
            return None
        expected = self._expected
        first, last = int(expected.offsets[start]), int(expected.offsets[end])
        q_local = (expected.q_idx[first:last] - start).to(positive.device)
        g_idx = expected.g_idx[first:last].to(positive.device)
        if int(torch.count_nonzero(positive)) != last - first or \
                not bool(positive[q_local, g_idx].all()):
            return None
        return q_local, g_idx, expected.values[first:last].to(positive.device)

    def collect(self, rows: DistanceRows, chunk: int = QUERY_CHUNK) -> PairScores:
        """The pass on its own, over `rows` (when the CMC/mAP pass did not observe), its
        negatives counted in it (`expect` first)."""
        self.expect(rows, chunk)
        for start, end, dist, labels in _chunks(rows, self.labels, chunk):
            self.observe(dist, *_pair_masks(labels))
        return self

    def finish(self, rows: DistanceRows, *, distance: str = 'euclidean', flip_test: bool = False,
               rerank: bool = False, match_fpir: float = 0.01, seed: int = 1,
               chunk: int = QUERY_CHUNK) -> tuple[dict, dict | None, Curves]:
        """(verification, open_set, curves): metrics.json's blocks (see the module's
        docstring; open_set None with `rerank`) and what the pictures draw. `rows`: the same
        distances, read again only when the pass could not count the negatives (see the
        class). `distance`, `flip_test`, `rerank` name the distances in the block;
        `match_fpir` (0 < x < 1): the FPIR the match threshold is picked at; `seed`: the
        held-out split's."""
        positives = np.sort(torch.cat(self._positives).numpy()) if self._positives \
            else np.zeros(0, np.float32)
        impostor = torch.cat(self._impostor).numpy() if self._impostor else np.zeros(0)
        nearest_true = torch.cat(self._nearest_true).numpy() if self._nearest_true \
            else np.zeros(0)
        if self.one_pass:
            below, equal = self._counter.result()
        else:
            below, equal = _count_negatives(rows, self.labels, positives, chunk)
        verification, fpr, tpr = _verification(positives, below, equal, self._negatives,
                                               float(impostor.min()) if len(impostor) else np.inf,
                                               self._dtype)
        verification = {'distance': distance, 'flip_test': bool(flip_test),
                        'rerank': bool(rerank), **verification}
        open_set = None if rerank else _open_set(impostor, nearest_true,
                                                 self.labels.q_pids.cpu().numpy(), match_fpir,
                                                 seed, self._dtype)
        edges = _edges(positives, impostor, nearest_true, self._picture)
        curves = _curves(edges, positives, _rebinned(self._picture, edges), impostor, fpr, tpr,
                         verification, open_set, rerank, distance)
        return verification, open_set, curves


def _positive_pairs(labels: Labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, gallery) indices of every positive pair (as `_pair_masks` keeps them), on the
    CPU, in row-major order, from the labels alone: each query's gallery items of the same
    person, kept when from another camera and another file."""
    labels = labels.to(torch.device('cpu'))
    g_pids, q_pids = labels.g_pids.long(), labels.q_pids.long()
    order = torch.sort(g_pids, stable=True).indices        # a person's items in index order
    pids = g_pids[order]
    first = torch.searchsorted(pids, q_pids, side='left')
    counts = torch.searchsorted(pids, q_pids, side='right') - first
    q_idx = torch.repeat_interleave(torch.arange(labels.num_queries), counts)
    within = torch.arange(len(q_idx)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    g_idx = order[first[q_idx] + within]
    keep = labels.q_camids[q_idx] != labels.g_camids[g_idx]
    if labels.q_files is not None:
        keep &= labels.q_files[q_idx] != labels.g_files[g_idx]
    return q_idx[keep], g_idx[keep]


class _NegativeCounter:
    """Negatives counted against sorted positive distances known before the pass, chunk by
    chunk: `result()` gives (below, equal), below[j] = negatives strictly below
    positives[j], equal[j] = those equal to it.

    Only negatives up to the largest positive need placing (the others are above them all).
    Those are put in KEYS_PER_POSITIVE x positives equal-width bins between the smallest
    and the largest positive by a monotone function (`_key`, the same for positives and
    negatives), and counted per bin: a bin holding no positive lies wholly between two
    consecutive positives, so its count is placed at once (`result`); a negative in a bin
    that holds one is placed among the positives by binary search (`torch.searchsorted`)."""

    def __init__(self, positives: torch.Tensor):
        self.positives = positives
        size = len(positives) + 1
        self.at_most = torch.zeros(size, dtype=torch.int64, device=positives.device)
        self.below = self.at_most.clone()  # per first positive a negative is <= (<) to
        self.above = 0                     # negatives above every positive
        if len(positives) == 0:
            return
        low, high = float(positives[0]), float(positives[-1])
        self.bins = min(KEYS_PER_POSITIVE * len(positives), MAX_KEYS)
        scale = self.bins / (high - low) if high > low else 1.0
        # (a range too narrow for its values' size: one bin, every negative searched)
        finite = np.isfinite(np.float32(scale * max(abs(low), abs(high)) + self.bins))
        self.scale = scale if finite else 1.0
        self.offset = low * self.scale - 1         # the smallest positive: about key 1
        keys = self._key(positives)
        self.hot = torch.zeros(self.bins + 3, dtype=torch.bool, device=positives.device)
        self.hot[keys] = True
        self.counts = torch.zeros(self.bins + 3, dtype=torch.int64, device=positives.device)

    def _key(self, values: torch.Tensor) -> torch.Tensor:
        return values.mul(self.scale).sub_(self.offset).clamp_(0, self.bins + 2).long()

    def add(self, negatives: torch.Tensor, count: int) -> None:
        """Counts the `count` negatives of one chunk: `negatives`, its distances where the
        pair is negative, +inf elsewhere."""
        if len(self.positives) == 0:
            return
        values = torch.masked_select(negatives, negatives <= self.positives[-1])
        self.above += count - len(values)
        keys = self._key(values)
        self.counts += torch.bincount(keys, minlength=len(self.counts))
        placed = torch.masked_select(values, torch.index_select(self.hot, 0, keys))
        size = len(self.at_most)
        # n <= p_j from j = #{p < n} on, and n < p_j from j = #{p <= n} on: the same place
        # unless n equals a positive (then searched again: ties are few)
        left = torch.searchsorted(self.positives, placed, side='left')
        tied = placed == self.positives[left.clamp(max=len(self.positives) - 1)]
        right = torch.searchsorted(self.positives, placed[tied], side='right')
        self.at_most += torch.bincount(left, minlength=size)
        self.below += torch.bincount(left, minlength=size) + \
            torch.bincount(right, minlength=size) - torch.bincount(left[tied], minlength=size)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(below, equal), int64 numpy arrays of len(positives)."""
        if len(self.positives) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        cold = ~self.hot
        # a key holding no positive: its negatives lie above the positives of keys below it
        place = torch.searchsorted(self._key(self.positives),
                                   torch.arange(len(self.hot), device=self.hot.device))
        placed = torch.zeros_like(self.at_most).index_add_(0, place[cold], self.counts[cold])
        placed[-1] += self.above
        below = (self.below + placed).cumsum(0)[:-1].cpu().numpy()          # #neg < p_j
        at_most = (self.at_most + placed).cumsum(0)[:-1].cpu().numpy()      # #neg <= p_j
        return below, at_most - below


def _pair_masks(labels: Labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) pairs of a chunk, as the CMC/mAP protocol keeps them."""
    same = labels.same_person()
    ignored = labels.ignored()
    return same & ~ignored, ~(same | ignored)


def _chunks(rows: DistanceRows, labels: Labels, chunk: int):
    for start in range(0, labels.num_queries, chunk):
        end = min(start + chunk, labels.num_queries)
        dist = rows(start, end)
        if labels.q_pids.device != dist.device:
            labels = labels.to(dist.device)
        yield start, end, dist, labels.queries(start, end)


def _count_negatives(rows: DistanceRows, labels: Labels, positives: np.ndarray, chunk: int):
    """The second pass, where the first could not count: (below, equal) as
    `_NegativeCounter.result`."""
    counter = None
    for _, _, dist, chunk_labels in _chunks(rows, labels, chunk):
        if counter is None:
            counter = _NegativeCounter(torch.from_numpy(positives).to(dist.device, dist.dtype))
        negative = _pair_masks(chunk_labels)[1]
        counter.add(torch.where(negative, dist, float('inf')), int(torch.count_nonzero(negative)))
    return counter.result() if counter is not None else \
        (np.zeros(0, np.int64), np.zeros(0, np.int64))


def _picture_counts(negatives: torch.Tensor) -> np.ndarray:
    """The negatives of one chunk (`negatives`: +inf where a pair is not one) counted in the
    pictures' fine bins: float32 distances by their bit patterns' top bits (the same bins in
    every chunking; below 0 in the first)."""
    bins = (negatives.float().view(torch.int32) >> PICTURE_SHIFT).clamp_(min=0)
    counts = torch.bincount(bins.view(-1), minlength=PICTURE_BINS).cpu().numpy()
    counts[_INF_BIN] = 0                                             # not a negative pair
    return counts


def _fine_edges(bins: np.ndarray) -> np.ndarray:
    """The distance at which each of these fine bins of `_picture_counts` begins."""
    return (bins.astype(np.int64) << PICTURE_SHIFT).astype(np.int32).view(np.float32) \
        .astype(np.float64)


def _edges(positives, impostor, nearest_true, picture) -> np.ndarray:
    """The pictures' HISTOGRAM_BINS equal bins, from the smallest distance of any kind (the
    smallest impostor score or nearest true match) to the largest (the largest positive,
    or the end of the last fine bin holding a negative)."""
    finite = np.concatenate([impostor[np.isfinite(impostor)],
                             nearest_true[np.isfinite(nearest_true)]])
    occupied = np.flatnonzero(picture)
    ends = [float(positives[-1])] if len(positives) else []
    if len(occupied):
        ends.append(float(_fine_edges(occupied[-1:] + 1)[0]))
    low = float(finite.min()) if len(finite) else 0.0
    high = max(ends) if ends else low + 1.0
    if high <= low:
        high = low + 1.0
    return np.linspace(low, high, HISTOGRAM_BINS + 1)


def _rebinned(picture: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The fine bins' counts in `edges`' bins, each by where it begins (fine bins are
    1/1024 of a power of two wide: a picture's rounding)."""
    occupied = np.flatnonzero(picture)
    where = np.searchsorted(edges, _fine_edges(occupied), side='right') - 1
    return np.bincount(np.clip(where, 0, len(edges) - 2), weights=picture[occupied],
                       minlength=len(edges) - 1).astype(np.int64)


def _verification(positives: np.ndarray, below: np.ndarray, equal: np.ndarray, negatives: int,
                  lowest_negative: float, dtype):
    """The verification block's numbers, and the ROC (fpr, tpr) at every positive distance."""
    num_pos = len(positives)
    block = {'pairs': {'positive': num_pos, 'negative': int(negatives)}, 'auc': None,
             'eer': None, 'eer_threshold': None,
             'tpr_at_fpr': {_key(r): NOT_ENOUGH_NEGATIVES for r in FPR_LEVELS}}
    if num_pos == 0 or negatives == 0:
        return block, np.zeros(0), np.zeros(0)
    at_most = below + equal
    # U: each (positive, negative) pair where the positive is nearer, ties 1/2
    u = np.sum(negatives - at_most, dtype=np.float64) + 0.5 * np.sum(equal, dtype=np.float64)
    block['auc'] = float(u / (num_pos * float(negatives)))
    fpr = at_most / negatives
    tpr = np.searchsorted(positives, positives, side='right') / num_pos   # ties: all of them
    gap = np.abs(fpr - (1 - tpr))
    best = int(np.argmin(gap))
    block['eer'] = float((fpr[best] + 1 - tpr[best]) / 2)
    block['eer_threshold'] = float(positives[best])
    for rate in FPR_LEVELS:
        if rate * negatives < MIN_RESOLVING:
            continue
        allowed = np.flatnonzero(fpr <= rate)
        if len(allowed):
            j = int(allowed[-1])
            block['tpr_at_fpr'][_key(rate)] = {'tpr': float(tpr[j]),
                                               'threshold': float(positives[j])}
        else:                        # no positive distance is below enough negatives
            block['tpr_at_fpr'][_key(rate)] = {'tpr': 0.0,
                                               'threshold': _below(lowest_negative, _np(dtype))}
    return block, fpr, tpr


def _np(dtype: torch.dtype):
    return torch.empty(0, dtype=dtype).numpy().dtype


def fpir_threshold(impostor: np.ndarray, fpir: float, dtype=np.float32) -> float | None:
    """The largest distance t with FPIR(t) = share of `impostor` scores <= t at most `fpir`:
    just below the next impostor score. None when fewer than 10 queries resolve it
    (len(impostor) x fpir < 10)."""
    num = len(impostor)
    if num == 0 or fpir * num < MIN_RESOLVING:
        return None
    scores = np.sort(impostor)
    allowed = int(np.floor(fpir * num))           # false matches allowed
    while allowed + 1 <= num and (allowed + 1) / num <= fpir:
        allowed += 1
    while allowed > 0 and allowed / num > fpir:
        allowed -= 1
    if allowed >= num:
        return float(np.finfo(dtype).max)
    return _below(scores[allowed], dtype)


def _rates(impostor: np.ndarray, nearest_true: np.ndarray, t: float) -> tuple[float, float | None]:
    """(FPIR, DIR) at threshold t over these queries (DIR None without mated queries)."""
    mated = np.isfinite(nearest_true)
    found = mated & (nearest_true < impostor) & (nearest_true <= t)
    fpir = float(np.mean(impostor <= t)) if len(impostor) else None
    return fpir, float(found.sum() / mated.sum()) if mated.any() else None


def identity_halves(pids: np.ndarray, seed: int) -> np.ndarray:
    """Per query, True for the first half: a hash of (seed, identity), so one identity's
    queries are all on one side, and the split is the same in every process and run."""
    side = {pid: hashlib.blake2b(f'{seed}/{pid}'.encode(), digest_size=8).digest()[0] & 1 == 0
            for pid in np.unique(pids).tolist()}
    return np.array([side[pid] for pid in pids.tolist()], dtype=bool)


def _open_set(impostor: np.ndarray, nearest_true: np.ndarray, pids: np.ndarray,
              match_fpir: float, seed: int, dtype) -> dict:
    dtype = _np(dtype)
    block = {'queries': len(impostor), 'mated': int(np.isfinite(nearest_true).sum()),
             'dir_at_fpir': {}}
    for rate in FPIR_LEVELS:
        t = fpir_threshold(impostor, rate, dtype)
        block['dir_at_fpir'][_key(rate)] = NOT_ENOUGH_QUERIES if t is None else \
            {'dir': _rates(impostor, nearest_true, t)[1], 'threshold': t}
    heldout = []
    first = identity_halves(pids, seed)
    for pick in (first, ~first):
        t = fpir_threshold(impostor[pick], match_fpir, dtype)
        fpir, dir_ = (None, None) if t is None or not (~pick).any() else \
            _rates(impostor[~pick], nearest_true[~pick], t)
        heldout.append({'fpir': fpir, 'dir': dir_})
    block['threshold'] = {'fpir': match_fpir,
                          'distance': fpir_threshold(impostor, match_fpir, dtype),
                          'heldout': heldout}
    return block


def distance_name(distance: str, rerank: bool) -> str:
    """The distance's name on an axis or a line: 'squared euclidean', 'cosine', 're-ranked'."""
    if rerank:
        return 're-ranked'
    return 'squared euclidean' if distance == 'euclidean' else distance


def _curves(edges, positives, negative_hist, impostor, fpr, tpr, verification, open_set,
            rerank, distance) -> Curves:
    keep = np.unique(np.linspace(0, max(len(fpr) - 1, 0), min(len(fpr), ROC_POINTS + 1))
                     .astype(int)) if len(fpr) else np.zeros(0, int)
    marks = {}
    if verification['eer_threshold'] is not None:
        marks['EER'] = verification['eer_threshold']
    tpr_1 = verification['tpr_at_fpr'].get('0.01')
    if isinstance(tpr_1, dict):
        marks['TPR@FPR 1%'] = tpr_1['threshold']
    finite = impostor[np.isfinite(impostor)] if impostor is not None else None
    if open_set is not None and open_set['threshold']['distance'] is not None:
        marks[f'match threshold (FPIR {open_set["threshold"]["fpir"]:.0%})'] = \
            open_set['threshold']['distance']
    return Curves(
        edges=edges, positive=np.histogram(positives, edges)[0],
        negative=negative_hist,
        impostor=None if open_set is None else np.histogram(finite, edges)[0],
        fpr=fpr[keep], tpr=tpr[keep], eer=verification['eer'],
        distance=distance_name(distance, rerank), marks=marks)


def _percent(value: float) -> str:
    return f'{value:.1%}' if value >= 0.001 else f'{value:.2g}'


def _at_levels(rate: str, at: str, levels: dict) -> str:
    """'  TPR@FPR=10%: 95.0% (distance 1.23) · ...' from a block's {level: value or text}."""
    key = rate.lower()
    return '  ' + ' · '.join(
        f'{rate}@{at}={_percent(float(level))}: ' +
        (value if isinstance(value, str) else
         f'{value[key]:.1%} (distance {value["threshold"]:.4g})')
        for level, value in levels.items())


def describe(verification: dict, open_set: dict | None) -> list[str]:
    """The printed block after the CMC: pairs, AUC, EER, TPR@FPR, DIR@FPIR, the threshold."""
    name = distance_name(verification['distance'], verification['rerank'])
    pairs = verification['pairs']
    lines = [f'Verification (query-gallery pairs, {name} distance): '
             f'{pairs["positive"]:,} positive, {pairs["negative"]:,} negative']
    if verification['auc'] is not None:
        lines.append(f'  ROC AUC {verification["auc"]:.1%} · EER {verification["eer"]:.1%} '
                     f'at distance {verification["eer_threshold"]:.4g}')
    lines.append(_at_levels('TPR', 'FPR', verification['tpr_at_fpr']))
    if open_set is None:
        lines.append(f'Open set: {RERANK_NOTE}')
        return lines
    lines.append(f'Open set (each query\'s identity left out of the gallery): '
                 f'{counted(open_set["queries"], "query", "queries")}, '
                 f'{open_set["mated"]:,} mated')
    lines.append(_at_levels('DIR', 'FPIR', open_set['dir_at_fpir']))
    threshold = open_set['threshold']
    if threshold['distance'] is None:
        lines.append(f'  Match threshold at MATCH_FPIR={threshold["fpir"]:g}: not enough queries '
                     f'(needs {MIN_RESOLVING / threshold["fpir"]:.0f}; '
                     f'a larger MATCH_FPIR resolves it)')
    else:
        heldout = ', '.join(f'FPIR {h["fpir"]:.1%} DIR {h["dir"]:.1%}'
                            for h in threshold['heldout'] if h['fpir'] is not None
                            and h['dir'] is not None)
        lines.append(f'  Match threshold at MATCH_FPIR={threshold["fpir"]:g}: distance '
                     f'{threshold["distance"]:.6g}'
                     + (f' (held-out halves: {heldout})' if heldout else ''))
    return lines
