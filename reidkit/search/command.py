"""Rank a folder of your own images for a query image (or a folder of queries) with a trained
checkpoint: a ranked strip, results.csv with the nearest gallery images, and a small index.html.

Gallery features are extracted in batches, streamed to a file on disk and cached per checkpoint
and gallery folder, with each file's identity (size, mtime, inode, ctime): the next search
extracts only the files added or changed since, and drops the removed ones. The manifest, the
features and the index carry one generation id, checked on every load (see _Manifest). Up to SEARCH_EXACT_UP_TO images, ranking is
exact and reads the features in chunks, so 100,000 images never need all features, images or
distances in memory at once; above it, an index kept beside the features (search_index.py)
proposes candidates that are re-ranked exactly. Searches running at once on one gallery share
the cache: one extracts (or builds the index), the others wait for it.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:         # Windows: no lock; searches on one gallery should not overlap
    fcntl = None

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

from reidkit.data.images import read_image
from reidkit.run.atomic import write_error
from reidkit.run.checkpoints import checkpoint_classes, load_weights
from reidkit.run.errors import UserError
from reidkit.evaluate.report import link, unique_names
from reidkit.run.settings import Settings
from reidkit.evaluate.metrics import check_finite, squared_euclidean
from reidkit.search import index as search_index
from reidkit.search.index import GalleryIndex
from reidkit.data import checks
from reidkit.evaluate.visrank import draw_strip, save_strip
from reidkit.run.device import choose_device, place_model
from reidkit.run.folders import new_run_dir
from reidkit.run.folders import resolve_checkpoint
from reidkit.run.log import log_once_there_is_a_folder
from reidkit.search.onnx_features import OnnxExtractor

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')
RANK_CHUNK = 50_000            # gallery rows read from disk at a time when ranking
EXACT_DISTANCES = 2 ** 26      # query-gallery distances held at once by the exact search (256 MB)
QUERY_BATCH = 10_000           # queries ranked together (a folder of them: one batch, or a few)
INCOMPLETE = 'INCOMPLETE.txt'  # in a search's folder until every query's results are written
SKIPPED_QUERIES = 'skipped_queries.txt'
SEARCH_LOG = 'log.txt'             # what the search printed


@dataclass
class Gallery:
    """Features of a folder's readable images, in a .npy file on disk (memory-mapped)."""
    paths: list[str]
    skipped: list[tuple[str, str]]      # (path, why)
    features: np.ndarray                # memory-mapped (len(paths), dim) float32
    cached: bool                        # nothing had to be extracted
    ids: np.ndarray | None = None       # each row's stable id (ascending): the index's ids
    key: str = ''                       # its files' name in the cache folder
    generation: str = ''                # of its manifest and features (see _Manifest)
    lineage: tuple[str, ...] = ()       # earlier generations whose ids mean the same images


def list_images(folder: Path, outputs: Path | None = None) -> list[Path]:
    """Every image under `folder`, recursively, in a stable order; none under `outputs` (our
    own EXPERIMENTS_DIR, where earlier searches wrote their strips)."""
    outputs = Path(outputs).resolve() if outputs else None
    return sorted(p for p in Path(folder).rglob('*')
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and
                  not (outputs and p.resolve().is_relative_to(outputs)))


def _read(path: Path) -> Image.Image | str:
    """The image, or why it cannot be used."""
    try:
        return read_image(str(path))
    except UserError as error:
        return str(error)


def extract_batches(model: torch.nn.Module, transform, paths: list[Path], batch_size: int,
                    device: torch.device, description: str) -> Iterator[tuple[list, np.ndarray]]:
    """Yields (readable paths, their features) batch by batch, with a progress bar; decoding
    runs in threads ahead of the model. Unreadable paths come back with features None."""
    model.eval()
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(paths), desc=description, unit='img') as bar:
        for start in range(0, len(paths), batch_size):
            batch = paths[start:start + batch_size]
            images = list(pool.map(_read, batch))
            good = [(p, im) for p, im in zip(batch, images) if not isinstance(im, str)]
            bad = [(p, im) for p, im in zip(batch, images) if isinstance(im, str)]
            features = None
            if good:
                tensor = torch.stack([transform(im) for _, im in good]).to(device)
                with torch.no_grad():
                    features = model(tensor).float().cpu().numpy()
            bar.update(len(batch))
            yield [p for p, _ in good], features, bad


def _cache_key(checkpoint: Path, folder: Path, model_key: str) -> str:
    """The checkpoint (path, size, mtime) and the gallery folder: one cache per gallery, which
    follows the folder's changes (see _Manifest)."""
    digest = hashlib.sha256()
    stat = checkpoint.stat()
    digest.update(os.fsencode(f'{checkpoint.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|'
                              f'{model_key}|{folder}'))
    return digest.hexdigest()[:24]


def _stamps(image_paths: list[Path]) -> dict[str, tuple[int, int, int, int]]:
    """Each file's identity: (size, mtime, inode, ctime), in ns. A file whose identity changed
    is extracted again. Size and mtime alone miss a picture replaced by another of the same
    size with its mtime kept (cp -p, rsync -a, tar, unzip); the inode and ctime do not (ctime
    cannot be set back), at the price of extracting again after a chmod or a restore."""
    stamps = {}
    for path in image_paths:
        try:
            stat = path.stat()
        except OSError:         # removed since it was listed
            continue
        stamps[str(path)] = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
    return stamps


# A feature file ends with its generation, after its rows (np.load reads the rows and ignores
# it): the manifest and the index name the same one, so no two of them from different writes
# are ever used together.
GENERATION_MAGIC = b'\nreidkit search cache generation '
GENERATION_CHARS = 32
LINEAGE = 1_000         # earlier generations an index may be brought up to date from


def _generation(body: bytes) -> str:
    """A manifest's generation: the digest of all it says, as written (a random nonce
    included), so a manifest changed after it was written no longer matches it."""
    return hashlib.sha256(body).hexdigest()[:GENERATION_CHARS]


@dataclass
class _Manifest:
    """What a gallery's cache holds (the .json beside its .npy): per feature row its file, the
    file's identity when extracted (see _stamps) and a stable id (the index's id for it); the
    files skipped; the generations this cache was derived from, oldest first (their ids mean
    the same images as this one's). On disk: a line {"generation": ...}, then the rest."""
    paths: list[str]
    stamps: list[tuple[int, int, int, int]]
    ids: list[int]                      # ascending; a new or changed file gets a new one
    next_id: int
    skipped: list[tuple]                # (path, why, *stamp)
    lineage: list[str]
    generation: str = ''

    def write(self, temporary: Path) -> None:
        """Sets the generation and writes the manifest to `temporary` (renamed into place by
        the caller, after the features)."""
        body = json.dumps({       # ASCII: file names that are not UTF-8 come \u-escaped
            'paths': self.paths, 'stamps': self.stamps, 'ids': self.ids, 'next_id': self.next_id,
            'skipped': self.skipped, 'lineage': self.lineage, 'nonce': os.urandom(8).hex()})
        self.generation = _generation(body.encode('ascii'))
        with open(temporary, 'w', encoding='ascii') as handle:
            handle.write(json.dumps({'generation': self.generation}) + '\n' + body)
            handle.flush()
            os.fsync(handle.fileno())

    @classmethod
    def read(cls, path: Path) -> _Manifest | str:
        """The manifest at `path`, or why it cannot be used (OSError when it cannot be read)."""
        text = path.read_bytes()
        first, _, body = text.partition(b'\n')
        try:
            generation = json.loads(first)['generation']
        except (ValueError, KeyError, TypeError):
            return 'it has no generation id: damaged, or written by an earlier version'
        if generation != _generation(body):
            return 'its manifest was changed after it was written'
        saved = json.loads(body)
        stamps = [tuple(int(v) for v in stamp) for stamp in saved['stamps']]
        skipped = [(str(path), str(why), *(int(v) for v in stamp))
                   for path, why, *stamp in saved['skipped']]
        return cls(list(saved['paths']), stamps, list(saved['ids']), int(saved['next_id']),
                   skipped, [str(g) for g in saved['lineage']], generation)


def gallery_features(model, transform, folder: Path, checkpoint: Path, model_key: str,
                     cache_dir: Path, batch_size: int, device: torch.device,
                     outputs: Path | None = None) -> Gallery:
    """Features of every readable image under `folder` (none under `outputs`, our own
    EXPERIMENTS_DIR), from the cache as far as it is current: only files that are new or
    changed since are extracted. Paths are absolute, so the cache serves searches started
    from any working directory. UserError when a cache file's place is taken by a folder
    (checked before any work) or when the cache cannot be written (a full disk)."""
    given, folder = folder, Path(folder).resolve()
    image_paths = list_images(folder, outputs=outputs)
    stamps = _stamps(image_paths)
    if not stamps:
        raise UserError(f'GALLERY: no images (.jpg, .jpeg, .png, .bmp) under "{given}". '
                        f'Point --GALLERY at the folder holding your person crops.')
    key = _cache_key(Path(checkpoint), folder, model_key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    search_index.check_place(cache_dir / f'{key}.npy', 'the gallery\'s features')
    search_index.check_place(cache_dir / f'{key}.json', 'the gallery\'s feature manifest')
    for kind in search_index.KINDS:
        search_index.check_place(cache_dir / f'{key}.{kind}.npz', 'the gallery\'s index')
    with _exclusive(cache_dir / f'{key}.lock', 'Waiting for another search that is extracting '
                    f'the features of this gallery (lock: {cache_dir / key}.lock) ...'):
        for leftover in cache_dir.glob(f'.{key}.*'):   # from a search that was killed
            leftover.unlink(missing_ok=True)
        manifest_file = cache_dir / f'{key}.json'
        cached = _read_cache(manifest_file, cache_dir / f'{key}.npy', folder)
        if isinstance(cached, str):
            if cached:
                print(f'Note: the feature cache "{manifest_file}" cannot be used ({cached}); '
                      f'extracting the features again.')
            cached = None

        def extract(paths: list[Path]):
            return extract_batches(model, transform, paths, batch_size, device,
                                   'Gallery features')
        return _update_cache(extract, given, stamps, cached, cache_dir, key)


@contextlib.contextmanager
def _exclusive(lock_file: Path, waiting: str) -> Iterator[None]:
    """Holds an exclusive lock on `lock_file` for the block, saying so if it has to wait."""
    with open(lock_file, 'a') as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(waiting, flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield                   # closing the file releases the lock


def _features_generation(feature_file: Path, features: np.memmap) -> str:
    """The generation written after a feature file's rows ('' when there is none)."""
    with open(feature_file, 'rb') as handle:
        handle.seek(features.offset + features.nbytes)
        tail = handle.read(len(GENERATION_MAGIC) + GENERATION_CHARS + 1)
    if len(tail) != len(GENERATION_MAGIC) + GENERATION_CHARS or \
            not tail.startswith(GENERATION_MAGIC):
        return ''
    return tail[len(GENERATION_MAGIC):].decode('ascii', 'replace')


def _read_cache(manifest_file: Path, feature_file: Path,
                folder: Path) -> tuple[_Manifest, np.ndarray] | str:
    """The cache's manifest and features, or why they cannot be used ('' when there are none):
    they must be of one generation, and the manifest as it was written."""
    if not manifest_file.exists() and not feature_file.exists():
        return ''
    try:
        manifest = _Manifest.read(manifest_file)
        if isinstance(manifest, str):
            return manifest
        features = np.load(feature_file, mmap_mode='r')
        rows = len(features) if features.ndim == 2 else -1
        written_with = _features_generation(feature_file, features) if rows >= 0 else ''
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f'{type(error).__name__}: {error}'
    paths, stamps, ids, skipped = manifest.paths, manifest.stamps, manifest.ids, manifest.skipped
    if written_with != manifest.generation:
        return (f'its features file "{feature_file.name}" is not the one its manifest was written '
                f'with')
    if not len(paths) == len(stamps) == len(ids) == rows or \
            any(len(stamp) != 4 for stamp in stamps + [s[2:] for s in skipped]):
        return f'{rows} feature rows for {len(paths)} images'
    # Caches written before paths were absolute, or edited by hand, list other files.
    inside = os.path.join(str(folder), '')
    if not all(path.startswith(inside) for path in paths + [s[0] for s in skipped]):
        return 'its file list is not the gallery\'s'
    if any(later <= earlier for earlier, later in zip(ids, ids[1:] + [manifest.next_id])):
        return 'its row ids are not ascending'
    return manifest, features


def _changes(old: _Manifest, stamps: dict[str, tuple]) -> tuple[list, list, list]:
    """The cached rows still current, the skipped files still as they were, and the files to
    extract (new, changed, or once unreadable and changed since)."""
    keep = [row for row, (path, stamp) in enumerate(zip(old.paths, old.stamps))
            if stamps.get(path) == tuple(stamp)]
    skipped = [s for s in old.skipped if stamps.get(s[0]) == tuple(s[2:])]
    known = {old.paths[row] for row in keep} | {s[0] for s in skipped}
    return keep, skipped, [Path(path) for path in stamps if path not in known]


class _FeatureWriter:
    """A features .npy written with ordinary writes, never through a memory map: on a full
    disk a write raises OSError (a memory-mapped page would kill the process with SIGBUS).
    Rows are appended; the header, written for the rows planned, is rewritten for the rows
    written (numpy pads the row count, so the header keeps its length), then the generation."""

    def __init__(self, path: Path, planned: int):
        self.path, self.planned, self.rows, self.handle, self.dim = path, planned, 0, None, 0

    def _header(self, rows: int) -> bytes:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {
            'descr': np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            'fortran_order': False, 'shape': (rows, self.dim)})
        return header.getvalue()

    def append(self, rows: np.ndarray) -> None:
        if self.handle is None:
            self.dim = rows.shape[1]
            self.handle = open(self.path, 'wb')
            self.handle.write(self._header(self.planned))
        self.handle.write(np.ascontiguousarray(rows, dtype=np.float32).data)
        self.rows += len(rows)

    def finish(self, generation: str) -> None:
        """Writes the header for the rows written and the generation; flushed to the disk."""
        if self.rows != self.planned:       # skipped files: fewer rows than planned
            header = self._header(self.rows)
            if len(header) != len(self._header(self.planned)):
                raise AssertionError('numpy changed its header padding')
            self.handle.seek(0)
            self.handle.write(header)
            self.handle.seek(0, os.SEEK_END)
        self.handle.write(GENERATION_MAGIC + generation.encode('ascii'))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()

    def discard(self) -> None:
        """Closes and removes the file (after a failure: a full disk may fail the close too)."""
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
        self.path.unlink(missing_ok=True)


def _update_cache(extract, folder: Path, stamps: dict[str, tuple], cached: tuple | None,
                  cache_dir: Path, key: str) -> Gallery:
    """Keeps the cached rows of unchanged files, extracts the new and changed files, and
    publishes the result: a new .npy and .json of one new generation, each written beside and
    renamed into place whole (the features first). A write that fails (a full disk) leaves
    the previous cache as it was and nothing partial: a UserError says so."""
    old, old_features = cached or (_Manifest([], [], [], 0, [], []), None)
    keep, skipped, todo = _changes(old, stamps)
    if cached and not todo and len(keep) == len(old.paths) and len(skipped) == len(old.skipped):
        return Gallery(old.paths, [s[:2] for s in old.skipped], old_features, cached=True,
                       ids=np.array(old.ids, dtype=np.int64), key=key,
                       generation=old.generation, lineage=tuple(old.lineage))
    if cached:
        print(f'Gallery: {len(todo):,} new or changed images to extract, '
              f'{len(old.paths) + len(old.skipped) - len(keep) - len(skipped):,} gone or '
              f'changed; {len(keep):,} features kept from the cache.')
    temporary = f'.{key}.{os.getpid()}'     # per process, even without the lock
    partial, manifest_partial = (cache_dir / f'{temporary}.partial{suffix}'
                                 for suffix in ('.npy', '.json'))
    feature_file = cache_dir / f'{key}.npy'
    # Kept rows keep their ids: an index of an earlier generation is updated by id.
    new = _Manifest([old.paths[r] for r in keep], [tuple(old.stamps[r]) for r in keep],
                    [old.ids[r] for r in keep], old.next_id, skipped,
                    (old.lineage + [old.generation])[-LINEAGE:] if cached else [])
    writer = _FeatureWriter(partial, len(keep) + len(todo))

    def cannot_write(error: OSError) -> UserError:
        return write_error(feature_file, error, 'the gallery features', 'The previous feature '
                           'cache is intact and nothing partial is left; free some space (or '
                           'fix the folder\'s permissions) and search again.')

    def append(rows: np.ndarray) -> None:
        try:
            writer.append(rows)
        except OSError as error:
            raise cannot_write(error) from None
    try:
        for start in range(0, len(keep), RANK_CHUNK):
            append(search_index.read_rows(old_features, np.array(keep[start:start + RANK_CHUNK])))
        for good, batch_features, bad in extract(todo) if todo else ():
            new.skipped += [(str(p), why, *stamps[str(p)]) for p, why in bad]
            if batch_features is None:
                continue
            append(batch_features)
            new.paths += [str(p) for p in good]
            new.stamps += [stamps[str(p)] for p in good]
            new.ids += range(new.next_id, new.next_id + len(good))
            new.next_id += len(good)
        if not writer.rows:
            raise UserError(f'GALLERY: none of the {len(stamps)} images under "{folder}" could '
                            f'be read (first: {new.skipped[0][0]}: {new.skipped[0][1]}).')
        try:
            new.write(manifest_partial)     # before any rename: a full disk changes nothing
            writer.finish(new.generation)
            os.replace(partial, feature_file)
            os.replace(manifest_partial, cache_dir / f'{key}.json')
        except OSError as error:
            raise cannot_write(error) from None
    except BaseException:               # a full disk, unreadable images, Ctrl-C: no leftovers
        writer.discard()
        manifest_partial.unlink(missing_ok=True)
        raise
    return Gallery(new.paths, [s[:2] for s in new.skipped],
                   np.load(feature_file, mmap_mode='r'), cached=False,
                   ids=np.array(new.ids, dtype=np.int64), key=key,
                   generation=new.generation, lineage=tuple(new.lineage))


def rank_gallery(query_features: np.ndarray, gallery: np.ndarray) -> list[tuple]:
    """For each query row: (order, distances), every gallery row nearest first, by squared
    euclidean distance (Torchreid's default metric). One pass over the gallery, read in
    chunks, serves a whole batch of queries."""
    queries = torch.from_numpy(np.atleast_2d(np.asarray(query_features, dtype=np.float32)))
    distances = np.empty((len(queries), len(gallery)), dtype=np.float32)
    for start in range(0, len(gallery), RANK_CHUNK):
        rows = torch.from_numpy(np.array(gallery[start:start + RANK_CHUNK]))   # read from disk
        distances[:, start:start + len(rows)] = squared_euclidean(queries, rows).numpy()
    check_finite(distances, 'query-gallery distances')    # a diverged model ranks nothing
    ranked = []
    for row in distances:
        order = np.argsort(row, kind='stable')
        ranked.append((order, row[order]))
    return ranked


def rank(queries: np.ndarray, gallery: Gallery, index: GalleryIndex | None, rows: int,
         nprobe: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each query's nearest `rows` gallery rows and their distances, nearest first: without an
    index the exact streaming search, each pass over the gallery serving as many queries as
    EXACT_DISTANCES allows; with one, its candidates re-ranked exactly."""
    if index is not None:
        return search_index.search(index, queries, gallery.features, gallery.ids, rows, nprobe)
    per_pass = max(1, EXACT_DISTANCES // len(gallery.features))
    return [(order[:rows].copy(), distances[:rows].copy())   # copies: the full rows go
            for start in range(0, len(queries), per_pass)
            for order, distances in rank_gallery(queries[start:start + per_pass],
                                                 gallery.features)]


def gallery_index(gallery: Gallery, cache_dir: Path, s: Settings) -> GalleryIndex | None:
    """The gallery's index, built or brought up to date beside its features (under the
    gallery's lock); None when the gallery is small enough to rank exactly."""
    if len(gallery.paths) <= s.SEARCH_EXACT_UP_TO:
        return None
    with _exclusive(cache_dir / f'{gallery.key}.lock', 'Waiting for another search that is '
                    f'updating the index of this gallery (lock: {cache_dir / gallery.key}.lock) '
                    '...'):
        index, what = search_index.open_index(
            cache_dir / f'{gallery.key}.{s.SEARCH_INDEX}.npz', gallery.features, gallery.ids,
            s.SEARCH_INDEX, generation=gallery.generation, lineage=gallery.lineage)
    print(f'Index: {what}: {len(gallery.paths):,} images above SEARCH_EXACT_UP_TO='
          f'{s.SEARCH_EXACT_UP_TO:,}, so {s.SEARCH_INDEX} proposes candidates and exact '
          f'distances rank them.')
    return index


def check_search_settings(s: Settings) -> None:
    """The search settings make sense (checked before the model is loaded)."""
    if s.SEARCH_INDEX not in search_index.KINDS:
        raise UserError(f'SEARCH_INDEX={s.SEARCH_INDEX!r}: valid choices are '
                        f'{", ".join(map(repr, search_index.KINDS))}. Fix it in config.py or '
                        f'with --SEARCH_INDEX=...')
    for key in ('SEARCH_CSV_ROWS', 'SEARCH_NPROBE'):
        if not s[key] > 0:
            raise UserError(f'{key}={s[key]!r} must be greater than 0. Fix it in config.py or '
                            f'with --{key}=...')
    if not s.SEARCH_EXACT_UP_TO >= 0:
        raise UserError(f'SEARCH_EXACT_UP_TO={s.SEARCH_EXACT_UP_TO!r} must be 0 (always use the '
                        f'index) or a number of gallery images up to which search is exact. Fix '
                        f'it in config.py or with --SEARCH_EXACT_UP_TO=...')


def query_batches(model, transform, queries: list[Path], batch_size: int,
                  device: torch.device) -> Iterator[tuple[list[Path], np.ndarray | None, list]]:
    """(readable queries, their features, unreadable ones with why) in groups of QUERY_BATCH:
    a folder of queries is ranked in one batch (a few for a huge folder)."""
    paths, features, bad = [], [], []
    for good, batch_features, unreadable in extract_batches(model, transform, queries,
                                                            batch_size, device, 'Queries'):
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


def write_results(out_dir: Path, query_path: Path, paths: list[str], order: np.ndarray,
                  distances: np.ndarray, topk: int, skipped: list,
                  csv_rows: int | None = None) -> None:
    """results.csv (the first `csv_rows` of `order`, all by default), strip.jpg (query +
    top-k) and index.html."""
    listed = len(order) if csv_rows is None else min(csv_rows, len(order))
    out_dir.mkdir(parents=True, exist_ok=True)
    # surrogateescape: paths that are not UTF-8 are written back as the bytes they are
    with open(out_dir / 'results.csv', 'w', newline='', errors='surrogateescape') as handle:
        writer = csv.writer(handle)
        writer.writerow(['rank', 'path', 'distance'])
        for rank, (index, distance) in enumerate(zip(order[:listed], distances[:listed]), 1):
            writer.writerow([rank, paths[index], f'{distance:.6g}'])
    top = [(paths[i], float(d)) for i, d in zip(order[:topk], distances[:topk])]
    save_strip(out_dir / 'strip.jpg',
               draw_strip((str(query_path), ['query', query_path.name[:10]]),
                          [(p, [f'#{r} d={d:.3g}', Path(p).name[:10]], None)
                           for r, (p, d) in enumerate(top, 1)]))
    rel = lambda p: html.escape(link(p, out_dir))  # noqa: E731
    tiles = ''.join(
        f'<figure><img loading="lazy" src="{rel(p)}" title="{html.escape(str(p))}">'
        f'<figcaption>#{r} d={d:.4g}<br>{html.escape(Path(p).name)}</figcaption></figure>'
        for r, (p, d) in enumerate(top, 1))
    notes = (f'<p>{len(skipped)} unreadable files skipped: see skipped.txt</p>' if skipped else '')
    (out_dir / 'index.html').write_text(
        '<!doctype html><html><head><meta charset="utf-8"><title>Search results</title><style>'
        'body{font:14px system-ui,sans-serif;margin:16px}figure{display:inline-block;margin:4px;'
        'text-align:center;font-size:11px;width:90px;vertical-align:top}'
        'h1,figcaption{overflow-wrap:anywhere}img{width:64px;'
        'height:128px;border:3px solid #888}.q img{border-color:#000}</style></head><body>'
        f'<h1>Search: {html.escape(query_path.name)}</h1><p>{len(paths):,} gallery images ranked; '
        + ('all of them' if listed == len(paths) else f'the nearest {listed:,}')
        + f' in <a href="results.csv">results.csv</a>.</p>{notes}'
        f'<figure class="q"><img src="{rel(query_path)}"><figcaption>query</figcaption></figure>'
        f'{tiles}</body></html>', encoding='utf-8', errors='surrogateescape')
    if skipped:
        (out_dir / 'skipped.txt').write_text(''.join(f'{p}\t{why}\n' for p, why in skipped),
                                             errors='surrogateescape')


def query_images(query: Path) -> list[Path]:
    if Path(query).is_dir():
        found = list_images(query)
        if found:
            return found
        raise UserError(f'QUERY: no images (.jpg, .jpeg, .png, .bmp) under "{query}".')
    if not Path(query).is_file():
        raise UserError(f'QUERY: "{query}" does not exist. Pass --QUERY=path/to/person.jpg '
                        f'(or a folder of query images).')
    return [Path(query)]


def model_for_search(checkpoint: dict, path: Path, model_name: str, loss: str) -> nn.Module:
    """The checkpoint's model, built without ImageNet weights (the checkpoint replaces them)."""
    from torchreid.reid.models import build_model
    model = build_model(model_name, num_classes=checkpoint_classes(checkpoint, model_name) or 1,
                        loss=loss, pretrained=False)
    load_weights(model, checkpoint, model_name, path)
    return model


def quiet_test_transform(height: int, width: int):
    """Torchreid's test transform (resize, tensor, ImageNet normalisation), built silently."""
    from torchreid.reid.data.transforms import build_transforms
    with contextlib.redirect_stdout(io.StringIO()):
        return build_transforms(height, width, transforms=[])[1]


class FlipTest(nn.Module):
    """FLIP_TEST: the mean of the features of each image and of its mirror image."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.model(images).float() + self.model(images.flip(3)).float()) / 2


class OnnxModel(nn.Module):
    """An exported model.onnx in the place of the PyTorch model: onnxruntime computes the
    features (`reidkit.search.onnx_features`, no Torchreid), `transform` is its own preprocessing."""

    def __init__(self, path: Path):
        super().__init__()
        self.extractor = OnnxExtractor(path)

    def transform(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.extractor.preprocess([image])[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        session, name = self.extractor.session, self.extractor.input.name
        return torch.from_numpy(np.asarray(session.run(None, {name: images.numpy()})[0],
                                           dtype=np.float32))


def search_model(s: Settings, weights: Path | None):
    """(model, transform, checkpoint path, cache key part, s) for a search: a PyTorch
    checkpoint through Torchreid, or an exported .onnx file through onnxruntime alone."""
    given = Path(weights or s.WEIGHTS or '')
    if given.suffix.lower() == '.onnx':
        if not given.is_file():
            raise UserError(f'WEIGHTS: "{given}" does not exist. Pass an exported model.onnx '
                            f'(python main.py export writes one beside its checkpoint).')
        model = OnnxModel(given)
        meta = model.extractor
        print(f'Model: "{given}" (ONNX, run by onnxruntime; {meta.model_name}, '
              f'{meta.height}x{meta.width} input)')
        key = f'onnx|{meta.model_name}|{meta.height}x{meta.width}'
        return model, model.transform, given, key, s
    checkpoint, saved, s = resolve_checkpoint(s, weights)
    checks.check_names(s)
    device = choose_device(s.DEVICE)
    model = place_model(model_for_search(saved, checkpoint, s.MODEL_NAME, s.LOSS), device)
    print(f'Model: "{checkpoint}" (epoch {saved.get("epoch", "?")}; {s.MODEL_NAME}, '
          f'{s.HEIGHT}x{s.WIDTH} input, on {device.type})')
    return model, quiet_test_transform(s.HEIGHT, s.WIDTH), checkpoint, \
        f'{s.MODEL_NAME}|{s.HEIGHT}x{s.WIDTH}', s


def search(s: Settings, weights: Path | None = None) -> Path:
    """`python main.py search`: ranks GALLERY for each image in QUERY with a checkpoint
    (`weights`, WEIGHTS or the newest run's); returns the new output folder, whose log.txt
    holds what was printed (the model, the gallery, the ranking)."""
    with log_once_there_is_a_folder() as start_log:
        return _search(s, weights, start_log)


def _search(s: Settings, weights: Path | None, start_log) -> Path:
    if not s.QUERY or not s.GALLERY:
        raise UserError('search needs --QUERY=path/to/person.jpg (or a folder of queries) and '
                        '--GALLERY=path/to/folder (searched recursively for images).')
    queries = query_images(Path(s.QUERY))
    if not Path(s.GALLERY).is_dir():
        raise UserError(f'GALLERY: "{s.GALLERY}" is not a folder. Point --GALLERY at the folder '
                        f'holding the images to rank.')
    model, transform, checkpoint, model_key, s = search_model(s, weights)
    checks.check_numbers(s, training=False)
    check_search_settings(s)
    checks.check_output_folder(Path(s.EXPERIMENTS_DIR))
    if s.FLIP_TEST:             # other features: another cache entry
        model, model_key = FlipTest(model), model_key + '|flip'
    print('Ranking: euclidean distance' +
          (', FLIP_TEST (each image averaged with its mirror)' if s.FLIP_TEST else ''))
    device = next(model.parameters(), torch.empty(0)).device
    cache_dir = Path(s.EXPERIMENTS_DIR) / '.search-cache'
    gallery = gallery_features(
        model, transform, Path(s.GALLERY), checkpoint, model_key,
        cache_dir, s.BATCH_SIZE_TEST, device, outputs=Path(s.EXPERIMENTS_DIR))
    print(f'Gallery: {len(gallery.paths)} images ('
          f'{"features from the cache" if gallery.cached else "features extracted and cached"})'
          + (f'; {len(gallery.skipped)} unreadable files skipped' if gallery.skipped else ''))
    index = gallery_index(gallery, cache_dir, s)
    rows = min(len(gallery.paths), max(s.SEARCH_CSV_ROWS, s.SEARCH_TOPK))
    names = dict(zip(queries, unique_names(
        [queries[0].name] if len(queries) == 1 else [q.relative_to(s.QUERY) for q in queries],
        reserved=(INCOMPLETE, SKIPPED_QUERIES, SEARCH_LOG))))
    out_dir, unreadable = None, []
    for paths, features, bad in query_batches(model, transform, queries, s.BATCH_SIZE_TEST,
                                              device):
        unreadable += bad
        if not paths:
            continue
        ranked = rank(features, gallery, index, rows, s.SEARCH_NPROBE)
        if out_dir is None:     # made only once there is something to put in it
            out_dir = new_run_dir(Path(s.EXPERIMENTS_DIR), 'search')
            start_log(out_dir / SEARCH_LOG)
            (out_dir / INCOMPLETE).write_text(
                'This search stopped (or is still running) before every query was done: the '
                'folders here are the queries that finished. Run the search again for all '
                'of them.\n')
        for path, (order, distances) in zip(paths, ranked):
            # Written under a hidden name, renamed when whole: a result folder is complete.
            partial = out_dir / f'.{names[path]}.partial'
            write_results(partial, path, gallery.paths, order, distances, s.SEARCH_TOPK,
                          gallery.skipped, csv_rows=s.SEARCH_CSV_ROWS)
            partial.rename(out_dir / names[path])
    if out_dir is None:
        first = ' The first three:' if len(unreadable) > 3 else ''
        raise UserError(f'QUERY: none of the {len(queries)} query images could be read.{first} '
                        + ' '.join(why for _, why in unreadable[:3]))
    if unreadable:
        (out_dir / SKIPPED_QUERIES).write_text(
            ''.join(f'{path}\t{why}\n' for path, why in unreadable), encoding='utf-8',
            errors='surrogateescape')
    (out_dir / INCOMPLETE).unlink()
    print(f'{len(queries) - len(unreadable)} queries ranked against {len(gallery.paths):,} '
          f'gallery images')
    return out_dir
