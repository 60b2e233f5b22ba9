"""Benchmark: search at a million images, today's exact streaming search against the index.

    python bench/search_scale.py                     # 1,000,000 x 2048-d, 1,000 queries
    python bench/search_scale.py --size 100000       # a quick run
    python bench/search_scale.py --flat --size 200000   # structureless features: the worst case
    python bench/search_scale.py --metric cosine     # DIST_METRIC='cosine' (its own index)

Features are synthetic, with identity structure: 20 images per identity, identities in groups
of 50 that look alike (as people in similar clothes do), so feature = group centre + identity
offset + per-image Gaussian noise, in a 2048-d space whose variance falls off as 1/k along
randomly rotated directions (as pooled CNN features' does). The noise is set so that exact
Rank-1 is ~90%. They are written to a .npy on disk in chunks, as search caches them.

Each measured step runs in a process of its own, so its peak RSS is its own (not the
generator's): the exact baseline (reidkit.search.command.rank_gallery, queries in batches of 100, on
the first --baseline-queries queries: 1M x 1,000 distances would not fit), the index build,
and the index search (candidates re-ranked exactly from the features on disk). Writing results
is excluded. Recall@10 and Rank-1 agreement are against exact top-10s of every query.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
from reidkit.search import command as search  # noqa: E402
from reidkit.search import index as search_index
from reidkit.evaluate.metrics import distances  # noqa: E402

PER_ID, IDS_PER_GROUP = 20, 50
CHUNK = 20_000              # rows generated (and ground-truth rows read) at a time


def peak_rss_gb() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss would carry
    the generating parent's peak into the measured child)."""
    try:
        status = Path('/proc/self/status').read_text()
        return int(status.split('VmHWM:')[1].split()[0]) / 1024 ** 2
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def generate(folder: Path, size: int, dim: int, num_queries: int, noise: float,
             flat: bool) -> None:
    """gallery.npy (size x dim), queries.npy, and the identity of each in labels.npz."""
    rng = np.random.default_rng(0)
    ids = max(1, size // PER_ID)
    if flat:                    # isotropic, identities independent: no structure to exploit
        scale, rotation = np.ones(dim, np.float32), None
        centres = rng.standard_normal((ids, dim), dtype=np.float32)
    else:
        scale = np.sqrt(1 / np.arange(1, dim + 1)).astype(np.float32)
        scale *= np.sqrt(dim / (scale ** 2).sum())
        rotation = torch.linalg.qr(torch.from_numpy(
            rng.standard_normal((dim, dim), dtype=np.float32)))[0]
        groups = rng.standard_normal((max(1, ids // IDS_PER_GROUP), dim), dtype=np.float32)
        centres = groups[rng.integers(0, len(groups), ids)]
        centres += 0.5 * rng.standard_normal((ids, dim), dtype=np.float32)

    def images(labels: np.ndarray) -> np.ndarray:
        z = (centres[labels] + noise * rng.standard_normal((len(labels), dim),
                                                           dtype=np.float32)) * scale
        return z if rotation is None else (torch.from_numpy(z) @ rotation).numpy()

    labels = np.arange(size) // PER_ID % ids
    gallery = np.lib.format.open_memmap(folder / 'gallery.npy', mode='w+', dtype=np.float32,
                                        shape=(size, dim))
    for start in range(0, size, CHUNK):
        gallery[start:start + CHUNK] = images(labels[start:start + CHUNK])
        print(f'\rgenerating {min(start + CHUNK, size):,} / {size:,}', end='', flush=True)
    print()
    gallery.flush()
    del gallery
    query_labels = rng.integers(0, ids, num_queries)
    np.save(folder / 'queries.npy', images(query_labels))
    np.savez(folder / 'labels.npz', gallery=labels, queries=query_labels)


def exact_top10(folder: Path, metric: str) -> np.ndarray:
    """Every query's exact 10 nearest gallery rows by `metric` (ground truth; not timed)."""
    gallery = np.load(folder / 'gallery.npy', mmap_mode='r')
    queries = torch.from_numpy(np.load(folder / 'queries.npy'))
    best_d = torch.full((len(queries), 10), float('inf'))
    best_i = torch.zeros((len(queries), 10), dtype=torch.long)
    for start in range(0, len(gallery), 50_000):
        rows = torch.from_numpy(search_index.read_rows(gallery, slice(start, start + 50_000)))
        d = distances(queries, rows, metric)
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, torch.arange(
            start, start + len(rows)).expand(len(queries), -1)], 1)
        best_d, at = d.topk(10, dim=1, largest=False, sorted=True)
        best_i = i.gather(1, at)
    return best_i.numpy()


# --- the measured steps, each in its own process ---------------------------------------------

def phase_exact(folder: Path, count: int, metric: str) -> dict:
    gallery = np.load(folder / 'gallery.npy', mmap_mode='r')
    queries = np.load(folder / 'queries.npy')[:count]
    started = time.perf_counter()
    for start in range(0, len(queries), 100):
        search.rank_gallery(queries[start:start + 100], gallery, metric)
    seconds = time.perf_counter() - started
    return {'ms_per_query': 1000 * seconds / len(queries), 'queries': len(queries),
            'peak_rss_gb': peak_rss_gb()}


def phase_build(folder: Path, metric: str) -> dict:
    gallery = np.load(folder / 'gallery.npy', mmap_mode='r')
    started = time.perf_counter()
    index, what = search_index.open_index(folder / 'index.npz', gallery,
                                          np.arange(len(gallery)), 'ivfpq', metric=metric)
    return {'seconds': time.perf_counter() - started, 'what': what,
            'peak_rss_gb': peak_rss_gb(), 'plan': index.plan.__dict__,
            'file_mb': (folder / 'index.npz').stat().st_size / 1e6}


def phase_search(folder: Path, rows: int, nprobe: int) -> dict:
    gallery = np.load(folder / 'gallery.npy', mmap_mode='r')
    queries = np.load(folder / 'queries.npy')
    ids = np.arange(len(gallery))
    started = time.perf_counter()
    index = search_index.load(folder / 'index.npz')
    loaded = time.perf_counter() - started
    rss_loaded = peak_rss_gb()
    started = time.perf_counter()
    ranked = search_index.rank_candidates(index, queries, gallery, ids, rows, nprobe)
    seconds = time.perf_counter() - started
    np.save(folder / f'found-{rows}.npy', np.stack([order[:10] for order, _ in ranked]))
    return {'ms_per_query': 1000 * seconds / len(queries), 'load_s': loaded,
            'rss_after_load_gb': rss_loaded, 'peak_rss_gb': peak_rss_gb()}


def run_phase(args, *extra: str) -> dict:
    """One measured step in a fresh process; its JSON line back."""
    done = subprocess.run([sys.executable, __file__, '--data', str(args.data), '--metric',
                           args.metric, *extra],
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', type=int, default=1_000_000, help='gallery images')
    parser.add_argument('--dim', type=int, default=2048)
    parser.add_argument('--queries', type=int, default=1_000)
    parser.add_argument('--baseline-queries', type=int, default=100,
                        help='queries the exact baseline is timed on (batches of 100)')
    parser.add_argument('--noise', type=float, default=None,
                        help='per-image noise (default: exact Rank-1 ~90%%)')
    parser.add_argument('--flat', action='store_true',
                        help='isotropic features of independent identities (worst case)')
    parser.add_argument('--rows', type=int, nargs='+', default=[config.SEARCH_CSV_ROWS, search_index.MIN_CANDIDATES],
                        help='rows each query gets (results.csv), i.e. candidates re-ranked')
    parser.add_argument('--nprobe', type=int, default=config.SEARCH_NPROBE)
    parser.add_argument('--metric', choices=('euclidean', 'cosine'), default='euclidean',
                        help='DIST_METRIC the search ranks by (and its index is built for)')
    parser.add_argument('--folder', type=Path, default=Path(tempfile.gettempdir()),
                        help='where the features are written (size x dim x 4 bytes)')
    parser.add_argument('--keep', action='store_true', help='keep (and reuse) the features')
    parser.add_argument('--data', type=Path, help=argparse.SUPPRESS)
    parser.add_argument('--phase', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        result = {'exact': lambda: phase_exact(args.data, args.baseline_queries, args.metric),
                  'build': lambda: phase_build(args.data, args.metric),
                  'search': lambda: phase_search(args.data, args.rows[0], args.nprobe),
                  }[args.phase]()
        print(json.dumps(result))
        return
    noise = args.noise if args.noise is not None else (2.83 if args.flat else 0.9)
    args.data = args.folder / (f'search-scale-{args.size}x{args.dim}-{args.queries}'
                               f'{"-flat" if args.flat else ""}-{noise}')
    free = shutil.disk_usage(args.folder).free
    need = args.size * args.dim * 4 * 1.05
    if not (args.data / 'labels.npz').exists():
        if free < need:
            sys.exit(f'{args.folder} has {free / 1e9:.1f} GB free; the features need '
                     f'{need / 1e9:.1f} GB. Pass --folder=... on a larger disk.')
        args.data.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        generate(args.data, args.size, args.dim, args.queries, noise, args.flat)
        print(f'generated in {time.perf_counter() - started:.0f} s')
    try:
        measure(args)
    finally:
        if not args.keep:
            shutil.rmtree(args.data)


def measure(args) -> None:
    labels = np.load(args.data / 'labels.npz')
    started = time.perf_counter()
    truth = exact_top10(args.data, args.metric)
    print(f'exact top-10 of every query (ground truth) in {time.perf_counter() - started:.0f} s')
    rank1 = np.mean(labels['gallery'][truth[:, 0]] == labels['queries'])
    (args.data / 'index.npz').unlink(missing_ok=True)
    exact = run_phase(args, '--phase', 'exact', '--baseline-queries', str(args.baseline_queries))
    build = run_phase(args, '--phase', 'build')
    shape = build['plan']
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads; gallery '
          f'{args.size:,} x {args.dim}-d{" (flat)" if args.flat else ""}, {args.queries:,} '
          f'queries; {args.metric} distance; exact Rank-1 {rank1:.1%}')
    print(f'| {args.size:,} x {args.dim}-d, {args.queries:,} queries | build | peak RSS | '
          f'ms / query | speed-up | recall@10 vs exact | Rank-1 agreement |')
    print('|---|---|---|---|---|---|---|')
    print(f'| exact streaming search (today; batches of 100, {exact["queries"]:,} queries '
          f'timed) | none | {exact["peak_rss_gb"]:.2f} GB | {exact["ms_per_query"]:.1f} | 1x '
          f'| 1 | 1 |')
    for rows in args.rows:
        found = run_phase(args, '--phase', 'search', '--rows', str(rows),
                          '--nprobe', str(args.nprobe))
        top = np.load(args.data / f'found-{rows}.npy')
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(top, truth)])
        agree = np.mean(top[:, 0] == truth[:, 0])
        print(f'| IVF-PQ ({shape["nlist"]:,} lists, {shape["m"]}-byte codes, nprobe '
              f'{args.nprobe}), {rows:,} candidates re-ranked exactly | {build["seconds"]:.0f} s '
              f'| {found["peak_rss_gb"]:.2f} GB | {found["ms_per_query"]:.2f} | '
              f'{exact["ms_per_query"] / found["ms_per_query"]:.0f}x | {recall:.4f} | '
              f'{agree:.4f} |')
        print(f'  (index load {found["load_s"]:.1f} s, RSS after load '
              f'{found["rss_after_load_gb"]:.2f} GB)', file=sys.stderr)
    print(f'index file {build["file_mb"]:.0f} MB ({build["file_mb"] * 1e6 / args.size:.0f} bytes '
          f'per image); build peak RSS {build["peak_rss_gb"]:.2f} GB')


if __name__ == '__main__':
    main()
