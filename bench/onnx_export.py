"""Benchmark: features/s of an exported model.onnx in onnxruntime against PyTorch eager.

    python bench/onnx_export.py [--quick]

(Not bench/onnx.py: bench/ is first on sys.path when a bench script runs, so that name would
hide the onnx package from every script here.)

Each model is exported with `reidkit.search.export.export` (checked as a user's export is), then both
runtimes get the same images in the same batches, with the same number of CPU threads:
- model only: the same preprocessed (batch, 3, H, W) float32 array;
- with preprocessing: PIL images in, features out, as search would run (Torchreid's test
  transform + the model, against `reidkit.search.onnx_features.OnnxExtractor`).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main  # noqa: E402
from reidkit.run.checkpoints import save_checkpoint  # noqa: E402
from reidkit.search.export import export  # noqa: E402
from reidkit.search.onnx_features import OnnxExtractor  # noqa: E402
from reidkit.search.extractor import checkpoint_model, quiet_test_transform  # noqa: E402


def images_per_second(eager, runtime, batch: int, seconds: float) -> tuple[float, float]:
    """Median throughput of one batch through each, after a warm-up, timed in turns: on a
    shared machine other work then slows both alike."""
    eager(), runtime()
    times, started = ([], []), time.perf_counter()
    while len(times[0]) < 3 or time.perf_counter() - started < 2 * seconds:
        for run, spent in zip((eager, runtime), times):
            begin = time.perf_counter()
            run()
            spent.append(time.perf_counter() - begin)
    return tuple(batch / float(np.median(spent)) for spent in times)


def bench(model_name: str, height: int, width: int, batch: int, seconds: float,
          thread_counts: tuple[int, ...]) -> None:
    from reidkit.run.model import build_model
    with tempfile.TemporaryDirectory() as folder:
        s = main.load_settings(dict(MODEL_NAME=model_name, HEIGHT=height, WIDTH=width,
                                    DATA_ROOT=folder, EXPERIMENTS_DIR=folder))
        torch.manual_seed(0)
        weights = save_checkpoint(
            {'state_dict': build_model(s, num_classes=10, pretrained=False).state_dict(),
             'epoch': 1, 'settings': s.record()}, Path(folder) / 'model' / 'model.pth.tar-1')
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):   # its check runs on random images
            path = export(s, weights)
        exported = time.perf_counter() - started
        model = checkpoint_model(torch.load(weights, weights_only=True), weights, s).eval()
        transform = quiet_test_transform(height, width)
        rng = np.random.default_rng(0)       # Market-1501's crops are 128x64
        images = [Image.fromarray(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8))
                  for _ in range(batch)]
        for threads in thread_counts:
            torch.set_num_threads(threads)
            extractor = OnnxExtractor(path, threads=threads)
            array = extractor.preprocess(images)
            tensor = torch.from_numpy(array)

            def torch_model():
                with torch.no_grad():
                    return model(tensor).numpy()

            def torch_full():
                with torch.no_grad():
                    return model(torch.stack([transform(im) for im in images])).numpy()

            def onnx_model():
                return extractor.session.run(None, {extractor.input.name: array})[0]

            rows = [('model only', torch_model, onnx_model),
                    ('with preprocessing', torch_full, lambda: extractor(images))]
            for what, eager, runtime in rows:
                a, b = images_per_second(eager, runtime, batch, seconds)
                print(f'| {model_name} {height}x{width} | {threads} | {batch} | {what} | '
                      f'{a:.1f} | {b:.1f} | {b / a:.2f}x |', flush=True)
        ours, theirs = onnx_model(), torch_model()
        cosine = ((ours * theirs).sum(1) / np.linalg.norm(ours, axis=1)
                  / np.linalg.norm(theirs, axis=1)).min()
        print(f'|   export + check {exported:.1f} s, {path.stat().st_size / 2 ** 20:.1f} MiB, '
              f'cosine min {cosine:.6f} | | | | | | |', flush=True)


def load() -> str:
    return ', '.join(f'{value:.1f}' for value in os.getloadavg())


if __name__ == '__main__':
    import onnxruntime
    quick = '--quick' in sys.argv
    seconds = 1.0 if quick else 5.0
    # 1 thread as well as all: on a busy machine PyTorch's OpenMP threads slow down far more
    # than onnxruntime's (15x seen here at load 4 on 2 cores), and one thread each is fair.
    threads = tuple(dict.fromkeys((1, torch.get_num_threads())))
    print(f'torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, same threads for '
          f'both; load average {load()} on {os.cpu_count()} CPUs\n')
    print('| model | threads | batch | timed | PyTorch eager img/s | onnxruntime img/s | ratio |')
    print('|---|---|---|---|---|---|---|')
    bench('resnet50', 256, 128, 32, seconds, threads)
    bench('resnet50', 64, 32, 32, seconds, threads)
    if not quick:
        bench('osnet_x1_0', 256, 128, 32, seconds, threads)
    print(f'\nload average at the end: {load()}')
