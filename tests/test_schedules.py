"""An extended run follows a schedule that makes sense: the learning rate of every epoch,
for each scheduler the project accepts, across a resume that changes MAX_EPOCH and one that
does not."""
import math
import shutil
from pathlib import Path

import pytest

import main
from reidkit.run.checkpoints import LATEST_NAME, load_checkpoint
from reidkit.train.engine import SoftmaxEngine
from conftest import whole_and_interrupted

pytestmark = pytest.mark.slow   # every test here trains


def _cosine(start: float, position: int, span: int) -> float:
    """A half cosine from `start` that reaches 0 at position `span`."""
    return start * (1 + math.cos(math.pi * position / span)) / 2


@pytest.mark.parametrize('scheduler', ['single_step', 'cosine'])
def test_a_run_extended_by_resume_follows_its_schedule(scheduler, tiny_settings, monkeypatch,
                                                       capsys):
    """Train 2 epochs; resume from epoch 2 with MAX_EPOCH=4, interrupted in epoch 4; resume
    that from epoch 3 with MAX_EPOCH=4 (unchanged): every epoch's LR is the plan's."""
    lr = 1e-3
    s = tiny_settings.replace(MODEL_NAME='resnet18', LR=lr, LR_SCHEDULER=scheduler, STEPSIZE=2,
                              MAX_EPOCH=2, EVAL_FREQ=-1)
    seen = []                                   # (epoch, LR it trained with), every run
    interrupt = {'at': None}
    original_train = SoftmaxEngine.train

    def recording_train(self, *args, **kwargs):    # one epoch, on any training path
        seen.append((self.epoch + 1, self.optimizer.param_groups[0]['lr']))
        if self.epoch + 1 == interrupt['at']:
            raise KeyboardInterrupt                # Ctrl-C as the epoch starts
        return original_train(self, *args, **kwargs)
    monkeypatch.setattr(SoftmaxEngine, 'train', recording_train)

    run_dir = main.train(s)
    capsys.readouterr()
    interrupt['at'] = 4
    with pytest.raises(KeyboardInterrupt):
        main.train(s.replace(RESUME=str(run_dir / 'model' / 'model.pth.tar-2'), MAX_EPOCH=4))
    extended = capsys.readouterr().out
    latest = run_dir / 'model' / LATEST_NAME
    assert load_checkpoint(latest)['epoch'] == 3
    interrupt['at'] = None
    assert main.train(s.replace(RESUME=str(latest), MAX_EPOCH=4)) == run_dir
    resumed = capsys.readouterr().out

    if scheduler == 'single_step':              # x0.1 every 2 epochs, counted from the start
        expected = [lr, lr, lr * 0.1, lr * 0.1]
        assert 'single_step keeps multiplying the learning rate by 0.1 every 2 epochs' in extended
    else:
        # The first plan: epochs 1-2 on a cosine over 2 epochs. Extended: from epoch 2's LR,
        # falling over epochs 3-4 to reach 0 one epoch after (as the first plan would have).
        last = _cosine(lr, 1, 2)
        expected = [lr, last, _cosine(last, 1, 3), _cosine(last, 2, 3)]
        assert 'the cosine learning-rate schedule is re-planned over epochs 3-4' in extended
    assert 'Note: MAX_EPOCH=4 where the run planned 2' in extended
    assert 'where the run planned' not in resumed          # the same MAX_EPOCH: exactly resumed
    # Epochs 1-2, then 3 and 4 (interrupted), then 4 again after the second resume.
    assert [epoch for epoch, _ in seen] == [1, 2, 3, 4, 4]
    assert [value for _, value in seen] == pytest.approx(expected + [expected[3]], rel=1e-6)
    assert all(value > 0 for _, value in seen)
    assert load_checkpoint(run_dir / 'model' / 'model.pth.tar-4')['epoch'] == 4


def test_a_shortened_cosine_is_replanned_to_its_new_end(tiny_settings, monkeypatch, capsys):
    """Interrupted after epoch 1 of a 6-epoch cosine, resumed with MAX_EPOCH=3: epochs 2-3 fall
    from epoch 1's LR over the two epochs left instead of stopping halfway down."""
    lr = 1e-3
    s = tiny_settings.replace(MODEL_NAME='resnet18', LR=lr, LR_SCHEDULER='cosine', MAX_EPOCH=6,
                              EVAL_FREQ=-1)
    seen = []
    original_train = SoftmaxEngine.train

    def recording_train(self, *args, **kwargs):
        seen.append(self.optimizer.param_groups[0]['lr'])
        if self.epoch == 1 and len(seen) == 2:      # Ctrl-C as epoch 2 starts, first run only
            raise KeyboardInterrupt
        return original_train(self, *args, **kwargs)
    monkeypatch.setattr(SoftmaxEngine, 'train', recording_train)
    with pytest.raises(KeyboardInterrupt):
        main.train(s)
    (latest,) = Path(s.EXPERIMENTS_DIR).glob(f'*/model/{LATEST_NAME}')
    seen.clear()
    main.train(s.replace(RESUME=str(latest), MAX_EPOCH=3))
    assert 'MAX_EPOCH=3 where the run planned 6' in capsys.readouterr().out
    assert seen == pytest.approx([_cosine(lr, 1, 3), _cosine(lr, 2, 3)], rel=1e-6)


def _warm(epochs_done: int, warmup: int = 2, factor: float = 0.1) -> float:
    """The warm-up's share of the schedule's rate after `epochs_done` epochs."""
    return factor + (1 - factor) * min(epochs_done, warmup) / warmup


@pytest.mark.parametrize('scheduler', ['single_step', 'multi_step', 'cosine'])
def test_warm_up_then_schedule_across_ctrl_c_resume_and_extension(scheduler, tiny_settings,
                                                                  epoch_watch, capsys):
    """WARMUP_EPOCHS=2 from 0.1 x LR, MAX_EPOCH=3: Ctrl-C as epoch 2 starts (in the warm-up),
    --RESUME: epochs 2-3 train at the uninterrupted run's rates and end in its scheduler state;
    then --RESUME --MAX_EPOCH=5 extends it by the schedule's own rule (multi_step keeps its
    epochs). A second run, extended from epoch 1 (during the warm-up), re-plans a cosine under
    the warm-up's factor."""
    lr = 1e-3
    stepsize = [2, 4] if scheduler == 'multi_step' else 2
    s = tiny_settings.replace(MODEL_NAME='resnet18', LR=lr, LR_SCHEDULER=scheduler,
                              STEPSIZE=stepsize, MAX_EPOCH=3, EVAL_FREQ=-1, WARMUP_EPOCHS=2,
                              WARMUP_FACTOR=0.1)
    seen = epoch_watch.rates                    # the LR each epoch trained with, every run
    whole_dir, run_dir, whole = whole_and_interrupted(s, epoch_watch)
    in_warm_up = run_dir / 'model' / 'epoch-1.pth.tar'            # for the last extension
    shutil.copy(run_dir / 'model' / LATEST_NAME, in_warm_up)
    main.train(s.replace(RESUME=str(run_dir / 'model' / LATEST_NAME)))
    assert seen == whole[1:]                       # the same floats, epoch by epoch
    ours, theirs = (load_checkpoint(d / 'model' / 'model.pth.tar-3') for d in (run_dir, whole_dir))
    assert ours['scheduler'] == theirs['scheduler']
    assert ours['optimizer']['param_groups'] == theirs['optimizer']['param_groups']
    capsys.readouterr()
    seen.clear()
    main.train(s.replace(RESUME=str(run_dir / 'model' / 'model.pth.tar-3'), MAX_EPOCH=5))
    extended = capsys.readouterr().out

    if scheduler == 'cosine':
        cosine = [_cosine(1, done, 3) for done in range(3)]     # epochs 1-3, over 3 epochs
        last = _cosine(1, 2, 3)                                 # epoch 3's, re-planned over 4-5
        schedule = cosine + [_cosine(last, 1, 3), _cosine(last, 2, 3)]
        assert 'the cosine learning-rate schedule is re-planned over epochs 4-5' in extended
    else:                                       # x0.1 after epochs 2 and 4, counted from epoch 1
        schedule = [1, 1, 0.1, 0.1, 0.01]
        rule = ('single_step keeps multiplying the learning rate by 0.1 every 2 epochs'
                if scheduler == 'single_step' else
                'multi_step keeps multiplying the learning rate by 0.1 after epochs 2, 4 '
                '(STEPSIZE, unchanged)')
        assert rule in extended
    expected = [lr * _warm(done) * schedule[done] for done in range(5)]
    assert whole == pytest.approx(expected[:3], rel=1e-9)
    assert seen == pytest.approx(expected[3:], rel=1e-9)

    if scheduler == 'cosine':                   # extended from epoch 1, inside the warm-up
        seen.clear()
        main.train(s.replace(RESUME=str(in_warm_up), MAX_EPOCH=5))
        out = capsys.readouterr().out
        assert "times the warm-up's factor until epoch 2" in out
        # epoch 1 trained at the cosine's start: re-planned over epochs 2-5 from LR
        assert seen == pytest.approx([lr * _warm(done) * _cosine(1, done, 5)
                                      for done in range(1, 5)], rel=1e-9)
