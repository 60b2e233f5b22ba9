"""The centre loss (CENTER_LOSS_WEIGHT, CENTER_LR): its value against a reference written here,
its centres' own optimiser, the step it joins (eager, compiled, no host sync), its place in the
checkpoint, an exact resume, and its gradients averaged under DDP."""
import copy
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torchreid

import main
from reidkit.run import distributed
from reidkit.run.checkpoints import CENTERS_KEY, LATEST_NAME, load_checkpoint
from reidkit.run.errors import UserError
from reidkit.train import engine as engine_module
from reidkit.train.step import (Centers, Loss, RunningMeans, TrainStep, center_loss,
                                training_feature_size)
from conftest import whole_and_interrupted
from test_step import TwoHeads, assert_same_weights, batches, identities
from test_step import no_host_reads  # noqa: F401  (a fixture)


def reference_center_loss(features, pids, centers):
    """BoT's definition, one image at a time: the squared distance of each feature to its
    identity's centre, clamped to [1e-12, 1e12], averaged over the batch."""
    distances = [((f - centers[y]) ** 2).sum().clamp(1e-12, 1e12) for f, y in zip(features, pids)]
    return torch.stack(distances).mean()


# --- the loss ------------------------------------------------------------------------------

@pytest.mark.parametrize('seed', range(3))
def test_center_loss_and_its_gradients_equal_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(16, 32, generator=g)
    centers = torch.randn(6, 32, generator=g)
    pids = torch.randint(0, 6, (16,), generator=g)
    ours = [features.clone().requires_grad_(), centers.clone().requires_grad_()]
    theirs = [features.clone().requires_grad_(), centers.clone().requires_grad_()]
    loss = center_loss(ours[0], pids, ours[1])
    reference = reference_center_loss(theirs[0], pids, theirs[1])
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    loss.backward()
    reference.backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    # identities absent from the batch get no gradient
    absent = sorted(set(range(6)) - set(pids.tolist()))
    assert (ours[1].grad[absent] == 0).all()


def test_center_loss_is_float32_under_bf16_autocast_and_averages_several_outputs():
    g = torch.Generator().manual_seed(7)
    features, centers = torch.randn(8, 4, generator=g), torch.randn(3, 4, generator=g)
    pids = torch.randint(0, 3, (8,), generator=g)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = center_loss(features.bfloat16(), pids, centers)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(center_loss((features, 2 * features), pids, centers),
                               (reference_center_loss(features, pids, centers)
                                + reference_center_loss(2 * features, pids, centers)) / 2)


# --- the centres and the step --------------------------------------------------------------

def test_centers_move_toward_their_class_features_at_center_lr_whatever_the_weight():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(12, 5, generator=g)
    pids = identities(3, 4, g)
    moved = []
    for weight in (5e-4, 1.0):
        centers = Centers(3, 5, lr=0.5, seed=0)
        before = centers.centers.detach().clone()
        (weight * center_loss(features, pids, centers.centers)).backward()
        centers.step(weight)
        after = centers.centers.detach()
        means = torch.stack([features[pids == k].mean(0) for k in range(3)])
        # BoT's update: c_k += lr * 2/B * sum_{y_i=k} (f_i - c_k), here 4 images of 12 each
        torch.testing.assert_close(after, before + 0.5 * 2 / 12 * 4 * (means - before))
        assert ((after - means).norm(dim=1) < (before - means).norm(dim=1)).all()
        moved.append(after.clone())
    torch.testing.assert_close(moved[0], moved[1])      # the gradient is scaled by 1/weight


def test_centers_start_the_same_for_a_seed_and_leave_the_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a, b = Centers(4, 3, lr=0.5, seed=5), Centers(4, 3, lr=0.5, seed=5)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(a.centers, b.centers)
    assert not torch.equal(a.centers, Centers(4, 3, lr=0.5, seed=6).centers)


def twin_steps(loss: Loss, centers: bool = True):
    torch.manual_seed(0)
    model = TwoHeads(triplet=True).train()
    twin = copy.deepcopy(model)
    make = lambda m: TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), loss,  # noqa: E731
                               centers=Centers(4, 8, lr=0.5) if centers else None)
    return make(model), make(twin)


@pytest.mark.parametrize('name', ['softmax', 'triplet'])
def test_the_step_adds_the_weighted_centre_loss_and_reports_it_as_loss_c(name):
    weight = 0.01
    with_centers, _ = twin_steps(Loss(name, center_weight=weight))
    plain_model = copy.deepcopy(with_centers.model)
    plain_model.triplet = name == 'triplet'         # today's softmax model returns logits alone
    without = TrainStep(plain_model, torch.optim.SGD(plain_model.parameters()), Loss(name))
    images, pids = batches(1)[0]
    centers = with_centers.centers.centers.detach().clone()
    total, values = with_centers.forward_and_loss(images, pids)
    plain_total, plain_values = without.forward_and_loss(images, pids)
    logits, features = with_centers.model(images)
    assert list(values) == list(plain_values) + ['loss_c']
    torch.testing.assert_close(values['loss_c'], reference_center_loss(features, pids, centers))
    torch.testing.assert_close(total, plain_total + weight * values['loss_c'])
    reported = with_centers(images, pids)
    assert set(reported) == set(values) and all(not v.requires_grad for v in reported.values())


def test_a_zero_weight_is_todays_step_bit_for_bit(tiny_settings):
    assert tiny_settings.CENTER_LOSS_WEIGHT == 0
    datamanager, model, optimizer, scheduler = main.get_items(tiny_settings)
    assert main.build_centers(tiny_settings, model, datamanager) is None
    engine = main.build_engine(tiny_settings, datamanager, model, optimizer, scheduler)
    step = engine.train_step
    assert step.centers is None and step.loss == Loss('softmax', tiny_settings.LABEL_SMOOTH)
    twin = copy.deepcopy(model)
    today = TrainStep(twin, torchreid.optim.build_optimizer(twin, optim=tiny_settings.OPTIM,
                                                            lr=tiny_settings.LR),
                      Loss('softmax', tiny_settings.LABEL_SMOOTH))
    images, pids = batches(1)[0]
    ours, theirs = step(images, pids), today(images, pids)
    assert list(ours) == list(theirs) == ['loss', 'acc']
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_centers_and_weight_go_together():
    model = TwoHeads(triplet=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match='centre loss needs both'):
        TrainStep(model, optimizer, Loss('triplet', center_weight=5e-4))
    with pytest.raises(ValueError, match='centre loss needs both'):
        TrainStep(model, optimizer, Loss('triplet'), centers=Centers(4, 8, lr=0.5))
    with pytest.raises(ValueError, match='center_weight'):
        Loss('softmax', center_weight=-1.0)


@pytest.mark.parametrize('optim', ['sgd', 'adam'])
def test_a_step_with_the_centre_loss_reads_nothing_back_to_the_host(optim, no_host_reads):
    step, _ = twin_steps(Loss('triplet', center_weight=5e-4))
    if optim == 'adam':      # fused: its step count stays on the device
        from reidkit.train.step import fuse_adam
        step.optimizer = fuse_adam(torch.optim.Adam(step.model.parameters()))
    means = RunningMeans()
    images, pids = batches(1)[0]
    step(images, pids)                       # optimiser states are created here
    no_host_reads()
    for _ in range(2):
        means.add(step(images, pids))


@pytest.mark.parametrize('backend', ['eager', pytest.param('inductor', marks=pytest.mark.slow)])
def test_the_step_with_the_centre_loss_compiles_without_graph_breaks(backend):
    eager, compiled = twin_steps(Loss('triplet', center_weight=5e-4))
    # fullgraph: any graph break is an error. The 'eager' backend traces with Dynamo alone (no
    # C++ compiler needed); 'inductor' is what COMPILE uses.
    compiled._compiled = torch.compile(compiled.forward_and_loss, fullgraph=True,
                                       backend=backend)
    for images, pids in batches(3):
        expected, got = eager(images, pids), compiled(images, pids)
        if isinstance(compiled.compile_error, torch._dynamo.exc.BackendCompilerFailed):
            pytest.skip(f'no working compiler here: {compiled.compile_error}')
        assert compiled.compiled and compiled.compile_error is None
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
        assert_same_weights(eager.model, compiled.model)
        torch.testing.assert_close(compiled.centers.centers, eager.centers.centers)


# --- settings to step: the model's feature, the engine, the checkpoint -----------------------

def test_training_feature_size_runs_the_model_on_the_meta_device_only():
    model = TwoHeads(triplet=True).eval()
    before = copy.deepcopy(model.state_dict())
    assert training_feature_size(model, 32, 16) == 8
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    with pytest.raises(ValueError, match='no \\(logits, features\\)'):
        training_feature_size(TwoHeads(triplet=False), 32, 16)


def centre_settings(tiny_settings, **more):
    return tiny_settings.replace(CENTER_LOSS_WEIGHT=5e-4, CENTER_LR=0.5, EVAL_FREQ=-1, **more)


def test_centres_are_sized_to_the_identities_and_the_models_feature(tiny_settings):
    s = centre_settings(tiny_settings, MODEL_NAME='osnet_x0_25')
    datamanager, model, optimizer, scheduler = main.get_items(s)
    centers = main.build_centers(s, model, datamanager)
    assert centers.centers.shape == (datamanager.num_train_pids, 512)
    assert centers.optimizer.param_groups[0]['lr'] == 0.5
    assert centers.centers not in {p for group in optimizer.param_groups for p in group['params']}
    engine = main.build_engine(s, datamanager, model, optimizer, scheduler, centers=centers)
    assert engine.train_step.centers is centers
    assert engine.train_step.loss.center_weight == 5e-4


@pytest.fixture
def engines(monkeypatch) -> list:
    """Every engine main.build_engine builds, in order."""
    built, build_engine = [], main.build_engine
    monkeypatch.setattr(main, 'build_engine',
                        lambda *a, **k: built.append(build_engine(*a, **k)) or built[-1])
    return built


@pytest.mark.slow
def test_the_checkpoint_holds_the_centres_and_a_resume_is_exact(tiny_settings, epoch_watch):
    """2 epochs straight against 1 epoch, Ctrl-C, --RESUME for the 2nd, on the eager CPU path:
    the same weights, centres and centre optimiser (the checkpoint's random states give the
    resumed epoch the same data order and augmentations)."""
    s = centre_settings(tiny_settings, MAX_EPOCH=2, STEPSIZE=1, LOSS='triplet',
                        BATCH_SIZE_TRAIN=8)
    straight, run_dir, _ = whole_and_interrupted(s, epoch_watch)
    expected = load_checkpoint(straight / 'model' / 'model.pth.tar-2')
    centres = expected[CENTERS_KEY]
    assert centres['centers'].shape[0] == 8 and centres['optimizer']['param_groups'][0]['lr'] == 0.5
    assert 'loss_c' in (straight / 'log.txt').read_text()
    latest = run_dir / 'model' / LATEST_NAME
    assert not torch.equal(load_checkpoint(latest)[CENTERS_KEY]['centers'], centres['centers'])
    main.train(s.replace(RESUME=str(latest)))
    resumed = load_checkpoint(run_dir / 'model' / 'model.pth.tar-2')
    for key, value in expected['state_dict'].items():
        assert torch.equal(resumed['state_dict'][key], value), key
    assert torch.equal(resumed[CENTERS_KEY]['centers'], centres['centers'])
    assert resumed[CENTERS_KEY]['optimizer'] == centres['optimizer']


def test_resuming_without_the_centres_the_run_trained_with_is_refused(tiny_settings, tmp_path):
    s = centre_settings(tiny_settings)
    datamanager, model, optimizer, scheduler = main.get_items(s)
    centers = main.build_centers(s, model, datamanager)
    from reidkit.run.checkpoints import resume_training
    saved = {'state_dict': model.state_dict(), 'epoch': 1, 'optimizer': optimizer.state_dict(),
             'scheduler': scheduler.state_dict(), 'model_name': s.MODEL_NAME}
    with pytest.raises(UserError, match='RESUME: .* has no centre-loss state'):
        resume_training(saved, tmp_path / 'x.pth.tar', model, optimizer, scheduler, centers)
    other = Centers(3, 7, lr=0.5)
    saved[CENTERS_KEY] = other.state_dict()
    with pytest.raises(UserError, match='RESUME: .* does not fit'):
        resume_training(saved, tmp_path / 'x.pth.tar', model, optimizer, scheduler, centers)


# --- DDP: the centres' gradients averaged over two gloo processes --------------------------

def _batch_of_rank(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own features and identities (3 identities, 4 values)."""
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)


def _centre_step_on_rank(rank: int, world: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    distributed.start('cpu')
    try:
        features, pids = _batch_of_rank(rank)
        centers = Centers(3, 4, lr=0.5, seed=1)
        (5e-4 * center_loss(features, pids, centers.centers)).backward()
        centers.step(5e-4)
        results.put((rank, centers.centers.detach().tolist()))
    finally:
        distributed.stop()


def test_centre_gradients_are_averaged_over_ddp_processes():
    queue = mp.get_context('spawn').SimpleQueue()
    mp.start_processes(_centre_step_on_rank, args=(2, distributed.free_port(), queue),
                       nprocs=2, start_method='spawn')
    results = dict(queue.get() for _ in range(2))
    # one process: the mean of both ranks' centre-loss gradients, one SGD step
    centers = Centers(3, 4, lr=0.5, seed=1)
    grads = []
    for rank in range(2):
        features, pids = _batch_of_rank(rank)
        grads.append(torch.autograd.grad(center_loss(features, pids, centers.centers),
                                         centers.centers)[0])
    expected = centers.centers.detach() - 0.5 * (grads[0] + grads[1]) / 2
    for rank in range(2):
        torch.testing.assert_close(torch.tensor(results[rank]), expected)


@pytest.mark.slow
def test_an_older_checkpoint_without_centres_resumes_and_tests_without_them(tiny_settings,
                                                                           monkeypatch, engines):
    """A run recorded before CENTER_LOSS_WEIGHT existed trained without the centre loss: it
    resumes and tests without centres, even with the centre loss on in config.py."""
    import config
    run_dir = main.train(tiny_settings.replace(MAX_EPOCH=1, EVAL_FREQ=-1))
    path = run_dir / 'model' / 'model.pth.tar-1'
    saved = load_checkpoint(path)
    assert CENTERS_KEY not in saved                      # the centre loss was off
    for key in ('CENTER_LOSS_WEIGHT', 'CENTER_LR'):      # as an older run recorded it
        del saved['settings'][key]
    torch.save(saved, path)
    monkeypatch.setattr(config, 'CENTER_LOSS_WEIGHT', 5e-4)
    main.train(main.load_settings({'RESUME': str(path), 'MAX_EPOCH': 2,
                                   'EXPERIMENTS_DIR': tiny_settings.EXPERIMENTS_DIR}))
    assert engines[-1].train_step.centers is None
    assert engines[-1].train_step.loss.center_weight == 0
    resumed = load_checkpoint(run_dir / 'model' / 'model.pth.tar-2')
    assert CENTERS_KEY not in resumed and resumed['settings']['CENTER_LOSS_WEIGHT'] == 0
    main.test(main.load_settings({'EXPERIMENTS_DIR': tiny_settings.EXPERIMENTS_DIR}), path)


def test_the_strong_recipes_whole_step_compiles_without_graph_breaks():
    """The preset's model (Torchreid's resnet18 with the neck and last stride 1, built by the
    one builder) and its three loss terms, compiled with fullgraph=True: the same values and
    weights as eager."""
    from conftest import TINY
    from reidkit.run.model import build_model
    s = main.load_settings(dict(TINY, RECIPE='strong', MODEL_NAME='resnet18'))
    assert (s.NECK, s.LAST_STRIDE, s.CENTER_LOSS_WEIGHT) == ('bnneck', 1, 5e-4)
    torch.manual_seed(0)
    model = build_model(s, num_classes=4, pretrained=False).train()
    twin = copy.deepcopy(model)
    loss = Loss('triplet', center_weight=s.CENTER_LOSS_WEIGHT)
    make = lambda m: TrainStep(m, torch.optim.Adam(m.parameters(), lr=3e-4), loss,  # noqa: E731
                               centers=Centers(4, 512, lr=s.CENTER_LR))
    eager, compiled = make(model), make(twin)
    compiled._compiled = torch.compile(compiled.forward_and_loss, fullgraph=True,
                                       backend='eager')
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for _ in range(2):
        images = torch.randn(8, 3, 32, 16)
        expected, got = eager(images, pids), compiled(images, pids)
        assert compiled.compiled and compiled.compile_error is None
        assert set(got) == {'loss_t', 'loss_x', 'acc', 'loss_c'}
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
