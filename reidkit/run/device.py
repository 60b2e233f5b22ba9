"""The device a run uses, chosen at run time from DEVICE ('auto', 'cuda' or 'cpu')."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from reidkit.run import distributed
from reidkit.run.errors import UserError


def choose_device(setting: str) -> torch.device:
    """CUDA when asked for or available; 'cuda' without a GPU is an error, 'auto' falls back."""
    if setting not in ('auto', 'cuda', 'cpu'):
        raise UserError(f"DEVICE must be 'auto', 'cuda' or 'cpu', got {setting!r}.")
    if setting == 'cpu':
        return torch.device('cpu')
    if torch.cuda.is_available():
        return torch.device('cuda')
    if setting == 'cuda':
        raise UserError(
            "DEVICE='cuda' but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False). "
            "Check the driver with nvidia-smi and that the installed torch is a CUDA build, or "
            "set --DEVICE=auto to run on the CPU."
        )
    print('Note: no CUDA GPU found; running on the CPU (DEVICE=auto).')
    return torch.device('cpu')


def use_threads(threads: int) -> None:
    """torch's intra-op threads in this process: `threads` (CPU_THREADS), or torch's default
    (one per core, or OMP_NUM_THREADS) for 0. UserError for a negative count."""
    if threads < 0:
        raise UserError(f'CPU_THREADS={threads} must be 0 (torch\'s default: one per core) or a '
                        f'number of threads, e.g. --CPU_THREADS=1 on a busy machine.')
    if threads > 0:
        torch.set_num_threads(threads)


def busy_cpu_note(load: float | None = None, cores: int | None = None,
                  chosen: bool = False) -> str | None:
    """A hint when the CPU is already busy: torch runs one thread per core in each process,
    and on a shared machine those threads wait on each other (on this project's 2-core machine
    one demo epoch took 246 s and 341 s with two threads, 84 s and 177 s with one, at a load of
    7; one batch 17.9 s against 2.2 s at a load of 4.8). None when the load is below the cores
    or the thread count was chosen (CPU_THREADS or OMP_NUM_THREADS)."""
    cores = torch.get_num_threads() if cores is None else cores
    if chosen or 'OMP_NUM_THREADS' in os.environ or cores <= 1:
        return None
    load = os.getloadavg()[0] if load is None else load
    if load < cores + 1:
        return None
    return (f'Note: this machine is busy (load {load:.1f} for {cores} threads): torch\'s '
            f'{cores} threads per process slow each other down here; with --CPU_THREADS=1 '
            f'a run is often 2-8x faster on a shared machine (the demo uses one thread).')


def thread_facts() -> dict:
    """{'torch': torch.get_num_threads(), 'OMP_NUM_THREADS': its text or None}: how many
    threads split each sum on the CPU. Their order changes the last bits of every sum, so a
    run repeats bit for bit at the same thread count (and SEED), not at another."""
    return {'torch': torch.get_num_threads(),
            'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS')}


def threads_line() -> str:
    """The log's first line for a run: its thread count (thread_facts)."""
    facts = thread_facts()
    omp = facts['OMP_NUM_THREADS']
    return (f'Threads: {facts["torch"]} (torch.get_num_threads(), CPU_THREADS; OMP_NUM_THREADS '
            f'{"=" + omp if omp is not None else "not set"}). A run repeats bit for bit at the '
            f'same SEED and thread count.')


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device`: this process's GPU under DDP (several GPUs train as several
    processes, see reidkit.run.distributed), else the first visible one."""
    return model.to(distributed.device_for(distributed.current(), device))


def tune_convolutions(device: torch.device) -> bool:
    """Has cuDNN time its convolution algorithms for each input shape and keep the fastest
    (torch.backends.cudnn.benchmark) on CUDA: training batches all have one shape (images
    resized to HEIGHT x WIDTH, drop_last), so the timing is paid once. Returns whether it
    was turned on (False off CUDA)."""
    if device.type != 'cuda':
        return False
    torch.backends.cudnn.benchmark = True
    return True
