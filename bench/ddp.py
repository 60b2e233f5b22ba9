"""Benchmark: training img/s with 1 process against N processes (DDP), same data, in one run.

    python bench/ddp.py                 # the demo data on this machine's CPU (gloo), 1 vs 2
    python bench/ddp.py --processes 4   # 1 vs 4 (on a 4-GPU box: NCCL, one GPU each)

Each configuration runs main.py's own objects (get_items + build_engine) in its own
processes, started by reidkit.run.distributed.launch as `python main.py` starts them: one epoch
to warm up, then one timed epoch (every process waits for the others at its end). img/s
counts the images of all processes. The batch is BATCH_SIZE_TRAIN per process, so N
processes train with an N-times larger global batch (as torchrun users do).
On this project's 2-core CPU machine two processes share two cores; the GPU figures need a
machine with several GPUs (none was available when this was written).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    import torch.distributed as dist
    import main
    from reidkit.run import distributed
    from torchreid.reid.utils import set_random_seed
    s = main.load_settings(dict(DATA_ROOT=args.data, HEIGHT=64, WIDTH=32, WORKERS=0,
                                PRETRAINED=False, DEVICE=args.device,
                                BATCH_SIZE_TRAIN=args.batch))
    processes = distributed.start(s.DEVICE)
    try:
        set_random_seed(s.SEED)
        with contextlib.redirect_stdout(io.StringIO()):
            engine = main.build_engine(s, *main.get_items(s))
        engine.max_epoch, engine.writer = 2, None
        times = []
        for epoch in range(2):
            engine.epoch = epoch
            if processes.distributed:
                dist.barrier()
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                engine.train(print_freq=10 ** 9)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if processes.distributed:
                dist.barrier()
            times.append(time.perf_counter() - started)
        images = len(engine.train_loader) * s.BATCH_SIZE_TRAIN * processes.world_size
        if processes.is_main:
            Path(args.result).write_text(json.dumps(
                dict(processes=processes.world_size, images=images, seconds=times[-1],
                     device=str(next(engine.model.parameters()).device))))
    finally:
        distributed.stop()


def measure(processes: int, args) -> dict:
    from reidkit.run import distributed
    result = Path(tempfile.mkdtemp()) / 'result.json'
    argv = ['--worker', f'--data={args.data}', f'--result={result}', f'--batch={args.batch}',
            f'--device={args.device}']
    if processes == 1:      # a plain process, as `python main.py` on one GPU
        code = _single(argv)
    else:
        gpus = list(range(processes)) if args.device == 'cuda' else None
        code = distributed.launch(str(Path(__file__).resolve()), argv, processes, gpus)
    if code != 0:
        sys.exit(f'{processes} process(es) failed with exit code {code}')
    return json.loads(result.read_text())


def _single(argv: list[str]) -> int:
    import subprocess
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv]).returncode


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--processes', type=int, default=2)
    parser.add_argument('--batch', type=int, default=32, help='BATCH_SIZE_TRAIN per process')
    parser.add_argument('--device', choices=('cpu', 'cuda'),
                        default='cuda' if torch.cuda.device_count() > 1 else 'cpu')
    parser.add_argument('--data', default=str(Path(tempfile.gettempdir()) / 'reidkit-ddp-bench'))
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--result', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from reidkit.data.demo import DEMO_DATA_SEED, make_demo_dataset
    summary = make_demo_dataset(Path(args.data), seed=DEMO_DATA_SEED)
    device = torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU (gloo)'
    print(f'{device}; demo data: {summary.train_images} training images at 64x32, ResNet50, '
          f'batch {args.batch} per process')
    one, many = measure(1, args), measure(args.processes, args)
    rates = [r['images'] / r['seconds'] for r in (one, many)]
    print('| processes | images per epoch | epoch (s) | img/s |\n|---|---|---|---|')
    for r, rate in zip((one, many), rates):
        print(f'| {r["processes"]} | {r["images"]} | {r["seconds"]:.1f} | {rate:.1f} |')
    print(f'{args.processes} processes vs 1: {rates[1] / rates[0]:.2f}x the img/s')


if __name__ == '__main__':
    main_bench()
