"""Which model a command uses when WEIGHTS is empty: the newest run's, announced as the default;
with --demo, the newest demo run's (issue #32)."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import main
from reidkit.run.checkpoints import save_checkpoint
from reidkit.run.folders import latest_run_checkpoint, resolve_checkpoint


def _run(experiments: Path, name: str, data_root: Path, stamp: int) -> Path:
    """A run folder with settings.json (its DATA_ROOT) and one small checkpoint written at
    `stamp` (seconds)."""
    run = experiments / name
    run.mkdir(parents=True)
    settings = main.load_settings(dict(DATA_ROOT=str(data_root))).record()
    (run / 'settings.json').write_text(json.dumps(settings))
    path = save_checkpoint({'state_dict': {'weight': torch.zeros(2)}, 'epoch': 1,
                            'settings': settings}, run / 'model' / 'model.pth.tar-1')
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def two_runs(tmp_path):
    """An older demo run and a newer run on other data, as after fine-tuning on one's own."""
    experiments = tmp_path / 'experiments'
    demo = _run(experiments, '20260101-000000-demo', tmp_path / 'demo-data', 1_000)
    other = _run(experiments, '20260102-000000-own', tmp_path / 'reid-data', 2_000)
    return experiments, demo, other


def test_a_data_root_picks_the_newest_run_on_it(two_runs, tmp_path):
    experiments, demo, other = two_runs
    assert latest_run_checkpoint(experiments) == other
    assert latest_run_checkpoint(experiments, tmp_path / 'demo-data') == demo


def test_the_default_weights_are_announced(two_runs, capsys):
    experiments, demo, other = two_runs
    s = main.load_settings(dict(EXPERIMENTS_DIR=str(experiments)))
    assert resolve_checkpoint(s)[0] == other
    assert f'Model (newest run; set WEIGHTS to choose): {other}' in capsys.readouterr().out
    resolve_checkpoint(s.replace(WEIGHTS=str(demo)))     # chosen: nothing to announce
    assert 'newest run' not in capsys.readouterr().out


def _demo_command(mode, experiments, data_root, monkeypatch):
    """main.main([mode, '--demo']) with the demo data and the mode stubbed: the weights the
    mode was given, and the exit status."""
    given = {}
    monkeypatch.setattr(main, 'make_demo_dataset', lambda root, seed: SimpleNamespace(
        train_ids=0, train_images=0, query_images=0, gallery_images=0, data_dir=root))
    monkeypatch.setattr(main, mode, lambda s, weights: given.setdefault('weights', weights))
    monkeypatch.setattr(main.searching, 'search_inputs', lambda s: None)   # no demo data made
    inputs = [f'--QUERY={data_root}', f'--GALLERY={data_root}'] if mode == 'search' else []
    status = main.main([mode, '--demo', f'--EXPERIMENTS_DIR={experiments}',
                        f'--DATA_ROOT={data_root}'] + inputs)
    return given.get('weights'), status


@pytest.mark.parametrize('mode', ['search', 'export', 'test'])
def test_demo_uses_the_newest_demo_run(two_runs, tmp_path, monkeypatch, capsys, mode):
    experiments, demo, other = two_runs
    weights, status = _demo_command(mode, experiments, tmp_path / 'demo-data', monkeypatch)
    assert status == 0 and weights == demo
    assert f'Model (newest demo run; set WEIGHTS to choose): {demo}' in capsys.readouterr().out


def test_demo_without_a_demo_run_says_so_before_making_data(two_runs, tmp_path, monkeypatch,
                                                            capsys):
    experiments, demo, other = two_runs
    weights, status = _demo_command('export', experiments, tmp_path / 'elsewhere', monkeypatch)
    assert status == 2 and weights is None
    printed = capsys.readouterr()
    assert 'no demo run' in printed.err and 'python main.py --demo' in printed.err
    assert 'Demo dataset' not in printed.out
