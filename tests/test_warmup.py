"""Linear learning-rate warm-up (WARMUP_EPOCHS, WARMUP_FACTOR) in front of each schedule: the rate
of every epoch, against the formula written out; none without warm-up; its state resumes."""
import math
from bisect import bisect_right

import pytest
import torch
import torchreid

import main
from reidkit.run.errors import UserError
from reidkit.run.schedule import with_warmup

LR = 1e-3


def _rates(scheduler, epochs: int) -> list[float]:
    """The rate each of `epochs` epochs trains with, stepping once an epoch as the engine does."""
    rates = []
    for _ in range(epochs):
        rates.append(scheduler.optimizer.param_groups[0]['lr'])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=LR)


def _expected(epoch: int, scheduler: str, warmup: int, factor: float, max_epoch: int) -> float:
    """Epoch `epoch` (1, 2, ...): LR * (f + (1 - f) * min(n - 1, W) / W) * schedule, where the
    schedule counts from the run's first epoch (step 3; drops at 3 and 5; cosine over max_epoch)."""
    done = epoch - 1
    warm = factor + (1 - factor) * min(done, warmup) / warmup if warmup else 1.0
    schedule = {'single_step': 0.1 ** (done // 3),
                'multi_step': 0.1 ** bisect_right([3, 5], done),
                'cosine': (1 + math.cos(math.pi * done / max_epoch)) / 2}[scheduler]
    return LR * warm * schedule


@pytest.mark.parametrize('scheduler', ['single_step', 'multi_step', 'cosine'])
@pytest.mark.parametrize('warmup', [0, 1, 4])
def test_each_epoch_trains_at_the_warm_up_times_the_schedule(scheduler, warmup):
    stepsize = [3, 5] if scheduler == 'multi_step' else 3
    built = torchreid.optim.build_lr_scheduler(_optimizer(), lr_scheduler=scheduler,
                                               stepsize=stepsize, max_epoch=8)
    rates = _rates(with_warmup(built, warmup, 0.01), 8)
    assert rates == pytest.approx([_expected(n, scheduler, warmup, 0.01, 8)
                                   for n in range(1, 9)], rel=1e-9)


def test_bots_warm_up_from_a_hundredth_over_ten_epochs():
    """BoT's released values: 0.01 x LR in the first epoch, + 0.099 x LR an epoch, LR from the
    11th epoch (its WarmupMultiStepLR with alpha = epochs done / 10), drops after 40 and 70."""
    built = torchreid.optim.build_lr_scheduler(_optimizer(), lr_scheduler='multi_step',
                                               stepsize=[40, 70])
    rates = [rate / LR for rate in _rates(with_warmup(built, 10, 0.01), 120)]
    assert rates[:11] == pytest.approx([0.01 + 0.099 * n for n in range(10)] + [1.0], rel=1e-9)
    assert rates[39] == pytest.approx(1.0) and rates[40] == pytest.approx(0.1)
    assert rates[69] == pytest.approx(0.1) and rates[70] == pytest.approx(0.01)


def test_no_warm_up_keeps_torchreids_scheduler():
    built = torchreid.optim.build_lr_scheduler(_optimizer(), lr_scheduler='single_step',
                                               stepsize=20)
    assert with_warmup(built, 0, 0.01) is built


@pytest.mark.parametrize('scheduler', ['multi_step', 'cosine'])
def test_a_state_saved_during_the_warm_up_continues_exactly(scheduler):
    def build():
        built = torchreid.optim.build_lr_scheduler(_optimizer(), lr_scheduler=scheduler,
                                                   stepsize=[3, 5], max_epoch=8)
        return with_warmup(built, 4, 0.01)
    whole = build()
    rates = _rates(whole, 8)
    first = build()
    _rates(first, 2)
    again = build()
    again.optimizer.load_state_dict(first.optimizer.state_dict())
    again.load_state_dict(first.state_dict())
    assert _rates(again, 6) == rates[2:]         # the same floats, not only close ones


def test_get_items_builds_the_warm_up(tiny_settings):
    s = tiny_settings.replace(LR=LR, LR_SCHEDULER='multi_step', STEPSIZE=[3, 5], MAX_EPOCH=8,
                              WARMUP_EPOCHS=4, WARMUP_FACTOR=0.01)
    _, _, _, scheduler = main.get_items(s)
    assert _rates(scheduler, 8) == pytest.approx(
        [_expected(n, 'multi_step', 4, 0.01, 8) for n in range(1, 9)], rel=1e-9)


def test_a_warm_up_as_long_as_the_run_is_refused(tiny_settings):
    with pytest.raises(UserError, match=r'WARMUP_EPOCHS=3 is not shorter than the run '
                                        r'\(MAX_EPOCH=3\)'):
        main.train(tiny_settings.replace(WARMUP_EPOCHS=3, MAX_EPOCH=3))
