"""The fast path for a GPU: bf16 autocast, channels_last, a compiled step, images decoded once.

`FastModel` runs the model in channels_last and/or, while training, under bf16 autocast;
outputs come back in float32, so losses and metrics are computed as before, and evaluation
features are float32 on every device (as on the CPU, in search and in an exported model).
`fast_training` puts together what the engine trains with: the model (in DDP first when
several processes train), our training step (compiled with its loss under COMPILE, where
Inductor can) and, under DATA_CACHE, loaders over images decoded once.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn as nn

from reidkit.data.datapath import CacheRequest, build_cached_loaders, with_machine_workers
from reidkit.run import distributed
from reidkit.train.ddp import distributed_model
from reidkit.train.step import Centers, Loss, TrainStep, fast_optimizer

DEVICE_TEST_BATCH = 256     # images per feature-extraction batch from the device cache


def switched_on(value: str, cuda: bool) -> bool:
    """A fast-path switch's value: 'auto' is on with CUDA, 'off' is off, any other choice
    ('on', 'bf16') is on."""
    return cuda if value == 'auto' else value != 'off'


# Inductor's GPU kernels are Triton's, and Triton runs on compute capability 7.0 (Volta) or newer.
TRITON_MIN_CAPABILITY = (7, 0)


def compile_choice(value: str, device: torch.device) -> tuple[bool, str]:
    """Whether COMPILE=`value` compiles the training step on `device`, and why not when 'auto'
    leaves it off on a GPU ('' otherwise): Inductor needs Triton installed and a GPU of compute
    capability 7.0 or newer. A forced 'on' is tried anyway (a failure falls back to eager)."""
    cuda = device.type == 'cuda'
    if value != 'auto' or not cuda:
        return switched_on(value, cuda), ''
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < TRITON_MIN_CAPABILITY:
        return False, ('not compiled: Triton needs a GPU of compute capability '
                       f'{".".join(map(str, TRITON_MIN_CAPABILITY))} or newer, this one is '
                       f'{".".join(map(str, capability))}')
    if importlib.util.find_spec('triton') is None:
        return False, 'not compiled: Triton is not installed'
    return True, ''


def _float(output):
    if isinstance(output, torch.Tensor):
        return output.float()
    if isinstance(output, (tuple, list)):
        return type(output)(_float(item) for item in output)
    return output


class FastModel(nn.Module):
    """Runs `model` in channels_last and/or, in training mode only, under autocast to
    `amp_dtype` (bf16): evaluation mode computes in float32."""

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None, channels_last: bool):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last

    @property
    def wrapped(self) -> nn.Module:
        """The model itself (see reidkit.run.checkpoints.unwrap)."""
        return self.model

    def forward(self, images: torch.Tensor):
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None and self.training):
            return _float(self.model(images))


def fast_path(model: nn.Module, device: torch.device, amp: str, channels_last: str,
              compiled: bool) -> tuple[nn.Module, str]:
    """The model to train and evaluate with (wrapped in FastModel where AMP or CHANNELS_LAST
    is on) and the words that say so for the path line ('eager float32' when neither is on and
    the step is not `compiled`)."""
    cuda = device.type == 'cuda'
    amp_dtype, note = None, ''
    if switched_on(amp, cuda):
        # Emulated bf16 (T4, RTX 20xx: compute capability below 8.0) leaves cuDNN's kernels
        # and Inductor skips its graphs: slower than float32 there.
        if cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
            note = ' (this GPU has no native bf16, so AMP is off)'
        else:
            amp_dtype = torch.bfloat16
    use_channels_last = switched_on(channels_last, cuda)
    parts = (['bf16 autocast'] if amp_dtype else []) + \
            (['channels_last'] if use_channels_last else [])
    if not parts:
        return model, ('float32' if compiled else 'eager float32') + note
    return FastModel(model, amp_dtype, use_channels_last), ' + '.join(parts) + note


@dataclass
class FastTraining:
    """What the engine trains with: the model (wrapped by the fast path), our training step,
    loaders over images decoded once (None: Torchreid's) and a line saying which path was
    taken."""
    model: nn.Module
    step: TrainStep
    loaders: tuple | None
    line: str


def fast_training(s, model: nn.Module, optimizer, datamanager, training: bool = True,
                  centers: Centers | None = None) -> FastTraining:
    """The training path for settings `s` (AMP, CHANNELS_LAST, COMPILE, DATA_CACHE,
    DATA_CACHE_GB: on with CUDA by default, forced on or off by a setting; SYNC_BN under DDP).
    Not `training` (test, visrank): no training images are decoded, and no centre loss.
    `centers`: the centre loss's (CENTER_LOSS_WEIGHT > 0), trained by the same step."""
    device = next(model.parameters()).device
    cuda = device.type == 'cuda'
    compile_step, not_compiled = compile_choice(s.COMPILE, device)
    if distributed.current().distributed:
        model = distributed_model(model, device, switched_on(s.CHANNELS_LAST, cuda), s.SYNC_BN,
                                  frozen_layers=s.FIXBASE_EPOCH > 0)
    model, words = fast_path(model, device, s.AMP, s.CHANNELS_LAST, compile_step)
    loss = Loss(s.LOSS, s.LABEL_SMOOTH,
                center_weight=s.CENTER_LOSS_WEIGHT if training else 0.0)
    step = TrainStep(model, fast_optimizer(optimizer), loss, compile=compile_step,
                     centers=centers if training else None)
    line = f'Training path: {words} + our training step' + \
        (' (compiled with its loss)' if compile_step else
         f' ({not_compiled})' if not_compiled else '')
    loaders = None
    if switched_on(s.DATA_CACHE, cuda):
        loaders, why = build_cached_loaders(datamanager, CacheRequest(
            s.TRANSFORMS, s.HEIGHT, s.WIDTH, device, s.DATA_CACHE_GB,
            seed=distributed.rank_seed(s.SEED),
            test_batch_size=DEVICE_TEST_BATCH if cuda else None, train=training))
        if loaders:
            line += ' + images decoded once, augmented on the device' + \
                (f' (features {max(s.BATCH_SIZE_TEST, DEVICE_TEST_BATCH)} images at a time)'
                 if cuda else '')
        else:
            # Torchreid's loader must keep up with the GPU: every spare core decodes.
            workers = with_machine_workers(datamanager) if cuda else None
            line += f' (Torchreid\'s loader: {why}' + \
                (f'; {workers} loader workers, one per spare core)' if workers else ')')
    return FastTraining(model, step, loaders, line)
