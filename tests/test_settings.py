"""config.py + --KEY=VALUE overrides: typed, checked by name, frozen; `given` says which came
from the command line. (Every setting's class: test_run_settings.py; its help text:
test_cli.py.)"""
import importlib.util
import types

import pytest

import config
import main
from reidkit.run.errors import UserError
from reidkit.run.settings import apply_overrides, defaults_from, parse_override_args, resolve


def _module(tmp_path, text):
    """A config module of our own, written to tmp_path and imported."""
    path = tmp_path / 'my_config.py'
    path.write_text(text)
    spec = importlib.util.spec_from_file_location('my_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_are_the_config_modules_upper_case_constants_in_file_order(tmp_path):
    own = _module(tmp_path, "B = 2\nA = 'x'\nlower = 3\n_PRIVATE = 4\nimport os\n"
                            "DEMO = dict(A='demo')\nC = [1]\n")
    assert list(defaults_from(own).items()) == [('B', 2), ('A', 'x'), ('C', [1])]
    # and main.py reads config.py itself: every constant, nothing changed, nothing given
    s = main.load_settings()
    assert dict(s) == defaults_from(config) and s.given == frozenset()


def test_overrides_are_parsed_as_python_literals_or_plain_names():
    parsed = parse_override_args(['--LR=1e-3', '--PRETRAINED=False', '--MODEL_NAME=osnet_x1_0',
                                  "--TRANSFORMS=['random_flip']", '--MAX_EPOCH=5'])
    assert parsed == {'LR': 0.001, 'PRETRAINED': False, 'MODEL_NAME': 'osnet_x1_0',
                      'TRANSFORMS': ['random_flip'], 'MAX_EPOCH': 5}
    s = main.load_settings(parsed)
    assert s.LR == 0.001 and s.MAX_EPOCH == 5 and s.HEIGHT == config.HEIGHT


def test_a_command_line_value_wins_over_config_and_is_recorded_as_given():
    other = config.MAX_EPOCH + 7
    s = main.load_settings({'MAX_EPOCH': other, 'MODEL_NAME': 'osnet_x1_0'})
    assert s.MAX_EPOCH == other and s['MAX_EPOCH'] == other and s.MODEL_NAME == 'osnet_x1_0'
    assert s.given == {'MAX_EPOCH', 'MODEL_NAME'}
    # a value equal to config.py's is still given: it may override what a checkpoint holds
    assert main.load_settings({'LR': config.LR}).given == {'LR'}
    # replace() checks like the command line and adds to given
    changed = s.replace(LR=0.5)
    assert changed.LR == 0.5 and changed.given == {'MAX_EPOCH', 'MODEL_NAME', 'LR'}
    with pytest.raises(UserError, match=r'replace\(\): LR must be a float'):
        s.replace(LR='fast')


def _demo_config(key, value):
    """config.py's settings with a DEMO of one entry."""
    module = types.ModuleType('demo_config')
    module.__dict__.update(defaults_from(config), DEMO={key: value})
    return module


def test_the_demo_values_apply_with_demo_only_and_are_not_given():
    plain, demo = main.load_settings(), main.load_settings(demo=True)
    assert config.DEMO and all(demo[key] == value for key, value in config.DEMO.items())
    assert any(getattr(config, key) != value for key, value in config.DEMO.items())
    assert dict(plain) == defaults_from(config)
    assert {key: demo[key] for key in demo if key not in config.DEMO} == \
        {key: plain[key] for key in plain if key not in config.DEMO}
    assert demo.given == frozenset()        # a checkpoint's values win over the demo's
    # and the command line wins over the demo's
    other = config.DEMO['MAX_EPOCH'] + 1
    s = main.load_settings({'MAX_EPOCH': other}, demo=True)
    assert s.MAX_EPOCH == other and s.given == {'MAX_EPOCH'}
    assert s.PRETRAINED == config.DEMO['PRETRAINED'] and s.DATA_ROOT == config.DEMO['DATA_ROOT']
    # the demo overrides are themselves checked like the command line
    with pytest.raises(UserError, match=r"config.DEMO: unknown setting 'EPOCHS'"):
        resolve(_demo_config('EPOCHS', 3), demo=True)


def test_an_int_is_accepted_for_a_float_but_not_the_reverse():
    lr = main.load_settings({'LR': 1}).LR
    assert lr == 1.0 and type(lr) is float
    with pytest.raises(UserError, match=r'MAX_EPOCH must be an int like its default '
                                        rf'{config.MAX_EPOCH}.*2\.5'):
        main.load_settings({'MAX_EPOCH': 2.5})


def test_a_bool_is_not_a_number_nor_a_number_a_bool():
    # bool is a subclass of int in Python: --MAX_EPOCH=True must still be refused
    with pytest.raises(UserError, match='MAX_EPOCH must be an int'):
        main.load_settings(parse_override_args(['--MAX_EPOCH=True']))
    with pytest.raises(UserError, match='PRETRAINED must be a bool'):
        main.load_settings(parse_override_args(['--PRETRAINED=1']))


@pytest.mark.parametrize('key, value', [('PRETRAINED', 'yes'), ('HEIGHT', '256px'),
                                        ('TRANSFORMS', 3), ('MODEL_NAME', 50)])
def test_a_wrong_type_names_the_setting_and_its_default(key, value):
    with pytest.raises(UserError) as error:
        main.load_settings({key: value})
    message = str(error.value)
    assert message.startswith(f'command line: {key} must be ')
    assert repr(getattr(config, key)) in message and repr(value) in message
    assert f'--{key}={getattr(config, key)!r}' in message          # how to write it


def test_a_list_setting_takes_one_name_or_a_tuple_as_a_list():
    assert main.load_settings(parse_override_args(['--TRANSFORMS=random_flip'])).TRANSFORMS \
        == ['random_flip']
    assert main.load_settings({'TRANSFORMS': ('a', 'b')}).TRANSFORMS == ['a', 'b']


def test_an_unknown_key_is_an_error_listing_near_matches():
    with pytest.raises(UserError, match="unknown setting 'MAX_EPOCHS'.*Did you mean MAX_EPOCH"):
        main.load_settings({'MAX_EPOCHS': 3})
    with pytest.raises(UserError, match="unknown setting 'lr'.*Did you mean LR"):
        apply_overrides(defaults_from(config), {'lr': 0.1})
    with pytest.raises(UserError) as error:            # nothing near: no guess
        main.load_settings({'ZZZQQQXXX': 3})
    assert 'Did you mean' not in str(error.value) and '--help' in str(error.value)


def test_a_malformed_argument_is_an_error():
    for arg in ('--LR', '--=3', 'LR'):
        with pytest.raises(UserError, match=f'{arg!r} is not an override.*--KEY=VALUE'):
            parse_override_args([arg])


def test_settings_are_frozen_once_resolved():
    s = main.load_settings()
    with pytest.raises(AttributeError):
        s.LR = 1.0
    with pytest.raises(TypeError):
        s['LR'] = 1.0
    with pytest.raises(AttributeError):
        s.given = frozenset({'LR'})
    s.record()['LR'] = 1.0                     # a record is a copy
    assert s.replace(LR=0.1).LR == 0.1 and s.LR == config.LR and s.given == frozenset()
    with pytest.raises(AttributeError):
        s.NO_SUCH_SETTING


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


@pytest.mark.parametrize('flag', ['--SOURCES=~nosuchuser/crops', '--EXPERIMENTS_DIR=~nosuchuser/x',
                                  '--WEIGHTS=~nosuchuser/a.pth',
                                  "--TARGETS=['market1501', '~nosuchuser/crops']"])
def test_a_home_folder_of_an_unknown_user_names_the_setting(flag, capsys):
    key = flag[2:].partition('=')[0]
    with pytest.raises(UserError, match=f'^{key}: "~nosuchuser/.*" starts with ~nosuchuser, '
                                        f'but there is no user "nosuchuser"'):
        main.load_settings(parse_override_args([flag]))
    assert main.main(['test', flag]) == 2
    assert capsys.readouterr().err.startswith(f'error: {key}: ')
