"""The one model builder (reidkit.run.model): Torchreid's own module with every trick off,
BNNeck (features before it in training, after it at test), last stride 1, what a model
cannot take (refused when set, left out with a note under RECIPE='strong'), and the paths
that use it: checkpoints, INIT_WEIGHTS, FIXBASE_EPOCH, the compiled training step."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchreid

import config
from reidkit.run.checkpoints import checkpoint_classes, load_weights, save_checkpoint
from reidkit.run.errors import UserError
from reidkit.run.model import PLAIN, NeckClassifier, build_model, fit_to_model, meta_model
from reidkit.run.settings import resolve
from reidkit.train.fine_tune import load_init_weights
from reidkit.train.step import Loss, TrainStep

# One model of each family that takes a neck (all tiny enough at 64x32 on a CPU).
FAMILIES = ['resnet18', 'osnet_x0_25', 'mobilenetv2_x1_0', 'densenet121', 'shufflenet',
            'se_resnet50']
NO_NECK = ['pcb_p4', 'pcb_p6', 'hacnn']


def settings(model_name: str, **changes) -> dict:
    return {**PLAIN, 'MODEL_NAME': model_name, **changes}


def built(model_name: str, num_classes: int = 5, seed: int = 0, **changes) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(settings(model_name, **changes), num_classes)


def images(n: int = 4, height: int = 64, width: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --- every trick off: Torchreid's own module ---------------------------------------------------

@pytest.mark.parametrize('loss', ['softmax', 'triplet'])
def test_with_every_trick_off_the_model_is_torchreids_own(loss):
    ours = built('resnet18', LOSS=loss)
    torch.manual_seed(0)
    theirs = torchreid.models.build_model('resnet18', num_classes=5, loss=loss, pretrained=False)
    assert type(ours) is type(theirs) and not ours._forward_hooks
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                 theirs.state_dict().values()))


def test_the_centre_loss_asks_for_features_under_softmax():
    """Torchreid's models return (logits, features) only when built with loss='triplet'."""
    plain = built('resnet18').train()
    centre = built('resnet18', CENTER_LOSS_WEIGHT=5e-4).train()
    assert isinstance(plain(images()), torch.Tensor)
    logits, features = centre(images())
    assert logits.shape == (4, 5) and features.shape == (4, 512)


# --- BNNeck ------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', FAMILIES)
def test_bnneck_features_before_it_in_training_and_after_it_at_test(name):
    model = built(name, NECK='bnneck', LOSS='triplet')
    head = model.classifier
    assert isinstance(head, NeckClassifier)
    assert head.linear.bias is None and not head.neck.bias.requires_grad
    assert head.neck.weight.requires_grad and head.linear.weight.requires_grad
    x = images()
    model.train()
    logits, features = model(x)
    # the classifier sees the features after the batch norm (batch statistics in training)
    after = F.batch_norm(features, None, None, head.neck.weight, head.neck.bias, training=True)
    torch.testing.assert_close(logits, head.linear(after), rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad():
        tested = model(x)
        pooled = model.forward(x)      # Torchreid's own forward, without our hook
        assert tested.shape == pooled.shape == (4, head.linear.in_features)
        torch.testing.assert_close(tested, head.neck(pooled))
    assert not torch.allclose(tested, pooled)


def test_bnneck_without_features_returns_logits_and_keeps_the_backbone_keys():
    model = built('osnet_x0_25', NECK='bnneck').train()
    assert model(images()).shape == (4, 5)
    plain = built('osnet_x0_25').state_dict()
    keys = model.state_dict().keys()
    assert {k for k in keys if not k.startswith('classifier.')} == \
        {k for k in plain if not k.startswith('classifier.')}
    assert {k for k in keys if k.startswith('classifier.')} == {
        'classifier.neck.weight', 'classifier.neck.bias', 'classifier.neck.running_mean',
        'classifier.neck.running_var', 'classifier.neck.num_batches_tracked',
        'classifier.linear.weight'}


@pytest.mark.parametrize('name', NO_NECK)
def test_models_without_one_linear_classifier_refuse_a_neck(name):
    with pytest.raises(UserError, match=f"NECK='bnneck'.*MODEL_NAME='{name}'.*NECK='none'"):
        build_model(settings(name, NECK='bnneck'), 5)
    with pytest.raises(UserError, match="NECK='bnneck'"):
        fit_to_model(resolve(config, {'MODEL_NAME': name, 'NECK': 'bnneck'}))


def test_all_but_three_of_torchreids_models_take_a_neck():
    from torchreid.reid.models import __model_factory
    refused = [name for name in __model_factory if meta_model(name, neck='bnneck') is None]
    assert sorted(refused) == sorted(NO_NECK)


# --- last stride 1 -----------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['resnet50', 'se_resnet50', 'resnet50_ibn_a'])
def test_last_stride_1_keeps_the_last_stage_at_16x8_for_256x128(name):
    x = images(1, 256, 128)
    with torch.no_grad():
        own = built(name).eval().featuremaps(x)
        kept = built(name, LAST_STRIDE=1).eval().featuremaps(x)
    assert own.shape[-2:] == (8, 4) and kept.shape[-2:] == (16, 8)
    assert own.shape[1] == kept.shape[1]


def test_last_stride_1_with_a_neck_and_weights_unchanged():
    model = built('resnet18', LAST_STRIDE=1, NECK='bnneck').eval()
    plain = built('resnet18', NECK='bnneck')
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 plain.state_dict().values()))
    assert model.featuremaps(images()).shape[-2:] == (4, 2)
    assert model(images()).shape == (4, 512)


@pytest.mark.parametrize('name', ['osnet_x0_25', 'mobilenetv2_x1_0', 'densenet121'])
def test_last_stride_1_is_refused_for_a_model_without_a_resnet_last_stage(name):
    with pytest.raises(UserError, match=f"LAST_STRIDE=1.*MODEL_NAME='{name}'.*'auto'"):
        build_model(settings(name, LAST_STRIDE=1), 5)
    with pytest.raises(UserError, match='LAST_STRIDE=1'):
        fit_to_model(resolve(config, {'MODEL_NAME': name, 'LAST_STRIDE': 1}))


# --- the strong recipe leaves out what a model cannot take, with one note each ------------------

def test_the_strong_recipe_leaves_out_what_the_model_cannot_take():
    s = resolve(config, {'RECIPE': 'strong', 'MODEL_NAME': 'osnet_x0_25'})
    fitted, notes = fit_to_model(s)
    assert (fitted.NECK, fitted.LAST_STRIDE) == ('bnneck', 'auto')
    assert notes == ["RECIPE='strong' leaves out LAST_STRIDE=1: osnet_x0_25 cannot take it "
                     "(LAST_STRIDE='auto' for this run)"]
    assert 'LAST_STRIDE' not in fitted.preset and 'NECK' in fitted.preset
    fitted, notes = fit_to_model(resolve(config, {'RECIPE': 'strong', 'MODEL_NAME': 'pcb_p4'}))
    assert (fitted.NECK, fitted.LAST_STRIDE) == ('none', 1) and len(notes) == 1
    assert "leaves out NECK='bnneck': pcb_p4" in notes[0]
    s = resolve(config, {'RECIPE': 'strong', 'MODEL_NAME': 'resnet50'})
    assert fit_to_model(s) == (s, [])


def test_under_the_strong_recipe_a_trick_given_explicitly_is_still_refused():
    s = resolve(config, {'RECIPE': 'strong', 'MODEL_NAME': 'osnet_x0_25', 'LAST_STRIDE': 1})
    with pytest.raises(UserError, match='LAST_STRIDE=1'):
        fit_to_model(s)


# --- checkpoints --------------------------------------------------------------------------------

def test_a_neck_checkpoint_gives_its_class_count_and_loads_for_test(tmp_path):
    trained = built('resnet18', num_classes=7, NECK='bnneck', LAST_STRIDE=1, seed=3)
    trained.train()(images())                 # running statistics of its own
    path = save_checkpoint({'state_dict': trained.state_dict(), 'model_name': 'resnet18'},
                           tmp_path / 'model.pth.tar-1')
    saved = torch.load(path, weights_only=False)
    assert checkpoint_classes(saved, 'resnet18') == 7
    saved_dp = {'state_dict': {f'module.{k}': v for k, v in saved['state_dict'].items()}}
    assert checkpoint_classes(saved_dp, 'resnet18') == 7
    tested = built('resnet18', num_classes=7, NECK='bnneck', LAST_STRIDE=1)
    load_weights(tested, saved, 'resnet18', path)
    with torch.no_grad():
        torch.testing.assert_close(tested.eval()(images()), trained.eval()(images()))
    with pytest.raises(UserError, match="trained with a BNNeck.*NECK='bnneck'"):
        load_weights(built('resnet18', num_classes=7), saved, 'resnet18', path)


# --- INIT_WEIGHTS across a neck; FIXBASE_EPOCH opens the neck with the classifier --------------

def test_init_weights_without_a_neck_into_a_run_with_one(tmp_path, capsys):
    plain = built('resnet18', seed=1)
    path = save_checkpoint({'state_dict': plain.state_dict()}, tmp_path / 'plain.pth')
    necked = built('resnet18', NECK='bnneck', seed=2)
    fresh = copy.deepcopy(necked.classifier.state_dict())
    loaded, skipped = load_init_weights(necked, torch.load(path), 'resnet18', path)
    assert (loaded, skipped) == (len(plain.state_dict()) - 2, 2)
    assert "2 skipped (the classifier: this run learns its own identities), 5 new (the neck: " \
           "NECK='bnneck' where INIT_WEIGHTS has none)" in capsys.readouterr().out
    assert torch.equal(necked.layer4[1].conv2.weight, plain.layer4[1].conv2.weight)
    assert all(torch.equal(v, fresh[k]) for k, v in necked.classifier.state_dict().items())


def test_init_weights_with_a_neck_into_a_run_without_one_drops_it(tmp_path, capsys):
    necked = built('resnet18', NECK='bnneck', seed=1)
    path = save_checkpoint({'state_dict': necked.state_dict()}, tmp_path / 'necked.pth')
    plain = built('resnet18', seed=2)
    loaded, skipped = load_init_weights(plain, torch.load(path), 'resnet18', path)
    assert (loaded, skipped) == (len(plain.state_dict()) - 2, 1)
    assert 'Note: INIT_WEIGHTS has a BNNeck and this run has none' in capsys.readouterr().out
    assert torch.equal(plain.layer4[1].conv2.weight, necked.layer4[1].conv2.weight)


def test_init_weights_with_a_neck_into_a_run_with_one_keeps_the_neck(tmp_path, capsys):
    trained = built('resnet18', NECK='bnneck', seed=1)
    trained.train()(images())
    path = save_checkpoint({'state_dict': trained.state_dict()}, tmp_path / 'necked.pth')
    necked = built('resnet18', num_classes=9, NECK='bnneck', seed=2)
    load_init_weights(necked, torch.load(path), 'resnet18', path)
    assert ', 1 skipped (the classifier' in capsys.readouterr().out
    assert torch.equal(necked.classifier.neck.running_mean, trained.classifier.neck.running_mean)


def test_fixbase_opens_the_neck_with_the_classifier_and_its_bias_stays_frozen():
    from reidkit.train.engine import SoftmaxEngine
    model = built('resnet18', NECK='bnneck').train()
    engine = SoftmaxEngine.__new__(SoftmaxEngine)     # the method alone: no data needed
    engine.model = model
    engine.two_stepped_transfer_learning(0, 1, ['classifier'])
    head = model.classifier
    assert head.neck.weight.requires_grad and head.linear.weight.requires_grad
    assert not head.neck.bias.requires_grad and not model.layer4[0].conv1.weight.requires_grad
    engine.two_stepped_transfer_learning(1, 1, ['classifier'])      # then every layer
    assert model.layer4[0].conv1.weight.requires_grad and not head.neck.bias.requires_grad


# --- the training step: eager, compiled (fullgraph), channels_last -----------------------------

def test_the_step_trains_a_neck_model_and_leaves_the_neck_bias_at_zero():
    model = built('resnet18', NECK='bnneck', LOSS='triplet').train()
    step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4),
                     Loss('triplet'))
    pids = torch.arange(2).repeat_interleave(4)
    before = model.classifier.neck.weight.detach().clone()
    for _ in range(2):
        values = step(images(8), pids)
    assert set(values) == {'loss_t', 'loss_x', 'acc'}
    assert not torch.equal(model.classifier.neck.weight, before)
    assert torch.count_nonzero(model.classifier.neck.bias) == 0


@pytest.mark.slow
def test_the_step_with_a_neck_compiles_as_one_graph():
    """fullgraph: no graph break in forward and loss (our hook included); aot_eager traces
    forward and backward as Inductor would get them, without generating code."""
    model = built('resnet18', NECK='bnneck', LOSS='triplet', LAST_STRIDE=1).train()
    reference = copy.deepcopy(model)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), Loss('triplet'))
    eager = TrainStep(reference, torch.optim.SGD(reference.parameters(), lr=0.1),
                      Loss('triplet'))
    step._compiled = torch.compile(step.forward_and_loss, fullgraph=True, backend='aot_eager')
    pids = torch.arange(2).repeat_interleave(4)
    for seed in range(2):
        got, expected = step(images(8, seed=seed), pids), eager(images(8, seed=seed), pids)
        assert step.compile_error is None
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)
    model.eval()
    with torch.no_grad():
        compiled_test = torch.compile(model, fullgraph=True, backend='aot_eager')
        torch.testing.assert_close(compiled_test(images()), reference.eval()(images()),
                                   rtol=1e-4, atol=1e-4)


def test_channels_last_and_the_fast_path_wrapper_keep_the_neck():
    from reidkit.train.speed import FastModel
    model = built('resnet18', NECK='bnneck', LOSS='triplet').eval()
    fast = FastModel(copy.deepcopy(model), amp_dtype=None, channels_last=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(images()), model(images()), rtol=1e-4, atol=1e-5)


# --- test, search and export of a checkpoint build the model it was trained as ----------------

def _run_checkpoint(s, model: nn.Module, record: dict) -> 'Path':
    """A checkpoint as training writes it, in a run folder under EXPERIMENTS_DIR."""
    from pathlib import Path
    return save_checkpoint({'state_dict': model.state_dict(), 'epoch': 3,
                            'model_name': s.MODEL_NAME, 'input_size': [s.HEIGHT, s.WIDTH],
                            'settings': record},
                           Path(s.EXPERIMENTS_DIR) / 'run' / 'model' / 'model.pth.tar-3')


@pytest.mark.slow
def test_test_search_and_export_of_a_neck_checkpoint_use_its_neck_and_stride(tiny_settings):
    import main
    from reidkit.run.folders import resolve_checkpoint
    from reidkit.search.extractor import checkpoint_model
    from reidkit.search.onnx_features import OnnxExtractor
    trained_with = tiny_settings.replace(MODEL_NAME='resnet18', NECK='bnneck', LAST_STRIDE=1,
                                         LOSS='triplet')
    trained = built('resnet18', num_classes=8, NECK='bnneck', LAST_STRIDE=1, LOSS='triplet')
    trained.train()(images(8, 32, 16))            # running statistics of its own
    checkpoint = _run_checkpoint(trained_with, trained, trained_with.record())
    x = images(3, 32, 16, seed=5)
    with torch.no_grad():
        expected = trained.eval()(x)
    # config.py's settings (no neck, resnet50): the checkpoint's own are used
    path, saved, s = resolve_checkpoint(tiny_settings, checkpoint)
    assert (s.MODEL_NAME, s.NECK, s.LAST_STRIDE) == ('resnet18', 'bnneck', 1)
    _, tested, _, _ = main.get_items(s.replace(PRETRAINED=False), saved)
    load_weights(tested, saved, s.MODEL_NAME, path)
    searched = checkpoint_model(saved, path, s)
    with torch.no_grad():
        for model in (tested, searched):
            torch.testing.assert_close(model.eval()(x), expected)
    exported = main.export(tiny_settings, checkpoint)
    onnx_features = OnnxExtractor(exported).session.run(None, {'images': x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx_features), expected, rtol=1e-4, atol=1e-4)
    assert (main.test(tiny_settings, checkpoint) / 'metrics.json').is_file()


def test_an_older_checkpoint_still_tests_with_the_strong_recipe_in_config(tiny_settings, capsys):
    import main
    from reidkit.run.settings import BEFORE_RECORDED
    s = tiny_settings.replace(MODEL_NAME='resnet18')
    older = {key: value for key, value in s.record().items() if key not in BEFORE_RECORDED}
    checkpoint = _run_checkpoint(s, built('resnet18', num_classes=8), older)
    strong = main.load_settings({**{k: tiny_settings[k] for k in tiny_settings.given},
                                 'RECIPE': 'strong'})
    assert (strong.NECK, strong.LAST_STRIDE) == ('bnneck', 1)
    out = main.test(strong, checkpoint)
    assert (out / 'metrics.json').is_file()
    assert 'BNNeck' not in capsys.readouterr().out


def test_ddp_and_sync_bn_wrap_a_neck_model(tmp_path):
    """One gloo process: DDP trains the model with its frozen bias (no gradient, no bucket)
    and its test features come after the neck; SyncBatchNorm keeps the neck's frozen bias."""
    import torch.distributed as dist
    from reidkit.train.ddp import distributed_model
    model = built('resnet18', NECK='bnneck', LOSS='triplet')
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(synced.classifier.neck, nn.SyncBatchNorm)
    assert not synced.classifier.neck.bias.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(synced.eval()(images()), model.eval()(images()))
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0,
                            world_size=1)
    try:
        wrapped = distributed_model(model.train(), torch.device('cpu'), channels_last=False,
                                    sync_bn=False)
        step = TrainStep(wrapped, torch.optim.SGD(model.parameters(), lr=0.1), Loss('triplet'))
        assert set(step(images(8), torch.arange(2).repeat_interleave(4))) == \
            {'loss_t', 'loss_x', 'acc'}
        assert model.classifier.neck.bias.grad is None
        with torch.no_grad():
            torch.testing.assert_close(wrapped.eval()(images()), model.eval()(images()))
    finally:
        dist.destroy_process_group()


# --- through main.py: a run records the model it trained, and test rebuilds it -----------------

@pytest.mark.slow
def test_a_neck_and_stride_run_trains_records_and_tests_as_it_trained(tiny_settings):
    import json
    import main
    from reidkit.run.checkpoints import load_checkpoint
    from reidkit.run.folders import newest_checkpoint
    s = tiny_settings.replace(MODEL_NAME='resnet18', NECK='bnneck', LAST_STRIDE=1,
                              LOSS='triplet')
    run_dir = main.train(s)
    recorded = json.loads((run_dir / 'settings.json').read_text())
    assert (recorded['NECK'], recorded['LAST_STRIDE']) == ('bnneck', 1)
    checkpoint = newest_checkpoint(run_dir)
    assert 'classifier.neck.running_mean' in load_checkpoint(checkpoint)['state_dict']
    assert not torch.count_nonzero(load_checkpoint(checkpoint)['state_dict'][
        'classifier.neck.bias'])                      # frozen through every epoch's opening
    out = main.test(tiny_settings, checkpoint)        # config.py's model: the checkpoint's used
    assert json.loads((out / 'metrics.json').read_text())


@pytest.mark.slow
def test_the_strong_recipe_on_osnet_leaves_out_last_stride_with_one_note(tiny_settings):
    import json
    import main
    s = main.load_settings({**{k: tiny_settings[k] for k in tiny_settings.given},
                            'RECIPE': 'strong', 'MODEL_NAME': 'osnet_x0_25'})
    run_dir = main.train(s)
    log = (run_dir / 'log.txt').read_text()
    assert log.count("RECIPE='strong' leaves out LAST_STRIDE=1: osnet_x0_25 cannot take it") == 1
    recorded = json.loads((run_dir / 'settings.json').read_text())
    assert (recorded['NECK'], recorded['LAST_STRIDE']) == ('bnneck', 'auto')
