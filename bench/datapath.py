"""Benchmark: our cached data path (reidkit/data/datapath.py) against Torchreid's own train loader,
one epoch each over the same demo dataset, same sampler and transforms, same machine, same run.

    python bench/datapath.py                      # 64x32 and 256x128, Torchreid with 2 and 0
                                                  # workers, ours on CUDA if there, else the CPU
    python bench/datapath.py --sizes 256x128 --workers 4 8 --batch 64

Torchreid's epoch is its DataLoader as the datamanager builds it (JPEG decode, PIL resize and
augmentation in worker processes, started again each epoch, as Torchreid does). Ours is a
CachedLoader: the images are decoded once (timed and reported apart, it happens once per run),
then each batch is gathered, resized and augmented on the device. Each epoch is timed to the
last batch being ready (on CUDA, synchronised). Epochs alternate between the loaders; the
fastest of --epochs epochs of each is reported.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchreid  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from reidkit.data.datapath import CachedLoader, DecodedImages, DeviceTransform  # noqa: E402
from reidkit.data.demo import make_demo_dataset  # noqa: E402

TRANSFORMS = ['random_flip', 'random_crop', 'color_jitter']     # config.DEMO's


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-root', default=str(Path(tempfile.gettempdir()) /
                                                   'reidkit-bench-demo'),
                        help='where the demo dataset is generated (kept for the next run)')
    parser.add_argument('--sizes', nargs='+', default=['64x32', '256x128'], help='HxW')
    parser.add_argument('--workers', nargs='+', type=int, default=[2, 0],
                        help="Torchreid's loader workers; the first is the ratio's base")
    parser.add_argument('--batch', type=int, default=32, help='images per batch')
    parser.add_argument('--epochs', type=int, default=2, help='timed epochs per loader')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    return parser.parse_args()


def time_epoch(loader, device: torch.device) -> tuple[float, int]:
    """(seconds, images) for one pass over `loader`."""
    started, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch['impath'])
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, images


def main() -> None:
    args = parse_args()
    cuda = args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available())
    device = torch.device('cuda' if cuda else 'cpu')
    summary = make_demo_dataset(Path(args.data_root))
    where = torch.cuda.get_device_name(device) if cuda else \
        f'CPU ({torch.get_num_threads()} threads)'
    print(f'{summary.train_images} train images of 128x64 | batch {args.batch} | '
          f'{", ".join(TRANSFORMS)} | ours on {where} | best of {args.epochs} epochs')

    rows = []
    for size in args.sizes:
        height, width = (int(n) for n in size.lower().split('x'))
        datamanager = torchreid.data.ImageDataManager(
            root=args.data_root, sources='market1501', height=height, width=width,
            batch_size_train=args.batch, transforms=TRANSFORMS, workers=0, use_gpu=cuda)
        theirs = datamanager.train_loader
        loaders = {f'Torchreid DataLoader, {workers} workers':
                   DataLoader(theirs.dataset, batch_size=args.batch, sampler=theirs.sampler,
                              num_workers=workers, pin_memory=cuda, drop_last=True)
                   for workers in args.workers}
        started = time.perf_counter()
        images = DecodedImages(theirs.dataset.data, progress=None).to(device)
        decode_s = time.perf_counter() - started
        loaders['reidkit CachedLoader'] = CachedLoader(
            images, DeviceTransform(height, width, TRANSFORMS, seed=0), theirs.sampler,
            args.batch, drop_last=True)
        time_epoch(loaders['reidkit CachedLoader'], device)     # warm-up: kernels, allocator
        # Epochs alternate between the loaders, so a slow spell of the machine hits all of
        # them; each loader's fastest epoch is reported.
        best = dict.fromkeys(loaders, 0.0)
        for _ in range(args.epochs):
            for name, loader in loaders.items():
                seconds, count = time_epoch(loader, device)
                best[name] = max(best[name], count / seconds)
        rows += [(size, name, rate, decode_s if name.startswith('reidkit') else None)
                 for name, rate in best.items()]

    print(f'\n{"size":8} {"loader":34} {"images/s":>10} {"ratio":>7} {"decode once":>12}')
    for size, name, rate, decode_s in rows:
        base = next(r for s, n, r, _ in rows if s == size and n.endswith(
            f'{args.workers[0]} workers'))
        decode = f'{decode_s:10.2f} s' if decode_s is not None else ''
        print(f'{size:8} {name:34} {rate:10.0f} {rate / base:6.1f}x {decode:>12}')
    print(f'\nratio: images/s over Torchreid with {args.workers[0]} workers, same size. '
          f'"decode once": our one-off decode of all {summary.train_images} images '
          f'(not in images/s).')


if __name__ == '__main__':
    main()
