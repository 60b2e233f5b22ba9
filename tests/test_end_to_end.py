"""train -> checkpoint -> test -> visrank on tiny generated data: the real pipeline."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import main
from reidkit.run.checkpoints import load_checkpoint
from reidkit.run.folders import newest_checkpoint

pytestmark = pytest.mark.slow   # every test here trains or runs main.py

ROOT = Path(__file__).resolve().parents[1]


def _printed_metrics(text):
    """The last 'mAP' and 'Rank-k' lines Torchreid printed."""
    found = re.findall(r'^(mAP|Rank-\d+)\s*: ([\d.]+)%', text, flags=re.M)
    return dict(found[-5:])


def test_train_test_visrank(tiny_settings, capsys):
    run_dir = main.train(tiny_settings)
    trained = capsys.readouterr().out
    checkpoint = newest_checkpoint(run_dir)
    assert checkpoint == run_dir / 'model' / 'model.pth.tar-1'
    saved = load_checkpoint(checkpoint)                      # safe loading, torch >= 2.6
    assert saved['epoch'] == 1 and isinstance(saved['rank1'], float)
    assert (run_dir / 'log.txt').read_text().count('Rank-1') >= 1
    assert list(run_dir.glob('events.out.tfevents.*'))       # TensorBoard events

    test_dir = main.test(tiny_settings)                      # default: newest run's checkpoint
    tested = capsys.readouterr().out
    assert test_dir.parent == run_dir
    assert _printed_metrics(tested) == _printed_metrics(trained) != {}
    train_metrics = json.loads((run_dir / 'metrics.json').read_text())
    test_metrics = json.loads((test_dir / 'metrics.json').read_text())
    for key in ('rank1', 'rank5', 'rank10', 'rank20', 'mAP'):
        assert test_metrics[key] == train_metrics[key]
    assert test_metrics['epoch'] == 1 and test_metrics['checkpoint'] == str(checkpoint)

    vis_dir = main.vis_rank(tiny_settings)
    strips = sorted((vis_dir / 'visrank_market1501').glob('*.jpg'))
    queries = sorted((Path(tiny_settings.DATA_ROOT) / 'market1501' / 'Market-1501-v15.09.15'
                      / 'query').glob('*.jpg'))
    assert [p.name for p in strips] == [p.name for p in queries]
    from PIL import Image

    from reidkit.evaluate import visrank
    k = tiny_settings.VISRANK_TOPK                         # query + top-3 side by side
    with Image.open(strips[0]) as strip:
        assert strip.size == (visrank.THUMB_WIDTH + visrank.QUERY_GAP
                              + k * (visrank.THUMB_WIDTH + visrank.GAP),
                              visrank.THUMB_HEIGHT + visrank.CAPTION_HEIGHT)
    assert test_dir != vis_dir and vis_dir.parent == run_dir


def test_a_second_run_never_overwrites_the_first(tiny_settings):
    first = main.train(tiny_settings.replace(EVAL_FREQ=-1))
    second = main.train(tiny_settings.replace(EVAL_FREQ=-1))
    assert first != second and newest_checkpoint(first).is_file()


def test_the_command_line_runs_the_pipeline(tiny_data_root, tmp_path):
    args = [f'--{k}={v!r}' for k, v in dict(
        __import__('conftest').TINY, DATA_ROOT=str(tiny_data_root),
        EXPERIMENTS_DIR=str(tmp_path)).items()]
    done = subprocess.run([sys.executable, 'main.py', 'train', 'test', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'Cython evaluation' not in done.stderr + done.stdout
    assert 'Training run:' in done.stdout and 'Test results:' in done.stdout
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (run / 'model' / 'model.pth.tar-1').is_file()


def test_the_default_checkpoint_is_the_latest_trained_run(tmp_path):
    import os
    from reidkit.run.folders import latest_run_checkpoint
    older, newer = tmp_path / '20260101-000000-a', tmp_path / '20260102-000000-b'
    for run, stamp in ((older, 1_000), (newer, 2_000)):
        for epoch in (5, 10):
            path = run / 'model' / f'model.pth.tar-{epoch}'
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b'')
            os.utime(path, (stamp + epoch, stamp + epoch))
    (older / '20260103-000000-test').mkdir()       # testing the older run later ...
    assert latest_run_checkpoint(tmp_path) == newer / 'model' / 'model.pth.tar-10'
