"""DDP: samplers, gathering and launching, on the CPU with gloo (as CI runs them)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from reidkit.run import distributed
from reidkit.train.ddp import (ShardedIdentitySampler, ShardedRandomSampler, ShardSampler,
                               shard_bounds)
from reidkit.run.distributed import gpus_to_use
from reidkit.run.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / 'main.py')


# --- samplers -------------------------------------------------------------------------------

@pytest.mark.parametrize('size,world', [(100, 2), (101, 2), (103, 4), (7, 3)])
def test_plain_shards_cover_the_set_once_and_are_disjoint(size, world):
    shards = [list(ShardedRandomSampler(size, rank, world, seed=5)) for rank in range(world)]
    assert len({len(shard) for shard in shards}) == 1             # same count on every rank
    seen = [index for shard in shards for index in shard]
    assert len(seen) == len(set(seen))                            # no image twice
    assert set(seen) <= set(range(size)) and size - len(seen) < world


def test_plain_shards_follow_the_seed_and_change_every_epoch():
    def shards(seed, epoch):
        samplers = [ShardedRandomSampler(60, rank, 2, seed) for rank in range(2)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        return [list(sampler) for sampler in samplers]
    assert shards(1, 0) == shards(1, 0)
    assert shards(1, 0) != shards(1, 1) and shards(1, 0) != shards(2, 0)
    every_epoch = [set(shards(1, epoch)[0]) for epoch in range(5)]
    assert len(set(map(frozenset, every_epoch))) == 5


def identity_pids(identities=12, low=2, high=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(low, high, (identities,), generator=generator).tolist()
    return [pid for pid, count in enumerate(counts) for _ in range(count)]


@pytest.mark.parametrize('world', [1, 2, 3])
def test_identity_shards_keep_each_identity_in_one_process(world):
    pids = identity_pids()
    samplers = [ShardedIdentitySampler(pids, 8, 4, rank, world, seed=3) for rank in range(world)]
    for epoch in range(3):
        owners = {}
        counts = set()
        for rank, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            indices = list(sampler)
            assert len(indices) == len(sampler) and len(indices) % 8 == 0
            counts.add(len(indices))
            for start in range(0, len(indices), 8):
                batch = Counter(pids[i] for i in indices[start:start + 8])
                assert sorted(batch.values()) == [4, 4]          # 2 identities x 4 images
            for pid in {pids[i] for i in indices}:
                assert owners.setdefault(pid, rank) == rank      # whole, in one process
        assert len(counts) == 1 and counts != {0}                 # same batch count everywhere
    # An identity goes to a different process in some epoch (the split is redrawn).
    if world > 1:
        assert samplers[0].identities_of(0, 0) != samplers[0].identities_of(0, 1)


def test_identity_shards_repeat_with_the_seed():
    pids = identity_pids()
    first = list(ShardedIdentitySampler(pids, 8, 4, 1, 2, seed=9))
    assert first == list(ShardedIdentitySampler(pids, 8, 4, 1, 2, seed=9))
    assert first != list(ShardedIdentitySampler(pids, 8, 4, 1, 2, seed=10))


def test_too_few_identities_per_process_is_a_clear_error():
    with pytest.raises(UserError, match='identities'):
        ShardedIdentitySampler(identity_pids(identities=5), 8, 4, 0, 4, seed=1)


@pytest.mark.parametrize('size,world', [(10, 3), (2, 2), (181, 2), (5, 1)])
def test_test_shards_are_contiguous_and_cover_everything(size, world):
    bounds = shard_bounds(size, world)
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1
    assert [i for r in range(world) for i in ShardSampler(size, r, world)] == list(range(size))


def test_gpus_setting():
    import main
    from reidkit.data import checks
    assert gpus_to_use(0, 4) == [0, 1, 2, 3] and gpus_to_use(2, 4) == [0, 1]
    with pytest.raises(UserError, match='GPUS=5 but this machine shows 4'):
        gpus_to_use(5, 4)
    for bad in ({'GPUS': -1}, {'LR_SCALING': 'sqrt'}, {'SYNC_BN': True, 'DEVICE': 'cpu'}):
        with pytest.raises(UserError, match=next(iter(bad))):
            checks.check_numbers(main.load_settings(bad), training=True)


# --- collectives over gloo, two processes in this test -------------------------------------

def _collectives(rank: int, world: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    distributed.start('cpu')
    try:
        bounds = shard_bounds(7, world)[rank]
        rows = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)[bounds[0]:bounds[1]]
        gathered = distributed.gather(rows)
        flags = distributed.any_rank(rank == 1, torch.device('cpu'))
        made = distributed.on_main(lambda: f'made by {distributed.current().rank}')
        try:
            distributed.on_main(lambda: (_ for _ in ()).throw(UserError('rank 0 says no')))
            error = None
        except UserError as raised:
            error = str(raised)
        results.put((rank, gathered.tolist(), flags, made, error))
    finally:
        distributed.stop()


def _on_two_gloo_ranks(target) -> list:
    """Runs target(rank, 2, port, queue) in two spawned processes; returns what each put."""
    queue = mp.get_context('spawn').SimpleQueue()
    mp.start_processes(target, args=(2, distributed.free_port(), queue), nprocs=2,
                       start_method='spawn')
    return [queue.get() for _ in range(2)]


def test_gather_any_rank_and_on_main_over_gloo():
    results = sorted(_on_two_gloo_ranks(_collectives))
    expected = torch.arange(21, dtype=torch.float32).reshape(7, 3).tolist()
    for rank, gathered, flag, made, error in results:
        assert gathered == expected                                # in order, every rank
        assert flag is True                                        # rank 1's flag reaches 0
        assert made == 'made by 0' and error == 'rank 0 says no'


# --- whole runs (slow): torchrun and our own launcher on the demo data ---------------------

def run_main(args: list[str], cwd: Path, launcher: list[str] | None = None, timeout=900,
             env=None):
    return subprocess.run([*(launcher or [sys.executable]), MAIN, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def torchrun(processes: int) -> list[str]:
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone',
            f'--nproc_per_node={processes}']


def rank1_of(run: Path) -> float:
    return json.loads((run / 'metrics.json').read_text())['rank1']


DEMO_FLAGS = ['train', '--demo', '--MAX_EPOCH=2', '--EVAL_FREQ=2', '--LATEST_EVERY=1']


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    two = run_main([*DEMO_FLAGS, '--BATCH_SIZE_TRAIN=32', f'--EXPERIMENTS_DIR={tmp_path}/two'],
                   tmp_path, torchrun(2))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert 'DDP: 2 processes on the CPU (gloo); global batch 64' in two.stdout
    runs = list((tmp_path / 'two').iterdir())
    assert len(runs) == 1                                         # one writer, one folder
    run = runs[0]
    assert sorted(p.name for p in (run / 'model').iterdir()) == ['latest.pth.tar',
                                                                 'model.pth.tar-2']
    assert len(list(run.glob('events.out.tfevents*'))) == 1
    assert (run / 'log.txt').read_text().count('epoch: [2/2]') >= 1
    tested = run_main(['test', f'--WEIGHTS={run}/model/model.pth.tar-2', '--demo',
                       f'--EXPERIMENTS_DIR={tmp_path}/two'], tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    one = run_main([*DEMO_FLAGS, '--BATCH_SIZE_TRAIN=64', f'--EXPERIMENTS_DIR={tmp_path}/one'],
                   tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    one_run = next((tmp_path / 'one').iterdir())
    one_rank1 = rank1_of(one_run)
    assert abs(rank1_of(run) - one_rank1) <= 0.05, (rank1_of(run), one_rank1)
    # Checkpoints are one format: a single-process run resumes under DDP and the other way.
    for latest, launcher in ((one_run / 'model' / 'latest.pth.tar', torchrun(2)),
                             (run / 'model' / 'latest.pth.tar', None)):
        resumed = run_main(['train', f'--RESUME={latest}', f'--EXPERIMENTS_DIR={tmp_path}/r'],
                           tmp_path, launcher)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert 'Resuming from' in resumed.stdout and 'after epoch 1' in resumed.stdout
        assert ('DDP: 2 processes' in resumed.stdout) == (launcher is not None)


def test_python_main_py_starts_one_process_per_gpu(monkeypatch, tmp_path):
    import main
    started = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    monkeypatch.setattr(distributed, 'launch',
                        lambda script, argv, n, gpus: started.append((argv, n, gpus)) or 0)
    for key in ('RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(key, raising=False)
    assert main.main(['train', '--GPUS=2', f'--EXPERIMENTS_DIR={tmp_path}']) == 0
    assert started == [(['train', '--GPUS=2', f'--EXPERIMENTS_DIR={tmp_path}'], 2, [0, 1])]
    started.clear()
    assert main.main(['train', '--GPUS=9']) == 2 and not started      # a clear error
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    assert main.gpus_for_training(main.load_settings(), ['train']) == []   # under torchrun
    monkeypatch.delenv('RANK')
    assert main.gpus_for_training(main.load_settings(), ['test']) == []    # test: one GPU


def test_gpus_is_checked_only_when_training(monkeypatch):
    """test --GPUS=4 on a 2-GPU box evaluates on one GPU; train --GPUS=4 there is refused."""
    import main
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    for key in ('RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(key, raising=False)
    s = main.load_settings().replace(GPUS=4)
    assert main.gpus_for_training(s, ['test', 'visrank']) == []
    assert main.gpus_for_training(s.replace(DEVICE='cpu'), ['train']) == []
    with pytest.raises(UserError, match='GPUS=4 but this machine shows 2 GPU'):
        main.gpus_for_training(s, ['train', 'test'])


@pytest.mark.parametrize('text', [
    '[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, '
    'OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600012 '
    'milliseconds before timing out.',
    'NCCL error: remote process exited or there was a network error, NCCL version 2.27.3\n'
    'ncclRemoteError: A call failed possibly due to a network error or a remote process '
    'exiting prematurely.'])
def test_nccl_timeouts_and_remote_errors_are_a_lost_peer(text, monkeypatch):
    monkeypatch.setattr(distributed, '_current', distributed.ProcessRank(1, 2, 1))
    assert distributed.is_peer_failure(RuntimeError(text))
    assert not distributed.is_peer_failure(RuntimeError('CUDA error: an illegal memory access'))
    monkeypatch.setattr(distributed, '_current', distributed.ProcessRank())
    assert not distributed.is_peer_failure(RuntimeError(text))      # one process: no peer


def test_linear_lr_scaling_multiplies_by_the_processes(monkeypatch):
    import main
    s = main.load_settings()
    monkeypatch.setattr(distributed, '_current', distributed.ProcessRank(0, 4, 0))
    assert main.learning_rate(s) == s.LR
    assert main.learning_rate(s.replace(LR_SCALING='linear')) == pytest.approx(4 * s.LR)


def worker_pids(marker: str) -> dict[int, int]:
    """{rank: pid} of the training processes whose command line holds `marker`."""
    found = {}
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / 'cmdline').read_bytes().split(b'\0')
            environ = (entry / 'environ').read_bytes().split(b'\0')
        except OSError:
            continue
        if marker.encode() in b' '.join(command) and b'torch.distributed.run' not in \
                b' '.join(command):
            for item in environ:
                if item.startswith(b'RANK='):
                    found[int(item[5:])] = int(entry.name)
    return found


def launched_by(launcher: str, args: list[str]) -> list[str]:
    """The command that runs main.py ARGS in 2 processes: through torchrun, or our launcher."""
    if launcher == 'torchrun':
        return [*torchrun(2), MAIN, *args]
    return [sys.executable, '-c', 'import sys; from reidkit.run import distributed; '
            f'sys.exit(distributed.launch({MAIN!r}, sys.argv[1:], 2))', *args]


@pytest.mark.slow
@pytest.mark.parametrize('launcher', ['torchrun', 'ours'])
def test_killing_one_worker_ends_the_run_and_resume_continues(tmp_path, launcher):
    experiments = tmp_path / f'exp-{launcher}'
    args = ['train', '--demo', '--MAX_EPOCH=3', '--EVAL_FREQ=3', '--LATEST_EVERY=1',
            f'--EXPERIMENTS_DIR={experiments}']
    command = launched_by(launcher, args)
    started = time.time()
    job = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=dict(
                               os.environ, PYTHONPATH=str(ROOT), REIDKIT_DDP_TIMEOUT='60'))
    try:
        latest = None
        while latest is None and time.time() - started < 600:   # the first epoch's checkpoint
            latest = next(experiments.glob('*/model/latest.pth.tar'), None)
            assert job.poll() is None, job.communicate()
            time.sleep(1)
        assert latest is not None
        os.kill(worker_pids(str(experiments))[1], signal.SIGKILL)
        out, err = job.communicate(timeout=600)          # the whole run ends, not a hang
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert not worker_pids(str(experiments))              # no process left behind
    if launcher == 'ours':
        assert 'training process 1 of 2 was killed by signal 9' in err
    # Rank 0 stops as on Ctrl-C, or sees its peer's socket close: either way it says so.
    assert 'Interrupted.' in out + err or 'lost contact with the others' in err, err[-3000:]
    run = latest.parent.parent
    assert not list(run.glob('model/*.partial'))
    resumed = run_main(['train', f'--RESUME={latest}', f'--EXPERIMENTS_DIR={experiments}'],
                       tmp_path, torchrun(2))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert 'Resuming from' in resumed.stdout
    assert (run / 'model' / 'model.pth.tar-3').is_file()


@pytest.mark.slow
def test_two_nodes_on_one_machine_rendezvous_over_c10d(tmp_path):
    port = distributed.free_port()
    args = ['train', '--demo', '--MAX_EPOCH=1', '--EVAL_FREQ=1',
            f'--EXPERIMENTS_DIR={tmp_path}/exp']
    nodes = [subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1',
         f'--node_rank={node}', '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{port}',
         '--rdzv-id=reidkit-test', MAIN, *args], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for node in range(2)]
    outputs = [node.communicate(timeout=900) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [o[1][-2000:] for o in outputs]
    printed = ''.join(out for out, _ in outputs)
    assert printed.count('DDP: 2 processes') == 1                 # one log: rank 0's
    assert len(list((tmp_path / 'exp').iterdir())) == 1


@pytest.mark.slow
def test_a_port_in_use_and_an_unreachable_rendezvous_are_clear_errors(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(RANK='0', WORLD_SIZE='2', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
                   MASTER_PORT=str(port), REIDKIT_DDP_TIMEOUT='5')
        in_use = run_main(['train', '--DEVICE=cpu'], tmp_path, env=env, timeout=600)
    assert in_use.returncode == 2
    assert 'could not join the process group' in in_use.stderr
    assert 'address already in use' in in_use.stderr and 'Traceback' not in in_use.stderr
    # Rank 1 with nobody listening at MASTER_PORT: waits REIDKIT_DDP_TIMEOUT, then says so.
    # (waiting PyTorch's default 600 s instead would overrun this 300 s guard against a hang)
    unreachable = run_main(['train', '--DEVICE=cpu'], tmp_path, env=dict(env, RANK='1'),
                           timeout=300)
    assert unreachable.returncode == 2
    assert 'could not join the process group' in unreachable.stderr.splitlines()[-1]
    assert 'Traceback' not in unreachable.stderr


SHOW_ENV = ('import os, sys, time, pathlib; '
            'pathlib.Path(sys.argv[1], os.environ["RANK"]).write_text('
            'os.environ.get("CUDA_VISIBLE_DEVICES", "") + "|" + os.environ["OMP_NUM_THREADS"]); '
            'time.sleep(float(sys.argv[2]))')


def test_the_launcher_maps_gpus_through_cuda_visible_devices(tmp_path, monkeypatch):
    script = tmp_path / 'show_env.py'
    script.write_text(SHOW_ENV)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '2,3,5')
    assert distributed.launch(str(script), [str(tmp_path), '0'], 2, [1, 2]) == 0
    assert (tmp_path / '0').read_text().split('|')[0] == '3,5'     # physical GPUs 3 and 5
    assert (tmp_path / '1').read_text().split('|')[0] == '3,5'


def test_killing_the_launcher_stops_its_workers(tmp_path):
    script = tmp_path / 'show_env.py'
    script.write_text(SHOW_ENV)
    launcher = subprocess.Popen(
        [sys.executable, '-c', 'import sys; from reidkit.run import distributed; '
         f'sys.exit(distributed.launch({str(script)!r}, [{str(tmp_path)!r}, "300"], 2))'],
        cwd=ROOT)
    deadline = time.time() + 60
    while not ((tmp_path / '0').exists() and (tmp_path / '1').exists()):
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.2)
    workers = worker_pids(str(tmp_path))
    assert len(workers) == 2
    launcher.terminate()
    assert launcher.wait(timeout=300) != 0
    assert not worker_pids(str(tmp_path))                          # none left running


def test_a_forked_child_of_a_ddp_process_ends_on_sigterm():
    """An image-decoding worker forked by a DDP process inherits its SIGTERM handler; there it
    must end the worker, not raise KeyboardInterrupt inside the pool's locks."""
    code = ('import os, signal, time, multiprocessing as mp\n'
            'from reidkit.run import distributed\n'
            'distributed._stop_on_sigterm.pid = os.getpid()\n'
            'signal.signal(signal.SIGTERM, distributed._stop_on_sigterm)\n'
            'child = mp.get_context("fork").Process(target=time.sleep, args=(60,))\n'
            'child.start(); time.sleep(0.5); child.terminate(); child.join(10)\n'
            'print(child.exitcode)\n')
    done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.stdout.strip() == str(-signal.SIGTERM), done.stderr[-2000:]
    assert 'KeyboardInterrupt' not in done.stderr


def test_sync_bn_without_cuda_is_refused_before_any_work(monkeypatch):
    """SYNC_BN is checked once, with the other settings (DEVICE='auto' on a box with no GPU)."""
    import main
    from reidkit.data import checks
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    s = main.load_settings({'SYNC_BN': True})
    with pytest.raises(UserError, match='SYNC_BN=True needs CUDA'):
        checks.check_before_run(s, training=True)


# --- the launcher killed with SIGKILL: its workers stop too (issue 21) -------------------------

def alive(pid: int) -> bool:
    """The process exists and has not ended (an ended child of a dead launcher may stay a
    zombie until init reaps it)."""
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ('Z', 'X')


def wait_until(condition, timeout: float) -> bool:
    """Polls `condition` until it holds; the timeout only guards against a hang."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


WORKER = ('import os, sys, time, pathlib; sys.path.insert(0, sys.argv[1]); '
          'from reidkit.run import distributed; distributed.start("cpu"); '
          'pathlib.Path(sys.argv[2]).write_text(str(os.getpid())); time.sleep(600)')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux\'s')
def test_a_worker_stops_when_its_launcher_is_killed_with_sigkill(tmp_path):
    """A worker that joined its process group (as every training process does in
    distributed.start) ends when the process that started it is killed with SIGKILL."""
    ready = tmp_path / 'worker.pid'
    env = dict(os.environ, RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
               MASTER_PORT=str(distributed.free_port()))
    launcher = subprocess.Popen(
        [sys.executable, '-c', 'import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); '
         'time.sleep(600)', sys.executable, '-c', WORKER, str(ROOT), str(ready)], env=env)
    worker = None
    try:
        assert wait_until(lambda: ready.exists() and ready.read_text(), 120)
        worker = int(ready.read_text())
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        assert wait_until(lambda: not alive(worker), 60), 'the worker outlived its launcher'
    finally:
        launcher.kill()
        if worker and alive(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize('launcher', ['torchrun', 'ours'])
def test_killing_the_launcher_with_sigkill_stops_a_training_run(tmp_path, launcher):
    experiments = tmp_path / f'exp-{launcher}'
    args = ['train', '--demo', '--MAX_EPOCH=1000', '--EVAL_FREQ=1000',
            f'--EXPERIMENTS_DIR={experiments}']
    command = launched_by(launcher, args)
    job = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    workers = {}
    try:
        # Training has started in both processes once rank 0 logs its first epoch line.
        assert wait_until(lambda: any('epoch: [1/1000]' in log.read_text()
                                      for log in experiments.glob('*/log.txt')), 600)
        workers = worker_pids(str(experiments))
        assert sorted(workers) == [0, 1]
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        assert wait_until(lambda: not any(alive(pid) for pid in workers.values()), 120), \
            'training went on without its launcher'
    finally:
        job.kill()
        for pid in workers.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_an_error_every_process_finds_is_printed_once_under_torchrun(tmp_path, tiny_data_root):
    from conftest import TINY
    finished = tmp_path / 'finished.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'epoch': 3}, finished)
    common = ['train', '--DEVICE=cpu', f'--EXPERIMENTS_DIR={tmp_path}/exp',
              *(f'--{key}={value!r}' for key, value in TINY.items()),
              f'--DATA_ROOT={tiny_data_root}']
    cases = {'RESUME: no checkpoint file': [f'--RESUME={tmp_path}/none.pth'],
             'it has finished': [f'--RESUME={finished}', '--MAX_EPOCH=2'],
             'so training would take zero steps': ['--BATCH_SIZE_TRAIN=100000']}
    for message, flags in cases.items():
        done = run_main([*common, *flags], tmp_path, torchrun(2), timeout=600)
        ours = [line for line in done.stderr.splitlines() if line.startswith('error:')]
        assert len(ours) == 1 and message in ours[0], (message, done.stderr[-3000:])
        assert not (tmp_path / 'exp').exists() or not list((tmp_path / 'exp').glob('*/model/*'))


def _same_everywhere(rank: int, world: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    distributed.start('cpu')
    try:
        outcomes = []
        for failing in ({0, 1}, {1}, set()):      # every rank, rank 1 alone, none
            def check():
                if rank in failing:
                    raise UserError(f'found by {rank}')
                return rank
            try:
                outcomes.append(('ok', distributed.same_everywhere(check)))
            except UserError as error:
                outcomes.append((str(error), getattr(error, 'printed_by_main', False)))
        results.put((rank, outcomes))
    finally:
        distributed.stop()


def test_same_everywhere_stops_every_rank_and_one_prints():
    results = dict(_on_two_gloo_ranks(_same_everywhere))
    # (message, printed by another rank): the lowest rank that found it prints it
    assert results[0] == [('found by 0', False), ('found by 1', True), ('ok', 0)]
    assert results[1] == [('found by 0', True), ('found by 1', False), ('ok', 1)]


@pytest.mark.slow
def test_a_ddp_resume_of_the_strong_recipe_ends_with_the_uninterrupted_weights(tmp_path):
    """Two processes, RECIPE='strong': resuming the run's epoch-1 checkpoint (latest.pth.tar)
    under two processes again gives the uninterrupted run's final weights and centres bit for
    bit: each process's random generators are in the checkpoint and restored to its rank."""
    from reidkit.run.checkpoints import load_checkpoint
    flags = [*DEMO_FLAGS, '--RECIPE=strong', '--HEIGHT=32', '--WIDTH=16', '--EVAL_FREQ=1']
    whole = run_main([*flags, f'--EXPERIMENTS_DIR={tmp_path}/whole'], tmp_path, torchrun(2))
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    (run,) = (tmp_path / 'whole').iterdir()
    latest = load_checkpoint(run / 'model' / 'latest.pth.tar')
    assert latest['epoch'] == 1 and len(latest['random_state']) == 2     # one per process
    resumed = run_main(['train', f'--RESUME={run}/model/latest.pth.tar',
                        f'--EXPERIMENTS_DIR={tmp_path}/resumed'], tmp_path, torchrun(2))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert 'Note: the checkpoint holds' not in resumed.stdout
    (again,) = (tmp_path / 'resumed').iterdir()
    expected, got = (load_checkpoint(folder / 'model' / 'model.pth.tar-2')
                     for folder in (run, again))
    differing = [key for key, value in expected['state_dict'].items()
                 if not torch.equal(got['state_dict'][key], value)]
    assert not differing, differing[:5]
    assert torch.equal(got['center_loss']['centers'], expected['center_loss']['centers'])
