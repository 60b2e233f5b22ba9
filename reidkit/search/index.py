"""An approximate index (FAISS IVF-PQ) over a search gallery's cached features, kept beside them
and brought up to date with the gallery folder, for galleries too large to rank exactly.

IVF-PQ keeps a 64-byte code per image instead of its 8 KB 2048-d feature, so a million images
take ~80 MB. Its distances are approximate: each query's candidates are re-ranked with exact
distances read from the features on disk, so the returned order and distances are exact among
them. The index holds the gallery's row ids (stable while a file is unchanged), so images added
to or removed from the folder are added to or removed from the index: no rebuild. It also holds
the generation of the feature cache it was last brought up to date with: an index of any other
cache than this one or one it was derived from (whose ids may mean other images) is rebuilt.

The index records its metric (DIST_METRIC): for 'cosine' it holds the L2-normalised features,
whose L2 distances (2 - 2 cos) order candidates as cosine distances do, and is searched with
normalised queries; the exact distances that re-rank its candidates are 1 - cos. An index of
one metric is never used for the other (it is rebuilt); the feature cache it is built from
holds the raw features and serves both.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from reidkit.evaluate.metrics import check_finite, one_query_distances, unit_rows
from reidkit.run.errors import UserError
from reidkit.run.progress import progress

ADD_CHUNK = 8_192           # rows added at a time: FAISS encodes them with 64 KB of tables each
SCATTERED = 256             # scattered rows read between releases of their pages
MIN_CANDIDATES = 300        # re-ranked per query at least, however few rows are wanted
PQ_BYTES = 64               # code bytes per image (one byte per sub-quantiser)
GPU_MAX_K = 2_048           # the most candidates (and lists probed) FAISS's GPU search gives
GPU_TABLE_BYTES = 48 * 1024  # shared memory FAISS's GPU IVF-PQ keeps a query's tables in


class Unusable(Exception):
    """A cache file (features, manifest or index) that cannot be used; its text says why."""


@dataclass(frozen=True)
class Plan:
    """An index's shape: chosen from the gallery's size, saved with the index."""
    kind: str
    dim: int
    nlist: int              # inverted lists (coarse centroids)
    m: int                  # product-quantiser sub-vectors
    nbits: int              # bits per sub-vector code
    metric: str = 'euclidean'   # DIST_METRIC it ranks by (indexes saved before: euclidean)

    def fits(self, wanted: Plan) -> bool:
        """Still right for a gallery that wants `wanted`: the number of lists may be off by 2x
        either way, so a gallery near a boundary is not rebuilt on every change."""
        return (self.kind, self.dim, self.m, self.nbits, self.metric) == \
            (wanted.kind, wanted.dim, wanted.m, wanted.nbits, wanted.metric) and \
            wanted.nlist / 2 <= self.nlist <= wanted.nlist * 2

    def indexed(self, rows: np.ndarray) -> np.ndarray:
        """Features (or queries) as this index holds them: unit length for 'cosine'."""
        return unit_rows(rows) if self.metric == 'cosine' else rows

    @property
    def training_rows(self) -> int:
        """Sample the quantisers are trained on: 40 per coarse centroid (FAISS's advice is
        39 or more) and enough for the 256 centroids of each sub-quantiser."""
        return max(40 * self.nlist, 40 * 2 ** self.nbits)


def plan(rows: int, dim: int, kind: str = 'ivfpq', metric: str = 'euclidean') -> Plan:
    """~sqrt(rows) lists, a power of two (1,024 at 1M, 4,096 at 10M); 64-byte codes, or fewer
    for features under 256-d (sub-vectors of at least 4 values: smaller ones train slowly for
    no gain); `metric`: the DIST_METRIC it ranks by."""
    nlist = min(rows, 2 ** round(math.log2(math.sqrt(max(rows, 1)))))
    m = max(d for d in range(1, max(1, min(dim // 4, PQ_BYTES)) + 1) if dim % d == 0)
    nbits = max(1, min(8, int(math.log2(max(rows, 1)))))   # tiny galleries: fewer centroids
    return Plan(kind, dim, nlist, m, nbits, metric)


@dataclass
class GalleryIndex:
    index: object           # faiss.IndexIVFPQ; its ids are gallery row ids
    ids: np.ndarray         # the ids it holds, ascending
    plan: Plan
    searcher: object = None  # the index on a GPU when FAISS has one, else the index itself
    generation: str = ''    # of the feature cache whose ids it holds (see cache.Manifest)
    gpu: object = None      # FAISS's GPU resources the searcher runs on, held as long as it


def check_place(path: Path, what: str) -> None:
    """UserError when something other than a file (a folder, say) is where the search cache
    keeps `what`: nothing could be written there."""
    if path.exists() and not path.is_file():
        kind = 'a folder' if path.is_dir() else 'not a regular file'
        raise UserError(f'search cache: "{path}" is {kind}, where search keeps {what}. Remove '
                        f'or rename it (nothing else in the cache is affected) and search again.')


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UserError('SEARCH_EXACT_UP_TO: this gallery is larger, so search needs its index, '
                        'which needs FAISS: pip install faiss-cpu (it is in requirements.txt), '
                        'or rank exactly with a larger --SEARCH_EXACT_UP_TO=...') from None
    return faiss


def read_rows(features: np.ndarray, rows) -> np.ndarray:
    """A copy of features[rows] (a slice, or ascending row numbers). Pages of a memory-mapped
    .npy are let go as it reads (see release); scattered rows are read SCATTERED rows at a
    time, as the kernel maps 64 KB or more around each one."""
    if isinstance(rows, np.ndarray) and len(rows) and rows[-1] - rows[0] == len(rows) - 1:
        rows = slice(int(rows[0]), int(rows[-1]) + 1)            # a run: read it whole
    if isinstance(rows, slice):
        copy = np.array(features[rows], dtype=np.float32)
        release(features)
        return copy
    copy = np.empty((len(rows), features.shape[1]), dtype=np.float32)
    for start in range(0, len(rows), SCATTERED):
        copy[start:start + SCATTERED] = features[rows[start:start + SCATTERED]]
        release(features)
    return copy


def release(features: np.ndarray) -> None:
    """Lets go of the pages of a memory-mapped .npy read so far: the page cache keeps them,
    but they no longer count against this process's memory (a million 2048-d features are
    8 GB). numpy's own mapping is used (np.memmap's attribute since numpy 1.x): the file may
    have been replaced by a newer cache since, so it is not opened again."""
    mapping = getattr(features, '_mmap', None)
    if mapping is not None and hasattr(mmap, 'MADV_DONTNEED'):
        mapping.madvise(mmap.MADV_DONTNEED)


def build(features: np.ndarray, ids: np.ndarray, shape: Plan) -> GalleryIndex:
    """Trains the quantisers on a sample, then adds every row in chunks (bounded memory)."""
    faiss = _faiss()
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(shape.dim), shape.dim, shape.nlist, shape.m,
                             shape.nbits)
    # The sample is sized on purpose; FAISS's "too few points" warnings only concern
    # galleries of a few hundred images, where every row is re-ranked exactly anyway.
    index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1
    rows = np.sort(np.random.default_rng(0).choice(
        len(ids), min(len(ids), shape.training_rows), replace=False))
    sample = read_rows(features, rows)
    check_finite(sample, 'gallery features')
    sample = shape.indexed(sample)
    if len(sample) < 2 ** shape.nbits:      # a gallery of one image: k-means needs 2 points
        sample = np.resize(sample, (2 ** shape.nbits, shape.dim))
    print(f'Index: training IVF-PQ ({shape.nlist:,} lists, {shape.m}-byte codes) on '
          f'{len(rows):,} sampled gallery features ...', flush=True)
    _train(index, sample)
    del sample
    _add(index, features, np.arange(len(ids)), ids, shape)
    return GalleryIndex(index, np.array(ids, dtype=np.int64), shape)


def _train(index, sample: np.ndarray) -> None:
    """index.train(sample), its coarse k-means on the GPU where FAISS has one. FAISS neither
    owns nor frees an index set as clustering_index (and assigning it takes it from Python):
    it is kept here and let go, with its GPU memory, once trained."""
    gpu = _gpu()
    if gpu is None:
        index.train(sample)
        return
    faiss = _faiss()
    clustering = faiss.index_cpu_to_gpu(gpu, 0, faiss.IndexFlatL2(index.d))
    index.clustering_index = clustering
    clustering.thisown = True           # ours again: freed with this function's reference
    try:
        index.train(sample)
    finally:
        index.clustering_index = None


def _add(index, features: np.ndarray, rows: np.ndarray, ids: np.ndarray, shape: Plan) -> None:
    with progress(total=len(rows), desc='Index', unit='img') as bar:
        for start in range(0, len(rows), ADD_CHUNK):
            part = rows[start:start + ADD_CHUNK]
            chunk = read_rows(features, part)
            check_finite(chunk, 'gallery features')   # NaN would be filed in a random list
            index.add_with_ids(shape.indexed(chunk),
                               np.ascontiguousarray(ids[part], dtype=np.int64))
            bar.update(len(part))


def update(found: GalleryIndex, features: np.ndarray, ids: np.ndarray) -> tuple[int, int]:
    """Removes the ids the gallery no longer has, adds its new rows; (added, removed)."""
    gone = np.setdiff1d(found.ids, ids, assume_unique=True)
    new = np.setdiff1d(ids, found.ids, assume_unique=True)
    if len(gone):
        found.index.remove_ids(gone)
    if len(new):
        _add(found.index, features, np.searchsorted(ids, new), ids, found.plan)
    found.ids, found.searcher, found.gpu = np.array(ids, dtype=np.int64), None, None
    return len(new), len(gone)


def load(path: Path) -> GalleryIndex | None:
    """The saved index; None when there is none. Unusable, saying why, when it cannot be
    read or is inconsistent."""
    if not path.exists():
        return None
    faiss = _faiss()
    try:
        with np.load(path) as saved:
            if 'generation' not in saved.files:
                raise Unusable('it has no generation id: written by an earlier version')
            shape = Plan(**json.loads(str(saved['plan'])))
            ids, index = saved['ids'], faiss.deserialize_index(saved['index'])
            generation = str(saved['generation'])
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, TypeError,
            RuntimeError) as error:
        raise Unusable(f'{type(error).__name__}: {error}') from None
    if index.ntotal != len(ids):
        raise Unusable(f'it holds {index.ntotal} codes for {len(ids)} ids')
    return GalleryIndex(index, ids, shape, generation=generation)


def save(found: GalleryIndex, path: Path) -> None:
    """Written beside, then renamed into place whole: an interrupted save (or build) leaves
    the previous index as it was."""
    faiss = _faiss()
    temporary = path.with_name(f'.{path.name}.{os.getpid()}.partial')
    try:
        with open(temporary, 'wb') as handle:
            np.savez(handle, index=faiss.serialize_index(found.index), ids=found.ids,
                     plan=np.array(json.dumps(asdict(found.plan))),
                     generation=np.array(found.generation))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def open_index(path: Path, features: np.ndarray, ids: np.ndarray, kind: str,
               generation: str = '', lineage: tuple[str, ...] = (),
               metric: str = 'euclidean') -> tuple[GalleryIndex, str]:
    """The index at `path` brought up to date with the gallery (`ids` ascending, one per row
    of `features`, of the feature cache `generation`, derived from the generations in
    `lineage`), or a new one ranking by `metric`; saved when changed. Also says which it was.
    An index of another generation than these is rebuilt: its ids may mean other images; so
    is one of another metric. A save that fails (a full disk) is a one-line note: this search
    uses the index in memory, the file stays."""
    check_place(path, 'the gallery\'s index')
    wanted = plan(len(ids), features.shape[1], kind, metric)
    try:
        found = load(path)
        if found is not None:
            _check_usable(found, wanted, ids, generation, lineage)
    except Unusable as why:
        print(f'Note: the index "{path}" is rebuilt ({why}).')
        found = None
    if found is None:
        built = build(features, ids, wanted)
        built.generation = generation
        _save_or_say(built, path)
        return built, 'built'
    added, removed = update(found, features, ids)
    if not added and not removed and found.generation == generation:
        return found, 'reused'
    found.generation = generation
    _save_or_say(found, path)
    return found, f'updated ({added:,} added, {removed:,} removed)'


def _check_usable(found: GalleryIndex, wanted: Plan, ids: np.ndarray, generation: str,
                  lineage: tuple[str, ...]) -> None:
    """Unusable, saying why, unless `found` holds the ids of the feature cache `generation`
    (or of one it was derived from, in `lineage`) and has the shape `wanted`, near enough."""
    if found.generation != generation and found.generation not in lineage:
        raise Unusable('it was built for another version of the feature cache')
    if generation and found.generation == generation and not np.array_equal(found.ids, ids):
        raise Unusable('its ids are not those of the feature cache')
    if found.plan.metric != wanted.metric:
        raise Unusable(f'it ranks by DIST_METRIC={found.plan.metric!r}, this search by '
                       f'{wanted.metric!r}')
    if not found.plan.fits(wanted):
        raise Unusable(f'it has {found.plan.nlist:,} lists, {len(ids):,} images want '
                       f'{wanted.nlist:,}' if found.plan.dim == wanted.dim else
                       f'its features have {found.plan.dim} values, these {wanted.dim}')


def _save_or_say(found: GalleryIndex, path: Path) -> None:
    try:
        save(found, path)
    except OSError as error:
        reason = error.strerror or str(error)
        print(f'Note: the index could not be saved to "{path}" ({reason}); this search uses it '
              f'as updated in memory, ' + ('the previous file stays (the next search brings it '
                                           'up to date).' if path.exists() else
                                           'the next search builds it again.'), flush=True)


def _gpu():
    """FAISS's GPU resources when it was built with GPU support and sees a GPU, else None."""
    faiss = _faiss()
    if not hasattr(faiss, 'StandardGpuResources') or faiss.get_num_gpus() < 1:
        return None
    return faiss.StandardGpuResources()


def _searcher(found: GalleryIndex, wanted: int, nprobe: int):
    """The index to search for `wanted` candidates per query in `nprobe` lists: its copy on
    the GPU where FAISS has one that takes this index, made once and kept on `found` with its
    resources; the index itself otherwise, or for more candidates or lists than FAISS's GPU
    search gives (the same results, on the CPU), each said in a one-line note."""
    if found.searcher is None:
        found.searcher = found.index
        gpu = _gpu()
        if gpu is not None:
            faiss = _faiss()
            options = faiss.GpuClonerOptions()
            # 64-byte codes (512-d and 2048-d features) need float16 tables to fit; the
            # candidates are re-ranked exactly, so their distances lose nothing.
            options.useFloat16 = found.plan.m * 2 ** found.plan.nbits * 4 > GPU_TABLE_BYTES
            try:
                found.searcher, found.gpu = faiss.index_cpu_to_gpu(gpu, 0, found.index,
                                                                   options), gpu
            except RuntimeError as error:   # a shape the GPU kernels lack: the CPU index serves
                print(f'Note: the index is searched on the CPU ({error}).')
    if found.searcher is not found.index and max(wanted, nprobe) > GPU_MAX_K:
        print(f'Note: the index is searched on the CPU this time (same results, slower): '
              + (f'SEARCH_CSV_ROWS ({wanted:,} candidates per query)' if wanted > GPU_MAX_K
                 else f'SEARCH_NPROBE={nprobe:,}') + f' is more than FAISS\'s GPU search takes '
              f'({GPU_MAX_K:,}).', flush=True)
        return found.index
    return found.searcher


def rank_candidates(found: GalleryIndex, queries: np.ndarray, features: np.ndarray,
                    ids: np.ndarray, rows: int,
                    nprobe: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each query: (gallery rows, distances) of its nearest `rows`, nearest first, by the
    index's metric (squared euclidean, or 1 - cosine similarity). The index proposes
    candidates; exact distances from `features` order them (ties by row, as the exact search
    orders them)."""
    faiss = _faiss()
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    check_finite(queries, 'query features')
    wanted, nprobe = min(max(rows, MIN_CANDIDATES), len(ids)), min(nprobe, found.plan.nlist)
    searcher = _searcher(found, wanted, nprobe)
    space = faiss.ParameterSpace() if searcher is found.index else faiss.GpuParameterSpace()
    space.set_index_parameter(searcher, 'nprobe', nprobe)
    # ids; -1 past the last one found
    _, candidates = searcher.search(found.plan.indexed(queries), wanted)
    ranked = []
    for query, found_ids in zip(queries, candidates):
        at = np.sort(np.searchsorted(ids, found_ids[found_ids >= 0]))      # id -> row
        gathered = read_rows(features, at)
        distances = one_query_distances(query, gathered, found.plan.metric)
        check_finite(distances, 'query-gallery distances')
        order = np.argsort(distances, kind='stable')[:rows]    # ties: by row, as exact search
        ranked.append((at[order], distances[order]))
    return ranked
