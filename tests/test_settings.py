"""config.py + --KEY=VALUE overrides: typed, checked by name, frozen."""
import pytest

import config
import main
from reidkit.run.errors import UserError
from reidkit.run.settings import apply_overrides, defaults_from, parse_override_args


def test_defaults_are_the_tutorials_recipe():
    s = main.load_settings()
    assert (s.MODEL_NAME, s.LOSS, s.PRETRAINED, s.LABEL_SMOOTH) == ('resnet50', 'softmax', True, True)
    assert (s.HEIGHT, s.WIDTH, s.BATCH_SIZE_TRAIN, s.BATCH_SIZE_TEST) == (256, 128, 32, 100)
    assert s.TRANSFORMS == ['random_flip', 'random_crop']
    assert (s.OPTIM, s.LR, s.LR_SCHEDULER, s.STEPSIZE) == ('adam', 0.0003, 'single_step', 20)
    assert (s.MAX_EPOCH, s.EVAL_FREQ, s.PRINT_FREQ, s.VISRANK_TOPK) == (60, 10, 10, 10)
    assert 'DEMO' not in s


def test_overrides_are_parsed_as_python_literals_or_plain_names():
    parsed = parse_override_args(['--LR=1e-3', '--PRETRAINED=False', '--MODEL_NAME=osnet_x1_0',
                                  "--TRANSFORMS=['random_flip']", '--MAX_EPOCH=5'])
    assert parsed == {'LR': 0.001, 'PRETRAINED': False, 'MODEL_NAME': 'osnet_x1_0',
                      'TRANSFORMS': ['random_flip'], 'MAX_EPOCH': 5}
    s = main.load_settings(parsed)
    assert s.LR == 0.001 and s.MAX_EPOCH == 5 and s.HEIGHT == 256


def test_an_int_is_accepted_for_a_float_but_not_the_reverse():
    assert main.load_settings({'LR': 1}).LR == 1.0 and isinstance(main.load_settings({'LR': 1}).LR, float)
    with pytest.raises(UserError, match=r'MAX_EPOCH must be an int like its default 60.*2\.5'):
        main.load_settings({'MAX_EPOCH': 2.5})


@pytest.mark.parametrize('key, value', [('PRETRAINED', 'yes'), ('HEIGHT', '256px'),
                                        ('TRANSFORMS', 3), ('MODEL_NAME', 50)])
def test_a_wrong_type_names_the_setting_and_its_default(key, value):
    with pytest.raises(UserError) as error:
        main.load_settings({key: value})
    assert key in str(error.value) and repr(getattr(config, key)) in str(error.value)


def test_an_unknown_key_is_an_error_listing_near_matches():
    with pytest.raises(UserError, match="unknown setting 'MAX_EPOCHS'.*Did you mean MAX_EPOCH"):
        main.load_settings({'MAX_EPOCHS': 3})
    with pytest.raises(UserError, match="unknown setting 'lr'.*Did you mean LR"):
        apply_overrides(defaults_from(config), {'lr': 0.1})


def test_a_malformed_argument_is_an_error():
    with pytest.raises(UserError, match='--KEY=VALUE'):
        parse_override_args(['--LR'])


def test_settings_are_frozen_once_resolved():
    s = main.load_settings()
    with pytest.raises(AttributeError):
        s.LR = 1.0
    assert s.replace(LR=0.1).LR == 0.1 and s.LR == 0.0003


def test_demo_overrides_apply_under_the_command_line():
    s = main.load_settings({'MAX_EPOCH': 2}, demo=True)
    assert s.PRETRAINED is False and s.DATA_ROOT == config.DEMO['DATA_ROOT'] and s.MAX_EPOCH == 2


def test_command_line_modes_and_help(capsys):
    assert main.parse_command_line([]) == (['train', 'test', 'visrank'], False, {})
    assert main.parse_command_line(['test', '--demo', '--LR=0.1']) == (['test'], True, {'LR': 0.1})
    assert main.main(['--help']) == 0
    out = capsys.readouterr().out
    assert all(f'--{key}=' in out for key in defaults_from(config))
    assert main.main(['trian']) == 2
    assert "unknown mode 'trian'" in capsys.readouterr().err
    assert main.main(['--MAX_EPOCHS=2']) == 2
    assert 'Did you mean MAX_EPOCH' in capsys.readouterr().err
