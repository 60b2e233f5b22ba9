"""The process's random generators as a checkpoint holds them, so a resumed run draws what the
uninterrupted run would have drawn: the same batches (Torchreid's samplers and the DataLoader's
seeds read torch's and Python's generators), the same augmentations (Python's and torch's) and
the same dropout (torch's)."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

CHECKPOINT_KEY = 'random_state'      # a checkpoint's list of every process's generator states


def host_random_state() -> dict:
    """Python's, NumPy's, torch's CPU and (where initialised) every CUDA generator's state, as
    plain values and tensors that a checkpoint loads with weights_only."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_host_random_state(state: dict) -> None:
    """Sets the generators `host_random_state` read (CUDA ones only when as many are here)."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and \
            len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


@contextmanager
def unchanged_randomness() -> Iterator[None]:
    """The host's generators as they were before the block, whatever it drew (an evaluation
    between epochs: a DataLoader draws a seed from torch's generator each time it starts)."""
    state = host_random_state()
    try:
        yield
    finally:
        restore_host_random_state(state)
