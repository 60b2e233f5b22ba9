"""Ctrl-C between epochs, then --RESUME: the same learning rates and the same weights as the
run that was never interrupted, for each trick of the strong recipe this covers (warm-up,
multi_step, random_erase on either data path), an evaluation between epochs included."""
import pytest
import torch

import main
from conftest import whole_and_interrupted
from reidkit.run.checkpoints import LATEST_NAME, load_checkpoint

pytestmark = pytest.mark.slow   # every test here trains

TRICKS = {
    'warm-up': dict(WARMUP_EPOCHS=2, WARMUP_FACTOR=0.1),
    'multi_step, an evaluation between epochs': dict(LR_SCHEDULER='multi_step', STEPSIZE=[1, 2],
                                                     EVAL_FREQ=1),
    'random_erase, Torchreid loader': dict(TRANSFORMS=['random_flip', 'random_erase'],
                                           DATA_CACHE='off'),
    'random_erase, device path': dict(TRANSFORMS=['random_flip', 'random_crop', 'random_erase'],
                                      DATA_CACHE='on'),
}


@pytest.mark.parametrize('trick', TRICKS)
def test_ctrl_c_and_resume_trains_what_the_uninterrupted_run_trained(trick, tiny_settings,
                                                                     epoch_watch):
    s = tiny_settings.replace(**{'MODEL_NAME': 'resnet18', 'MAX_EPOCH': 3, 'EVAL_FREQ': -1,
                                 **TRICKS[trick]})
    whole_dir, run_dir, whole_rates = whole_and_interrupted(s, epoch_watch)
    main.train(s.replace(RESUME=str(run_dir / 'model' / LATEST_NAME)))
    assert epoch_watch.rates == whole_rates[1:]
    ours, theirs = (load_checkpoint(d / 'model' / 'model.pth.tar-3') for d in (run_dir, whole_dir))
    assert ours['scheduler'] == theirs['scheduler']
    different = [key for key, value in theirs['state_dict'].items()
                 if not torch.equal(ours['state_dict'][key], value)]
    assert different == []
    assert torch.equal(ours['random_state'][0]['torch'], theirs['random_state'][0]['torch'])
