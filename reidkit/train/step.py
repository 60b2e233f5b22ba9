"""Our training step: the loss on the device, optionally compiled, no host sync per batch.

Torchreid's step (`ImageSoftmaxEngine.forward_backward`, `ImageTripletEngine.forward_backward`)
builds its label-smoothing target on the CPU, mines triplets in a Python loop over the batch
(a boolean-mask index, hence a sync, per anchor) and reads the loss and the accuracy with
`.item()` every batch, so the GPU waits for the CPU on every step. `TrainStep` computes the
same numbers (the tests compare it with Torchreid's own engines) with device-only tensor ops and
returns them as device tensors; `RunningMeans` adds them up on the device and reads them back
once per log line. `fast_optimizer` turns on the fused Adam kernel on CUDA while keeping the
optimizer's checkpoints those of a plain Adam. With CENTER_LOSS_WEIGHT the step adds the centre
loss (`center_loss`), whose class centres (`Centers`) have their own optimiser.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from reidkit.run import distributed

Outputs = torch.Tensor | Sequence[torch.Tensor]

# Torchreid's CrossEntropyLoss default; its engines only switch smoothing on or off.
LABEL_SMOOTH_EPSILON = 0.1


def compile_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean "torch.compile could not compile this", as opposed to errors
    of the model or the machine that would happen without it too. Inductor's TritonMissing and
    GPUTooOldForTriton are not BackendCompilerFailed (Dynamo re-raises them unwrapped)."""
    from torch._dynamo import exc
    from torch._inductor.exc import GPUTooOldForTriton, TritonMissing
    return (exc.BackendCompilerFailed, exc.Unsupported, exc.InvalidBackend,
            GPUTooOldForTriton, TritonMissing)


def note_compile_failure(error: Exception, what: str = '') -> None:
    """Says once that compiling `what` failed and that the run carries on eagerly; an
    out-of-memory error wrapped by the compiler is raised as it is."""
    cause = getattr(error, 'inner_exception', None) or error
    if isinstance(cause, torch.OutOfMemoryError):
        raise cause
    text = str(cause).strip()
    print(f'Note: torch.compile failed{f" for {what}" if what else ""} ({type(cause).__name__}: '
          f'{text.splitlines()[0][:200] if text else ""}); continuing without compilation '
          f'(COMPILE=off skips the attempt).')


def _mean_over_outputs(loss: Callable, outputs: Outputs, targets: torch.Tensor, *args):
    """Like Torchreid's DeepSupervision: a model with several outputs is trained on the mean of
    their losses (the sum divided by their number)."""
    if isinstance(outputs, (tuple, list)):
        return sum(loss(output, targets, *args) for output in outputs) / len(outputs)
    return loss(outputs, targets, *args)


def label_smoothed_cross_entropy(logits: Outputs, targets: torch.Tensor,
                                 epsilon: float = LABEL_SMOOTH_EPSILON) -> torch.Tensor:
    """Cross-entropy against (1 - epsilon) * one-hot + epsilon / K, averaged over the batch,
    K being the number of logits: Torchreid's CrossEntropyLoss (epsilon=0: without smoothing),
    computed in float32 on the logits' device."""
    return _mean_over_outputs(_label_smoothed_cross_entropy, logits, targets, epsilon)


def _label_smoothed_cross_entropy(logits, targets, epsilon):
    # Autocast off: under bf16 autocast the loss would otherwise be reduced in bf16.
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.float(), targets, label_smoothing=epsilon)


def batch_hard_triplet_loss(features: Outputs, targets: torch.Tensor,
                            margin: float = 0.3) -> torch.Tensor:
    """For each anchor, its farthest same-identity and nearest other-identity image in the batch;
    the mean of max(0, positive - negative + margin): Torchreid's TripletLoss, without its
    per-anchor Python loop. An anchor with no other identity in the batch adds 0 (Torchreid's
    raises on it)."""
    return _mean_over_outputs(_batch_hard_triplet_loss, features, targets, margin)


def _batch_hard_triplet_loss(features, targets, margin):
    with torch.autocast(features.device.type, enabled=False):   # distances in float32
        x = features.float()
        squared_norms = x.pow(2).sum(dim=1, keepdim=True)
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, clamped before the square root as Torchreid does
        # (rounding can make it negative, and sqrt's gradient at 0 is infinite). The anchor's
        # distance to itself is therefore 1e-6, and it counts as a positive, as in Torchreid.
        distances = torch.addmm(squared_norms + squared_norms.t(), x, x.t(), alpha=-2)
        distances = distances.clamp(min=1e-12).sqrt()
        same_identity = targets[:, None] == targets[None, :]
        # amax/amin share the gradient evenly between tied distances, as Torchreid's max()/min()
        # over a masked row do.
        hardest_positive = torch.where(same_identity, distances, float('-inf')).amax(dim=1)
        hardest_negative = torch.where(same_identity, float('inf'), distances).amin(dim=1)
        # clamp, not relu: the same gradient at the hinge as MarginRankingLoss.
        return (hardest_positive - hardest_negative + margin).clamp(min=0).mean()


def center_loss(features: Outputs, targets: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The centre loss (Wen et al., "A Discriminative Feature Learning Approach for Deep Face
    Recognition", ECCV 2016) as the Bag of Tricks computes it (reid-strong-baseline's
    `CenterLoss`): the mean over the batch of each feature's squared euclidean distance to its
    identity's centre, ||f_i - c_{y_i}||^2, each clamped to [1e-12, 1e12] as BoT does. Wen et
    al. write half of the sum over the batch; BoT's mean without the half is what its weight
    (CENTER_LOSS_WEIGHT, 5e-4) was tuned with. Unlike BoT we subtract directly instead of
    expanding |f|^2 + |c|^2 - 2 f.c (the same value, without its rounding).

    features: (B, D), targets: (B,) int64 in [0, K), centers: (K, D); a float32 scalar,
    computed in float32 on the features' device. Several feature outputs: their losses' mean."""
    return _mean_over_outputs(_center_loss, features, targets, centers)


def _center_loss(features, targets, centers):
    with torch.autocast(features.device.type, enabled=False):
        offsets = features.float() - centers.float()[targets]
        return offsets.pow(2).sum(dim=1).clamp(min=1e-12, max=1e12).mean()


def top1_accuracy(logits: Outputs, targets: torch.Tensor) -> torch.Tensor:
    """Percentage of the batch whose highest logit is its identity, as Torchreid's
    `metrics.accuracy(logits, targets)[0]` (first output only, when there are several)."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return (logits.argmax(dim=1) == targets).float().mean() * 100


@dataclass(frozen=True)
class Loss:
    """What a training step minimises, as Torchreid's engines take it: 'softmax' (label-smoothed
    cross-entropy) or 'triplet' (weight_t * batch-hard triplet loss with `margin` + weight_x *
    cross-entropy); plus, with either, center_weight * the centre loss (BoT's third term; 0:
    off). ValueError for a name or weights Torchreid's engines would reject, or a negative
    center_weight."""
    name: str = 'softmax'
    label_smooth: bool = True
    weight_t: float = 1.0
    weight_x: float = 1.0
    margin: float = 0.3
    center_weight: float = 0.0

    def __post_init__(self):
        if self.name not in ('softmax', 'triplet'):
            raise ValueError(f"loss={self.name!r}: choose 'softmax' or 'triplet'.")
        if self.name == 'triplet' and (self.weight_t < 0 or self.weight_x < 0
                                       or self.weight_t + self.weight_x <= 0):
            raise ValueError(f'weight_t={self.weight_t}, weight_x={self.weight_x}: both must '
                             'be >= 0 and at least one > 0.')
        if not self.center_weight >= 0:
            raise ValueError(f'center_weight={self.center_weight}: must be >= 0 (0: off).')

    @property
    def epsilon(self) -> float:
        """The label-smoothing epsilon (0: none)."""
        return LABEL_SMOOTH_EPSILON if self.label_smooth else 0.0

    @property
    def needs_features(self) -> bool:
        """Whether the model must return (logits, features) in training, as Torchreid's models
        built with loss='triplet' do: for the triplet or the centre loss."""
        return self.name == 'triplet' or self.center_weight > 0


class Centers:
    """The centre loss's class centres, a (num_classes, feature_dim) float32 parameter on
    `device`, with their own optimiser: plain SGD at `lr` (CENTER_LR), never warmed up nor
    scheduled, as BoT's `optimizer_center`. They start from a standard normal draw (BoT's
    torch.randn) from their own generator seeded with `seed`: every DDP process starts with the
    same centres, and the run's random stream (data order, augmentations) is left as it is.

    `step(weight)` follows a backward pass through `weight * center_loss`: it divides the
    centres' gradient by `weight` (as BoT's trainer does), so they move at `lr` whatever the
    weight, averages it over DDP processes as DDP averages the model's, then steps. Every
    operation stays on the device (no host sync)."""

    def __init__(self, num_classes: int, feature_dim: int, lr: float,
                 device: torch.device | str = 'cpu', seed: int = 0):
        start = torch.randn(num_classes, feature_dim,
                            generator=torch.Generator().manual_seed(seed))
        self.centers = nn.Parameter(start.to(device))
        self.optimizer = torch.optim.SGD([self.centers], lr=lr)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, weight: float) -> None:
        grad = self.centers.grad
        grad.mul_(1.0 / weight)
        distributed.average(grad)
        self.optimizer.step()

    def state_dict(self) -> dict:
        """{'centers': (K, D) tensor, 'optimizer': the SGD's state_dict}, for a checkpoint."""
        return {'centers': self.centers.detach(), 'optimizer': self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()`'s output exactly; RuntimeError for centres of another shape
        (other identities or another feature size), KeyError for a dict without them."""
        with torch.no_grad():
            self.centers.copy_(state['centers'])
        self.optimizer.load_state_dict(state['optimizer'])


def training_feature_size(model: nn.Module, height: int, width: int) -> int:
    """The length of the feature `model` returns beside its logits in training (what the
    triplet and centre losses see: Torchreid's models built with loss='triplet' return
    (logits, features)), for images of height x width. Found by running the model on the meta
    device (shapes only: no memory, no computation, its weights and statistics untouched).
    ValueError when the model returns no single (batch, length) feature in training."""
    meta = {name: torch.empty_like(tensor, device='meta') for name, tensor in
            chain(model.named_parameters(), model.named_buffers())}
    images = torch.empty(2, 3, height, width, device='meta')
    was_training = model.training
    model.train()
    try:
        outputs = torch.func.functional_call(model, meta, (images,))
    finally:
        model.train(was_training)
    features = outputs[1] if isinstance(outputs, (tuple, list)) and len(outputs) == 2 else None
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError('the model returns no (logits, features) pair with one feature vector '
                         'per image in training')
    return int(features.shape[1])


class TrainStep:
    """One training step of Torchreid's softmax or triplet engine, without a host sync.

    `step(images, pids)` runs the forward pass and the loss (compiled together with
    `compile=True`), then backward and `optimizer.step()`, and returns the batch's values as
    detached 0-dim tensors on the device: {'loss', 'acc'} for softmax; for triplet, 'loss_t'
    when weight_t > 0 and 'loss_x', 'acc' when weight_x > 0, as Torchreid's engines name them;
    with either, 'loss_c' (the centre loss, unweighted) when loss.center_weight > 0, the
    `centers` then stepping after the model's optimizer. 'acc' is top-1 accuracy in percent.
    The model's train/eval mode is left to the caller. ValueError when `centers` are given
    without a center_weight or the reverse."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss: Loss = Loss(), compile: bool = False, centers: Centers | None = None):
        if (loss.center_weight > 0) != (centers is not None):
            raise ValueError(f'center_weight={loss.center_weight} with '
                             f'{"no " if centers is None else ""}centers: the centre loss '
                             'needs both (or neither).')
        self.model, self.optimizer, self.loss, self.centers = model, optimizer, loss, centers
        # Only forward + loss are compiled: backward is autograd's (AOTAutograd compiles it with
        # the forward) and the optimizer stays an ordinary call.
        self._compiled = torch.compile(self.forward_and_loss) if compile else None
        self.compile_error: Exception | None = None   # why compilation was given up, if it was

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def __call__(self, images: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        images = images.to(device, non_blocking=True)
        pids = pids.to(device, non_blocking=True)
        # Before the forward pass, so last step's gradients are freed before the activations
        # are allocated.
        self._zero_grad()
        values = self._forward_and_backward(images, pids)
        self.optimizer.step()
        if self.centers is not None:
            self.centers.step(self.loss.center_weight)
        return {name: value.detach() for name, value in values.items()}

    def forward_and_loss(self, images: torch.Tensor, pids: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and the batch's values to report (not yet detached)."""
        loss = self.loss
        if loss.needs_features:
            logits, features = self.model(images)
        else:
            logits = self.model(images)
        if loss.name == 'softmax':
            total = label_smoothed_cross_entropy(logits, pids, loss.epsilon)
            values = {'loss': total, 'acc': top1_accuracy(logits, pids)}
        else:
            total, values = 0, {}
            if loss.weight_t > 0:
                values['loss_t'] = batch_hard_triplet_loss(features, pids, loss.margin)
                total = total + loss.weight_t * values['loss_t']
            if loss.weight_x > 0:
                values['loss_x'] = label_smoothed_cross_entropy(logits, pids, loss.epsilon)
                values['acc'] = top1_accuracy(logits, pids)
                total = total + loss.weight_x * values['loss_x']
        if loss.center_weight > 0:
            values['loss_c'] = center_loss(features, pids, self.centers.centers)
            total = total + loss.center_weight * values['loss_c']
        return total, values

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.centers is not None:
            self.centers.zero_grad()

    def _forward_and_backward(self, images, pids) -> dict[str, torch.Tensor]:
        if self._compiled is not None:
            # backward() inside the try too: AOTAutograd compiles the backward graph lazily, at
            # the first backward (and again at a recompile), so a compiler failure can show there.
            try:
                total, values = self._compiled(images, pids)
                total.backward()
                return values
            except compile_errors() as error:   # a missing compiler, an old GPU, an unsupported op
                note_compile_failure(error, 'the training step')
                self.compile_error, self._compiled = error, None
                # A backward that failed part-way may have left gradients. (Its forward pass
                # has updated BatchNorm's running statistics once more, on this batch only.)
                self._zero_grad()
        total, values = self.forward_and_loss(images, pids)
        total.backward()
        return values


class RunningMeans:
    """Means of a step's values since the last reset, summed on the device; `means()` reads
    them all back in one transfer (so the log and TensorBoard cost one sync per print)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            if name in self._sums:
                self._sums[name] += value
            else:
                self._sums[name] = value.clone()    # ours to add into in place
            self._counts[name] = self._counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        if not self._sums:
            return {}
        names = list(self._sums)
        sums = torch.stack([self._sums[name] for name in names]).tolist()   # the one transfer
        return {name: total / self._counts[name] for name, total in zip(names, sums)}


def fast_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer object, called once the model is in the memory format it trains in:
    its state in its parameters' layouts (`state_like_parameters`), and Adam's (and AdamW's)
    fused kernel turned on when every parameter is on CUDA (one kernel per step instead of
    several per tensor group, and its step count stays on the GPU). Nothing else changes."""
    state_like_parameters(optimizer)
    params = [p for group in optimizer.param_groups for p in group['params']]
    if isinstance(optimizer, torch.optim.Adam) and params \
            and all(p.is_cuda and p.is_floating_point() for p in params) \
            and not any(group.get('differentiable') for group in optimizer.param_groups):
        fuse_adam(optimizer)
    return optimizer


def fuse_adam(optimizer: torch.optim.Adam) -> torch.optim.Adam:
    """Switches an existing Adam/AdamW to its fused implementation, in place (so a scheduler or
    an engine holding it keeps working), on any device that has the kernel.

    Adam reads `group['fused']` at every step, so setting it after construction is honoured; the
    fused kernel also wants each `step` count as a float32 tensor on the parameter's device.
    Checkpoints stay plain: `state_dict()` reports each group's original 'fused' setting and
    CPU step counts, as a plain Adam's; after `load_state_dict()` the groups are fused again."""
    if hasattr(optimizer, '_reidkit_plain_fused'):
        return optimizer                      # already fused by us
    optimizer._reidkit_plain_fused = [group['fused'] for group in optimizer.param_groups]
    _fuse_groups(optimizer)
    optimizer._step_supports_amp_scaling = True   # as Adam(fused=True) sets for GradScaler
    optimizer.register_state_dict_post_hook(_plain_state_dict)
    optimizer.register_load_state_dict_post_hook(_fuse_groups)
    return optimizer


def state_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Gives each floating state tensor of a parameter's shape (Adam's exp_avg, exp_avg_sq,
    SGD's momentum_buffer...) that parameter's strides, in place in `optimizer.state`.

    A resumed state keeps the layout it was saved in, while the model may since have moved to
    or from channels_last (CHANNELS_LAST changed, or a CPU run resumed on a GPU). Element-wise
    ops do not mind, but the fused Adam kernel pairs elements by memory position: CUDA's raises
    on unequal strides, the CPU's silently mixes up the elements."""
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() \
                    and value.shape == param.shape and value.stride() != param.stride():
                state[name] = torch.empty_like(param, dtype=value.dtype,
                                               device=value.device).copy_(value)


def _fuse_groups(optimizer: torch.optim.Optimizer) -> None:
    state_like_parameters(optimizer)         # the fused kernel needs them in the same layout
    for group in optimizer.param_groups:
        group['fused'] = True
        for param in group['params']:
            state = optimizer.state.get(param)
            if state and 'step' in state:
                state['step'] = state['step'].to(param.device, torch.float32)


def _plain_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    for group, fused in zip(state_dict['param_groups'], optimizer._reidkit_plain_fused):
        group['fused'] = fused
    # New per-parameter dicts: state_dict() shares them with the live state.
    state_dict['state'] = {
        key: {**state, 'step': state['step'].to('cpu')} if 'step' in state else state
        for key, state in state_dict['state'].items()}
    return state_dict
