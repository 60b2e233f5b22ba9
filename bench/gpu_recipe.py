"""Benchmark: the tutorial's recipe, Torchreid as the tutorial drives it against our path, step
by step, in one run on the same generated data.

    python bench/gpu_recipe.py            # Market-1501-sized data on a GPU; tiny on a CPU
    python bench/gpu_recipe.py --tiny     # the tiny version anywhere (a smoke run)

Steps timed for both paths: one training epoch (the first, which includes any compilation, and
a second), one evaluation (engine.test) and visrank of every query; then the projected whole
recipe (60 epochs, evaluations at 10/20/30/40/50/60, test, visrank). Then "same results":
both paths train a few epochs from the same seed and their Rank-1 and mAP are printed.
Torchreid's path uses its own evaluator and rank-image writer (ours are used only inside our
engine); ours is main.py's get_items() + build_engine() (fast path on 'auto').
On a machine without CUDA the figures only show that the script works: they need a GPU.
"""
from __future__ import annotations

import contextlib
import io
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reidkit  # noqa: E402,F401
import torchreid  # noqa: E402

import main  # noqa: E402
from reidkit.demo_data import make_demo_dataset  # noqa: E402


def build(s, ours: bool):
    """(engine, datamanager) for one path; the tutorial's path builds plain Torchreid objects."""
    torchreid.reid.utils.set_random_seed(s.SEED)
    with contextlib.redirect_stdout(io.StringIO()):
        datamanager, model, optimizer, scheduler = main.get_items(s)
        if ours:
            return main.build_engine(s, datamanager, model, optimizer, scheduler)
        return torchreid.engine.ImageSoftmaxEngine(
            datamanager, model, optimizer, scheduler=scheduler, label_smooth=True,
            use_gpu=torch.cuda.is_available())


def timed(function) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(s, ours: bool, out_dir: Path) -> dict:
    engine = build(s, ours)
    engine.max_epoch, engine.writer = 2, None
    times = {}
    for epoch in (0, 1):
        engine.epoch = epoch
        times[f'epoch {epoch + 1}'] = timed(lambda: engine.train(print_freq=10 ** 9))
    times['evaluation'] = timed(lambda: engine.test(save_dir=str(out_dir)))
    times['visrank'] = timed(lambda: engine.test(visrank=True, visrank_topk=10,
                                                 save_dir=str(out_dir)))
    times['recipe (projected)'] = (times['epoch 1'] + 59 * times['epoch 2'] +
                                   7 * times['evaluation'] + times['visrank'])
    if torch.cuda.is_available():
        times['peak GPU memory (GiB)'] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
    return times


def accuracy_after(s, ours: bool, epochs: int) -> tuple[float, float]:
    """(Rank-1, mAP) in percent, as Torchreid printed them, after `epochs` of training."""
    engine = build(s, ours)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        engine.run(save_dir=tempfile.mkdtemp(), max_epoch=epochs, eval_freq=-1,
                   print_freq=10 ** 9)
    text = printed.getvalue()
    rank1 = re.findall(r'Rank-1\s*: ([\d.]+)%', text)[-1]
    mAP = re.findall(r'mAP: ([\d.]+)%', text)[-1]
    return float(rank1), float(mAP)


def main_bench() -> None:
    gpu = torch.cuda.is_available() and '--tiny' not in sys.argv
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'
    print(f'device: {device}; torch {torch.__version__}')
    if not gpu:
        print('No GPU (or --tiny): a tiny CPU version; the figures need a GPU.')
    root = Path(tempfile.mkdtemp())
    sizes = dict(num_train_ids=751, num_test_ids=750, images_per_camera=(3, 6)) if gpu else \
        dict(num_train_ids=16, num_test_ids=16)
    summary = make_demo_dataset(root, **sizes)
    print(f'data: {summary.train_images} train images of {summary.train_ids} ids, '
          f'{summary.query_images} queries, {summary.gallery_images} gallery')
    overrides = dict(DATA_ROOT=str(root), PRETRAINED=False, EXPERIMENTS_DIR=str(root / 'exp'))
    if not gpu:
        overrides.update(HEIGHT=64, WIDTH=32, WORKERS=0)
    s = main.load_settings(overrides)
    theirs = measure(s, ours=False, out_dir=root / 'theirs')
    ours = measure(s, ours=True, out_dir=root / 'ours')
    print('| step | Torchreid as the tutorial | ours | speed-up |\n|---|---|---|---|')
    for step in theirs:
        ratio = theirs[step] / ours[step] if 'memory' not in step else ours[step] / theirs[step]
        label = 'x' if 'memory' not in step else 'x of theirs'
        print(f'| {step} | {theirs[step]:.2f} | {ours[step]:.2f} | {ratio:.2f}{label} |')
    epochs = 5 if gpu else 2
    base = accuracy_after(s, False, epochs)
    fast = accuracy_after(s, True, epochs)
    print(f'same results after {epochs} epochs from seed {s.SEED}: Torchreid Rank-1 '
          f'{base[0]:.1f}% mAP {base[1]:.1f}%; ours Rank-1 {fast[0]:.1f}% mAP {fast[1]:.1f}%')


if __name__ == '__main__':
    main_bench()
