"""Training with several processes: DistributedDataParallel, launched by `torchrun` or by
`python main.py` itself on a box with several GPUs.

One process per GPU (NCCL), or per CPU slot with `torchrun` on a CPU box (gloo). Each process
runs the same single-GPU path on its shard of every epoch; gradients are averaged by DDP.
Only rank 0 writes (run folder, log, TensorBoard, checkpoints, metrics, rank images); every
rank extracts a shard of the test features, and all ranks gather them for one exact
evaluation, so every rank reaches the same decisions (divergence, best epoch) in step.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from reidkit.run.errors import UserError

# Longest a process waits for the others in one collective; then it stops with an error
# instead of hanging (a dead or unreachable peer). Checkpoint writes on rank 0 fit in it.
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get('REIDKIT_DDP_TIMEOUT', 600)))


@dataclass(frozen=True)
class ProcessRank:
    """Where this one process stands: its rank among `world_size` processes and its GPU
    (local_rank) on this machine."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current = ProcessRank()


def current() -> ProcessRank:
    return _current


def processes_on_this_machine() -> int:
    """How many processes of this run share this machine's cores: LOCAL_WORLD_SIZE (set by
    torchrun and by our launcher), 1 without it."""
    try:
        return max(1, int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    except ValueError:          # not ours to judge: torchrun sets it
        return 1


def rank_seed(seed: int) -> int:
    """This process's random seed from the run's SEED: under DDP each process draws its own
    augmentations (and data-path shuffles), while rank 0's weights are broadcast to all."""
    return (seed + current().rank) % 2 ** 32


def launched() -> bool:
    """Started by torchrun (or by our own launcher, which sets the same variables)."""
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


def start(device_setting: str) -> ProcessRank:
    """Joins the process group torchrun describes in the environment (a no-op otherwise).
    NCCL with CUDA, gloo on the CPU; each process takes the GPU of its LOCAL_RANK."""
    global _current
    if not launched() or dist.is_initialized():
        return _current
    end_with_launcher()
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    cuda = device_setting != 'cpu' and torch.cuda.is_available()
    if device_setting == 'cuda' and not cuda:
        raise UserError("DEVICE='cuda' but this process sees no CUDA GPU. Check nvidia-smi "
                        "and CUDA_VISIBLE_DEVICES, or pass --DEVICE=cpu to train with gloo.")
    backend = 'gloo'
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f'DDP: process {rank} has LOCAL_RANK {local_rank} but this machine shows '
                f'{torch.cuda.device_count()} GPU(s). Start at most one process per GPU '
                f'(torchrun --nproc_per_node={torch.cuda.device_count()}).')
        torch.cuda.set_device(local_rank)
        if dist.is_nccl_available():
            backend = 'nccl'
        else:
            print('Note: this PyTorch has no NCCL; the processes talk over gloo (slower).')
    try:
        dist.init_process_group(backend, timeout=TIMEOUT,
                                **({'device_id': torch.device('cuda', local_rank)}
                                   if backend == 'nccl' else {}))
    except (RuntimeError, ValueError) as error:
        raise UserError(
            f'DDP: process {rank} of {world} could not join the process group '
            f'(MASTER_ADDR={os.environ.get("MASTER_ADDR")}, MASTER_PORT='
            f'{os.environ.get("MASTER_PORT")}): {str(error).splitlines()[0][:300]}. Check '
            f'that the rendezvous host is reachable from every machine, the port is free and '
            f'open, and every launcher uses the same --nnodes and --rdzv-endpoint.') from error
    _current = ProcessRank(rank, world, local_rank)
    _stop_on_sigterm.pid = os.getpid()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if rank != 0:       # one set of progress bars and warnings: rank 0's
        os.environ['TQDM_DISABLE'] = '1'
        warnings.filterwarnings('ignore')
    return _current


# The process that started this one (torchrun, or our own launcher), as it was at import:
# early, so a launcher gone before `end_with_launcher` runs is still noticed.
_LAUNCHER = os.getppid()
PR_SET_PDEATHSIG = 1                # <linux/prctl.h>


def end_with_launcher() -> bool:
    """Asks Linux to send this process SIGTERM when its launcher ends, however it ends: after
    a `kill -9` of torchrun (or the OOM killer choosing it) the workers would otherwise train
    on alone, writing checkpoints into the run folder while a resume trains into it too.
    SIGTERM then stops this process as Ctrl-C does (see `_stop_on_sigterm`). Returns whether
    the request was made (False off Linux, where nothing stops an orphaned worker).

    Linux sends it when the launcher's *thread* that started this process ends: torchrun and
    our launcher start workers from their main thread."""
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):       # no C library to ask
        return False
    if os.getppid() != _LAUNCHER:           # it ended before the request: stop now
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _stop_on_sigterm(signum, frame):
    # torchrun (or our launcher) ends the other processes with SIGTERM when one fails or the
    # user presses Ctrl-C: stop like Ctrl-C, so the log says where to resume from. A forked
    # child (an image-decoding worker) inherits this handler: there SIGTERM must just end it.
    if os.getpid() != _stop_on_sigterm.pid:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise KeyboardInterrupt


def stop(barrier: bool = False) -> None:
    """Leaves the process group (after every process reaches this point, with `barrier`)."""
    global _current
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _current = ProcessRank()


def device_for(process: ProcessRank, device: torch.device) -> torch.device:
    """This process's GPU (cuda:LOCAL_RANK) when training on CUDA with several processes."""
    if device.type == 'cuda' and process.distributed:
        return torch.device('cuda', process.local_rank)
    return device


def on_main(make: Callable[[], object]):
    """`make()` on rank 0 only (e.g. creating a folder); every rank gets its result."""
    process = current()
    if not process.distributed:
        return make()
    box = [None]
    if process.is_main:
        try:
            box[0] = ('ok', make())
        except UserError as error:      # every rank stops with rank 0's message
            box[0] = ('error', str(error))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == 'error':
        error = UserError(value)
        error.printed_by_main = not process.is_main   # one copy of the message, rank 0's
        raise error
    return value


def same_everywhere(check: Callable[[], object]):
    """`check()` on every rank, for a check each process makes itself (the RESUME checkpoint,
    the batches of an epoch). If it raises UserError on any rank, every rank raises it
    together (none waits for a peer that stopped) and the message is printed once, by the
    lowest rank that found it; otherwise each rank gets its own result."""
    process = current()
    if not process.distributed:
        return check()
    try:
        result, message = check(), None
    except UserError as error:
        result, message = None, str(error)
    messages = [None] * process.world_size
    dist.all_gather_object(messages, message)
    found = [rank for rank, text in enumerate(messages) if text is not None]
    if found:
        error = UserError(messages[found[0]])
        error.printed_by_main = process.rank != found[0]   # one copy of the message
        raise error
    return result


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it may download weights or write a cache), then the rest."""
    process = current()
    if process.distributed and not process.is_main:
        dist.barrier()
    yield
    if process.distributed and process.is_main:
        dist.barrier()


def main_only() -> contextlib.AbstractContextManager:
    """Muted standard output outside rank 0, so a run prints one log, not one per process."""
    if current().is_main:
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(open(os.devnull, 'w'))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (one small collective)."""
    if not current().distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def average(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` replaced in place by its mean over every rank, as DDP averages gradients (the
    sum divided by the number of processes; gloo has no average); unchanged in one process.
    No host sync: on NCCL the collective is queued on the device's stream."""
    process = current()
    if process.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(process.world_size)
    return tensor


def gather_objects(value) -> list:
    """Every process's `value`, in rank order (`[value]` without DDP); every process must
    call it. Values are pickled (torch.distributed.all_gather_object): small ones only."""
    process = current()
    if not process.distributed:
        return [value]
    values = [None] * process.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def gather(shard: torch.Tensor) -> torch.Tensor:
    """Every rank's `shard` (rows of one test set, in rank order) concatenated, on every rank."""
    process = current()
    if not process.distributed:
        return shard
    count = torch.tensor([shard.shape[0]], device=shard.device)
    counts = [torch.zeros_like(count) for _ in range(process.world_size)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros((max(counts),) + tuple(shard.shape[1:]), dtype=shard.dtype,
                         device=shard.device)
    padded[:shard.shape[0]] = shard
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


# --- launching ----------------------------------------------------------------------------
# Our own launcher, not torchrun's elastic agent (torch.distributed.run / elastic_launch) nor
# torch.multiprocessing.spawn, for what they cannot do here:
# - name the cause: when a worker is killed, its peer then fails too ("lost contact"); the
#   elastic agent reports the failure with the smallest timestamp, kept in whole seconds (ties
#   go to the lowest rank), and spawn's join() the first sentinel it reads; ours names the
#   worker killed by a signal before one that exited with an error;
# - exit as the worker did (2 for a UserError, 130 for Ctrl-C) with one line and no traceback:
#   the agent raises ChildFailedError and prints its own report;
# - run main.py as a script in fresh interpreters: spawn runs a pickled function in children
#   that re-import the parent's __main__, and join() leaves the launcher's own SIGTERM and
#   Ctrl-C to us (its children would be left running);
# - map GPUS onto CUDA_VISIBLE_DEVICES and share the cores (OMP_NUM_THREADS) per worker.
# The workers end with their launcher (end_with_launcher) under any of them, torchrun included.

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def launch(script: str, argv: list[str], processes: int, visible_gpus: list[int] | None = None,
           grace: float = 10.0) -> int:
    """Runs `python script argv` in `processes` worker processes on this machine, with the
    environment torchrun would give them; returns the first non-zero exit code (0 when all
    succeed). When one worker fails the others are stopped (SIGTERM, then SIGKILL after
    `grace` seconds), so a failure never leaves a process waiting for a dead peer."""
    env = dict(os.environ, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes))
    # The processes share the cores: without this each would start one thread per core.
    env.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // processes)))
    if visible_gpus is not None:    # indices among the GPUs this process sees
        seen = os.environ.get('CUDA_VISIBLE_DEVICES')
        names = seen.split(',') if seen else [str(gpu) for gpu in range(max(visible_gpus) + 1)]
        env['CUDA_VISIBLE_DEVICES'] = ','.join(names[gpu].strip() for gpu in visible_gpus)
    previous = signal.signal(signal.SIGTERM, _interrupt)   # `kill` of the launcher stops all
    workers: list[subprocess.Popen] = []
    failed: tuple[int, int] | None = None
    try:
        workers = [subprocess.Popen([sys.executable, script, *argv],
                                    env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
                   for rank in range(processes)]
        while any(worker.poll() is None for worker in workers) and failed is None:
            failed = _first_failure(workers)
            time.sleep(0.2)
        if failed is not None:
            time.sleep(0.5)         # a peer that died first may not have been polled yet
            failed = _first_failure(workers)
    except KeyboardInterrupt:       # Ctrl-C (the workers got it too) or SIGTERM
        failed = (-1, 130)
    finally:
        _stop_all(workers, grace)
        signal.signal(signal.SIGTERM, previous)
    failed = failed or _first_failure(workers)
    if failed is not None:
        rank, code = failed
        if rank >= 0 and code not in (2, 130):
            how = f'was killed by signal {-code}' if code < 0 else f'exited with code {code}'
            print(f'error: training process {rank} of {processes} {how}, so every process was '
                  f'stopped. Its own message, if it wrote one, is above. The last checkpoint '
                  f'on disk is intact: resume with --RESUME=<run folder>/model/latest.pth.tar '
                  f'(printed above when one was written).', file=sys.stderr)
        return code if code > 0 else 1
    return 0


def _first_failure(workers: list[subprocess.Popen]) -> tuple[int, int] | None:
    """(rank, exit code) of the process whose failure is the cause: one killed by a signal
    before one that stopped because it lost its peers."""
    failed = [(rank, worker.poll()) for rank, worker in enumerate(workers)
              if worker.poll() not in (None, 0)]
    return min(failed, key=lambda item: (item[1] > 0, item[0]), default=None)


def is_peer_failure(error: BaseException) -> bool:
    """A collective failed because another process died or cannot be reached (gloo and NCCL
    raise these as RuntimeError from inside backward or a collective). Matched by text: gloo
    raises a peer's closed connection as a plain RuntimeError (checked with torch 2.14), and
    NCCL's DistBackendError also covers errors of this process's own GPU, which must not be
    reported as a lost peer; NCCL's own texts are its watchdog's timeout ('... ran for N
    milliseconds before timing out') and ncclRemoteError (a remote process exited)."""
    if isinstance(error, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and current().distributed and any(
        sign in text for sign in ('Connection closed by peer', 'Connection reset by peer',
                                  'Timed out waiting', 'timed out', 'Broken pipe',
                                  'collective operation timeout', 'before timing out',
                                  'ncclRemoteError'))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_all(workers: list[subprocess.Popen], grace: float) -> None:
    """Every worker ended: SIGTERM, then SIGKILL after `grace` seconds (or at a second Ctrl-C)."""
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    deadline = time.time() + grace
    try:
        for worker in workers:
            worker.wait(max(0.1, deadline - time.time()))
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def gpus_to_use(setting: int, available: int) -> list[int]:
    """The GPU indices GPUS selects among the `available` visible ones (0: all of them)."""
    if setting > available:
        raise UserError(f'GPUS={setting} but this machine shows {available} GPU(s) '
                        f'(CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "unset")}'
                        f'). Pass --GPUS={max(1, available)} or --GPUS=0 for all of them.')
    return list(range(setting or available))
