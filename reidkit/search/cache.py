"""A gallery's feature cache: its features in a .npy file on disk (memory-mapped), its manifest
(which file each row is, with the file's identity and a stable id), one lock per gallery.

Gallery features are extracted in batches, streamed to a file on disk and cached per checkpoint
and gallery folder, with each file's identity (size, mtime, inode, ctime): the next search
extracts only the files added or changed since, and drops the removed ones. The manifest, the
features and the index carry one generation id, checked on every load (see Manifest). Searches
running at once on one gallery share the cache: one extracts (or builds the index), the others
wait for it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Iterable, Iterator

import numpy as np

from reidkit.data.checks import DIST_METRICS, SEARCH_INDEX_KINDS
from reidkit.run.atomic import exclusive, write_error
from reidkit.run.errors import UserError
from reidkit.run.words import counted
from reidkit.run.settings import Settings
from reidkit.search import index as search_index
from reidkit.search.extractor import IMAGE_SUFFIXES, FeatureExtractor, images_under, \
    list_images
from reidkit.search.index import GalleryIndex, Unusable

RANK_CHUNK = 50_000            # gallery rows read from disk at a time (ranking, copying rows)
# A feature file ends with its generation, after its rows (np.load reads the rows and ignores
# it): the manifest and the index name the same one, so no two of them from different writes
# are ever used together.
GENERATION_MAGIC = b'\nreidkit search cache generation '
GENERATION_CHARS = 32
LINEAGE = 1_000         # earlier generations an index may be brought up to date from

Stamp = tuple[int, int, int, int]


@dataclass(frozen=True)
class CacheFiles:
    """Where a gallery's cache lives: `folder`/`key`.npy, .json, .lock, and an index per
    kind and metric: .<kind>.npz (euclidean), .<kind>.cosine.npz."""
    folder: Path
    key: str

    @property
    def features(self) -> Path:
        return self.folder / f'{self.key}.npy'

    @property
    def manifest(self) -> Path:
        return self.folder / f'{self.key}.json'

    @property
    def lock(self) -> Path:
        return self.folder / f'{self.key}.lock'

    def index(self, kind: str, metric: str = 'euclidean') -> Path:
        """The index of `kind` ranking by `metric` (DIST_METRIC): one each, both built from
        the same raw features; the euclidean one keeps the name indexes always had."""
        return self.folder / (f'{self.key}.{kind}.npz' if metric == 'euclidean' else
                              f'{self.key}.{kind}.{metric}.npz')

    def partial(self, suffix: str) -> Path:
        """A file being written, per process (even without the lock), renamed when whole."""
        return self.folder / f'.{self.key}.{os.getpid()}.partial{suffix}'

    def leftovers(self) -> Iterator[Path]:
        """Files being written by a search that was killed (see partial)."""
        return self.folder.glob(f'.{self.key}.*')


@dataclass
class Gallery:
    """Features of a folder's readable images, in a .npy file on disk (memory-mapped)."""
    paths: list[str]
    skipped: list[tuple[str, str]]      # (path, why)
    features: np.ndarray                # memory-mapped (len(paths), dim) float32
    cached: bool                        # nothing had to be extracted
    ids: np.ndarray                     # each row's stable id (ascending): the index's ids
    files: CacheFiles
    inodes: np.ndarray                  # each row's file's inode (its identity, see _stamps)
    generation: str = ''                # of its manifest and features (see Manifest)
    lineage: tuple[str, ...] = ()       # earlier generations whose ids mean the same images


def _cache_key(checkpoint: Path, folder: Path, model_key: str) -> str:
    """The checkpoint (path, size, mtime) and the gallery folder: one cache per gallery, which
    follows the folder's changes (see Manifest)."""
    digest = hashlib.sha256()
    stat = checkpoint.stat()
    digest.update(os.fsencode(f'{checkpoint.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|'
                              f'{model_key}|{folder}'))
    return digest.hexdigest()[:24]


def _stamps(image_paths: list[Path]) -> dict[str, Stamp]:
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


def _generation(body: bytes) -> str:
    """A manifest's generation: the digest of all it says, as written (a random nonce
    included), so a manifest changed after it was written no longer matches it."""
    return hashlib.sha256(body).hexdigest()[:GENERATION_CHARS]


def _stamp(values) -> Stamp:
    stamp = tuple(int(v) for v in values)
    if len(stamp) != 4:
        raise ValueError(f'a file identity of {len(stamp)} values, not 4')
    return stamp


@dataclass(frozen=True)
class CachedRow:
    """One feature row: its file, the file's identity when extracted (see _stamps) and a
    stable id (the index's id for it; a new or changed file gets a new one)."""
    path: str
    stamp: Stamp
    id: int


@dataclass(frozen=True)
class SkippedFile:
    """A file that could not be read, with why, and its identity then: it is tried again once
    that changes."""
    path: str
    why: str
    stamp: Stamp


@dataclass
class Manifest:
    """What a gallery's cache holds (the .json beside its .npy): its rows, ids ascending, in
    the order of the features; the files skipped; the generations this cache was derived
    from, oldest first (their ids mean the same images as this one's). On disk: a line
    {"generation": ...}, then the rest, with paths, stamps and ids as three lists."""
    rows: list[CachedRow]
    skipped: list[SkippedFile]
    next_id: int
    lineage: list[str]
    generation: str = ''

    def write(self, temporary: Path) -> None:
        """Sets the generation and writes the manifest to `temporary` (renamed into place by
        the caller, after the features)."""
        body = json.dumps({       # ASCII: file names that are not UTF-8 come \u-escaped
            'paths': [row.path for row in self.rows],
            'stamps': [list(row.stamp) for row in self.rows],
            'ids': [row.id for row in self.rows], 'next_id': self.next_id,
            'skipped': [[file.path, file.why, *file.stamp] for file in self.skipped],
            'lineage': self.lineage, 'nonce': os.urandom(8).hex()})
        self.generation = _generation(body.encode('ascii'))
        with open(temporary, 'w', encoding='ascii') as handle:
            handle.write(json.dumps({'generation': self.generation}) + '\n' + body)
            handle.flush()
            os.fsync(handle.fileno())

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """The manifest at `path`. Unusable (saying why) when it has no generation id or was
        changed since it was written; OSError when it cannot be read, ValueError, KeyError or
        TypeError when it is malformed."""
        first, _, body = path.read_bytes().partition(b'\n')
        try:
            generation = json.loads(first)['generation']
        except (ValueError, KeyError, TypeError):
            raise Unusable('it has no generation id: damaged, or written by an earlier '
                           'version') from None
        if generation != _generation(body):
            raise Unusable('its manifest was changed after it was written')
        saved = json.loads(body)
        paths, stamps, ids = saved['paths'], saved['stamps'], saved['ids']
        if not len(paths) == len(stamps) == len(ids):
            raise ValueError(f'{len(paths)} paths, {len(stamps)} stamps, {len(ids)} ids')
        return cls([CachedRow(str(path), _stamp(stamp), int(id_))
                    for path, stamp, id_ in zip(paths, stamps, ids)],
                   [SkippedFile(str(path), str(why), _stamp(stamp))
                    for path, why, *stamp in saved['skipped']],
                   int(saved['next_id']), [str(g) for g in saved['lineage']], generation)

    def add(self, paths: list[Path], stamps: dict[str, Stamp]) -> None:
        """Rows for newly extracted files, with new ids."""
        self.rows += [CachedRow(str(path), stamps[str(path)], self.next_id + k)
                      for k, path in enumerate(paths)]
        self.next_id += len(paths)


def check_gallery(folder: Path, outputs: Path | None = None) -> None:
    """UserError unless GALLERY (`folder`) is a folder holding at least one image (none under
    `outputs`, our EXPERIMENTS_DIR, counts): checked before a model loads or a training runs,
    stopping at the first image found."""
    if not Path(folder).is_dir():
        raise UserError(f'GALLERY: "{folder}" is not a folder. Point --GALLERY at the folder '
                        f'holding the images to rank.')
    if next(images_under(folder, outputs), None) is None:
        raise _no_gallery_images(folder)


def _no_gallery_images(folder: Path) -> UserError:
    return UserError(f'GALLERY: no images ({", ".join(IMAGE_SUFFIXES)}) under "{folder}". '
                     f'Point --GALLERY at the folder holding your person crops.')


def gallery_features(extractor: FeatureExtractor, folder: Path, cache_dir: Path,
                     batch_size: int, outputs: Path | None = None) -> Gallery:
    """Features of every readable image under `folder` (none under `outputs`, our own
    EXPERIMENTS_DIR), from the cache as far as it is current: only files that are new or
    changed since are extracted. Paths are absolute, so the cache serves searches started
    from any working directory. UserError when there are no images, none can be read, a cache
    file's place is taken by a folder (checked before any work) or the cache cannot be
    written (a full disk)."""
    given, folder = folder, Path(folder).resolve()
    stamps = _stamps(list_images(folder, outputs=outputs))
    if not stamps:
        raise _no_gallery_images(given)
    files = CacheFiles(cache_dir, _cache_key(Path(extractor.source), folder, extractor.key))
    cache_dir.mkdir(parents=True, exist_ok=True)
    search_index.check_place(files.features, 'the gallery\'s features')
    search_index.check_place(files.manifest, 'the gallery\'s feature manifest')
    for kind in SEARCH_INDEX_KINDS:
        for metric in DIST_METRICS:
            search_index.check_place(files.index(kind, metric), 'the gallery\'s index')
    with exclusive(files.lock, 'Waiting for another search that is extracting the features '
                    f'of this gallery (lock: {files.lock}) ...'):
        for leftover in files.leftovers():       # from a search that was killed
            leftover.unlink(missing_ok=True)
        try:
            cached = _read_cache(files, folder)
        except Unusable as why:
            print(f'Note: the feature cache "{files.manifest}" cannot be used ({why}); '
                  f'extracting the features again.')
            cached = None
        return _update_cache(extractor, batch_size, given, stamps, cached, files)


def _features_generation(feature_file: Path, features: np.memmap) -> str:
    """The generation written after a feature file's rows ('' when there is none)."""
    with open(feature_file, 'rb') as handle:
        handle.seek(features.offset + features.nbytes)
        tail = handle.read(len(GENERATION_MAGIC) + GENERATION_CHARS + 1)
    if len(tail) != len(GENERATION_MAGIC) + GENERATION_CHARS or \
            not tail.startswith(GENERATION_MAGIC):
        return ''
    return tail[len(GENERATION_MAGIC):].decode('ascii', 'replace')


def _read_cache(files: CacheFiles, folder: Path) -> tuple[Manifest, np.ndarray] | None:
    """The cache's manifest and features; None when there is none. Unusable, saying why,
    unless they are of one generation, the manifest as it was written, listing files of
    `folder`."""
    if not files.manifest.exists() and not files.features.exists():
        return None
    try:
        manifest = Manifest.read(files.manifest)
        features = np.load(files.features, mmap_mode='r')
        rows = len(features) if features.ndim == 2 else -1
        written_with = _features_generation(files.features, features) if rows >= 0 else ''
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise Unusable(f'{type(error).__name__}: {error}') from None
    if written_with != manifest.generation:
        raise Unusable(f'its features file "{files.features.name}" is not the one its manifest '
                       f'was written with')
    if len(manifest.rows) != rows:
        raise Unusable(f'{rows} feature rows for {len(manifest.rows)} images')
    # Caches written before paths were absolute, or edited by hand, list other files.
    inside = os.path.join(str(folder), '')
    if not all(file.path.startswith(inside) for file in manifest.rows + manifest.skipped):
        raise Unusable('its file list is not the gallery\'s')
    ids = [row.id for row in manifest.rows] + [manifest.next_id]
    if any(later <= earlier for earlier, later in zip(ids, ids[1:])):
        raise Unusable('its row ids are not ascending')
    return manifest, features


def _gallery(manifest: Manifest, features: np.ndarray, files: CacheFiles,
             cached: bool) -> Gallery:
    return Gallery([row.path for row in manifest.rows],
                   [(file.path, file.why) for file in manifest.skipped], features, cached,
                   np.array([row.id for row in manifest.rows], dtype=np.int64), files,
                   np.array([row.stamp[2] for row in manifest.rows], dtype=np.uint64),
                   manifest.generation, tuple(manifest.lineage))


def _update_cache(extractor: FeatureExtractor, batch_size: int, folder: Path,
                  stamps: dict[str, Stamp], cached: tuple | None, files: CacheFiles) -> Gallery:
    """Keeps the cached rows of unchanged files, extracts the new and changed files (new,
    changed, or once unreadable and changed since), and publishes the result (see
    _write_cache)."""
    old, old_features = cached or (Manifest([], [], 0, []), None)
    keep = [k for k, row in enumerate(old.rows) if stamps.get(row.path) == row.stamp]
    skipped = [file for file in old.skipped if stamps.get(file.path) == file.stamp]
    known = {old.rows[k].path for k in keep} | {file.path for file in skipped}
    todo = [Path(path) for path in stamps if path not in known]
    if cached and not todo and len(keep) == len(old.rows) and len(skipped) == len(old.skipped):
        return _gallery(old, old_features, files, cached=True)
    if cached:
        print(f'Gallery: {len(todo):,} new or changed images to extract, '
              f'{len(old.rows) + len(old.skipped) - len(keep) - len(skipped):,} gone or '
              f'changed; {len(keep):,} features kept from the cache.')
    # Kept rows keep their ids: an index of an earlier generation is updated by id.
    new = Manifest([old.rows[k] for k in keep], skipped, old.next_id,
                   (old.lineage + [old.generation])[-LINEAGE:] if cached else [])
    kept = (search_index.read_rows(old_features, np.array(keep[start:start + RANK_CHUNK]))
            for start in range(0, len(keep), RANK_CHUNK))
    batches = _with_extracted(kept, extractor.batches(todo, batch_size, 'Gallery features')
                              if todo else (), new, stamps)
    _write_cache(files, new, batches, len(keep) + len(todo), folder)
    return _gallery(new, np.load(files.features, mmap_mode='r'), files, cached=False)


def _with_extracted(kept: Iterable[np.ndarray], extracted: Iterable[tuple], new: Manifest,
                    stamps: dict[str, Stamp]) -> Iterator[np.ndarray]:
    """The kept rows' features, then the extracted ones', each batch added to `new` (its
    rows, or its files skipped) as it comes."""
    yield from kept
    for good, features, bad in extracted:
        new.skipped += [SkippedFile(str(path), why, stamps[str(path)]) for path, why in bad]
        if features is not None:
            new.add(good, stamps)
            yield features


def _write_cache(files: CacheFiles, new: Manifest, batches: Generator[np.ndarray, None, None],
                 planned: int, folder: Path) -> None:
    """Writes `batches` (the features of `new`'s rows, which they complete) and `new`, of one
    new generation, each beside and renamed into place whole (the features first). A write
    that fails (a full disk) leaves the previous cache as it was and nothing partial: a
    UserError says so, as when no image could be read."""
    partial, manifest_partial = files.partial('.npy'), files.partial('.json')
    writer = _FeatureWriter(partial, planned)

    def cannot_write(error: OSError) -> UserError:
        return write_error(files.features, error, 'the gallery features', 'The previous '
                           'feature cache is intact and nothing partial is left; free some '
                           'space (or fix the folder\'s permissions) and search again.')
    try:
        with contextlib.closing(batches):   # a failure ends the extraction, and its progress bar
            for rows in batches:
                try:
                    writer.append(rows)
                except OSError as error:
                    raise cannot_write(error) from None
        if not writer.rows:     # then every file listed was skipped
            raise UserError(f'GALLERY: none of the {counted(len(new.skipped), "image")} '
                            f'under "{folder}" '
                            f'could be read (first: {new.skipped[0].path}: '
                            f'{new.skipped[0].why}).')
        try:
            new.write(manifest_partial)     # before any rename: a full disk changes nothing
            writer.finish(new.generation)
            os.replace(partial, files.features)
            os.replace(manifest_partial, files.manifest)
        except OSError as error:
            raise cannot_write(error) from None
    except BaseException:               # a full disk, unreadable images, Ctrl-C: no leftovers
        writer.discard()
        manifest_partial.unlink(missing_ok=True)
        raise


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


def gallery_index(gallery: Gallery, s: Settings) -> GalleryIndex | None:
    """The gallery's index for DIST_METRIC, built or brought up to date beside its features
    (under the gallery's lock); None when the gallery is small enough to rank exactly."""
    if len(gallery.paths) <= s.SEARCH_EXACT_UP_TO:
        return None
    files = gallery.files
    with exclusive(files.lock, 'Waiting for another search that is updating the index of '
                    f'this gallery (lock: {files.lock}) ...'):
        index, what = search_index.open_index(
            files.index(s.SEARCH_INDEX, s.DIST_METRIC), gallery.features, gallery.ids,
            s.SEARCH_INDEX, generation=gallery.generation, lineage=gallery.lineage,
            metric=s.DIST_METRIC)
    print(f'Index: {what}: {len(gallery.paths):,} images above SEARCH_EXACT_UP_TO='
          f'{s.SEARCH_EXACT_UP_TO:,}, so {s.SEARCH_INDEX} proposes candidates and exact '
          f'distances rank them.')
    return index
