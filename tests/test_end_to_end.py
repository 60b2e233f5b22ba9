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

ROOT = Path(__file__).resolve().parents[1]


def _printed_metrics(text):
    """The last 'mAP' and 'Rank-k' lines Torchreid printed, as {'mAP': '12.3', ...}."""
    found = re.findall(r'^(mAP|Rank-\d+)\s*: ([\d.]+)%', text, flags=re.M)
    return dict(found[-5:])


def check_metrics(metrics, printed=None):
    """metrics.json's numbers are fractions in [0, 1], consistent with each other and (given
    `printed`, from _printed_metrics) with the percentages printed."""
    cmc = metrics['cmc']
    assert all(0 <= v <= 1 for v in cmc) and cmc == sorted(cmc) and 0 <= metrics['mAP'] <= 1
    assert [metrics[f'rank{r}'] for r in (1, 5, 10, 20)] == [cmc[0], cmc[4], cmc[9], cmc[19]]
    assert printed is None or printed == {
        'mAP': f'{metrics["mAP"]:.1%}'[:-1],
        **{f'Rank-{r}': f'{metrics[f"rank{r}"]:.1%}'[:-1] for r in (1, 5, 10, 20)}}


def _check_strip(path, k):
    """A rank strip: the query, then k tiles each holding a picture, white gaps between."""
    import numpy as np
    from PIL import Image

    from reidkit.evaluate import visrank
    thumb_w, thumb_h, gap = visrank.THUMB_WIDTH, visrank.THUMB_HEIGHT, visrank.GAP
    with Image.open(path) as image:
        assert image.size == (thumb_w + visrank.QUERY_GAP + k * (thumb_w + gap),
                              thumb_h + visrank.CAPTION_HEIGHT)
        pixels = np.asarray(image.convert('L')).astype(int)
    lefts = [0] + [thumb_w + visrank.QUERY_GAP + i * (thumb_w + gap) for i in range(k)]
    for left in lefts:                             # a picture (JPEG: white is 250+)
        assert (pixels[:thumb_h, left:left + thumb_w] < 240).mean() > 0.5, (path, left)
    for left in lefts[1:]:                         # white before each match
        assert (pixels[:thumb_h, left - gap + 1:left - 1] > 240).all(), (path, left)


@pytest.mark.slow   # trains
def test_train_test_visrank(tiny_settings, capsys):
    run_dir = main.train(tiny_settings)
    trained = capsys.readouterr().out
    checkpoint = newest_checkpoint(run_dir)
    assert checkpoint == run_dir / 'model' / 'model.pth.tar-1'
    train_metrics = json.loads((run_dir / 'metrics.json').read_text())
    check_metrics(train_metrics, _printed_metrics(trained))
    saved = load_checkpoint(checkpoint)                      # safe loading, torch >= 2.6
    assert saved['epoch'] == train_metrics['epoch'] == 1
    assert saved['rank1'] == train_metrics['rank1']
    assert saved['settings']['HEIGHT'] == tiny_settings.HEIGHT
    log = (run_dir / 'log.txt').read_text()                 # what was printed, kept
    assert [line for line in trained.splitlines() if re.match(r'(mAP|Rank-\d+)\s*:', line)] \
        == [line for line in log.splitlines() if re.match(r'(mAP|Rank-\d+)\s*:', line)] != []
    assert f'Run folder: {run_dir}' in log
    assert list(run_dir.glob('events.out.tfevents.*'))       # TensorBoard events

    test_dir = main.test(tiny_settings)                      # default: newest run's checkpoint
    tested = capsys.readouterr().out
    assert test_dir.parent == run_dir
    assert _printed_metrics(tested) == _printed_metrics(trained) != {}
    test_metrics = json.loads((test_dir / 'metrics.json').read_text())
    check_metrics(test_metrics, _printed_metrics(tested))
    for key in ('rank1', 'rank5', 'rank10', 'rank20', 'mAP', 'cmc'):
        assert test_metrics[key] == train_metrics[key]
    assert test_metrics['epoch'] == 1 and test_metrics['checkpoint'] == str(checkpoint)
    assert f'Loaded weights from "{checkpoint}" (epoch 1)' in (test_dir / 'log.txt').read_text()

    vis_dir = main.vis_rank(tiny_settings)
    strips = sorted((vis_dir / 'visrank_market1501').glob('*.jpg'))
    queries = sorted((Path(tiny_settings.DATA_ROOT) / 'market1501' / 'Market-1501-v15.09.15'
                      / 'query').glob('*.jpg'))
    assert [p.name for p in strips] == [p.name for p in queries]
    for strip in strips:                                     # query + top-3 side by side
        _check_strip(strip, tiny_settings.VISRANK_TOPK)
    vis_metrics = json.loads((vis_dir / 'metrics.json').read_text())
    assert vis_metrics['rank1'] == train_metrics['rank1'] and vis_metrics['mode'] == 'visrank'
    assert test_dir != vis_dir and vis_dir.parent == run_dir


def _contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob('*') if p.is_file()}


@pytest.mark.slow   # trains
def test_a_second_run_never_overwrites_the_first(tiny_settings):
    first = main.train(tiny_settings.replace(EVAL_FREQ=-1))
    before = _contents(first)
    second = main.train(tiny_settings.replace(EVAL_FREQ=-1))
    assert first != second and first.parent == second.parent
    assert _contents(first) == before                        # not a byte changed
    assert {p.name for p in (second / 'model').iterdir()} >= {'model.pth.tar-1'}
    assert load_checkpoint(newest_checkpoint(second))['epoch'] == 1


@pytest.mark.slow   # trains
def test_the_command_line_runs_the_pipeline(tiny_data_root, tmp_path):
    args = [f'--{k}={v!r}' for k, v in dict(
        __import__('conftest').TINY, DATA_ROOT=str(tiny_data_root),
        EXPERIMENTS_DIR=str(tmp_path)).items()]
    done = subprocess.run([sys.executable, 'main.py', 'train', 'test', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'Cython evaluation' not in done.stderr + done.stdout
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert re.search(r'^Training run: (.*)$', done.stdout, re.M).group(1) == str(run)
    tested = Path(re.search(r'^Test results: (.*)$', done.stdout, re.M).group(1))
    assert tested.parent == run
    # the test step printed its numbers last; they are the ones in its metrics.json
    check_metrics(json.loads((tested / 'metrics.json').read_text()),
                   _printed_metrics(done.stdout))
    saved = load_checkpoint(run / 'model' / 'model.pth.tar-1')
    assert saved['epoch'] == 1
    assert {k: saved['settings'][k] for k in ('HEIGHT', 'WIDTH', 'MAX_EPOCH')} == \
        {'HEIGHT': 32, 'WIDTH': 16, 'MAX_EPOCH': 1}              # the flags given
    assert json.loads((run / 'settings.json').read_text())['BATCH_SIZE_TRAIN'] == 16


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
