"""Several TARGETS in one test or visrank (issue 27): metrics.json holds every target's scores
under its name (the first's at the top level too), one CMC plot and one gallery folder per
target, also for own-data folders that share a base name."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torchreid

import main
from conftest import TINY
from reidkit.data.market import market_data_dir
from reidkit.evaluate import report
from reidkit.evaluate.report import BestEffortWriter

SCORES = ('rank1', 'rank5', 'rank10', 'mAP', 'mINP', 'cmc')
COUNTS = ('num_query', 'num_gallery', 'num_query_ids', 'num_gallery_ids')


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """An untrained resnet18 at 32x16, as test and visrank load one."""
    torch.manual_seed(0)
    model = torchreid.models.build_model('resnet18', num_classes=8, pretrained=False)
    path = tmp_path / 'resnet18.pth'
    torch.save({'state_dict': model.state_dict(), 'model_name': 'resnet18', 'epoch': 3,
                'input_size': [32, 16]}, path)
    return path


def _crops(market_dir: Path, folder: Path, people) -> str:
    """Market's test images of `people` as query|gallery/<pid>/<camera>/<image> in `folder`."""
    for split, market in (('query', 'query'), ('gallery', 'bounding_box_test')):
        for image in sorted((market_dir / market).glob('*.jpg')):
            pid, camera = image.name.split('_')[:2]
            if int(pid) in people:
                target = folder / split / pid / camera[:2] / image.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(image, target)
    return str(folder)


@pytest.fixture
def two_sites(tiny_data_root, tmp_path):
    """Two own-data folders named crops (site-a/crops, site-b/crops), each with half the
    tiny dataset's test people."""
    market_dir = market_data_dir(tiny_data_root)
    people = sorted({int(p.name.split('_')[0]) for p in (market_dir / 'query').glob('*.jpg')})
    half = len(people) // 2
    return (_crops(market_dir, tmp_path / 'site-a' / 'crops', set(people[:half])),
            _crops(market_dir, tmp_path / 'site-b' / 'crops', set(people[half:])))


def _settings(tiny_data_root, tmp_path, checkpoint, targets):
    return main.load_settings(dict(TINY, MODEL_NAME='resnet18', DEVICE='cpu',
                                   DATA_ROOT=str(tiny_data_root), TARGETS=targets,
                                   WEIGHTS=str(checkpoint),
                                   EXPERIMENTS_DIR=str(tmp_path / 'experiments')))


def _metrics(out_dir: Path) -> dict:
    return json.loads((out_dir / 'metrics.json').read_text())


@pytest.mark.slow   # five tests of a checkpoint
def test_metrics_json_holds_every_targets_scores_and_the_first_at_the_top(
        tiny_data_root, tmp_path, checkpoint, two_sites):
    targets = ['market1501', *two_sites]
    out_dir = main.test(_settings(tiny_data_root, tmp_path, checkpoint, targets))
    metrics = _metrics(out_dir)
    assert [t['target'] for t in metrics['targets']] == \
        ['market1501', 'site-a_crops', 'site-b_crops']
    assert [t['dataset'] for t in metrics['targets']] == targets
    # each target's block holds the numbers a test of that target alone gives
    for block, target, name in zip(metrics['targets'], targets,
                                   ['market1501', 'crops', 'crops']):   # alone: no clash
        alone = _metrics(main.test(_settings(tiny_data_root, tmp_path, checkpoint, target)))
        assert alone['target'] == name and len(alone['targets']) == 1
        for key in SCORES + COUNTS:
            assert block[key] == alone[key], (target, key)
        assert block['num_query'] > 0 and block['num_query_ids'] > 1
    # the top level is the first target's, as a script written for one target reads it
    first = metrics['targets'][0]
    assert metrics['target'] == 'market1501'
    assert {key: metrics[key] for key in SCORES + COUNTS} == \
        {key: first[key] for key in SCORES + COUNTS}
    assert metrics['epoch'] == 3 and metrics['mode'] == 'test'
    assert sorted(p.name for p in out_dir.glob('cmc*.png')) == \
        ['cmc.png', 'cmc_site-a_crops.png', 'cmc_site-b_crops.png']


@pytest.mark.slow   # runs main.py's visrank
def test_visrank_gives_each_target_its_own_gallery_folder(tiny_data_root, tmp_path, checkpoint,
                                                          two_sites, capsys):
    argv = [f'--{key}={value!r}' for key, value in TINY.items()] + [
        '--MODEL_NAME=resnet18', '--DEVICE=cpu', f'--DATA_ROOT={tiny_data_root}',
        f'--WEIGHTS={checkpoint}', f'--EXPERIMENTS_DIR={tmp_path / "experiments"}',
        f'--TARGETS={list(two_sites)!r}']
    assert main.main(['visrank', *argv]) == 0
    printed = capsys.readouterr().out
    (out_dir,) = Path(tmp_path / 'experiments').glob('*-visrank')
    pages = [out_dir / f'visrank_site-{site}_crops' / 'index.html' for site in 'ab']
    assert re.findall(r'^Gallery page: (.*)$', printed, re.M) == [str(p.resolve()) for p in pages]
    for page, site in zip(pages, two_sites):
        rows = json.loads(re.search(r'application/json">(.*?)</script>', page.read_text(),
                                    re.S).group(1))
        queries = sorted(str(p) for p in (Path(site) / 'query').rglob('*.jpg'))
        strips = sorted(page.parent.glob('*.jpg'))
        assert len(rows) == len(strips) == len(queries) > 0       # its own queries, no others
        assert sorted(str((page.parent / row['path']).resolve()) for row in rows) == queries
    assert [t['target'] for t in _metrics(out_dir)['targets']] == ['site-a_crops',
                                                                  'site-b_crops']


def test_training_curves_name_each_target_also_a_folders_path(tmp_path, monkeypatch):
    """Torchreid tags evaluations Test/<TARGETS value>/<metric>; a path holds '/' too."""
    writer = BestEffortWriter(tmp_path)
    writer.add_scalar('Train/loss', 1.0, 0)
    for target in ('market1501', '/x/site-a/crops', '/x/site-b/crops'):
        writer.add_scalar(f'Test/{target}/rank1', 0.5, 0)
    writer.close()
    drawn = []
    monkeypatch.setattr(report, '_save_figure', lambda fig, path, what: drawn.append(fig))
    report.plot_training(tmp_path, iterations_per_epoch=1)
    legend = drawn[0].axes[3].get_legend()
    assert sorted(text.get_text() for text in legend.get_texts()) == \
        ['market1501 Rank-1', 'site-a_crops Rank-1', 'site-b_crops Rank-1']
