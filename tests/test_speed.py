"""The fast path's switches, on the CPU (CI has no GPU): bf16 autocast and channels_last train
and evaluate correctly, checkpoints stay plain, a failing compile falls back to eager, and our
training step (the only one) trains as Torchreid's own step does."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from torchreid.reid.engine import ImageSoftmaxEngine

import main
from reidkit.data import checks, datapath
from reidkit.run.checkpoints import load_checkpoint
from reidkit.run.errors import UserError
from reidkit.run.folders import newest_checkpoint
from reidkit.train.engine import ReidkitEngineMixin
from reidkit.run.folders import resolve_checkpoint, resume_checkpoint
from reidkit.train.speed import FastModel, compile_choice, fast_path
from reidkit.train.step import TrainStep


def test_auto_is_eager_on_the_cpu_with_our_step(tiny_settings, capsys):
    datamanager, model, optimizer, scheduler = main.get_items(tiny_settings)
    engine = main.build_engine(tiny_settings, datamanager, model, optimizer, scheduler)
    assert engine.model is model
    assert isinstance(engine.train_step, TrainStep) and not engine.train_step.compiled
    assert 'Training path: eager float32 + our training step\n' in capsys.readouterr().out


# 32x32, not the tiny 32x16: on this CPU, oneDNN's bf16 weight gradient of a 3x3 convolution
# over a 2x1 feature map (ResNet50's layer4 at 32x16) comes back NaN for some batches; the
# divergence check stops such a run (see test_resume.py), so these tests use another size.
BF16_SIZE = dict(HEIGHT=32, WIDTH=32)


@pytest.mark.slow
def test_bf16_and_channels_last_train_evaluate_and_save_plain_checkpoints(tiny_settings, capsys):
    s = tiny_settings.replace(AMP='bf16', CHANNELS_LAST='on', MAX_EPOCH=2, **BF16_SIZE)
    seen = []
    datamanager, model, optimizer, scheduler = main.get_items(s)
    model.conv1.register_forward_hook(lambda module, args, out: seen.append(
        (module.training, out.dtype, out.is_contiguous(memory_format=torch.channels_last))))
    engine = main.build_engine(s, datamanager, model, optimizer, scheduler)
    assert isinstance(engine.model, FastModel)
    engine.run(save_dir=s.EXPERIMENTS_DIR, max_epoch=2, eval_freq=-1, print_freq=1000)
    assert 'Training path: bf16 autocast + channels_last' in capsys.readouterr().out
    # bf16 while training, float32 features in evaluation, channels_last in both
    assert {seen_one for seen_one in seen} == {(True, torch.bfloat16, True),
                                              (False, torch.float32, True)}
    result = engine.results[-1]
    assert result['epoch'] == 2 and 0 < result['mAP'] <= 1     # evaluated, finite, a score
    saved = load_checkpoint(newest_checkpoint(s.EXPERIMENTS_DIR))
    assert 'conv1.weight' in saved['state_dict']                # no wrapper prefix
    assert saved['state_dict']['conv1.weight'].dtype == torch.float32


@pytest.mark.slow
def test_the_fast_path_round_trips_through_test(tiny_settings, capsys):
    s = tiny_settings.replace(AMP='bf16', CHANNELS_LAST='on', **BF16_SIZE)
    run_dir = main.train(s)
    trained = capsys.readouterr().out
    main.test(s)
    tested = capsys.readouterr().out
    last = lambda text: [line for line in text.splitlines() if line.startswith('Rank-1')][-1]  # noqa: E731
    assert last(trained) == last(tested) and run_dir.is_dir()


@pytest.mark.slow
def test_a_failing_compile_says_so_once_and_continues_eager(tiny_settings, monkeypatch, capsys):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken_compile(step):
        def run(*args):
            raise BackendCompilerFailed(broken_compile, RuntimeError('no C++ compiler found'),
                                        None)
        return run
    monkeypatch.setattr(torch, 'compile', broken_compile)
    s = tiny_settings.replace(COMPILE='on', MAX_EPOCH=2, EVAL_FREQ=-1)
    run_dir = main.train(s)
    out = capsys.readouterr().out
    assert 'Training path: float32 + our training step (compiled with its loss)' in out
    assert out.count('Note: torch.compile failed for the training step (RuntimeError: no C++ '
                     'compiler found)') == 1
    assert newest_checkpoint(run_dir).name == 'model.pth.tar-2'


def test_bad_switch_values_are_named_before_any_work(tiny_settings):
    with pytest.raises(UserError, match="AMP='fp8': valid choices are auto, bf16, off"):
        checks.check_before_run(tiny_settings.replace(AMP='fp8'), training=True)
    for key in ('CHANNELS_LAST', 'COMPILE', 'DATA_CACHE'):    # checked in one place
        with pytest.raises(UserError, match=f"{key}='yes': valid choices are auto, on, off"):
            checks.check_before_run(tiny_settings.replace(**{key: 'yes'}), training=False)


@pytest.mark.parametrize('error', [torch.OutOfMemoryError('CUDA out of memory'),
                                   RuntimeError('shape mismatch in the model')])
def test_errors_that_are_not_compilation_failures_are_raised_not_hidden(error, monkeypatch):
    def compiled_that_fails(step):
        def run(*args):
            raise error
        return run
    monkeypatch.setattr(torch, 'compile', compiled_that_fails)
    model = torch.nn.Linear(4, 2).train()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), compile=True)
    with pytest.raises(type(error), match=str(error)):
        step(torch.ones(3, 4), torch.tensor([0, 1, 0]))
    assert step.compiled and step.compile_error is None   # not silently switched to eager


@pytest.mark.slow
def test_our_training_step_trains_exactly_as_torchreids(tiny_settings, monkeypatch):
    """Our step (the only one, on every device) against Torchreid's own epoch loop and
    `forward_backward`, the reference, same seed, on the CPU: the same weights, the same
    evaluation, and epoch means in TensorBoard at PRINT_FREQ and at each epoch's end only."""
    from reidkit.evaluate.report import read_scalars
    def trained(name: str):
        s = tiny_settings.replace(MAX_EPOCH=2, PRINT_FREQ=3,
                                  EXPERIMENTS_DIR=f'{tiny_settings.EXPERIMENTS_DIR}/{name}')
        run_dir = main.train(s)
        return load_checkpoint(newest_checkpoint(run_dir)), read_scalars(run_dir)
    runs = {}
    with monkeypatch.context() as patch:     # Torchreid's loop, which calls its forward_backward
        patch.setattr(ReidkitEngineMixin, '_train_epoch',
                      lambda self, *args: ImageSoftmaxEngine.train(self, *args))
        runs['torchreid'] = trained('torchreid')
    runs['ours'] = trained('ours')
    (theirs, their_scalars), (ours, our_scalars) = runs['torchreid'], runs['ours']
    for key, value in theirs['state_dict'].items():
        assert torch.allclose(value.float(), ours['state_dict'][key].float(), atol=1e-5), key
    assert ours['rank1'] == theirs['rank1']
    batches = len(their_scalars['Train/loss']) // 2                 # Torchreid: every batch
    ends = [batches - 1, 2 * batches - 1]
    assert [step for step, _ in our_scalars['Train/loss']] == sorted({2, 2 + batches} | set(ends))
    their_means = dict(their_scalars['Train/loss'])
    for step, value in our_scalars['Train/loss']:
        assert value == pytest.approx(their_means[step], abs=1e-4)


@pytest.mark.slow
def test_the_device_data_path_trains_and_evaluates_end_to_end(tiny_settings):
    """DATA_CACHE='on' (on by default with CUDA): images decoded once, augmented per batch on
    the device, with our step; a test through Torchreid's loader agrees with its evaluation."""
    s = tiny_settings.replace(DATA_CACHE='on', MAX_EPOCH=2,
                              TRANSFORMS=['random_flip', 'random_crop', 'color_jitter'])
    run_dir = main.train(s)
    log = (run_dir / 'log.txt').read_text()
    assert 'images decoded once, augmented on the device' in log
    assert log.count('epoch: [2/2]') >= 1
    trained = load_checkpoint(newest_checkpoint(run_dir))['rank1']
    tested = main.test(s.replace(DATA_CACHE='off'))
    import json
    rank1 = json.loads((tested / 'metrics.json').read_text())['rank1']
    assert abs(rank1 - trained) <= 0.05           # resize differs by at most one level
    assert 0 < trained <= 1


def test_an_evaluating_engine_decodes_only_the_test_images(tiny_settings, monkeypatch):
    """test/visrank with DATA_CACHE: the engine's cached loaders are the test sets alone."""
    decoded = []
    decode = datapath._decode
    monkeypatch.setattr(datapath, '_decode', lambda path: decoded.append(path) or decode(path))
    s = tiny_settings.replace(DATA_CACHE='on')
    datamanager, model, optimizer, scheduler = main.get_items(s)
    engine = main.build_engine(s, datamanager, model, optimizer, scheduler, training=False)
    test_images = sum(len(items) for items in datamanager.test_dataset['market1501'].values())
    assert len(decoded) == test_images
    assert isinstance(engine.test_loader['market1501']['query'], datapath.CachedLoader)
    assert not isinstance(engine.train_loader, datapath.CachedLoader)


def test_a_checkpoint_that_recorded_train_step_still_resumes_and_evaluates(tiny_settings,
                                                                           tmp_path):
    """TRAIN_STEP is gone (our step is the only one); runs that recorded it load as before."""
    recorded = dict(tiny_settings.record(), TRAIN_STEP='off', COMPILE='on', STEPSIZE=7,
                    MAX_EPOCH=5)
    path = tmp_path / 'old.pth.tar'
    torch.save({'state_dict': {}, 'epoch': 2, 'settings': recorded}, path)
    assert 'TRAIN_STEP' not in tiny_settings
    _, saved, s = resolve_checkpoint(tiny_settings.replace(WEIGHTS=str(path)))
    assert saved['settings']['TRAIN_STEP'] == 'off' and 'TRAIN_STEP' not in s
    assert s.COMPILE == tiny_settings.COMPILE                      # evaluating: not taken
    resumed = resume_checkpoint(tiny_settings.replace(RESUME=str(path), MAX_EPOCH=5)).settings
    assert 'TRAIN_STEP' not in resumed
    assert resumed.COMPILE == 'on' and resumed.STEPSIZE == 7       # the rest of the run's


# --- which GPU gets which path (torch.cuda replaced by stand-ins: CI has no GPU) -----------------

def test_bf16_needs_a_gpu_with_native_bf16(monkeypatch):
    """A T4 or RTX 20xx emulates bf16 (torch's default answer counts emulation): there bf16
    convolutions leave cuDNN and Inductor skips bf16 graphs, so AMP stays off."""
    def t4(including_emulation=True):
        return including_emulation
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', t4)
    model = torch.nn.Linear(2, 2)
    kept, words = fast_path(model, torch.device('cuda'), 'auto', 'off', compiled=False)
    assert kept is model and words == 'eager float32 (this GPU has no native bf16, so AMP is off)'
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    wrapped, words = fast_path(model, torch.device('cuda'), 'auto', 'off', compiled=True)
    assert wrapped.amp_dtype == torch.bfloat16 and words == 'bf16 autocast'


@pytest.fixture
def gpu(monkeypatch):
    """A stand-in GPU: set its compute capability and whether Triton is installed."""
    found = importlib.util.find_spec
    stand_in = SimpleNamespace(capability=(8, 0), triton=True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None:
                        stand_in.capability)
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *args: (
        (found('torch') if stand_in.triton else None) if name == 'triton' else
        found(name, *args)))
    return stand_in


def test_auto_compiles_only_where_inductor_can(gpu):
    cuda = torch.device('cuda', 0)
    assert compile_choice('auto', cuda) == (True, '')
    gpu.capability = (6, 1)                                  # a P100/GTX 10xx: Triton refuses it
    assert compile_choice('auto', cuda) == (
        False, 'not compiled: Triton needs a GPU of compute capability 7.0 or newer, this one '
               'is 6.1')
    assert compile_choice('on', cuda) == (True, '')          # forced: tried, and falls back
    gpu.capability, gpu.triton = (9, 0), False
    assert compile_choice('auto', cuda) == (False, 'not compiled: Triton is not installed')
    assert compile_choice('off', cuda) == (False, '')
    assert compile_choice('auto', torch.device('cpu')) == (False, '')
    assert compile_choice('on', torch.device('cpu')) == (True, '')


def test_evaluation_features_are_float32_with_amp_forced_on(tiny_settings):
    """Autocast while training only: evaluation (test, visrank, during training) gives the
    float32 features the CPU, search and the exported ONNX model give."""
    s = tiny_settings.replace(AMP='bf16', **BF16_SIZE)
    datamanager, model, optimizer, scheduler = main.get_items(s)
    engine = main.build_engine(s, datamanager, model, optimizer, scheduler)
    assert isinstance(engine.model, FastModel)
    seen = []
    model.conv1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    engine.set_model_mode('eval')
    with torch.no_grad():
        features = engine.test_features(images)
        assert seen == [torch.float32]
        assert torch.equal(features, model(images))       # the model itself, without AMP
        engine.set_model_mode('train')
        engine.model(images)
    assert seen[-1] == torch.bfloat16                     # training still autocasts


@pytest.mark.slow
def test_a_resume_with_another_channels_last_gives_the_optimiser_state_the_weights_layout(
        tiny_settings, monkeypatch):
    """A CPU-trained run (a --demo) resumed on a GPU, where channels_last is on: main.py
    restores the optimiser before the fast path converts the model; the fused Adam kernel
    needs each state in its weight's layout (reidkit.train.step.state_like_parameters)."""
    s = tiny_settings.replace(EVAL_FREQ=-1)         # CHANNELS_LAST='auto': off on the CPU
    run_dir = main.train(s)
    seen = []
    original = TrainStep.__call__

    def record_layouts(step, images, pids):
        if not seen:
            seen.extend((param.stride(), {name: value.stride() for name, value in state.items()
                                          if value.shape == param.shape})
                        for param, state in step.optimizer.state.items())
        return original(step, images, pids)
    monkeypatch.setattr(TrainStep, '__call__', record_layouts)
    main.train(s.replace(RESUME=str(newest_checkpoint(run_dir)), MAX_EPOCH=2,
                         CHANNELS_LAST='on'))
    assert any(len(stride) == 4 and stride[1] == 1 for stride, _ in seen)   # channels_last
    for stride, states in seen:
        assert states and all(value == stride for value in states.values())
