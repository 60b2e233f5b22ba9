"""Rank a folder of your own images for a query image (or a folder of queries) with a trained
checkpoint: a ranked strip, results.csv with every gallery image, and a small index.html.

Gallery features are extracted in batches, streamed to a file on disk and cached, keyed by the
checkpoint and the gallery's file list (path, size, mtime): a second query against the same
gallery does not extract again. Ranking reads the features in chunks, so a gallery of 100,000
images never needs all features, images or distances of every query in memory at once.
Searches running at once on one gallery share the cache: one extracts, the others wait for it.
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

from reidkit.checks import read_image
from reidkit.checkpoints import load_weights
from reidkit.errors import UserError
from reidkit.report import link, unique_names
from reidkit.settings import Settings
from reidkit.evaluation import check_finite, squared_euclidean

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')
RANK_CHUNK = 50_000            # gallery rows read from disk at a time when ranking
INCOMPLETE = 'INCOMPLETE.txt'  # in a search's folder until every query's results are written
SKIPPED_QUERIES = 'skipped_queries.txt'


@dataclass
class Gallery:
    """Features of a folder's readable images, in a .npy file on disk (memory-mapped)."""
    paths: list[str]
    skipped: list[tuple[str, str]]      # (path, why)
    features: np.ndarray                # memory-mapped (len(paths), dim) float32
    cached: bool


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


def _cache_key(checkpoint: Path, image_paths: list[Path], model_key: str) -> str:
    digest = hashlib.sha256()
    stat = checkpoint.stat()
    digest.update(os.fsencode(f'{checkpoint.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|'
                              f'{model_key}'))
    for path in image_paths:
        stat = path.stat()
        digest.update(os.fsencode(f'\n{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}'))
    return digest.hexdigest()[:24]


def gallery_features(model, transform, folder: Path, checkpoint: Path, model_key: str,
                     cache_dir: Path, batch_size: int, device: torch.device,
                     outputs: Path | None = None) -> Gallery:
    """Features of every readable image under `folder` (none under `outputs`, our own
    EXPERIMENTS_DIR), from the cache when it is current. Paths are absolute, so the cache
    serves searches started from any working directory."""
    image_paths = list_images(Path(folder).resolve(), outputs=outputs)
    if not image_paths:
        raise UserError(f'GALLERY: no images (.jpg, .jpeg, .png, .bmp) under "{folder}". '
                        f'Point --GALLERY at the folder holding your person crops.')
    key = _cache_key(Path(checkpoint), image_paths, model_key)
    index_file, feature_file = cache_dir / f'{key}.json', cache_dir / f'{key}.npy'
    found = _cached_gallery(index_file, feature_file, image_paths)
    if isinstance(found, Gallery):
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache_dir / f'{key}.lock', 'Waiting for another search that is extracting '
                    f'the features of this gallery (lock: {cache_dir / key}.lock) ...'):
        found = _cached_gallery(index_file, feature_file, image_paths)   # built while we waited?
        if isinstance(found, Gallery):
            return found
        if found:
            print(f'Note: the feature cache "{index_file}" cannot be used ({found}); '
                  f'extracting the features again.')
        for leftover in cache_dir.glob(f'.{key}.*'):   # from a search that was killed
            leftover.unlink(missing_ok=True)
        return _extract_to_cache(model, transform, folder, image_paths, index_file,
                                 feature_file, batch_size, device)


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


def _cached_gallery(index_file: Path, feature_file: Path,
                    image_paths: list[Path]) -> Gallery | str:
    """The cached gallery, or why it cannot be used ('' when there is no cache)."""
    if not index_file.exists() and not feature_file.exists():
        return ''
    try:
        index = json.loads(index_file.read_text(encoding='utf-8'))
        paths, skipped = list(index['paths']), [tuple(s) for s in index['skipped']]
        # Caches written before paths were absolute, or edited by hand, list other files.
        same_files = (sorted(paths + [path for path, _ in skipped]) ==
                      sorted(str(path) for path in image_paths))
        features = np.load(feature_file, mmap_mode='r')
        rows = len(features) if features.ndim == 2 else -1
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f'{type(error).__name__}: {error}'
    if rows != len(paths):
        return f'{rows} feature rows for {len(paths)} images'
    if not same_files:
        return 'its file list is not the gallery\'s'
    return Gallery(paths, skipped, features, cached=True)


def _extract_to_cache(model, transform, folder: Path, image_paths: list[Path], index_file: Path,
                      feature_file: Path, batch_size: int, device: torch.device) -> Gallery:
    """Extracts features into a temporary file, then publishes it: the .npy first, then the
    .json that makes it a cache, each renamed into place whole."""
    temporary = f'.{index_file.stem}.{os.getpid()}'     # per process, even without the lock
    partial = feature_file.with_name(f'{temporary}.partial.npy')
    paths, skipped, features, written = [], [], None, 0
    for good, batch_features, bad in extract_batches(model, transform, image_paths, batch_size,
                                                     device, 'Gallery features'):
        skipped += [(str(p), why) for p, why in bad]
        if batch_features is None:
            continue
        if features is None:    # streamed to disk: memory holds one batch, not the gallery
            features = np.lib.format.open_memmap(partial, mode='w+', dtype=np.float32,
                                                 shape=(len(image_paths), batch_features.shape[1]))
        features[written:written + len(good)] = batch_features
        written += len(good)
        paths += [str(p) for p in good]
    if features is None:
        raise UserError(f'GALLERY: none of the {len(image_paths)} images under "{folder}" could '
                        f'be read (first: {skipped[0][0]}: {skipped[0][1]}).')
    features.flush()
    del features
    if written < len(image_paths):
        trimmed = feature_file.with_name(f'{temporary}.trimmed.npy')
        _keep_rows(partial, trimmed, written)
        partial = trimmed
    os.replace(partial, feature_file)
    index = index_file.with_name(f'{temporary}.json')
    index.write_text(json.dumps({'paths': paths, 'skipped': skipped}), encoding='utf-8')
    os.replace(index, index_file)
    return Gallery(paths, skipped, np.load(feature_file, mmap_mode='r'), cached=False)


def _keep_rows(source: Path, target: Path, rows: int) -> None:
    """Copies the first `rows` rows of a .npy file (skipped files leave the tail unused)."""
    full = np.load(source, mmap_mode='r')
    trimmed = np.lib.format.open_memmap(target, mode='w+', dtype=np.float32,
                                        shape=(rows, full.shape[1]))
    for start in range(0, rows, RANK_CHUNK):
        trimmed[start:start + RANK_CHUNK] = full[start:min(start + RANK_CHUNK, rows)]
    trimmed.flush()
    del trimmed, full
    source.unlink()


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


def write_results(out_dir: Path, query_path: Path, paths: list[str], order: np.ndarray,
                  distances: np.ndarray, topk: int, skipped: list) -> None:
    """results.csv (every gallery image), strip.jpg (query + top-k) and index.html."""
    from reidkit.visrank import draw_strip, save_strip
    out_dir.mkdir(parents=True, exist_ok=True)
    # surrogateescape: paths that are not UTF-8 are written back as the bytes they are
    with open(out_dir / 'results.csv', 'w', newline='', errors='surrogateescape') as handle:
        writer = csv.writer(handle)
        writer.writerow(['rank', 'path', 'distance'])
        for rank, (index, distance) in enumerate(zip(order, distances), 1):
            writer.writerow([rank, paths[index], f'{distance:.6g}'])
    top = [(paths[i], float(d)) for i, d in zip(order[:topk], distances[:topk])]
    save_strip(out_dir / 'strip.jpg',
               draw_strip((str(query_path), ['query', query_path.name[:10]]),
                          [(p, [f'#{r} d={d:.3g}', Path(p).name[:10]], None)
                           for r, (p, d) in enumerate(top, 1)]))
    rel = lambda p: html.escape(link(p, out_dir))  # noqa: E731
    tiles = ''.join(
        f'<figure><img loading="lazy" src="{rel(p)}"><figcaption>#{r} d={d:.4g}<br>'
        f'{html.escape(Path(p).name)}</figcaption></figure>' for r, (p, d) in enumerate(top, 1))
    notes = (f'<p>{len(skipped)} unreadable files skipped: see skipped.txt</p>' if skipped else '')
    (out_dir / 'index.html').write_text(
        '<!doctype html><html><head><meta charset="utf-8"><title>Search results</title><style>'
        'body{font:14px system-ui,sans-serif;margin:16px}figure{display:inline-block;margin:4px;'
        'text-align:center;font-size:11px;width:90px;vertical-align:top}img{width:64px;'
        'height:128px;border:3px solid #888}.q img{border-color:#000}</style></head><body>'
        f'<h1>Search: {html.escape(query_path.name)}</h1><p>{len(paths)} gallery images ranked; '
        f'all of them in <a href="results.csv">results.csv</a>.</p>{notes}'
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
    classifier = checkpoint['state_dict'].get('classifier.weight')
    model = build_model(model_name, num_classes=len(classifier) if classifier is not None else 1,
                        loss=loss, pretrained=False)
    load_weights(model, checkpoint, model_name, path)
    return model


def quiet_test_transform(height: int, width: int):
    """Torchreid's test transform (resize, tensor, ImageNet normalisation), built silently."""
    from torchreid.reid.data.transforms import build_transforms
    with contextlib.redirect_stdout(io.StringIO()):
        return build_transforms(height, width, transforms=[])[1]


def search(s: Settings, weights: Path | None = None) -> Path:
    """`python main.py search`: ranks GALLERY for each image in QUERY with a checkpoint
    (`weights`, WEIGHTS or the newest run's); returns the new output folder."""
    from reidkit import checks
    from reidkit.device import choose_device, place_model
    from reidkit.runs import new_run_dir, resolve_checkpoint
    if not s.QUERY or not s.GALLERY:
        raise UserError('search needs --QUERY=path/to/person.jpg (or a folder of queries) and '
                        '--GALLERY=path/to/folder (searched recursively for images).')
    queries = query_images(Path(s.QUERY))
    if not Path(s.GALLERY).is_dir():
        raise UserError(f'GALLERY: "{s.GALLERY}" is not a folder. Point --GALLERY at the folder '
                        f'holding the images to rank.')
    checkpoint, saved, s = resolve_checkpoint(s, weights)
    checks.check_names(s)
    checks.check_numbers(s, training=False)
    checks.check_output_folder(Path(s.EXPERIMENTS_DIR))
    device = choose_device(s.DEVICE)
    model = place_model(model_for_search(saved, checkpoint, s.MODEL_NAME, s.LOSS), device)
    transform = quiet_test_transform(s.HEIGHT, s.WIDTH)
    gallery = gallery_features(
        model, transform, Path(s.GALLERY), checkpoint, f'{s.MODEL_NAME}|{s.HEIGHT}x{s.WIDTH}',
        Path(s.EXPERIMENTS_DIR) / '.search-cache', s.BATCH_SIZE_TEST, device,
        outputs=Path(s.EXPERIMENTS_DIR))
    print(f'Gallery: {len(gallery.paths)} images ('
          f'{"features from the cache" if gallery.cached else "features extracted and cached"})'
          + (f'; {len(gallery.skipped)} unreadable files skipped' if gallery.skipped else ''))
    names = dict(zip(queries, unique_names(
        [queries[0].name] if len(queries) == 1 else [q.relative_to(s.QUERY) for q in queries],
        reserved=(INCOMPLETE, SKIPPED_QUERIES))))
    out_dir, unreadable = None, []
    for paths, features, bad in extract_batches(model, transform, queries, s.BATCH_SIZE_TEST,
                                                device, 'Queries'):
        for path, why in bad:
            print(f'Note: query "{path}" skipped: {why}')
        unreadable += bad
        if features is None:
            continue
        ranked = rank_gallery(features, gallery.features)
        if out_dir is None:     # made only once there is something to put in it
            out_dir = new_run_dir(Path(s.EXPERIMENTS_DIR), 'search')
            (out_dir / INCOMPLETE).write_text(
                'This search stopped (or is still running) before every query was done: the '
                'folders here are the queries that finished. Run the search again for all '
                'of them.\n')
        for path, (order, distances) in zip(paths, ranked):
            # Written under a hidden name, renamed when whole: a result folder is complete.
            partial = out_dir / f'.{names[path]}.partial'
            write_results(partial, path, gallery.paths, order, distances, s.SEARCH_TOPK,
                          gallery.skipped)
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
    return out_dir
