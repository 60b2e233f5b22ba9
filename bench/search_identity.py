"""What the search cache's checks cost on a gallery of 100,000 files (issue 21).

    python bench/search_identity.py [--files 100000] [--folder DIR]

1. os.stat of every file (what search does before each search, to find the files that are
   new or changed): size, mtime, inode and ctime all come from that one call, so the stronger
   identity costs no extra system call; timed with the inodes cached (the usual case: listing
   the folder just read them), best and median of 3.
2. Listing the folder (reidkit.search.extractor.list_images: a walk, is_file and resolve per file).
3. Reading the manifest of 100,000 files and checking its generation (JSON parse + SHA-256).
Files are empty: stat does not read their contents.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reidkit.search import cache  # noqa: E402
from reidkit.search.extractor import list_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--files', type=int, default=100_000)
    parser.add_argument('--folder', default=None, help='where to make them (default: /tmp)')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        gallery = Path(folder) / 'gallery'
        for sub in range(args.files // 1000 + 1):          # 1,000 files per folder
            (gallery / f'{sub:03d}').mkdir(parents=True)
        paths = [gallery / f'{k // 1000:03d}' / f'{k:06d}.jpg' for k in range(args.files)]
        for path in paths:
            path.touch()
        started = time.perf_counter()
        listed = list_images(gallery)
        listing = time.perf_counter() - started
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            stamps = cache._stamps(listed)
            timings.append(time.perf_counter() - started)
        manifest = cache.Manifest([cache.CachedRow(path, stamp, k)
                                   for k, (path, stamp) in enumerate(stamps.items())],
                                  [], len(stamps), [])
        manifest.write(Path(folder) / 'manifest.json')
        text = (Path(folder) / 'manifest.json').read_bytes()
        started = time.perf_counter()
        first, _, body = text.partition(b'\n')
        assert cache._generation(body) == json.loads(first)['generation']
        checking = time.perf_counter() - started
        started = time.perf_counter()
        assert isinstance(cache.Manifest.read(Path(folder) / 'manifest.json'), cache.Manifest)
        reading = time.perf_counter() - started
        size = len(text)
    print(f'{args.files:,} files, {os.cpu_count()} CPUs, {sys.platform}')
    print(f'listing (list_images): {listing:.2f} s')
    best, median = min(timings), sorted(timings)[1]
    print(f'os.stat of every file: best {best:.3f} s ({best / args.files * 1e6:.1f} us a file), '
          f'median {median:.3f} s')
    print(f'manifest: {size / 1e6:.1f} MB; generation checked (SHA-256) in {checking:.3f} s; '
          f'read whole (parse included) in {reading:.2f} s')

if __name__ == '__main__':
    main()
