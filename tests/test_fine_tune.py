"""Fine-tuning (INIT_WEIGHTS, FIXBASE_EPOCH, OPEN_LAYERS): a new run from any checkpoint, its
classifier dropped, the backbone frozen for the first epochs on every training path."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchreid

import main
from reidkit.data.demo import make_identity_folders
from reidkit.run.checkpoints import classifier_keys, load_checkpoint
from reidkit.run.errors import UserError
from reidkit.run.folders import newest_checkpoint
from reidkit.train.fine_tune import load_init_weights, read_init_weights

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / 'main.py')
# The smallest ResNet: fine-tuning does not depend on the architecture, and it trains faster.
MODEL = 'resnet18'


def built(model_name: str = MODEL, num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchreid.models.build_model(model_name, num_classes=num_classes, pretrained=False)


def zoo_file(path: Path, model: torch.nn.Module, **fields) -> Path:
    """`model` saved as Torchreid's model zoo and scripts do: its state_dict under
    nn.DataParallel's 'module.' prefix, bare (no `fields`) or inside a dict with them."""
    weights = {f'module.{key}': value for key, value in model.state_dict().items()}
    torch.save({'state_dict': weights, **fields} if fields else weights, path)
    return path


def classifier_and_backbone(state: dict) -> tuple[dict, dict]:
    classifier = classifier_keys(MODEL)
    return ({k: v for k, v in state.items() if k in classifier},
            {k: v for k, v in state.items() if k not in classifier})


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# --- loading: zoo files, Torchreid's checkpoints, another architecture ----------------------

@pytest.mark.parametrize('fields', [{}, {'epoch': 60, 'rank1': np.float64(0.9)}],
                         ids=['bare state_dict', "Torchreid's checkpoint"])
def test_a_zoo_file_loads_all_but_its_classifier_and_says_how_many(tmp_path, capsys, fields):
    trained = built(seed=1)
    path = zoo_file(tmp_path / 'zoo.pth', trained, **fields)
    s = main.load_settings({'MODEL_NAME': MODEL, 'INIT_WEIGHTS': str(path), 'HEIGHT': 64,
                            'WIDTH': 32})
    s, saved, notes = read_init_weights(s)
    assert s.INIT_WEIGHTS == str(path.resolve()) and s.PRETRAINED is False and not notes
    model = built(seed=2)       # as many identities as the file's classifier: dropped anyway
    own_classifier, _ = classifier_and_backbone(
        {k: v.clone() for k, v in model.state_dict().items()})
    file_classifier, file_backbone = classifier_and_backbone(trained.state_dict())
    assert load_init_weights(model, saved, MODEL, path) == (len(file_backbone),
                                                            len(file_classifier))
    classifier, backbone = classifier_and_backbone(model.state_dict())
    assert same(backbone, file_backbone)
    assert same(classifier, own_classifier) and not same(classifier, file_classifier)
    out = capsys.readouterr().out
    assert (f'INIT_WEIGHTS: {len(file_backbone)} tensors loaded from "{path}"'
            + (' (epoch 60)' if fields else '')
            + f', {len(file_classifier)} skipped (the classifier') in out


def test_another_architecture_is_the_clear_error(tmp_path):
    path = zoo_file(tmp_path / 'resnet18.pth', built())
    s, saved, _ = read_init_weights(main.load_settings({'INIT_WEIGHTS': str(path)}))
    with pytest.raises(UserError, match=r'INIT_WEIGHTS: ".*resnet18.pth" was saved from another '
                                        r'architecture, which does not match '
                                        r"MODEL_NAME='resnet50'.*Set MODEL_NAME"):
        load_init_weights(built('resnet50'), saved, 'resnet50', path)


def test_a_checkpoint_of_another_input_size_is_a_note(tmp_path):
    path = zoo_file(tmp_path / 'ours.pth', built(), input_size=[256, 128])
    notes = read_init_weights(main.load_settings({'INIT_WEIGHTS': str(path), 'HEIGHT': 64,
                                                  'WIDTH': 32})).notes
    assert notes == ['INIT_WEIGHTS was trained on 256x128 images and this run trains on 64x32 '
                     '(HEIGHT x WIDTH): its features adapt to the new size as it trains']


# --- settings checked before any work -------------------------------------------------------

def errors_of(tmp_path, capsys, *flags) -> str:
    """stderr of `main.py train FLAGS`, which must stop with exit status 2 before any work."""
    experiments = tmp_path / 'experiments'
    assert main.main(['train', f'--EXPERIMENTS_DIR={experiments}', '--DATA_ROOT=/nonexistent',
                      *flags]) == 2
    assert not experiments.exists()         # stopped before the data checks and the run folder
    return capsys.readouterr().err


def test_init_weights_and_resume_together_are_an_error(tmp_path, capsys):
    err = errors_of(tmp_path, capsys, f'--INIT_WEIGHTS={tmp_path}/a.pth',
                    f'--RESUME={tmp_path}/b.pth')
    assert err.startswith('error: INIT_WEIGHTS=') and 'given together' in err
    assert 'Drop one of the two flags' in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('flags,expected', [
    (["--OPEN_LAYERS=['classifer']"], "resnet50 has no layer named 'classifer' (did you mean "
                                       "'classifier'?)"),
    (['--OPEN_LAYERS=[]'], 'no layer is named, so nothing would train'),
    (["--OPEN_LAYERS=['global_avgpool']"], "'global_avgpool' has no weights, so nothing would "
                                           "train"),
    (['--MODEL_NAME=hacnn'], "hacnn has no layer named 'classifier' (did you mean "
                             "'classifier_local'?)"),
])
def test_open_layers_that_name_no_layer_are_one_paragraph(tmp_path, capsys, flags, expected):
    err = errors_of(tmp_path, capsys, '--FIXBASE_EPOCH=2', *flags)
    assert err.startswith('error: OPEN_LAYERS=') and expected in err
    assert "layers are: " in err and len(err.strip().splitlines()) == 1
    assert ('''--OPEN_LAYERS="['classifier_global', 'classifier_local']" (its classifier)'''
            if 'hacnn' in flags[0] else '''--OPEN_LAYERS="['classifier']" (its''') in err


def test_a_negative_fixbase_epoch_is_an_error(tmp_path, capsys):
    assert 'FIXBASE_EPOCH=-1 must be 0' in errors_of(tmp_path, capsys, '--FIXBASE_EPOCH=-1')


@pytest.mark.parametrize('value', [float('nan'), float('inf')], ids=['nan', 'inf'])
@pytest.mark.parametrize('mode, setting', [('train', 'INIT_WEIGHTS'), ('train', 'RESUME'),
                                           ('test', 'WEIGHTS')])
def test_a_checkpoint_with_nan_or_infinite_weights_is_refused_before_any_work(
        tmp_path, capsys, mode, setting, value):
    model = built()
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = value     # as a run that diverged saves it
    path = zoo_file(tmp_path / 'diverged.pth', model, epoch=3)
    experiments = tmp_path / 'experiments'
    assert main.main([mode, f'--{setting}={path}', f'--MODEL_NAME={MODEL}',
                      f'--EXPERIMENTS_DIR={experiments}', '--DATA_ROOT=/nonexistent']) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {setting}: "{path}" holds NaN or infinite values (first: '
                          f"'module.layer2.0.conv1.weight')"), err
    assert 'LR' not in err and len(err.strip().splitlines()) == 1
    assert not experiments.exists()         # before the data checks and the run folder


# --- freezing, on every training path -------------------------------------------------------

PATHS = {'our step': dict(CHANNELS_LAST='off', COMPILE='off'),
         'our step, channels_last': dict(CHANNELS_LAST='on', COMPILE='off'),
         'our step, compiled': dict(CHANNELS_LAST='on', COMPILE='on')}


@pytest.mark.parametrize('path', list(PATHS))
def test_fixbase_epochs_train_the_open_layers_only(tiny_settings, monkeypatch, path):
    if 'compiled' in path:      # dynamo's guards and graphs, without a C++ compiler
        monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile,
                                                                backend='aot_eager'))
    s = tiny_settings.replace(MODEL_NAME=MODEL, **PATHS[path])
    datamanager, model, optimizer, scheduler = main.get_items(s)
    engine = main.build_engine(s, datamanager, model, optimizer, scheduler)
    assert engine.train_step is not None
    assert (engine.model is model) == (s.CHANNELS_LAST == 'off')   # else the fast path wraps it
    start = {key: value.clone() for key, value in model.state_dict().items()}
    engine.max_epoch = 2
    for engine.epoch in range(2):
        engine.train(print_freq=1000, fixbase_epoch=1, open_layers=['classifier'])
        classifier, backbone = classifier_and_backbone(model.state_dict())
        before_classifier, before_backbone = classifier_and_backbone(start)
        assert not same(classifier, before_classifier)
        # The frozen layers: weights, and BatchNorm statistics (eval mode), unchanged.
        assert same(backbone, before_backbone) == (engine.epoch == 0)
        if 'compiled' in path:
            assert engine.train_step.compiled and engine.train_step.compile_error is None


# --- whole runs -----------------------------------------------------------------------------

def rank1_of(run: Path) -> float:
    return json.loads((run / 'metrics.json').read_text())['rank1']


# The demo's recipe at 64x32 (config.DEMO), with the small model.
RECIPE = dict(HEIGHT=64, WIDTH=32, BATCH_SIZE_TRAIN=16, BATCH_SIZE_TEST=64, WORKERS=0,
              PRETRAINED=False, MODEL_NAME=MODEL, LR=0.001, EVAL_FREQ=-1, PRINT_FREQ=1000,
              TRANSFORMS=['random_flip', 'random_crop', 'color_jitter'])


@pytest.fixture(scope='module')
def demo_checkpoint(tiny_data_root, module_tmp_path) -> Path:
    """A model trained a few epochs on the tiny demo data (Market-1501's layout)."""
    s = main.load_settings(dict(RECIPE, DATA_ROOT=str(tiny_data_root), MAX_EPOCH=3,
                                EXPERIMENTS_DIR=str(module_tmp_path / 'demo')))
    return newest_checkpoint(main.train(s))


@pytest.fixture(scope='module')
def other_people(module_tmp_path) -> dict:
    """Other identities seen by other cameras, as one's own data: 16 people to train on, 16
    to test on."""
    folder = make_identity_folders(module_tmp_path / 'other-people', num_ids=32, seed=5)
    return dict(SOURCES=str(folder), TARGETS=str(folder))


@pytest.fixture(scope='module')
def zero_shot_rank1(demo_checkpoint, other_people, module_tmp_path) -> float:
    """The demo model's Rank-1 on the other people's test split, before any fine-tuning."""
    s = main.load_settings(dict(other_people, BATCH_SIZE_TEST=64, WORKERS=0,
                                EXPERIMENTS_DIR=str(module_tmp_path / 'zero-shot')))
    return rank1_of(main.test(s, weights=demo_checkpoint))


@pytest.mark.slow
@pytest.mark.parametrize('fixbase', [0, 1])
def test_fine_tuning_on_other_people_beats_the_zero_shot_model(
        demo_checkpoint, other_people, zero_shot_rank1, tmp_path, fixbase, capsys):
    s = main.load_settings(dict(RECIPE, **other_people, MAX_EPOCH=4, FIXBASE_EPOCH=fixbase,
                                INIT_WEIGHTS=str(demo_checkpoint),
                                EXPERIMENTS_DIR=str(tmp_path / 'experiments')))
    run = main.train(s)
    fine_tuned = rank1_of(run)
    with capsys.disabled():         # the numbers, for whoever runs the test
        print(f'\nRank-1 on other people: zero-shot {zero_shot_rank1:.1%}, fine-tuned '
              f'(FIXBASE_EPOCH={fixbase}) {fine_tuned:.1%}')
    assert fine_tuned > zero_shot_rank1
    log = (run / 'log.txt').read_text()
    demo_classifier, demo_backbone = classifier_and_backbone(
        load_checkpoint(demo_checkpoint)['state_dict'])
    assert (f'INIT_WEIGHTS: {len(demo_backbone)} tensors loaded from "{demo_checkpoint}" '
            f'(epoch 3), {len(demo_classifier)} skipped') in log
    assert ("* Only train ['classifier'] (epoch: 1/1)" in log) == (fixbase == 1)
    final = load_checkpoint(newest_checkpoint(run))
    for recorded in (json.loads((run / 'settings.json').read_text()), final['settings']):
        assert recorded['INIT_WEIGHTS'] == str(demo_checkpoint.resolve())
        assert recorded['PRETRAINED'] is False and recorded['FIXBASE_EPOCH'] == fixbase
    if fixbase == 0:
        # Resuming a fine-tuned run continues it: INIT_WEIGHTS comes back from its settings
        # and is not loaded again over the weights it reached.
        capsys.readouterr()
        resumed = main.train(main.load_settings(dict(
            RESUME=str(newest_checkpoint(run)), MAX_EPOCH=5, EXPERIMENTS_DIR=s.EXPERIMENTS_DIR)))
        out = capsys.readouterr().out
        assert resumed == run and 'Resuming from' in out and 'INIT_WEIGHTS:' not in out
        assert load_checkpoint(newest_checkpoint(run))['settings']['INIT_WEIGHTS'] == \
            str(demo_checkpoint.resolve())


def flags(**settings) -> list[str]:
    return [f'--{key}={value!r}' if not isinstance(value, (str, Path)) else f'--{key}={value}'
            for key, value in settings.items()]


@pytest.mark.slow
def test_ddp_fine_tune_with_fixbase_epoch_on_the_cpu(tiny_data_root, tmp_path):
    from conftest import TINY
    init = zoo_file(tmp_path / 'zoo.pth', built())
    experiments = tmp_path / 'experiments'
    done = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         MAIN, 'train', *flags(**dict(TINY, MODEL_NAME=MODEL, DATA_ROOT=tiny_data_root,
                                      EXPERIMENTS_DIR=experiments, MAX_EPOCH=2, EVAL_FREQ=-1,
                                      LATEST_EVERY=1, INIT_WEIGHTS=init, FIXBASE_EPOCH=1))],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert 'DDP: 2 processes on the CPU (gloo)' in done.stdout
    _, backbone = classifier_and_backbone(built().state_dict())
    assert done.stdout.count(f'INIT_WEIGHTS: {len(backbone)} tensors loaded') == 1   # rank 0's
    assert "* Only train ['classifier'] (epoch: 1/1)" in done.stdout
    (run,) = experiments.iterdir()
    assert json.loads((run / 'settings.json').read_text())['INIT_WEIGHTS'] == str(init)
    after_fixbase = load_checkpoint(run / 'model' / 'latest.pth.tar')
    assert after_fixbase['epoch'] == 1
    assert same(classifier_and_backbone(after_fixbase['state_dict'])[1], backbone)
    final = load_checkpoint(newest_checkpoint(run))
    assert final['epoch'] == 2 and not same(classifier_and_backbone(final['state_dict'])[1],
                                            backbone)
