"""A run's checkpoints on disk: older numbered ones without the optimiser's state
(KEEP_OPTIMIZER), latest.pth.tar stored once (a hard link), resume from those that keep it."""
import os
from pathlib import Path

import pytest
import torch

import main
from reidkit.data import checks
from reidkit.run.checkpoints import (LATEST_NAME, checkpoint_path, drop_optimizer_states,
                                     link_latest, load_checkpoint, save_checkpoint)
from reidkit.run.errors import UserError
from reidkit.run.folders import resume_checkpoint, resume_point


def _write_run(model_dir: Path, epochs=(1, 2, 3)) -> dict:
    """Numbered checkpoints of a small model trained by Adam (its state: two moments per
    weight, as in a real run); latest.pth.tar written as training writes it, a copy."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    paths = {}
    for epoch in epochs:
        model(torch.randn(4, 64)).sum().backward()
        optimizer.step()
        scheduler.step()
        state = {'state_dict': model.state_dict(), 'epoch': epoch, 'rank1': 0.5,
                 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                 'model_name': 'linear', 'settings': {}}
        save_checkpoint(state, model_dir / LATEST_NAME)
        paths[epoch] = save_checkpoint(state, model_dir / f'model.pth.tar-{epoch}')
    return paths


def test_older_checkpoints_keep_their_weights_only(tmp_path):
    paths = _write_run(tmp_path / 'model')
    full = paths[1].stat().st_size
    before = {epoch: load_checkpoint(path) for epoch, path in paths.items()}
    assert drop_optimizer_states(tmp_path / 'model', keep=1) == [paths[2], paths[1]]
    for epoch in (1, 2):
        after = load_checkpoint(paths[epoch])
        assert after['optimizer'] is None and after['epoch'] == epoch
        assert after['scheduler'] == before[epoch]['scheduler']
        assert all(torch.equal(after['state_dict'][k], v)
                   for k, v in before[epoch]['state_dict'].items())
        assert paths[epoch].stat().st_size < full / 2      # Adam's two moments are gone
    assert load_checkpoint(paths[3])['optimizer'] is not None
    assert drop_optimizer_states(tmp_path / 'model', keep=1) == []    # done once
    assert not list((tmp_path / 'model').glob('.*'))                  # no temporary file left


def test_latest_is_the_numbered_file_and_survives_its_rewrite(tmp_path):
    paths = _write_run(tmp_path / 'model')
    latest = link_latest(paths[3])
    assert latest == tmp_path / 'model' / LATEST_NAME and latest.samefile(paths[3])
    assert latest.stat().st_nlink == 2                  # stored once
    assert resume_point(tmp_path) == paths[3]           # the same file: its numbered name
    assert drop_optimizer_states(tmp_path / 'model', keep=0)[0] == paths[3]
    assert resume_point(tmp_path) == latest             # the newest that keeps its state
    assert not latest.samefile(paths[3])                # the rewrite broke the link, not latest
    assert load_checkpoint(latest)['optimizer'] is not None
    assert load_checkpoint(paths[3])['optimizer'] is None


def test_latest_of_another_epoch_stays_the_rolling_checkpoint(tmp_path):
    paths = _write_run(tmp_path / 'model', epochs=(1, 2))     # latest: epoch 2's
    before = (tmp_path / 'model' / LATEST_NAME).read_bytes()
    assert link_latest(paths[1]) is None
    assert (tmp_path / 'model' / LATEST_NAME).read_bytes() == before
    assert link_latest(paths[2]) is not None
    (tmp_path / 'model' / LATEST_NAME).unlink()               # LATEST_EVERY=0: none is made
    assert link_latest(paths[2]) is None and not (tmp_path / 'model' / LATEST_NAME).exists()


def test_resume_from_weights_only_names_the_newest_that_can(tmp_path):
    model_dir = tmp_path / 'experiments' / 'run' / 'model'
    paths = _write_run(model_dir)
    link_latest(paths[3])
    drop_optimizer_states(model_dir, keep=1)
    s = main.load_settings(dict(EXPERIMENTS_DIR=str(tmp_path / 'experiments')))
    with pytest.raises(UserError) as error:
        resume_checkpoint(s.replace(RESUME=str(paths[1])))
    assert 'test, visrank and search' in str(error.value)
    assert f'Resume from "{paths[3]}"' in str(error.value)
    drop_optimizer_states(model_dir, keep=0)          # latest alone keeps it now
    with pytest.raises(UserError, match=f'Resume from "{model_dir / LATEST_NAME}"'):
        resume_checkpoint(s.replace(RESUME=str(paths[3])))


def test_keep_optimizer_is_not_negative():
    with pytest.raises(UserError, match='KEEP_OPTIMIZER=-1'):
        checks.check_numbers(main.load_settings(dict(KEEP_OPTIMIZER=-1)), training=True)


@pytest.mark.slow
def test_a_run_stores_latest_once_and_resumes_from_every_checkpoint_with_state(tiny_settings,
                                                                               capsys):
    s = tiny_settings.replace(MODEL_NAME='resnet18', MAX_EPOCH=3, EVAL_FREQ=1, LATEST_EVERY=1,
                              KEEP_OPTIMIZER=2)
    run = main.train(s)
    model_dir = run / 'model'
    numbered = {epoch: checkpoint_path(run, epoch) for epoch in (1, 2, 3)}
    assert [load_checkpoint(numbered[e])['optimizer'] is not None for e in (1, 2, 3)] == \
        [False, True, True]
    # latest stays the rolling checkpoint (epoch 2, before the final one), stored once
    latest = model_dir / LATEST_NAME
    assert load_checkpoint(latest)['epoch'] == 2 and latest.samefile(numbered[2])
    assert sorted(p.name for p in model_dir.iterdir()) == [LATEST_NAME] + [
        p.name for p in numbered.values()]
    # a weights-only checkpoint serves test; resume refuses it before any work
    assert main.main(['train', f'--RESUME={numbered[1]}', f'--DATA_ROOT={s.DATA_ROOT}',
                      f'--EXPERIMENTS_DIR={s.EXPERIMENTS_DIR}']) == 2
    assert f'Resume from "{numbered[3]}"' in capsys.readouterr().err
    main.test(s, numbered[1])
    # from the newest: one more epoch in the same run; from latest (epoch 2): a new run
    assert main.train(s.replace(RESUME=str(numbered[3]), MAX_EPOCH=4)) == run
    assert load_checkpoint(numbered[2])['optimizer'] is None        # KEEP_OPTIMIZER=2: 3 and 4
    assert load_checkpoint(latest)['optimizer'] is not None         # the rewrite left latest
    assert main.train(s.replace(RESUME=str(latest), MAX_EPOCH=4)) != run
