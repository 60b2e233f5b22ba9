"""Shared fixtures: every test makes its own small data; nothing is downloaded."""
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main  # noqa: E402
from reidkit.data.demo import make_demo_dataset  # noqa: E402

# The subprocesses tests start (main.py, torchrun) run one torch thread each: on a machine
# busy with other jobs torch's one-per-core threads wait on each other (one demo epoch ran
# 2-3x slower). Set after torch is imported, so this process keeps its own thread count.
os.environ.setdefault('OMP_NUM_THREADS', '1')

# Small enough to train an epoch in seconds on 2 CPU cores.
TINY = dict(HEIGHT=32, WIDTH=16, BATCH_SIZE_TRAIN=16, BATCH_SIZE_TEST=64, WORKERS=0,
            PRETRAINED=False, MAX_EPOCH=1, EVAL_FREQ=1, PRINT_FREQ=1000, VISRANK_TOPK=3)


@pytest.fixture(scope='session')
def tiny_data_root(tmp_path_factory) -> Path:
    """A 16-identity demo dataset in Market-1501's layout."""
    root = tmp_path_factory.mktemp('tiny-data')
    make_demo_dataset(root, num_train_ids=8, num_test_ids=8, seed=3, gallery_extras=4)
    return root


@pytest.fixture
def tiny_settings(tiny_data_root, tmp_path):
    """Settings for a seconds-long run on the tiny dataset, writing into tmp_path."""
    return main.load_settings(dict(TINY, DATA_ROOT=str(tiny_data_root),
                                   EXPERIMENTS_DIR=str(tmp_path / 'experiments')))



class EpochWatch:
    """What every training run does as each epoch starts: the learning rate it trains with is
    appended to `rates`; with `interrupt_at` set, that epoch raises KeyboardInterrupt (Ctrl-C)
    instead, once."""

    def __init__(self):
        self.rates: list = []
        self.interrupt_at = None


@pytest.fixture
def epoch_watch(monkeypatch) -> EpochWatch:
    from reidkit.train.engine import SoftmaxEngine
    watch = EpochWatch()
    original_train = SoftmaxEngine.train

    def watched_train(self, *args, **kwargs):
        if self.epoch + 1 == watch.interrupt_at:
            watch.interrupt_at = None
            raise KeyboardInterrupt
        watch.rates.append(self.optimizer.param_groups[0]['lr'])
        return original_train(self, *args, **kwargs)
    monkeypatch.setattr(SoftmaxEngine, 'train', watched_train)
    return watch


def whole_and_interrupted(s, watch: EpochWatch, at: int = 2) -> tuple[Path, Path, list]:
    """Trains `s` uninterrupted (in EXPERIMENTS_DIR + '-whole'), then again in EXPERIMENTS_DIR
    with Ctrl-C as epoch `at` starts: (the whole run's folder, the interrupted run's, the whole
    run's rates); watch.rates is emptied for the resumed run's."""
    whole_dir = main.train(s.replace(EXPERIMENTS_DIR=s.EXPERIMENTS_DIR + '-whole'))
    whole_rates = watch.rates[:]
    watch.rates.clear()
    watch.interrupt_at = at
    with pytest.raises(KeyboardInterrupt):
        main.train(s)
    watch.rates.clear()
    (run_dir,) = Path(s.EXPERIMENTS_DIR).iterdir()
    return whole_dir, run_dir, whole_rates

class _FullFile:
    """An open file on a full disk: it opens, and every write fails with ENOSPC."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, 'No space left on device')

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Every file written through reidkit.run.atomic (every output of a run but TensorBoard's events
    and the ONNX exporter's own writes) fails as on a full disk: it opens, then its first write
    raises OSError(ENOSPC)."""
    from reidkit.run import atomic

    def full_open(file, mode='r', *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        return _FullFile(handle) if any(c in mode for c in 'wax') and '+' not in mode \
            else handle
    monkeypatch.setattr(atomic, 'open', full_open, raising=False)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real file system of 64 KiB (tmpfs), for writing until it is full; skipped where this
    process may not mount one (not root, or in a container that forbids it)."""
    mount = tmp_path / 'tmpfs'
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which('mount') is None:
        pytest.skip('mounting a tmpfs needs root')
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {done.stderr.strip()}')
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)], capture_output=True)


def fill(folder: Path) -> None:
    """Writes a file into `folder` until its file system has no space left."""
    with open(folder / 'filler', 'wb', buffering=0) as handle:
        try:
            while True:
                handle.write(b'\0' * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC


@pytest.fixture(scope='module')
def module_tmp_path(tmp_path_factory, request) -> Path:
    """A folder shared by one module's tests, removed when they are done: a module's training
    runs hold hundreds of MB of checkpoints, which pytest's retention would keep."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit('.', 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)
