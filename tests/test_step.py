"""Our training step against Torchreid's own: the same losses, the same updated weights, and
no host read-back during a step."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torchreid
from torchreid.reid.engine import ImageSoftmaxEngine, ImageTripletEngine
from torchreid.reid.losses import CrossEntropyLoss, DeepSupervision, TripletLoss
from torchreid.reid.metrics import accuracy

from reidkit.train.step import (Loss, RunningMeans, TrainStep, batch_hard_triplet_loss,
                                fast_optimizer, fuse_adam, label_smoothed_cross_entropy,
                                top1_accuracy)


def identities(num_ids: int, per_id: int, generator=None) -> torch.Tensor:
    """pids as a RandomIdentitySampler batch holds them: `per_id` images of each identity."""
    order = torch.randperm(num_ids, generator=generator)
    return order.repeat_interleave(per_id)


# --- losses ------------------------------------------------------------------------------------

@pytest.mark.parametrize('label_smooth', [True, False])
@pytest.mark.parametrize('num_classes', [4, 751])
def test_cross_entropy_equals_torchreids(label_smooth, num_classes):
    g = torch.Generator().manual_seed(num_classes)
    logits = 3 * torch.randn(32, num_classes, generator=g)
    targets = torch.randint(0, num_classes, (32,), generator=g)
    theirs = CrossEntropyLoss(num_classes, use_gpu=False, label_smooth=label_smooth)
    ours = label_smoothed_cross_entropy(logits, targets, epsilon=0.1 if label_smooth else 0.0)
    torch.testing.assert_close(ours, theirs(logits, targets), rtol=0, atol=1e-6)


def test_cross_entropy_gradient_equals_torchreids():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 10, generator=g)
    targets = torch.randint(0, 10, (16,), generator=g)
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    label_smoothed_cross_entropy(ours, targets).backward()
    CrossEntropyLoss(10, use_gpu=False)(theirs, targets).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-7)


@pytest.mark.parametrize('container', [tuple, list])
def test_several_outputs_are_averaged_as_deep_supervision(container):
    g = torch.Generator().manual_seed(2)
    outputs = container(torch.randn(8, 5, generator=g) * scale for scale in (1, 3, 10))
    targets = torch.randint(0, 5, (8,), generator=g)
    theirs = DeepSupervision(CrossEntropyLoss(5, use_gpu=False), outputs, targets)
    torch.testing.assert_close(label_smoothed_cross_entropy(outputs, targets), theirs,
                               rtol=0, atol=1e-6)
    features = container(torch.randn(8, 6, generator=g) for _ in range(2))
    pids = identities(2, 4, g)
    torch.testing.assert_close(batch_hard_triplet_loss(features, pids),
                               DeepSupervision(TripletLoss(0.3), features, pids),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('margin', [0.3, 1.0])
def test_triplet_loss_and_gradient_equal_torchreids(seed, margin):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(32, 64, generator=g) / 4      # margins active for some anchors only
    pids = identities(8, 4, g)
    ours, theirs = features.clone().requires_grad_(), features.clone().requires_grad_()
    loss = batch_hard_triplet_loss(ours, pids, margin)
    reference = TripletLoss(margin)(theirs, pids)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-5)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)


def test_triplet_loss_with_tied_distances_equals_torchreids():
    # Integer features, duplicated images and a point in the middle of two others: several
    # hardest positives and negatives are tied, and the gradient must be shared as Torchreid's.
    features = torch.tensor([[0., 0.], [0., 0.], [2., 0.], [0., 2.],
                             [1., 1.], [1., 1.], [3., 1.], [1., 3.],
                             [0., 0.], [2., 2.], [2., 0.], [0., 2.]])
    pids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    for margin in (0.3, 2.0):
        ours, theirs = features.clone().requires_grad_(), features.clone().requires_grad_()
        loss = batch_hard_triplet_loss(ours, pids, margin)
        reference = TripletLoss(margin)(theirs, pids)
        torch.testing.assert_close(loss, reference, rtol=0, atol=1e-5)
        loss.backward()
        reference.backward()
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)


def test_an_identity_alone_in_the_batch_adds_nothing():
    # Torchreid's loss raises here (no negative for any anchor); ours is 0, not inf or nan.
    features = torch.randn(4, 8, requires_grad=True)
    loss = batch_hard_triplet_loss(features, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(features.grad).all()


def test_losses_are_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 6, generator=g).bfloat16()
    features = torch.randn(16, 32, generator=g).bfloat16()
    pids = identities(4, 4, g)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ce = label_smoothed_cross_entropy(logits, pids)
        triplet = batch_hard_triplet_loss(features, pids)
    assert ce.dtype == triplet.dtype == torch.float32
    torch.testing.assert_close(ce, CrossEntropyLoss(6, use_gpu=False)(logits.float(), pids),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(triplet, TripletLoss()(features.float(), pids), rtol=0, atol=1e-5)


def test_accuracy_equals_torchreids():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(32, 4, generator=g)
    pids = torch.randint(0, 4, (32,), generator=g)
    torch.testing.assert_close(top1_accuracy(logits, pids), accuracy(logits, pids)[0][0])
    torch.testing.assert_close(top1_accuracy((logits, -logits), pids),
                               accuracy((logits, -logits), pids)[0][0])


# --- the step against Torchreid's engines ------------------------------------------------------

def torchreid_engine(engine_class, model, optimizer, num_classes, **kwargs):
    """A Torchreid engine on the CPU; its step needs no data manager beyond these attributes."""
    datamanager = SimpleNamespace(train_loader=None, test_loader={}, num_train_pids=num_classes)
    return engine_class(datamanager, model, optimizer, use_gpu=False, **kwargs)


def twin_setups(loss: str, optim: str = 'adam'):
    """Two identical Torchreid ResNet-18s in training mode, each with its own optimizer."""
    torch.manual_seed(0)
    model = torchreid.models.build_model('resnet18', num_classes=4, loss=loss, pretrained=False)
    twin = copy.deepcopy(model)
    model.train(), twin.train()
    return [(m, torchreid.optim.build_optimizer(m, optim=optim, lr=LR)) for m in (model, twin)]


def batches(count: int, per_id: int = 4):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(4 * per_id, 3, 32, 16, generator=g), identities(4, per_id, g))
            for _ in range(count)]


LR = 0.001


def assert_same_weights(model_a, model_b, optim='sgd', steps=2):
    # Adam moves every weight by about LR on its first steps, whatever its gradient's size, so
    # a near-zero gradient that differs in rounding (their loss is summed in another order, and
    # another thread count sums in another order again) can move a weight the other way: a few
    # weights may differ by up to 2 LR a step; all the others agree to LR/10. SGD's update is
    # exact to rounding.
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        if optim != 'adam' or not a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f'{name} differs')
            continue
        apart = (a - b).abs()
        assert apart.max() <= 2 * LR * steps + 1e-6, f'{name} differs by {apart.max()}'
        assert (apart > LR / 10).float().mean() <= 0.01, f'{name}: too many weights differ'


@pytest.mark.parametrize('label_smooth', [True, False])
@pytest.mark.parametrize('optim', ['adam', 'sgd'])
def test_softmax_step_equals_torchreids_forward_backward(label_smooth, optim):
    (ref_model, ref_optimizer), (model, optimizer) = twin_setups('softmax', optim)
    engine = torchreid_engine(ImageSoftmaxEngine, ref_model, ref_optimizer, 4,
                              label_smooth=label_smooth)
    step = TrainStep(model, optimizer, Loss('softmax', label_smooth=label_smooth))
    for images, pids in batches(2, per_id=2):
        theirs = engine.forward_backward({'img': images, 'pid': pids})
        ours = step(images, pids)
        assert ours.keys() == theirs.keys() == {'loss', 'acc'}
        for name in ours:
            assert isinstance(ours[name], torch.Tensor) and ours[name].dim() == 0
            assert not ours[name].requires_grad
            assert ours[name].item() == pytest.approx(theirs[name], rel=1e-5, abs=1e-5)
        assert_same_weights(ref_model, model, optim)


@pytest.mark.parametrize('weights', [(1.0, 1.0), (0.7, 1.0), (1.0, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize('optim', ['adam', 'sgd'])
def test_triplet_step_equals_torchreids_forward_backward(weights, optim):
    weight_t, weight_x = weights
    (ref_model, ref_optimizer), (model, optimizer) = twin_setups('triplet', optim)
    engine = torchreid_engine(ImageTripletEngine, ref_model, ref_optimizer, 4,
                              margin=0.3, weight_t=weight_t, weight_x=weight_x)
    step = TrainStep(model, optimizer, Loss('triplet', label_smooth=True, weight_t=weight_t,
                                            weight_x=weight_x, margin=0.3))
    for images, pids in batches(2):
        theirs = engine.forward_backward({'img': images, 'pid': pids})
        ours = step(images, pids)
        assert list(ours) == list(theirs)
        for name in ours:
            assert ours[name].item() == pytest.approx(theirs[name], rel=1e-5, abs=1e-5)
        assert_same_weights(ref_model, model, optim)


def test_step_rejects_what_torchreid_rejects():
    with pytest.raises(ValueError, match='softmax'):
        Loss('arcface')
    with pytest.raises(ValueError, match='weight_t'):
        Loss('triplet', weight_t=0, weight_x=0)


class TwoHeads(nn.Module):
    """A tiny re-id model: logits always, (logits, features) in training for the triplet loss."""

    def __init__(self, num_classes=4, triplet=False):
        super().__init__()
        self.triplet = triplet
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        features = self.body(x)
        logits = self.classifier(features)
        return (logits, features) if self.triplet and self.training else logits


@pytest.fixture
def no_host_reads(monkeypatch):
    """Every way a tensor's value reaches Python raises while the fixture is active."""
    def read_back(*args, **kwargs):
        raise AssertionError('a tensor was read back to the host during the step')

    def activate():
        for name in ('item', 'cpu', 'tolist', 'numpy', '__bool__', '__float__', '__int__'):
            monkeypatch.setattr(torch.Tensor, name, read_back)
    return activate


@pytest.mark.parametrize('loss', ['softmax', 'triplet'])
@pytest.mark.parametrize('optim', ['fused adam', 'sgd'])
def test_a_step_reads_nothing_back_to_the_host(loss, optim, no_host_reads):
    # Plain Adam is left out: it keeps its step count on the CPU and reads it with .item()
    # (no device sync, but indistinguishable here); fast_optimizer fuses it on CUDA anyway.
    torch.manual_seed(0)
    model = TwoHeads(triplet=loss == 'triplet').train()
    optimizer = fuse_adam(torch.optim.Adam(model.parameters())) if optim == 'fused adam' else \
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = TrainStep(model, optimizer, Loss(loss))
    means = RunningMeans()
    images, pids = batches(1)[0]
    step(images, pids)                        # the optimizer's state is created here
    no_host_reads()
    for _ in range(2):
        values = step(images, pids)
        means.add(values)
    assert all(isinstance(value, torch.Tensor) for value in values.values())
    assert set(values) == ({'loss', 'acc'} if loss == 'softmax' else {'loss_t', 'loss_x', 'acc'})


@pytest.mark.slow
def test_compiled_step_runs_and_matches_eager():
    torch.manual_seed(0)
    eager_model = TwoHeads(triplet=True).train()
    compiled_model = copy.deepcopy(eager_model)
    eager = TrainStep(eager_model, torch.optim.SGD(eager_model.parameters(), lr=0.1),
                      Loss('triplet'))
    compiled = TrainStep(compiled_model, torch.optim.SGD(compiled_model.parameters(), lr=0.1),
                         Loss('triplet'), compile=True)
    for images, pids in batches(2):
        expected = eager(images, pids)
        got = compiled(images, pids)
        if isinstance(compiled.compile_error, torch._dynamo.exc.BackendCompilerFailed):
            pytest.skip(f'no working compiler here: {compiled.compile_error}')
        assert compiled.compiled and compiled.compile_error is None
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
        assert_same_weights(eager_model, compiled_model)


# --- running means -----------------------------------------------------------------------------

def test_running_means_average_and_read_back_once(monkeypatch):
    means = RunningMeans()
    assert means.means() == {}
    for loss, acc in ((1.0, 50.0), (2.0, 75.0), (4.5, 100.0)):
        means.add({'loss': torch.tensor(loss), 'acc': torch.tensor(acc)})
    means.add({'loss_t': torch.tensor(0.25, dtype=torch.bfloat16)})    # a value seen once
    reads = []
    for name in ('item', 'cpu', 'tolist', 'numpy'):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k:
                            reads.append(_n) or _f(self, *a, **k))
    result = means.means()
    assert len(reads) == 1
    assert result == pytest.approx({'loss': 2.5, 'acc': 75.0, 'loss_t': 0.25})
    assert all(type(value) is float for value in result.values())
    means.reset()
    assert means.means() == {}


def test_running_means_do_not_alias_the_added_tensors():
    means = RunningMeans()
    first = torch.tensor(1.0)
    means.add({'loss': first})
    means.add({'loss': torch.tensor(3.0)})
    assert first.item() == 1.0 and means.means() == {'loss': 2.0}


# --- the optimizer -----------------------------------------------------------------------------

def test_fast_optimizer_leaves_a_cpu_optimizer_as_it_is():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    before = copy.deepcopy(optimizer.state_dict())
    assert fast_optimizer(optimizer) is optimizer
    assert all(group['fused'] is None for group in optimizer.param_groups)
    assert optimizer.state_dict() == before
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert fast_optimizer(sgd) is sgd


def train(model, optimizer, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 3, generator=g)).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize('optimizer_class', [torch.optim.Adam, torch.optim.AdamW])
def test_fused_adam_trains_as_plain_and_its_checkpoints_stay_plain(optimizer_class, monkeypatch):
    # fuse_adam is what fast_optimizer does on CUDA; PyTorch has the fused kernel on the CPU too.
    fused_calls = []
    for name in ('_fused_adam_', '_fused_adamw_'):
        kernel = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _kernel=kernel, **k:
                            fused_calls.append(1) or _kernel(*a, **k))
    torch.manual_seed(0)
    plain_model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    fused_model = copy.deepcopy(plain_model)
    plain = optimizer_class([{'params': plain_model[0].parameters()},
                             {'params': plain_model[2].parameters(), 'lr': 0.01}], lr=0.001)
    fused = optimizer_class([{'params': fused_model[0].parameters()},
                             {'params': fused_model[2].parameters(), 'lr': 0.01}], lr=0.001)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
                  for o in (plain, fused)]
    train(plain_model, plain, 1, seed=1)
    train(fused_model, fused, 1, seed=1)       # state created by the plain implementation...
    assert fuse_adam(fused) is fused             # ...then carried over
    assert all(group['fused'] for group in fused.param_groups)
    for scheduler in schedulers:                 # the scheduler still drives the same object
        scheduler.step()
    train(plain_model, plain, 3, seed=2)
    assert not fused_calls
    train(fused_model, fused, 3, seed=2)
    assert len(fused_calls) == 3 * 2             # one call per step and parameter group
    assert_same_weights(plain_model, fused_model)

    saved = fused.state_dict()
    assert [group['fused'] for group in saved['param_groups']] == [None, None]
    assert all(state['step'].device.type == 'cpu' for state in saved['state'].values())
    assert saved['param_groups'] == plain.state_dict()['param_groups']
    assert all(group['fused'] for group in fused.param_groups)       # the live one still is

    # A plain optimizer loads it and continues exactly as the plain run.
    restored_model = copy.deepcopy(fused_model)
    restored = optimizer_class([{'params': restored_model[0].parameters()},
                                {'params': restored_model[2].parameters()}], lr=0.001)
    restored.load_state_dict(copy.deepcopy(saved))
    assert [group['fused'] for group in restored.param_groups] == [None, None]
    train(restored_model, restored, 2, seed=3)
    train(plain_model, plain, 2, seed=3)
    assert_same_weights(plain_model, restored_model)

    # And the fused one loads a plain checkpoint and stays fused.
    fused.load_state_dict(plain.state_dict())
    assert all(group['fused'] for group in fused.param_groups)
    train(fused_model, fused, 1, seed=4)


def with_gradients(module: nn.Module, seed: int) -> None:
    """The same gradients for `module` whatever its memory format (each in its weight's)."""
    g = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.grad = torch.empty_like(param).copy_(torch.randn(param.shape, generator=g))


def assert_state_in_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if value.shape == param.shape:
                assert value.stride() == param.stride(), name


@pytest.mark.parametrize('order', ['loaded, converted, fused', 'fused, converted, loaded'])
def test_fused_adam_steps_rightly_after_the_weights_change_memory_format(order):
    """A run resumed with another CHANNELS_LAST: its Adam state was saved in the other layout
    than the weights now have. The fused kernel pairs elements by memory position (CUDA's
    refuses unequal strides), so the state must take each weight's layout."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    saved = torch.optim.Adam(conv.parameters(), lr=LR)
    with_gradients(conv, seed=1)
    saved.step()                                      # a contiguous state, as a CPU run saves
    checkpoint = copy.deepcopy(saved.state_dict())
    reference = copy.deepcopy(conv)                   # stays contiguous: the expected numbers
    expected = fuse_adam(torch.optim.Adam(reference.parameters(), lr=LR))
    expected.load_state_dict(copy.deepcopy(checkpoint))
    resumed = torch.optim.Adam(conv.parameters(), lr=LR)
    if order == 'loaded, converted, fused':           # main.py: _resume_state, build_engine
        resumed.load_state_dict(checkpoint)
        conv.to(memory_format=torch.channels_last)
        fuse_adam(resumed)
    else:
        fuse_adam(resumed)
        conv.to(memory_format=torch.channels_last)
        resumed.load_state_dict(checkpoint)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_state_in_parameter_layouts(resumed)
    for seed in (2, 3):
        with_gradients(conv, seed)
        with_gradients(reference, seed)
        resumed.step()
        expected.step()
    for a, b in zip(conv.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_fast_optimizer_gives_a_cpu_optimizers_state_its_weights_layout():
    model = nn.Conv2d(3, 8, 3)
    optimizer = torch.optim.Adam(model.parameters())
    with_gradients(model, seed=1)
    optimizer.step()
    model.to(memory_format=torch.channels_last)
    assert fast_optimizer(optimizer) is optimizer
    assert_state_in_parameter_layouts(optimizer)
    assert all(group['fused'] is None for group in optimizer.param_groups)   # not fused here


# --- compiler failures -------------------------------------------------------------------------

def compiler_errors():
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import GPUTooOldForTriton, TritonMissing
    old_gpu = SimpleNamespace(name='Tesla P100-PCIE-16GB', major=6, minor=0)
    return [TritonMissing(None), GPUTooOldForTriton(old_gpu, None),
            BackendCompilerFailed(compiler_errors, RuntimeError('no C++ compiler found'), None)]


class BackwardFails(torch.autograd.Function):
    """The identity, whose backward raises `error`: AOTAutograd compiles the backward graph
    lazily, at the first backward, so a compiler failure can first show there."""

    @staticmethod
    def forward(ctx, total, error):
        ctx.error = error
        return total.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ctx.error


@pytest.mark.parametrize('error', compiler_errors(), ids=lambda error: type(error).__name__)
@pytest.mark.parametrize('where', ['forward', 'backward'])
def test_a_compiler_failure_in_forward_or_backward_falls_back_to_eager(error, where,
                                                                       monkeypatch, capsys):
    def compile_that_fails(forward_and_loss):
        def run(images, pids):
            if where == 'forward':
                raise error
            total, values = forward_and_loss(images, pids)
            return BackwardFails.apply(total, error), values
        return run
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 16, 4)).train()
    eager_model = copy.deepcopy(model)
    monkeypatch.setattr(torch, 'compile', compile_that_fails)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), compile=True)
    eager = TrainStep(eager_model, torch.optim.SGD(eager_model.parameters(), lr=0.1))
    for images, pids in batches(2):
        torch.testing.assert_close(step(images, pids), eager(images, pids))
    assert step.compile_error is error and not step.compiled
    assert capsys.readouterr().out.count('Note: torch.compile failed for the training step') == 1
    assert_same_weights(eager_model, model)
