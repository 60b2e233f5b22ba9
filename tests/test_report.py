"""What a run leaves to look at: rank strips with text, the gallery page, plots, metrics.json."""
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from torchreid.reid.data.datasets.image.market1501 import Market1501

import main
from test_end_to_end import check_metrics

pytestmark = pytest.mark.slow   # every test here trains or runs main.py

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update',
                  '--disable-sync', '--window-size=1300,1400', '--virtual-time-budget=4000']


@pytest.fixture(scope='module')
def visrank_run(module_tmp_path, tiny_data_root):
    experiments = module_tmp_path / 'experiments'
    from conftest import TINY
    s = main.load_settings(dict(TINY, DATA_ROOT=str(tiny_data_root), EXPERIMENTS_DIR=str(experiments),
                                MAX_EPOCH=2, EVAL_FREQ=1))
    run_dir = main.train(s)
    return run_dir, main.vis_rank(s), s


def test_run_outputs_plots_and_metrics(visrank_run):
    run_dir, vis_dir, s = visrank_run
    from reidkit.evaluate.report import read_scalars
    scalars = read_scalars(run_dir)                # what training_curves.png is drawn from
    batches = len(list((Path(s.DATA_ROOT) / 'market1501/Market-1501-v15.09.15/'
                        'bounding_box_train').glob('*.jpg'))) // s.BATCH_SIZE_TRAIN
    # the epoch means at each epoch's end (PRINT_FREQ=1000 is longer than an epoch)
    assert [step for step, _ in scalars['Train/loss']] == [batches - 1, 2 * batches - 1]
    assert [step for step, _ in scalars['Test/market1501/rank1']] == [0, 1]   # epochs 1, 2
    for plot in (run_dir / 'training_curves.png', vis_dir / 'cmc.png'):
        with Image.open(plot) as image:            # drawn, not blank
            pixels = np.asarray(image.convert('L'))
            assert (pixels < 128).mean() > 0.01
    metrics = json.loads((vis_dir / 'metrics.json').read_text())
    queries = list((Path(s.DATA_ROOT) / 'market1501/Market-1501-v15.09.15/query').glob('*.jpg'))
    assert metrics['num_query'] == len(queries) and metrics['num_gallery'] > 0
    assert metrics['mode'] == 'visrank' and metrics['epoch'] == 2
    assert metrics['settings']['VISRANK_TOPK'] == 3 and metrics['seconds'] > 0
    gallery = Market1501(root=s.DATA_ROOT, verbose=False).gallery     # junk (-1) left out
    assert metrics['num_gallery'] == len(gallery)
    check_metrics(metrics)
    # visrank evaluated the run's last checkpoint: the numbers training ended with
    trained = json.loads((run_dir / 'metrics.json').read_text())
    assert trained['epoch'] == 2 and trained['mode'] == 'train'
    assert {k: trained[k] for k in ('rank1', 'mAP', 'cmc')} == \
        {k: metrics[k] for k in ('rank1', 'mAP', 'cmc')}
    assert metrics['checkpoint'] == str(run_dir / 'model' / 'model.pth.tar-2')


def test_gallery_page_holds_every_query_failures_first(visrank_run):
    _, vis_dir, s = visrank_run
    page = (vis_dir / 'visrank_market1501' / 'index.html').read_text()
    rows = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>',
                                page, re.S).group(1))
    strips = list((vis_dir / 'visrank_market1501').glob('*.jpg'))
    assert len(rows) == len(strips) > 0
    assert all(len(row['matches']) == s.VISRANK_TOPK for row in rows)
    for row in rows:                       # every image reference resolves from the page
        assert (vis_dir / 'visrank_market1501' / unquote(row['path'])).is_file()
        assert all((vis_dir / 'visrank_market1501' / unquote(m[0])).is_file()
                   for m in row['matches'])
        distances = [m[1] for m in row['matches']]
        assert distances == sorted(distances)
    assert 'http://' not in page and 'https://' not in page      # nothing from the network
    # each row's first true match is where its ids say; the page's numbers are metrics.json's
    for row in rows:
        same = [m[2] == row['pid'] for m in row['matches']]
        if 0 <= row['first'] < len(same):           # shown: the first green tile
            assert same.index(True) == row['first']
        else:                                       # further down, or none: no green tile
            assert True not in same
    kept = [row for row in rows if row['first'] >= 0]
    metrics = json.loads((vis_dir / 'metrics.json').read_text())
    assert np.isclose(np.mean([row['first'] == 0 for row in kept]), metrics['rank1'])
    assert np.isclose(np.mean([row['ap'] for row in kept]), metrics['mAP'], atol=1e-4)
    assert f'Rank-1 <b>{metrics["rank1"]:.1%}</b>' in page
    assert f'mAP <b>{metrics["mAP"]:.1%}</b>' in page


def test_each_strip_has_one_tile_per_match_framed_by_whether_it_is_the_same_person(visrank_run):
    _, vis_dir, s = visrank_run
    from reidkit.evaluate import visrank
    page = (vis_dir / 'visrank_market1501' / 'index.html').read_text()
    rows = json.loads(re.search(r'application/json">(.*?)</script>', page, re.S).group(1))
    green, red = visrank.GREEN[::-1], visrank.RED[::-1]               # BGR -> RGB
    for row in rows:
        with Image.open(vis_dir / 'visrank_market1501' / unquote(row['strip'])) as image:
            pixels = np.asarray(image.convert('RGB')).astype(int)
        assert pixels.shape[1] == visrank.THUMB_WIDTH + visrank.QUERY_GAP + \
            len(row['matches']) * (visrank.THUMB_WIDTH + visrank.GAP)
        for rank, match in enumerate(row['matches']):
            left = visrank.THUMB_WIDTH + visrank.QUERY_GAP + rank * (visrank.THUMB_WIDTH
                                                                     + visrank.GAP)
            frame = pixels[1:visrank.BORDER - 1, left + 8:left + visrank.THUMB_WIDTH - 8]
            expected = green if match[2] == row['pid'] else red
            assert np.abs(frame.mean(axis=(0, 1)) - expected).max() < 40, (row['strip'], rank)


@pytest.mark.skipif(CHROMIUM is None, reason='Chromium is not installed (Debian package '
                    '"chromium"; .ci/run installs it)')
def test_gallery_page_renders_in_a_browser(visrank_run, tmp_path):
    _, vis_dir, _ = visrank_run
    page = (vis_dir / 'visrank_market1501' / 'index.html').resolve()
    rows = json.loads(re.search(r'application/json">(.*?)</script>', page.read_text(),
                                re.S).group(1))
    common = [CHROMIUM, *CHROMIUM_FLAGS, f'--user-data-dir={tmp_path / "profile"}']
    dom = subprocess.run([*common, '--dump-dom', page.as_uri()], capture_output=True,
                         text=True, timeout=600).stdout
    body = re.search(r'<body([^>]*)>', dom).group(1)
    shown = int(re.search(r'data-rows="(\d+)"', body).group(1))
    loaded = int(re.search(r'data-loaded="(\d+)"', body).group(1))
    assert shown == min(50, len(rows)) == dom.count('class="row"')
    assert loaded >= shown                          # query thumbnails (and more) loaded
    assert re.search(r'mAP <b>\d+\.\d%</b> · mINP <b>\d+\.\d%</b> · Rank-1 <b>\d+\.\d%</b>', dom)
    screenshot = tmp_path / 'page.png'
    subprocess.run([*common, f'--screenshot={screenshot}', page.as_uri()], capture_output=True,
                   timeout=600)
    with Image.open(screenshot) as image:
        assert image.size == (1300, 1400)
        assert len(np.unique(np.asarray(image.convert('L')))) > 20          # not blank
