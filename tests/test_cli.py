"""python main.py --help and a mistyped command line are answered before torch is imported."""
import subprocess
import sys
from pathlib import Path

import config
from reidkit.run.cli import setting_comments, usage
from reidkit.run.settings import command_line_flag, defaults_from

ROOT = Path(__file__).resolve().parents[1]

# Runs main.py as `python main.py ARGS` would, then reports its exit code and whether torch
# (or Torchreid) was imported by then.
RUN_MAIN = '''
import runpy, sys
sys.argv = ['main.py'] + sys.argv[1:]
try:
    runpy.run_path('main.py', run_name='__main__')
    code = 0
except SystemExit as exit:
    code = exit.code
print('EXIT', code, 'torch' in sys.modules, 'torchreid' in sys.modules)
'''


def run_main(*args):
    done = subprocess.run([sys.executable, '-c', RUN_MAIN, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    last = done.stdout.strip().splitlines()[-1].split()
    return int(last[1]), last[2] == 'True', done.stdout, done.stderr


def test_help_describes_every_setting_without_importing_torch():
    code, torch_imported, out, _ = run_main('--help')
    assert code == 0 and not torch_imported
    described = {name: comment for _, rows in setting_comments(config) for name, comment in rows}
    assert set(described) == set(defaults_from(config))     # every setting, none twice
    for name, value in defaults_from(config).items():
        line = next(line for line in out.splitlines()
                    if line.strip().lstrip('"\'').startswith(f'--{name}='))
        assert command_line_flag(name, value) in line
        assert described[name] and described[name] in out


def test_a_mistyped_command_line_is_refused_before_torch_loads():
    for args, expected in [(['--LRR=3'], 'Did you mean LR'), (['trian'], "unknown mode 'trian'"),
                           (['--LR=abc'], 'LR must be a float'), (['--LR=1e999'], 'not a finite'),
                           (['--demo', '--MAX_EPOCH=2.5'], 'MAX_EPOCH must be an int'),
                           (['--MAX_EPOCH'], 'is not an override')]:
        code, torch_imported, _, err = run_main(*args)
        assert code == 2 and not torch_imported, args
        assert expected in err and err.startswith('error: ') and 'Traceback' not in err, args


def test_a_good_command_line_goes_on_to_the_real_work():
    # No mode that runs quickly exists, so check the early answer lets a good line through.
    from reidkit.run.cli import answer_early
    assert answer_early(['test', '--demo', '--LR=0.1', '--GALLERY=2024'], '', config) is None


def test_groups_follow_config_py_and_a_hash_inside_a_value_is_not_a_comment(tmp_path):
    fake = tmp_path / 'fake_config.py'
    fake.write_text("# --- first ---\nA = '#not a comment'   # the real one\nB = 2\n"
                    "# --- second -----\nC = [1,\n     2]          # spans lines\nDEMO = dict()\n")
    import importlib.util
    spec = importlib.util.spec_from_file_location('fake_config', fake)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert setting_comments(module) == [('first', [('A', 'the real one'), ('B', '')]),
                                        ('second', [('C', 'spans lines')])]
    text = usage('doc', module)
    assert '"--A=#not a comment"  the real one' in text and '"--C=[1, 2]"' in text


def test_a_value_after_a_space_is_answered_with_the_flag_written_whole():
    from reidkit.run.cli import parse_command_line
    from reidkit.run.errors import UserError
    import pytest
    for argv, suggested in [(['--MAX_EPOCH', '3'], '--MAX_EPOCH=3'),
                            (['test', '--GALLERY', 'my photos/'], "'--GALLERY=my photos/'")]:
        with pytest.raises(UserError) as error:
            parse_command_line(argv)
        assert 'unknown mode' not in str(error.value) and suggested in str(error.value), argv


def test_help_prints_every_value_as_it_is_typed_on_a_command_line():
    import shlex
    from reidkit.run.settings import parse_override_args
    text = usage('doc', config)
    assert '"--TRANSFORMS=[\'random_flip\', \'random_crop\']"' in text
    assert '--MODEL_NAME=resnet50 ' in text
    for name, value in defaults_from(config).items():
        line = next(line for line in text.splitlines()
                    if line.strip().lstrip('"\'').startswith(f'--{name}='))
        pasted = shlex.shlex(line.strip(), posix=True)     # the flag as a shell reads it
        pasted.whitespace_split = True
        assert parse_override_args([pasted.get_token()]) == {name: value}, line


def test_the_resume_command_printed_pastes_back_to_the_same_settings():
    import shlex
    import main
    from reidkit.run.settings import parse_override_args
    given = {'DATA_ROOT': 'my data', 'WORKERS': 0, 'MATCH_THRESHOLD': 'off', 'FLIP_TEST': True}
    s = main.load_settings(given)
    words = shlex.split(main.resume_command(Path("/runs/it's here/latest.pth.tar"), s))
    assert words[:3] == ['python', 'main.py', 'train']
    assert parse_override_args(words[3:]) == dict(
        given, RESUME="/runs/it's here/latest.pth.tar")
