"""Cases a hostile review found after issue 11's fixes: each a way a run could train or report
on the wrong thing, or end in a traceback."""
import os
import shutil
from pathlib import Path

import pytest

import main
from reidkit.run.checkpoints import load_checkpoint, save_checkpoint
from reidkit.run.errors import UserError
from reidkit.run.folders import newest_checkpoint


def test_the_demo_dataset_does_not_change_with_the_training_seed(tmp_path):
    data = tmp_path / 'demo'
    for seed in (2, 3):        # generates the demo data, then stops: a batch larger than it
        assert main.main(['train', '--demo', f'--DATA_ROOT={data}', f'--SEED={seed}',
                          '--BATCH_SIZE_TRAIN=100000',
                          f'--EXPERIMENTS_DIR={tmp_path / "exp"}']) == 2
    marker = data / 'market1501' / 'Market-1501-v15.09.15' / '.demo-complete'
    from reidkit.data.demo import DEMO_DATA_SEED
    assert f'seed={DEMO_DATA_SEED}' in marker.read_text()


def test_schedulers_get_the_run_length_and_multi_step_takes_a_list(tiny_settings):
    _, _, _, scheduler = main.get_items(tiny_settings.replace(LR_SCHEDULER='cosine',
                                                              MAX_EPOCH=7))
    assert scheduler.T_max == 7
    with pytest.raises(UserError, match="'multi_step' drops the learning rate at a list"):
        main.train(tiny_settings.replace(LR_SCHEDULER='multi_step'))
    with pytest.raises(UserError, match="'single_step' drops the learning rate every"):
        main.train(tiny_settings.replace(STEPSIZE=[2, 4]))
    _, _, _, scheduler = main.get_items(tiny_settings.replace(LR_SCHEDULER='multi_step',
                                                              STEPSIZE=[2, 4]))
    assert sorted(scheduler.milestones) == [2, 4]


@pytest.mark.parametrize('seed', [-1, 2 ** 32])
def test_a_seed_numpy_cannot_take_is_named(tiny_settings, seed):
    with pytest.raises(UserError, match=f'SEED={seed} must be between 0 and'):
        main.train(tiny_settings.replace(SEED=seed))


def test_a_tilde_path_means_the_home_folder_everywhere(monkeypatch, tmp_path):
    monkeypatch.setenv('HOME', str(tmp_path))
    s = main.load_settings({'EXPERIMENTS_DIR': '~/exp'})
    assert s.EXPERIMENTS_DIR == str(tmp_path / 'exp')


@pytest.mark.slow
def test_resuming_an_earlier_checkpoint_branches_into_a_new_run(tiny_settings, capsys):
    # every numbered checkpoint keeps its optimiser state to resume from
    s = tiny_settings.replace(MAX_EPOCH=3, EVAL_FREQ=1, KEEP_OPTIMIZER=3)
    run_dir = main.train(s)
    later = {p.name: p.read_bytes() for p in (run_dir / 'model').iterdir()}
    branch = main.train(s.replace(RESUME=str(run_dir / 'model' / 'model.pth.tar-1'),
                                  MAX_EPOCH=2))
    assert branch != run_dir and newest_checkpoint(branch).name == 'model.pth.tar-2'
    assert 'continues in a new one' in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (run_dir / 'model').iterdir()} == later


@pytest.mark.slow
def test_a_dataparallel_checkpoint_resumes_and_an_equivalent_list_is_no_change(tiny_settings,
                                                                              capsys):
    run_dir = main.train(tiny_settings.replace(MAX_EPOCH=1, EVAL_FREQ=-1))
    saved = load_checkpoint(newest_checkpoint(run_dir))
    names = set(saved['state_dict'])
    saved['state_dict'] = {f'module.{k}': v for k, v in saved['state_dict'].items()}
    kept = save_checkpoint(saved, Path(tiny_settings.EXPERIMENTS_DIR).parent / 'dp' / 'model'
                           / 'model.pth.tar-1')
    capsys.readouterr()
    resumed = main.train(tiny_settings.replace(RESUME=str(kept), MAX_EPOCH=2, EVAL_FREQ=-1,
                                               SOURCES=['market1501']))
    assert f'Resuming from "{kept}" after epoch 1' in capsys.readouterr().out
    continued = load_checkpoint(newest_checkpoint(resumed))
    assert newest_checkpoint(resumed).name == 'model.pth.tar-2' and continued['epoch'] == 2
    assert set(continued['state_dict']) == names              # saved without 'module.'


@pytest.mark.slow
def test_search_skips_its_own_outputs_and_takes_names_that_are_not_utf8(tiny_settings, tmp_path):
    run_dir = main.train(tiny_settings.replace(MAX_EPOCH=1, EVAL_FREQ=-1))
    gallery = tmp_path / 'gallery'
    source = Path(tiny_settings.DATA_ROOT) / 'market1501/Market-1501-v15.09.15/bounding_box_test'
    shutil.copytree(source, gallery)
    odd = os.fsdecode(b'caf\xe9.jpg')                      # Latin-1 bytes, as in old zips
    shutil.copy(next(gallery.glob('0*.jpg')), gallery / odd)
    query = next(gallery.glob('0*.jpg'))
    s = tiny_settings.replace(QUERY=str(gallery / odd), GALLERY=str(gallery),
                              WEIGHTS=str(newest_checkpoint(run_dir)),
                              EXPERIMENTS_DIR=str(gallery / 'experiments'))
    first = main.search(s)
    second = main.search(s.replace(QUERY=str(query)))
    rows = (second / query.name / 'results.csv').read_bytes()
    assert b'experiments' not in rows and b'strip.jpg' not in rows
    # every gallery image but the query's own file (never its own match)
    assert rows.count(b'\n') - 1 == len(list(gallery.glob('*.jpg'))) - 1
    assert first != second
