"""Benchmark: the record of training files and the check against it, at a million files.

    python bench/training_files.py              # 100,000 files on disk, projected to 1M
    python bench/training_files.py --files 20000

Writes N small JPEG-sized files (4 KiB of random bytes each, as a Market-1501 crop) into a
temporary folder, then measures: hashing them into a record (TrainingFiles.of_files), the
record's size inside a checkpoint (torch.save of its compact form) and in the run folder
(training_files.csv.gz), reading it back, and the check of 20,000 test files against it (half
of them of a training file's size, so hashed). Times scale with the number of files; the
projection to 1M is linear. There is no Torchreid counterpart to compare with: Torchreid keeps
no record of training files.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reidkit.data.training_files import RECORD_FILE, TrainingFiles  # noqa: E402

MILLION = 1_000_000


def write_files(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f'{i // 1000:04d}' / f'{i:07d}.jpg'
        if i % 1000 == 0:
            path.parent.mkdir(parents=True)
        path.write_bytes(rng.bytes(size + int(rng.integers(0, 512))))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--files', type=int, default=100_000)
    args = parser.parse_args()
    scale = MILLION / args.files
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        train = write_files(tmp / 'train', args.files, 4096, seed=0)
        print(f'wrote {args.files} files in {time.perf_counter() - started:.1f}s')
        os.sync()
        started = time.perf_counter()
        record = TrainingFiles.of_files(train)
        hashing = time.perf_counter() - started
        buffer = io.BytesIO()
        torch.save({'training_files': record.compact()}, buffer)
        in_checkpoint = buffer.tell()
        started = time.perf_counter()
        record.write(tmp)
        writing = time.perf_counter() - started
        in_folder = (tmp / RECORD_FILE).stat().st_size
        started = time.perf_counter()
        read = TrainingFiles.read(tmp)
        reading = time.perf_counter() - started
        assert len(read) == len(record)
        test = write_files(tmp / 'test', 10_000, 4096, seed=1)
        # as many again of a training file's size (so they are hashed), none a leak
        (tmp / 'same-size').mkdir()
        for i, like in enumerate(train[:10_000]):
            test.append(tmp / 'same-size' / f'{i}.jpg')
            test[-1].write_bytes(os.urandom(like.stat().st_size))
        started = time.perf_counter()
        found = read.leaks(test)
        checking = time.perf_counter() - started
        assert not found
    rows = [('hash the training files into a record', f'{hashing:.1f} s',
             f'{hashing * scale:.0f} s'),
            ('record inside a checkpoint', f'{in_checkpoint / 2**20:.2f} MiB',
             f'{in_checkpoint * scale / 2**20:.1f} MiB'),
            (f'{RECORD_FILE} in the run folder', f'{in_folder / 2**20:.2f} MiB',
             f'{in_folder * scale / 2**20:.0f} MiB'),
            ('write it', f'{writing:.1f} s', f'{writing * scale:.0f} s'),
            ('read it back (test, visrank)', f'{reading:.1f} s', f'{reading * scale:.0f} s'),
            ('check 20,000 test files against it', f'{checking:.1f} s',
             f'{checking:.1f} s + lookups')]
    print(f'\n{"":40s} {args.files:>12,} files {"1M (projected)":>16s}')
    for what, measured, projected in rows:
        print(f'{what:40s} {measured:>18s} {projected:>16s}')


if __name__ == '__main__':
    main()
