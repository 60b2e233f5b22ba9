"""Issue 22: a Torchreid model-zoo checkpoint (a bare state_dict, keys prefixed 'module.')
tested on one's own cameras gives the numbers it gives on the same images laid out as
Market-1501, and a folder with only query/ and gallery/ needs no SOURCES dataset."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torchreid

import main
from conftest import ROOT, TINY
from reidkit.data.market import market_data_dir

ZOO_CLASSES = 11        # the zoo model's identities: none of the test data's


def _zoo_file(path: Path) -> Path:
    """What Torchreid's model zoo serves: the state_dict alone, saved from DataParallel."""
    torch.manual_seed(5)
    model = torchreid.models.build_model('resnet18', num_classes=ZOO_CLASSES, pretrained=False)
    with torch.no_grad():           # BN statistics of a trained model, not 0 and 1
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    torch.save({f'module.{k}': v for k, v in model.state_dict().items()}, path)
    return path


def _as_identity_folders(market_dir: Path, root: Path) -> Path:
    """The test images of a Market-1501 folder as query|gallery/<pid>/<camera>/<image>, but
    junk (pid -1, which Market-1501 drops; a folder named -1 is a person). Its distractors
    (0000) become a person without queries: a distractor still."""
    for split, market in (('query', 'query'), ('gallery', 'bounding_box_test')):
        for image in (market_dir / market).glob('*.jpg'):
            pid, camera = image.name.split('_')[:2]
            if pid == '-1':
                continue
            target = root / split / pid / camera[:2] / image.name.replace('_', '-')
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
    return root


def _metrics(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / 'metrics.json').read_text())


def test_a_zoo_checkpoint_gives_the_same_numbers_on_own_folders_without_sources(
        tiny_data_root, tmp_path, capsys):
    zoo = _zoo_file(tmp_path / 'zoo.pth')
    cameras = _as_identity_folders(market_data_dir(tiny_data_root), tmp_path / 'my-cameras')
    assert not (cameras / 'train').exists()
    common = dict(TINY, MODEL_NAME='resnet18', DEVICE='cpu', WEIGHTS=str(zoo),
                  EXPERIMENTS_DIR=str(tmp_path / 'experiments'))
    market = _metrics(main.test(main.load_settings(dict(
        common, DATA_ROOT=str(tiny_data_root), TARGETS='market1501'))))
    # the same checkpoint, read as a model sized to its own classifier: nothing skipped
    assert 'classifier was trained on other identities' not in capsys.readouterr().out
    # SOURCES (config's market1501) present under DATA_ROOT, then absent
    own = [_metrics(main.test(main.load_settings(dict(
        common, DATA_ROOT=str(data_root), TARGETS=str(cameras)))))
        for data_root in (tiny_data_root, tmp_path / 'no-data')]
    assert not (tmp_path / 'no-data').exists()
    assert market['num_query'] == own[0]['num_query'] > 0
    assert market['num_gallery'] == own[0]['num_gallery'] > 0
    for result in own:
        assert abs(result['mAP'] - market['mAP']) < 1e-6, (result['mAP'], market['mAP'])
        assert len(result['cmc']) == len(market['cmc'])
        assert max(abs(a - b) for a, b in zip(result['cmc'], market['cmc'])) < 1e-6
    assert 0 < market['mAP'] < 1        # a real ranking, not a degenerate one


def test_the_command_line_tests_a_zoo_file_on_a_query_gallery_folder_alone(tmp_path,
                                                                          tiny_data_root):
    _zoo_file(tmp_path / 'zoo.pth')
    _as_identity_folders(market_data_dir(tiny_data_root), tmp_path / 'my-cameras')
    flags = [f'--{key}={value}' for key, value in TINY.items()]
    run = subprocess.run(
        [sys.executable, str(ROOT / 'main.py'), 'test', '--WEIGHTS=zoo.pth',
         '--TARGETS=./my-cameras', '--MODEL_NAME=resnet18', '--DEVICE=cpu',
         '--DATA_ROOT=./nothing-here', '--EXPERIMENTS_DIR=./experiments', *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = list((tmp_path / 'experiments').glob('*/metrics.json'))
    assert len(written) == 1
    metrics = json.loads(written[0].read_text())
    assert metrics['own_data'][0]['path'] == str(tmp_path / 'my-cameras')
    assert metrics['own_data'][0]['train_ids'] == 0 and 0 < metrics['mAP'] <= 1
