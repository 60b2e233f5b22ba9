"""Benchmark: search on this machine.

    python bench/search.py [--quick]

1. Extraction: images/second of `reidkit.search.extractor.extract_batches` (threads decode, model
   extracts) against Torchreid's own FeatureExtractor on the same files, same model.
2. Ranking a 100,000-image gallery of random 2048-d features stored on disk the way search
   stores them (a memory-mapped .npy), one query alone and a batch of queries sharing one pass
   over the gallery (as a folder of queries does): seconds per query and peak RSS.
"""
from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reidkit  # noqa: E402,F401
from reidkit.search import command as search  # noqa: E402
from reidkit.search import extractor as search_extractor  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def bench_extraction(num_images: int, height: int, width: int) -> None:
    from torchreid.reid.models import build_model
    from torchreid.reid.utils import FeatureExtractor
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(num_images):
            path = Path(folder) / f'{i:05d}.jpg'
            Image.fromarray(rng.integers(0, 255, (128, 64, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        model = build_model('resnet50', num_classes=10, pretrained=False).eval()
        transform = search_extractor.quiet_test_transform(height, width)
        started = time.perf_counter()
        count = sum(len(good) for good, _, _ in search_extractor.extract_batches(
            model, transform, paths, 100, torch.device('cpu'), 'reidkit'))
        ours = count / (time.perf_counter() - started)
        weights = Path(folder) / 'weights.pth'          # same weights; no ImageNet download
        torch.save({'state_dict': model.state_dict()}, weights)
        extractor = FeatureExtractor('resnet50', model_path=str(weights),
                                     image_size=(height, width), device='cpu', verbose=False)
        started = time.perf_counter()
        for start in range(0, num_images, 100):
            extractor([str(p) for p in paths[start:start + 100]])
        theirs = num_images / (time.perf_counter() - started)
    print(f'| extraction {height}x{width}, {num_images} images | reidkit {ours:.1f} img/s | '
          f'Torchreid FeatureExtractor {theirs:.1f} img/s | ratio {ours / theirs:.2f}x |')


def bench_ranking(num_gallery: int, dim: int, num_queries: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / 'gallery.npy'
        features = np.lib.format.open_memmap(path, mode='w+', dtype=np.float32,
                                             shape=(num_gallery, dim))
        rng = np.random.default_rng(0)
        for start in range(0, num_gallery, 10_000):
            rows = min(10_000, num_gallery - start)
            features[start:start + rows] = rng.standard_normal((rows, dim), dtype=np.float32)
        features.flush()
        del features
        gallery = np.load(path, mmap_mode='r')
        queries = rng.standard_normal((num_queries, dim), dtype=np.float32)
        before = peak_rss_gb()
        started = time.perf_counter()
        for query in queries:
            search.rank_gallery(query, gallery)
        alone = (time.perf_counter() - started) / num_queries
        started = time.perf_counter()
        search.rank_gallery(queries, gallery)
        batched = (time.perf_counter() - started) / num_queries
        print(f'| ranking {num_gallery:,} x {dim}-d from disk | one query at a time '
              f'{alone:.3f} s/query | {num_queries} queries in one pass {batched:.3f} s/query | '
              f'peak RSS {peak_rss_gb():.2f} GB (before ranking {before:.2f} GB; the features '
              f'alone are {num_gallery * dim * 4 / 1e9:.2f} GB) |')


if __name__ == '__main__':
    quick = '--quick' in sys.argv
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads')
    bench_extraction(64 if quick else 400, 64, 32)
    bench_extraction(32 if quick else 200, 256, 128)
    bench_ranking(10_000 if quick else 100_000, 2048, 3 if quick else 10)
