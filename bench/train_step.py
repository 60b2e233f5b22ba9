"""Benchmark: our training step (reidkit.train.step.TrainStep) against Torchreid's own
`forward_backward`, same model and weights, same batch, same machine, same run.

    python bench/train_step.py                       # ResNet-50, batch 32, 64x32 on the CPU,
                                                     # 256x128 on CUDA
    python bench/train_step.py --loss triplet        # with Torchreid's triplet engine
    python bench/train_step.py --compile --amp bf16  # CUDA: our compiled step, both in bf16

Torchreid's side is its engine's `forward_backward` (it reads the loss and accuracy with .item()
every batch, so it waits for the GPU each step). Ours is `TrainStep` with `fast_optimizer`
(fused Adam on CUDA), adding its values into `RunningMeans` and reading them once at the end,
as our engine does between log lines. Both sides get the batch already on the device and the
same optimizer settings (Torchreid's build_optimizer, Adam); `--amp bf16` runs both under
autocast. Prints images/s for each and the ratio.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchreid  # noqa: E402
from torchreid.reid.engine import ImageSoftmaxEngine, ImageTripletEngine  # noqa: E402

from reidkit.train.step import Loss, RunningMeans, TrainStep, fast_optimizer  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='resnet50', help='any name in torchreid.models')
    parser.add_argument('--loss', default='softmax', choices=('softmax', 'triplet'))
    parser.add_argument('--batch', type=int, default=32, help='images per step')
    parser.add_argument('--ids-per-batch', type=int, default=8,
                        help='identities in a batch (batch / this images each, as a '
                             'RandomIdentitySampler gives)')
    parser.add_argument('--num-classes', type=int, default=751, help="the classifier's width")
    parser.add_argument('--height', type=int, help='default: 64 on the CPU, 256 on CUDA')
    parser.add_argument('--width', type=int, help='default: 32 on the CPU, 128 on CUDA')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per side')
    parser.add_argument('--steps', type=int, default=4, help='timed steps per round')
    parser.add_argument('--rounds', type=int, default=3,
                        help='timed rounds per side, alternating; the fastest is reported')
    parser.add_argument('--compile', action='store_true', help='compile our step')
    parser.add_argument('--amp', default='off', choices=('off', 'bf16'),
                        help='autocast both sides')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(run_step, finish, steps: int, device: torch.device) -> float:
    """Seconds for `steps` steps, `finish()` (the values' read-back) included, the device
    drained before and after."""
    finish()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    finish()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    cuda = args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available())
    device = torch.device('cuda' if cuda else 'cpu')
    height = args.height or (256 if cuda else 64)
    width = args.width or (128 if cuda else 32)
    torch.manual_seed(0)
    model = torchreid.models.build_model(args.model, num_classes=args.num_classes,
                                         loss=args.loss, pretrained=False).to(device).train()
    per_id = max(1, args.batch // args.ids_per_batch)
    pids = torch.randperm(args.num_classes)[:args.ids_per_batch].repeat_interleave(per_id)
    pids = pids[:args.batch].to(device)
    images = torch.randn(len(pids), 3, height, width, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == 'bf16')

    # Torchreid's step, through its own engine (it needs only these attributes of a data manager).
    theirs_model = copy.deepcopy(model)
    theirs_optimizer = torchreid.optim.build_optimizer(theirs_model, optim='adam')
    datamanager = SimpleNamespace(train_loader=None, test_loader={},
                                  num_train_pids=args.num_classes)
    engine_class = ImageSoftmaxEngine if args.loss == 'softmax' else ImageTripletEngine
    engine = engine_class(datamanager, theirs_model, theirs_optimizer, use_gpu=cuda)
    data = {'img': images, 'pid': pids}

    def theirs_step():
        with autocast:
            engine.forward_backward(data)

    # Ours.
    ours_model = copy.deepcopy(model)
    ours_optimizer = fast_optimizer(torchreid.optim.build_optimizer(ours_model, optim='adam'))
    step = TrainStep(ours_model, ours_optimizer, Loss(args.loss, label_smooth=True),
                     compile=args.compile)
    means = RunningMeans()

    def ours_step():
        with autocast:
            means.add(step(images, pids))

    del model
    sides = (('Torchreid forward_backward', theirs_step, lambda: None),
             ('reidkit TrainStep', ours_step, means.means))
    for _, run_step, _ in sides:
        for _ in range(args.warmup):
            run_step()
    # Rounds alternate between the sides, so a slow spell of the machine hits both; each
    # side's fastest round is reported.
    best = {name: float('inf') for name, _, _ in sides}
    for _ in range(args.rounds):
        for name, run_step, finish in sides:
            best[name] = min(best[name], time_steps(run_step, finish, args.steps, device))
    rows = [(name, args.steps * len(pids) / seconds, 1000 * seconds / args.steps)
            for name, seconds in best.items()]

    where = torch.cuda.get_device_name(device) if cuda else \
        f'CPU ({torch.get_num_threads()} threads)'
    extras = [f'fused Adam: {all(g["fused"] for g in ours_optimizer.param_groups)}',
              f'compiled: {step.compiled}', f'amp: {args.amp}']
    print(f'{where} | {args.model}, {args.loss}, batch {len(pids)}, {height}x{width} | '
          f'{args.warmup} warm-up steps, then the best of {args.rounds} rounds of '
          f'{args.steps} steps, each side')
    print(f'ours: {", ".join(extras)}')
    print(f'{"":28} {"images/s":>10} {"ms/step":>10}')
    for name, rate, ms in rows:
        print(f'{name:28} {rate:10.1f} {ms:10.1f}')
    print(f'{"ratio (ours / Torchreid)":28} {rows[1][1] / rows[0][1]:9.2f}x')


if __name__ == '__main__':
    main()
