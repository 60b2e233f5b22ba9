"""A run carries its own settings: settings.json and every checkpoint hold them, and resume,
test, visrank and search take them from the checkpoint."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import config
import main
from reidkit.run.checkpoints import LATEST_NAME, load_checkpoint, save_checkpoint
from reidkit.run.errors import UserError
from reidkit.run.folders import newest_checkpoint
from reidkit.run.settings import (LOCAL_SETTINGS, RUN_SETTINGS, SCHEDULE_SETTINGS, defaults_from,
                              parse_override_args)


def test_every_setting_has_exactly_one_class():
    classes = RUN_SETTINGS + SCHEDULE_SETTINGS + LOCAL_SETTINGS
    assert sorted(classes) == sorted(defaults_from(config))     # nothing missing, no stray name
    assert len(set(classes)) == len(classes)                    # nothing in two classes


def test_numbers_that_are_not_finite_are_refused():
    with pytest.raises(UserError, match=r'LR=inf is not a finite number'):
        main.load_settings(parse_override_args(['--LR=1e999']))
    with pytest.raises(UserError, match='LR=nan'):
        main.load_settings({'LR': float('nan')})


def test_path_settings_keep_the_text_as_given():
    parsed = parse_override_args(['--GALLERY=2024', '--DATA_ROOT=1e3', '--QUERY=True',
                                  "--WEIGHTS='quoted.pth'", '--MAX_EPOCH=5'])
    assert parsed == {'GALLERY': '2024', 'DATA_ROOT': '1e3', 'QUERY': 'True',
                      'WEIGHTS': 'quoted.pth', 'MAX_EPOCH': 5}
    assert main.load_settings(parsed).GALLERY == '2024'


def test_several_datasets_are_a_list_of_names():
    s = main.load_settings(parse_override_args(["--SOURCES=['market1501', 'dukemtmcreid']"]))
    assert s.SOURCES == ['market1501', 'dukemtmcreid']
    assert main.load_settings({'TARGETS': 'grid'}).TARGETS == 'grid'
    with pytest.raises(UserError, match='SOURCES must be a str'):
        main.load_settings({'SOURCES': 3})
    with pytest.raises(UserError, match='SOURCES'):
        main.load_settings({'SOURCES': ['market1501', 3]})


@pytest.fixture(scope='module')
def trained_run(module_tmp_path, tiny_data_root):
    """One 2-epoch run on the tiny data, trained once for the tests below (which copy it)."""
    from conftest import TINY
    experiments = module_tmp_path / 'experiments'
    s = main.load_settings(dict(TINY, DATA_ROOT=str(tiny_data_root),
                                EXPERIMENTS_DIR=str(experiments), MAX_EPOCH=2, EVAL_FREQ=-1))
    return s, main.train(s)


def _copy_run(trained_run, tmp_path):
    s, run_dir = trained_run
    experiments = tmp_path / 'experiments'
    copy = experiments / run_dir.name
    shutil.copytree(run_dir, copy)
    return s.replace(EXPERIMENTS_DIR=str(experiments)), copy


def _fingerprint(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.mark.slow
def test_the_run_folder_and_every_checkpoint_hold_the_settings(trained_run, tiny_data_root):
    s, run_dir = trained_run
    stored = json.loads((run_dir / 'settings.json').read_text())
    assert stored['DATA_ROOT'] == str(Path(tiny_data_root).resolve())     # absolute
    assert {key: stored[key] for key in RUN_SETTINGS} == {key: s[key] for key in RUN_SETTINGS}
    assert stored['MAX_EPOCH'] == 2
    for checkpoint in run_dir.glob('model/*.pth.tar*'):
        assert load_checkpoint(checkpoint)['settings'] == stored
    assert json.loads((run_dir / 'metrics.json').read_text())['settings']['MAX_EPOCH'] == 2


@pytest.mark.slow
def test_test_takes_model_size_and_data_from_the_checkpoint(trained_run, tmp_path):
    s, run_dir = _copy_run(trained_run, tmp_path)
    # Nothing about the run is given: config.py's 256x128 and 'reid-data' would not fit.
    bare = main.load_settings({'EXPERIMENTS_DIR': s.EXPERIMENTS_DIR, 'WORKERS': 0})
    assert (bare.HEIGHT, bare.DATA_ROOT) == (256, 'reid-data')
    out_dir = main.test(bare)
    used = json.loads((out_dir / 'metrics.json').read_text())['settings']
    assert (used['HEIGHT'], used['WIDTH']) == (s.HEIGHT, s.WIDTH)
    assert used['DATA_ROOT'] == str(Path(s.DATA_ROOT).resolve())
    # A size given on the command line that differs is an error, not worse features.
    with pytest.raises(UserError, match='was trained on 32x16 images'):
        main.test(bare.replace(HEIGHT=64))


@pytest.mark.slow
@pytest.mark.parametrize('flag, value', [('HEIGHT', 64), ('OPTIM', 'sgd'), ('LR', 0.5),
                                         ('MODEL_NAME', 'resnet18')])
def test_resume_refuses_a_flag_that_changes_the_run(trained_run, tmp_path, flag, value):
    s, run_dir = _copy_run(trained_run, tmp_path)
    before = _fingerprint(run_dir)
    latest = newest_checkpoint(run_dir)
    with pytest.raises(UserError) as error:
        main.train(s.replace(RESUME=str(latest), MAX_EPOCH=3, **{flag: value}))
    message = str(error.value)
    assert f'{flag}={s[flag]!r}' in message and f'--{flag}={value!r}' in message
    assert 'cannot change when resuming' in message
    assert _fingerprint(run_dir) == before


@pytest.mark.slow
def test_resume_applies_schedule_flags_and_ignores_config_edits(trained_run, tmp_path, capsys,
                                                                 monkeypatch):
    s, run_dir = _copy_run(trained_run, tmp_path)
    monkeypatch.setattr(config, 'LR', 0.5)                  # an edit of config.py since
    resumed = main.load_settings({'EXPERIMENTS_DIR': s.EXPERIMENTS_DIR, 'WORKERS': 0,
                                  'MAX_EPOCH': 3, 'RESUME': str(newest_checkpoint(run_dir))})
    assert main.train(resumed) == run_dir
    out = capsys.readouterr().out
    assert 'MAX_EPOCH=3 from the command line (the run had 2)' in out
    assert 'edits to config.py are not read' in out
    assert 'epoch: [3/3]' in out or (run_dir / 'model' / 'model.pth.tar-3').is_file()
    used = json.loads((run_dir / 'metrics.json').read_text())['settings']
    assert used['LR'] == s.LR and used['MAX_EPOCH'] == 3 and used['HEIGHT'] == s.HEIGHT
    assert load_checkpoint(run_dir / 'model' / 'model.pth.tar-3')['settings']['MAX_EPOCH'] == 3


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_writes_nothing(trained_run, tmp_path):
    s, run_dir = _copy_run(trained_run, tmp_path)
    before = _fingerprint(run_dir)
    with pytest.raises(UserError, match=r'is from epoch 2 and the run.s MAX_EPOCH is 2: it has '
                                        r'finished'):
        main.train(s.replace(RESUME=str(run_dir / 'model' / 'model.pth.tar-2')))
    assert _fingerprint(run_dir) == before
    assert [p.name for p in Path(s.EXPERIMENTS_DIR).iterdir()] == [run_dir.name]


@pytest.mark.slow
def test_a_checkpoint_outside_experiments_continues_in_a_new_run_folder(trained_run, tmp_path,
                                                                        capsys):
    s, _ = trained_run
    kept = tmp_path / 'my-models' / 'model'
    kept.mkdir(parents=True)
    checkpoint = kept / 'epoch1.pth'
    saved = load_checkpoint(next(trained_run[1].glob(f'model/{LATEST_NAME}')))
    save_checkpoint(saved, checkpoint)
    (tmp_path / 'my-models' / 'metrics.json').write_text('mine')
    before = _fingerprint(tmp_path / 'my-models')
    experiments = tmp_path / 'experiments'
    run_dir = main.train(s.replace(RESUME=str(checkpoint), EXPERIMENTS_DIR=str(experiments)))
    assert run_dir.parent == experiments and (run_dir / 'model' / 'model.pth.tar-2').is_file()
    assert 'continues in a new one' in capsys.readouterr().out
    assert _fingerprint(tmp_path / 'my-models') == before


@pytest.mark.slow
def test_resume_needs_no_imagenet_weights(trained_run, tmp_path, monkeypatch):
    s, run_dir = _copy_run(trained_run, tmp_path)
    latest = run_dir / 'model' / LATEST_NAME
    saved = load_checkpoint(latest)
    saved['settings'] = dict(saved['settings'], PRETRAINED=True)     # started from ImageNet
    save_checkpoint(saved, latest)
    from reidkit.data import checks

    def offline(*args, **kwargs):
        raise AssertionError('resume must not look for ImageNet weights')
    monkeypatch.setattr(checks, 'check_pretrained', offline)
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    # epoch 1 of a run that reached 2: continues as a new run (nothing overwritten)
    resumed = main.train(main.load_settings({'EXPERIMENTS_DIR': s.EXPERIMENTS_DIR,
                                             'WORKERS': 0, 'RESUME': str(latest)}))
    assert resumed != run_dir
    assert load_checkpoint(resumed / 'model' / 'model.pth.tar-2')['settings']['PRETRAINED']


@pytest.mark.slow
def test_an_old_checkpoint_of_another_optimiser_is_named(trained_run, tmp_path):
    s, run_dir = _copy_run(trained_run, tmp_path)
    latest = run_dir / 'model' / LATEST_NAME
    saved = load_checkpoint(latest)
    del saved['settings']                                   # as written before settings existed
    save_checkpoint(saved, latest)
    with pytest.raises(UserError, match='holds the state of another optimiser than SGD'):
        main.train(s.replace(RESUME=str(latest), OPTIM='sgd'))


def test_resume_resolution_returns_its_notes_and_finds_the_run_folder(tmp_path, capsys):
    from reidkit.run.folders import resume_checkpoint, training_run_dir
    experiments = tmp_path / 'experiments'
    run = main.load_settings({'MAX_EPOCH': 2, 'LR': 0.01, 'EXPERIMENTS_DIR': str(experiments)})
    model_dir = experiments / '20250101-000000-run' / 'model'
    for epoch in (1, 2):
        save_checkpoint({'state_dict': {'w': torch.ones(1)}, 'epoch': epoch,
                         'settings': run.record()}, model_dir / f'model.pth.tar-{epoch}')
    command = main.load_settings({'MAX_EPOCH': 3, 'EXPERIMENTS_DIR': str(experiments),
                                  'RESUME': str(model_dir / 'model.pth.tar-2')})
    resumed = resume_checkpoint(command)
    assert resumed.path == model_dir / 'model.pth.tar-2' and resumed.saved['epoch'] == 2
    assert (resumed.settings.LR, resumed.settings.MAX_EPOCH) == (0.01, 3)   # run's, then flag
    assert 'edits to config.py are not read' in resumed.notes[0]
    assert 'MAX_EPOCH=3 from the command line (the run had 2)' in resumed.notes[1]
    # the newest checkpoint of a run under EXPERIMENTS_DIR continues in that run's folder
    assert training_run_dir(resumed.settings, resumed) == (model_dir.parent, resumed.notes)
    # an earlier one would overwrite epoch 2 there: a new folder, and a note saying so
    earlier = resume_checkpoint(command.replace(RESUME=str(model_dir / 'model.pth.tar-1')))
    folder, notes = training_run_dir(earlier.settings, earlier)
    assert folder.parent == experiments and folder != model_dir.parent
    assert notes[:-1] == earlier.notes and 'continues in a new one' in notes[-1]
    assert capsys.readouterr().out == ''            # notes go to the log, with the run folder


def test_an_older_checkpoint_than_latest_continues_in_a_new_run_folder(tmp_path):
    """latest.pth.tar (written every LATEST_EVERY epochs) may be further on than every
    numbered checkpoint: resuming from one of those would overwrite it in the same folder."""
    from reidkit.run.folders import resume_checkpoint, training_run_dir
    experiments = tmp_path / 'experiments'
    run = main.load_settings({'MAX_EPOCH': 5, 'EXPERIMENTS_DIR': str(experiments)})
    model_dir = experiments / '20250101-000000-run' / 'model'
    for name, epoch in (('model.pth.tar-1', 1), (LATEST_NAME, 3)):
        save_checkpoint({'state_dict': {'w': torch.ones(1)}, 'epoch': epoch,
                         'settings': run.record()}, model_dir / name)
    earlier = resume_checkpoint(run.replace(RESUME=str(model_dir / 'model.pth.tar-1')))
    folder, notes = training_run_dir(earlier.settings, earlier)
    assert folder.parent == experiments and folder != model_dir.parent
    assert 'continues in a new one' in notes[-1]
    latest = resume_checkpoint(run.replace(RESUME=str(model_dir / LATEST_NAME)))
    assert training_run_dir(latest.settings, latest)[0] == model_dir.parent
    # a latest.pth.tar that cannot be read may be further on: never overwritten either
    (model_dir / LATEST_NAME).write_bytes(b'torn')
    assert training_run_dir(earlier.settings, earlier)[0] != model_dir.parent
