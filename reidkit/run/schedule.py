"""The learning-rate schedule's warm-up: PyTorch's LinearLR chained in front of the chosen schedule.

With WARMUP_EPOCHS = W > 0 and WARMUP_FACTOR = f, epoch n (1, 2, ...) trains at

    LR * (f + (1 - f) * min(n - 1, W) / W) * schedule(n)

where schedule(n) is the factor of today's schedule (Torchreid's build_lr_scheduler: StepLR,
MultiStepLR or CosineAnnealingLR, all counted from the run's first epoch, so multi_step's epochs
are the run's epochs). The first epoch trains at f * LR and epoch W + 1 on at the schedule's own
rate: BoT's WarmupMultiStepLR ("linear": alpha = epoch / warmup_iters, factor
f * (1 - alpha) + alpha, Luo et al., CVPRW 2019) with the epoch counted from 0 at the first
epoch. Both parts are PyTorch schedulers stepped together by its ChainedScheduler (each multiplies
the rate by its own change), whose state_dict holds both, so a checkpoint resumes it exactly.
"""
from __future__ import annotations

from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, LRScheduler


def with_warmup(scheduler: LRScheduler, epochs: int, factor: float) -> LRScheduler:
    """`scheduler` (built on its optimizer, not stepped yet) behind a linear warm-up of `epochs`
    epochs from `factor` x LR (see the module's docstring); `scheduler` itself when epochs is 0,
    so a run without warm-up keeps Torchreid's scheduler and its checkpoints' state."""
    if epochs <= 0:
        return scheduler
    warmup = LinearLR(scheduler.optimizer, start_factor=factor, end_factor=1.0,
                      total_iters=epochs)
    return ChainedScheduler([warmup, scheduler], optimizer=scheduler.optimizer)


def schedule_parts(scheduler: LRScheduler) -> tuple[LinearLR | None, LRScheduler]:
    """(the warm-up or None, the chosen schedule) of a scheduler built by `with_warmup`."""
    if isinstance(scheduler, ChainedScheduler):
        warmup, schedule = scheduler._schedulers        # PyTorch keeps the chain there
        return warmup, schedule
    return None, scheduler


def warmup_factor(warmup: LinearLR | None) -> float:
    """The share of the schedule's rate the warm-up gives the coming epoch (1 once it is over):
    LinearLR's closed form at its position."""
    if warmup is None:
        return 1.0
    done = min(warmup.last_epoch, warmup.total_iters) / warmup.total_iters
    return warmup.start_factor + (warmup.end_factor - warmup.start_factor) * done
