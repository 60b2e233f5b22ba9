"""The fast path for a GPU: bf16 autocast, channels_last and a compiled model (CUDA graphs).

`FastModel` wraps the model that Torchreid's engine drives, so the engine's own training step
and evaluation stay Torchreid's: the wrapper only changes how the forward pass runs (the
backward pass follows it). Outputs come back in float32, so losses and metrics are computed as
before. If compilation fails, it says so once and continues eagerly. Only a failure to compile
does that: an out-of-memory error or a bug in the model is raised as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from reidkit.data.datapath import build_cached_loaders, with_machine_workers
from reidkit.run import distributed
from reidkit.run.errors import UserError
from reidkit.train.step import TrainStep, compile_errors, fast_optimizer, note_compile_failure

DEVICE_TEST_BATCH = 256     # images per feature-extraction batch from the device cache

def switched_on(value: str, cuda: bool) -> bool:
    """'on', or 'auto' with CUDA."""
    return value == 'on' or (value == 'auto' and cuda)


def _float(output):
    if isinstance(output, torch.Tensor):
        return output.float()
    if isinstance(output, (tuple, list)):
        return type(output)(_float(item) for item in output)
    return output


class FastModel(nn.Module):
    """Runs `model` under bf16 autocast and/or channels_last, compiled for training."""

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None, channels_last: bool,
                 compile_mode: str | None):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        # Kept out of the module tree, so state_dict() holds each weight once.
        self.__dict__['compiled'] = torch.compile(self.model, mode=compile_mode) \
            if compile_mode else None

    @property
    def wrapped(self) -> nn.Module:
        """The model itself (see reidkit.run.checkpoints.unwrap)."""
        return self.model

    def forward(self, images: torch.Tensor):
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            return _float(self._forward(images))

    def _forward(self, images: torch.Tensor):
        # Only training is compiled: evaluation batches vary in size (the last one is smaller)
        # and would each cost a recompilation and a CUDA graph.
        if self.compiled is not None and self.training:
            try:
                return self.compiled(images)
            except compile_errors() as error:   # a missing compiler, an old GPU, an unsupported op
                note_compile_failure(error)
                self.__dict__['compiled'] = None
        return self.model(images)


def fast_path(model: nn.Module, device: torch.device, amp: str, channels_last: str,
              compile_setting: str, compile_model: bool = True) -> tuple[nn.Module, str]:
    """The model to train and evaluate with, and a line saying which path was taken.

    'auto' turns each switch on with CUDA and off on the CPU. `compile_model=False` leaves
    compilation to our training step (which compiles the forward pass with its loss)."""
    cuda = device.type == 'cuda'
    notes = []
    amp_dtype = None
    if amp == 'bf16' or (amp == 'auto' and cuda):
        if cuda and not torch.cuda.is_bf16_supported():
            notes.append('this GPU has no bf16, so AMP is off')
        else:
            amp_dtype = torch.bfloat16
    use_channels_last = channels_last == 'on' or (channels_last == 'auto' and cuda)
    compile_mode = None
    if compile_setting == 'on' or (compile_setting == 'auto' and cuda):
        # CUDA graphs replay fixed buffers: DDP's gradient hooks need the default mode.
        compile_mode = 'reduce-overhead' if cuda and not isinstance(
            model, nn.parallel.DistributedDataParallel) else 'default'
    parts = (['bf16 autocast'] if amp_dtype else []) + \
            (['channels_last'] if use_channels_last else []) + \
            ([f'torch.compile ({"CUDA graphs" if cuda else "CPU"})']
             if compile_mode and compile_model else [])
    compile_mode = compile_mode if compile_model else None
    line = 'Training path: ' + (' + '.join(parts) if parts else 'eager float32') + \
        (f' ({"; ".join(notes)})' if notes else '')
    if not parts:
        return model, line
    return FastModel(model, amp_dtype, use_channels_last, compile_mode), line


@dataclass
class FastTraining:
    """What the engine trains with: the model (wrapped by the fast path), our training step
    (None: Torchreid's), loaders over images decoded once (None: Torchreid's) and a line
    saying which path was taken."""
    model: nn.Module
    step: object
    loaders: tuple | None
    line: str


def fast_training(s, model: nn.Module, optimizer, datamanager) -> FastTraining:
    """The fast path for settings `s` (AMP, CHANNELS_LAST, COMPILE, TRAIN_STEP, DATA_CACHE,
    DATA_CACHE_GB): on with CUDA by default, forced on or off by a setting."""
    device = next(model.parameters()).device
    cuda = device.type == 'cuda'
    own_step = switched_on(s.TRAIN_STEP, cuda)
    compile_step = own_step and switched_on(s.COMPILE, cuda)
    if distributed.current().distributed:
        model = distributed_model(model, s, device)
    model, line = fast_path(model, device, s.AMP, s.CHANNELS_LAST, s.COMPILE,
                            compile_model=not own_step)
    step = None
    if own_step:
        step = TrainStep(model, fast_optimizer(optimizer), s.LOSS, s.LABEL_SMOOTH,
                         compile=compile_step)
        line += ' + our training step' + (' (compiled with its loss)' if compile_step else '')
    loaders = None
    if switched_on(s.DATA_CACHE, cuda):
        loaders, why = build_cached_loaders(
            datamanager, s.TRANSFORMS, s.HEIGHT, s.WIDTH, device, s.DATA_CACHE_GB,
            seed=(s.SEED + distributed.current().rank) % 2 ** 32,
            test_batch_size=DEVICE_TEST_BATCH if cuda else None)
        if loaders:
            line += ' + images decoded once, augmented on the device' + \
                (f' (features {max(s.BATCH_SIZE_TEST, DEVICE_TEST_BATCH)} images at a time)'
                 if cuda else '')
        else:
            # Torchreid's loader must keep up with the GPU: every spare core decodes.
            workers = with_machine_workers(datamanager) if cuda else None
            line += f' (Torchreid\'s loader: {why}' + \
                (f'; {workers} loader workers, one per spare core)' if workers else ')')
    return FastTraining(model, step, loaders, line.replace('Training path: eager float32 + ',
                                                           'Training path: float32 + '))


def distributed_model(model: nn.Module, s, device: torch.device) -> nn.Module:
    """The model in DistributedDataParallel (SyncBatchNorm first with SYNC_BN), in the memory
    format the fast path will use, so DDP's gradient buckets match the weights' layout."""
    if switched_on(s.CHANNELS_LAST, device.type == 'cuda'):
        model = model.to(memory_format=torch.channels_last)
    if s.SYNC_BN:
        if device.type != 'cuda':
            raise UserError('SYNC_BN=True needs CUDA GPUs (PyTorch\'s SyncBatchNorm runs only '
                            'there). Pass --SYNC_BN=False to train on the CPU.')
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the same parameters
    # FIXBASE_EPOCH: frozen layers give no gradient, which DDP must be told to expect.
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None,
        find_unused_parameters=s.FIXBASE_EPOCH > 0)
