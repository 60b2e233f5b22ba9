"""RECIPE='strong': config.STRONG applied after config.py and DEMO, before the command line."""
import pytest

import config
from reidkit.run.errors import UserError
from reidkit.run.settings import resolve, settings_to_evaluate, settings_to_resume


def test_the_tutorial_recipe_changes_nothing():
    s = resolve(config)
    assert not s.preset and s.recipe_line() == ''
    assert (s.NECK, s.LAST_STRIDE, s.CENTER_LOSS_WEIGHT, s.DIST_METRIC, s.WARMUP_EPOCHS) == \
        ('none', 'auto', 0.0, 'euclidean', 0)


def test_the_strong_preset_is_scaled_to_max_epoch_and_the_command_line_wins():
    s = resolve(config, {'RECIPE': 'strong', 'MAX_EPOCH': 60, 'DIST_METRIC': 'euclidean'})
    assert s.WARMUP_EPOCHS == 5 and s.STEPSIZE == [20, 35] and s.LR_SCHEDULER == 'multi_step'
    assert s.TRANSFORMS == ['random_flip', 'random_crop', 'random_erase']
    assert (s.NECK, s.LAST_STRIDE, s.LOSS, s.CENTER_LOSS_WEIGHT) == ('bnneck', 1, 'triplet', 5e-4)
    assert s.DIST_METRIC == 'euclidean' and 'DIST_METRIC' not in s.preset
    assert 'NECK' in s.preset and "NECK='bnneck'" in s.recipe_line()
    assert s.LR == config.LR and s.MAX_EPOCH == 60          # never sizes, epochs or LR


def test_demo_with_the_strong_recipe():
    s = resolve(config, {'RECIPE': 'strong'}, demo=True)
    assert s.MAX_EPOCH == config.DEMO['MAX_EPOCH'] and s.HEIGHT == config.DEMO['HEIGHT']
    assert s.TRANSFORMS[-1] == 'random_erase' and 'color_jitter' in s.TRANSFORMS
    assert all(step < s.MAX_EPOCH for step in s.STEPSIZE)


def test_an_unknown_recipe_is_named():
    with pytest.raises(UserError, match="RECIPE='bag' is not a recipe"):
        resolve(config, {'RECIPE': 'bag'})


def test_an_older_checkpoint_keeps_the_tutorial_values_under_the_strong_recipe(monkeypatch):
    older = {key: value for key, value in resolve(config).record().items()
             if key not in ('NECK', 'LAST_STRIDE', 'DIST_METRIC', 'RECIPE', 'CENTER_LOSS_WEIGHT',
                            'WARMUP_EPOCHS', 'WARMUP_FACTOR', 'CENTER_LR')}
    monkeypatch.setattr(config, 'RECIPE', 'strong')
    current = resolve(config)
    evaluated, _ = settings_to_evaluate(current, older, 'old.pth.tar')
    assert (evaluated.NECK, evaluated.LAST_STRIDE, evaluated.DIST_METRIC) == \
        ('none', 'auto', 'euclidean')
    resumed, _ = settings_to_resume(current, older, 'old.pth.tar')
    assert (resumed.NECK, resumed.LOSS, resumed.WARMUP_EPOCHS, resumed.CENTER_LOSS_WEIGHT,
            resumed.STEPSIZE, resumed.RECIPE) == ('none', 'softmax', 0, 0.0, 20, 'tutorial')
    with pytest.raises(UserError, match="trained with RECIPE='tutorial'"):
        settings_to_resume(resolve(config, {'RECIPE': 'strong'}), older, 'old.pth.tar')
    monkeypatch.setattr(config, 'RECIPE', 'tutorial')
