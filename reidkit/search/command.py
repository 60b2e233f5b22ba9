"""Rank a folder of your own images for a query image (or a folder of queries) with a trained
checkpoint or an exported model.onnx: a ranked strip, results.csv with the nearest gallery
images, and a small index.html.

The gallery's features come from its cache (reidkit.search.cache), extracted only for the
files added or changed since. Up to SEARCH_EXACT_UP_TO images, ranking is exact and reads the
features in chunks, so 100,000 images never need all features, images or distances in memory
at once; above it, an index kept beside the features (reidkit.search.index) proposes
candidates that are re-ranked exactly. A query that is itself in the gallery (the file, or a
link to it: reidkit.data.files) is left out of its own results, not found at distance 0; the
cache keeps it for every other query. With a match threshold (MATCH_THRESHOLD: the checkpoint's
calibration, reidkit.evaluate.calibration, or a distance) each result is marked match / no
match, and a query whose nearest image is above it has no match in the gallery.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from reidkit.data import checks
from reidkit.data.files import file_ids
from reidkit.evaluate.calibration import match_threshold
from reidkit.evaluate.metrics import check_finite, distances as metric_distances
from reidkit.evaluate.report import unique_names
from reidkit.run.errors import UserError
from reidkit.run.words import counted
from reidkit.run.folders import new_run_dir
from reidkit.run.log import log_once_there_is_a_folder
from reidkit.run.settings import Settings
from reidkit.search import index as search_index
from reidkit.search.cache import RANK_CHUNK, Gallery, check_gallery, gallery_features, \
    gallery_index
from reidkit.search.extractor import FeatureExtractor, list_images, load_extractor
from reidkit.search.index import GalleryIndex
from reidkit.search.writers import QueryResult, write_results, write_skipped

EXACT_DISTANCES = 2 ** 26      # query-gallery distances held at once by the exact search (256 MB)
QUERY_BATCH = 10_000           # queries ranked together (a folder of them: one batch, or a few)
INCOMPLETE = 'INCOMPLETE.txt'  # in a search's folder until every query's results are written
SKIPPED_QUERIES = 'skipped_queries.txt'
SEARCH_LOG = 'log.txt'             # what the search printed


def search_inputs(s: Settings) -> list[Path]:
    """The query images of QUERY (query_images), once GALLERY is known to hold an image
    (cache.check_gallery): UserError otherwise, before a model loads or a training runs."""
    queries = query_images(Path(s.QUERY))
    check_gallery(Path(s.GALLERY), Path(s.EXPERIMENTS_DIR))
    return queries


def run_search(s: Settings, weights: Path | None = None) -> Path:
    """`python main.py search` (after main's checks of the settings, checks.
    check_search_switches: QUERY and GALLERY are given): ranks GALLERY for each
    image in QUERY with a checkpoint (`weights`, WEIGHTS or the newest run's) or an exported
    .onnx file; returns the new output folder, whose log.txt holds what was printed (the
    model, the gallery, the ranking). A query that is itself in the gallery is left out of its
    own results (said once at the end). UserError for missing or unreadable queries or gallery,
    a checkpoint that does not fit the settings, a diverged model or a full disk."""
    with log_once_there_is_a_folder() as start_log:
        queries = search_inputs(s)
        extractor, s = load_extractor(s, weights)
        checks.check_numbers(s, training=False)
        checks.check_output_folder(Path(s.EXPERIMENTS_DIR))
        print(f'Ranking: {s.DIST_METRIC} distance' +
              (', FLIP_TEST (each image averaged with its mirror)' if s.FLIP_TEST else ''))
        threshold, line = match_threshold(s, extractor.calibration, extractor.source)
        print(line)
        gallery = gallery_features(extractor, Path(s.GALLERY),
                                   Path(s.EXPERIMENTS_DIR) / '.search-cache', s.BATCH_SIZE_TEST,
                                   outputs=Path(s.EXPERIMENTS_DIR))
        print(f'Gallery: {counted(len(gallery.paths), "image")} ('
              f'{"features from the cache" if gallery.cached else "features extracted and cached"})'
              + (f'; {counted(len(gallery.skipped), "unreadable file")} skipped'
                 if gallery.skipped else ''))
        index = gallery_index(gallery, s)
        out_dir, unreadable, in_gallery, no_match = _rank_and_write(
            s, extractor, queries, gallery, index, threshold, start_log)
        if out_dir is None:
            first = ' The first three:' if len(unreadable) > 3 else ''
            raise UserError(f'QUERY: none of the {len(queries)} query images could be read.'
                            f'{first} ' + ' '.join(why for _, why in unreadable[:3]))
        if unreadable:
            write_skipped(out_dir / SKIPPED_QUERIES, unreadable)
        (out_dir / INCOMPLETE).unlink()
        ranked = len(queries) - len(unreadable)
        print(f'{counted(ranked, "query", "queries")} ranked against '
              f'{counted(len(gallery.paths), "gallery image")}')
        if threshold is not None:
            print(f'No match in the gallery: {no_match} of '
                  f'{counted(ranked, "query", "queries")} (nearest image farther than the match '
                  f'threshold {threshold:.6g}; "No match" heads their pages)')
        if in_gallery:
            print(f'{in_gallery} quer{"y was" if in_gallery == 1 else "ies were"} found in the '
                  f'gallery {"itself" if in_gallery == 1 else "themselves"} and left out of '
                  f'{"its" if in_gallery == 1 else "their"} own results')
        return out_dir


def _rank_and_write(s: Settings, extractor: FeatureExtractor, queries: list[Path],
                    gallery: Gallery, index: GalleryIndex | None, threshold: float | None,
                    start_log) -> tuple[Path | None, list[tuple[Path, str]], int, int]:
    """Ranks the queries batch by batch and writes each one's results, marked match / no
    match by `threshold` (a distance, or None), into the search's folder, made (its log
    started there) once there is something to put in it. Returns the folder (None when no
    query could be read), the unreadable queries with why, how many queries were in the
    gallery themselves (left out of their own results) and how many have no match."""
    rows = min(len(gallery.paths), max(s.SEARCH_CSV_ROWS, s.SEARCH_TOPK))
    names = dict(zip(queries, unique_names(
        [queries[0].name] if len(queries) == 1 else [q.relative_to(s.QUERY) for q in queries],
        reserved=(INCOMPLETE, SKIPPED_QUERIES, SEARCH_LOG))))
    out_dir, unreadable, in_gallery, no_match = None, [], 0, 0
    for paths, features, bad in query_batches(extractor, queries, s.BATCH_SIZE_TEST):
        unreadable += bad
        if not paths:
            continue
        own = own_files(paths, gallery)
        ranked = rank(features, gallery, index, rows, s.SEARCH_NPROBE, own, s.DIST_METRIC)
        in_gallery += sum(1 for rows_out in own if len(rows_out))
        if out_dir is None:
            out_dir = new_run_dir(Path(s.EXPERIMENTS_DIR), 'search')
            start_log(out_dir / SEARCH_LOG)
            (out_dir / INCOMPLETE).write_text(
                'This search stopped (or is still running) before every query was done: the '
                'folders here are the queries that finished. Run the search again for all '
                'of them.\n')
        for path, (order, distances), rows_out in zip(paths, ranked, own):
            # Written under a hidden name, renamed when whole: a result folder is complete.
            partial = out_dir / f'.{names[path]}.partial'
            result = QueryResult(path, gallery.paths, order, distances, gallery.skipped,
                                 len(rows_out), threshold, Path(s.GALLERY))
            write_results(partial, result, s.SEARCH_TOPK, csv_rows=s.SEARCH_CSV_ROWS)
            partial.rename(out_dir / names[path])
            no_match += result.no_match
    return out_dir, unreadable, in_gallery, no_match


def own_files(queries: list[Path], gallery: Gallery) -> list[np.ndarray]:
    """For each query, the gallery rows that are its own file (the file itself or a link to
    it, as reidkit.data.files tells), ascending; empty for a query not in the gallery. Only
    rows with a query's inode (known from the cache's file identities) are looked up again:
    the files of a large gallery are not all stat'ed a second time."""
    inodes = []
    for query in queries:
        try:
            inodes.append(os.stat(query).st_ino)
        except OSError:             # gone since it was read: no file to leave out
            continue
    rows = np.flatnonzero(np.isin(gallery.inodes, np.array(inodes, dtype=np.uint64)))
    ids = file_ids(queries, [gallery.paths[row] for row in rows]) if len(rows) else None
    if ids is None:
        return [rows[:0]] * len(queries)
    query_ids, row_ids = ids
    return [rows[row_ids == query_id] for query_id in query_ids]


def query_images(query: Path) -> list[Path]:
    """The image `query`, or every image under the folder `query`; UserError when there is
    none."""
    if Path(query).is_dir():
        found = list_images(query)
        if found:
            return found
        raise UserError(f'QUERY: no images (.jpg, .jpeg, .png, .bmp) under "{query}".')
    if not Path(query).is_file():
        raise UserError(f'QUERY: "{query}" does not exist. Pass --QUERY=path/to/person.jpg '
                        f'(or a folder of query images).')
    return [Path(query)]


def query_batches(extractor: FeatureExtractor, queries: list[Path],
                  batch_size: int) -> Iterator[tuple[list[Path], np.ndarray | None, list]]:
    """(readable queries, their features, unreadable ones with why) in groups of QUERY_BATCH:
    a folder of queries is ranked in one batch (a few for a huge folder)."""
    paths, features, bad = [], [], []
    for good, batch_features, unreadable in extractor.batches(queries, batch_size, 'Queries'):
        for path, why in unreadable:
            print(f'Note: query "{path}" skipped: {why}')
        bad += unreadable
        if batch_features is not None:
            paths += good
            features.append(batch_features)
        if len(paths) >= QUERY_BATCH:
            yield paths, np.concatenate(features), bad
            paths, features, bad = [], [], []
    if paths or bad:
        yield paths, np.concatenate(features) if features else None, bad


def rank_gallery(query_features: np.ndarray, gallery: np.ndarray,
                 metric: str = 'euclidean') -> list[tuple]:
    """For each query row: (order, distances), every gallery row nearest first, by `metric`
    (DIST_METRIC: squared euclidean, Torchreid's default, or 1 - cosine similarity; the
    evaluation's `metrics.distances`). One pass over the gallery, read in chunks, serves a
    whole batch of queries."""
    queries = torch.from_numpy(np.atleast_2d(np.asarray(query_features, dtype=np.float32)))
    distances = np.empty((len(queries), len(gallery)), dtype=np.float32)
    for start in range(0, len(gallery), RANK_CHUNK):
        rows = torch.from_numpy(np.array(gallery[start:start + RANK_CHUNK]))   # read from disk
        distances[:, start:start + len(rows)] = metric_distances(queries, rows, metric).numpy()
    check_finite(distances, 'query-gallery distances')    # a diverged model ranks nothing
    ranked = []
    for row in distances:
        order = np.argsort(row, kind='stable')
        ranked.append((order, row[order]))
    return ranked


def rank(queries: np.ndarray, gallery: Gallery, index: GalleryIndex | None, rows: int,
         nprobe: int, own: list[np.ndarray] | None = None,
         metric: str = 'euclidean') -> list[tuple[np.ndarray, np.ndarray]]:
    """Each query's nearest `rows` gallery rows and their distances by `metric`, nearest
    first: without an index the exact streaming search, each pass over the gallery serving as
    many queries as EXACT_DISTANCES allows; with one (made for `metric`: ValueError
    otherwise), its candidates re-ranked exactly. `own`: per query, the gallery rows left out
    of its ranking (its own file, see `own_files`)."""
    extra = max(map(len, own), default=0) if own else 0
    wanted = min(rows + extra, len(gallery.features))   # as many more as may be left out
    if index is not None:
        if index.plan.metric != metric:
            raise ValueError(f'an index for {index.plan.metric!r} cannot rank by {metric!r}')
        ranked = search_index.rank_candidates(index, queries, gallery.features, gallery.ids,
                                              wanted, nprobe)
    else:
        per_pass = max(1, EXACT_DISTANCES // len(gallery.features))
        ranked = [(order[:wanted].copy(), distances[:wanted].copy())   # the full rows go
                  for start in range(0, len(queries), per_pass)
                  for order, distances in rank_gallery(queries[start:start + per_pass],
                                                       gallery.features, metric)]
    if not extra:
        return ranked
    kept = [~np.isin(order, rows_out) for (order, _), rows_out in zip(ranked, own)]
    return [(order[keep][:rows], distances[keep][:rows])
            for (order, distances), keep in zip(ranked, kept)]
