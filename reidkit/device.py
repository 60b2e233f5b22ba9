"""The device a run uses, chosen at run time from DEVICE ('auto', 'cuda' or 'cpu')."""
from __future__ import annotations

import torch
import torch.nn as nn

from reidkit.errors import UserError


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


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device`: this process's GPU under DDP (several GPUs train as several
    processes, see reidkit.distributed), else the first visible one."""
    from reidkit import distributed
    return model.to(distributed.device_for(distributed.current(), device))
