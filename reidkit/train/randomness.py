"""The random number generators' states, saved with every training checkpoint, so that a
resumed run draws the same data order and augmentations as an uninterrupted one.

A training run draws from four generators: torch's (the samplers' seeds, the loader workers'
seeds, the device data path's crops, flips and erasing), CUDA's (the same on a GPU), Python's
`random` and numpy's (Torchreid's samplers and transforms in the main process). Their states
at the end of an epoch are where the next epoch starts; evaluation leaves them alone
(`untouched_by`), so the state saved before or after an evaluation is the same. Under DDP each
process draws from its own seed (distributed.rank_seed): every process's states are stored,
and restored to the process of the same rank.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

from reidkit.run import distributed

CHECKPOINT_KEY = 'random_states'


def _states() -> dict:
    """This process's generator states as tensors and numbers (what a weights-only
    torch.load reads back)."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'position': int(position),
                  'has_gauss': int(has_gauss), 'gauss': float(gauss)},
        'python': {'version': version, 'state': torch.tensor(python_state, dtype=torch.int64),
                   'gauss': python_gauss},
    }


def random_states() -> list[dict]:
    """Every process's generator states, in rank order (one item without DDP). Under DDP
    every process must call it (an all-gather)."""
    mine = _states()
    process = distributed.current()
    if not process.distributed:
        return [mine]
    gathered = [None] * process.world_size
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def restore_random_states(saved: list[dict] | None) -> str | None:
    """Sets this process's generators to its rank's saved states. Returns a note when they
    cannot be (a checkpoint written before they were saved, or by another number of processes:
    the run continues with freshly seeded generators, so its data order differs from an
    uninterrupted run's), else None."""
    process = distributed.current()
    if not saved:
        return ('the checkpoint holds no random states (written by an older version), so the '
                'data order and augmentations from here on differ from an uninterrupted run\'s')
    if len(saved) != process.world_size:
        return (f'the checkpoint\'s random states are those of {len(saved)} processes and this '
                f'run has {process.world_size}, so the data order and augmentations from here '
                f'on differ from an uninterrupted run\'s')
    state = saved[process.rank]
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() \
            and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    numpy = state['numpy']
    np.random.set_state(('MT19937', numpy['keys'].numpy().astype(np.uint32), numpy['position'],
                         numpy['has_gauss'], numpy['gauss']))
    python = state['python']
    random.setstate((python['version'], tuple(python['state'].tolist()), python['gauss']))
    return None


@contextlib.contextmanager
def untouched_by(device: torch.device) -> Iterator[None]:
    """Runs the block (an evaluation) with torch's generators forked: whatever it draws (a
    data loader draws a seed each time it is iterated), the training after it draws what it
    would have drawn without it."""
    devices = [device] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        yield
