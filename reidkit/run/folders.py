"""Where a run's outputs go: one new folder per run, never an earlier run's."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, TextIO

from reidkit.run.atomic import reason, write_atomically
from reidkit.run.checkpoints import (CHECKPOINT_PREFIX, check_checkpoint_fits, checkpoint_epoch,
                                     load_checkpoint)
from reidkit.run.errors import UserError
from reidkit.run.settings import display_name
from reidkit.run.settings import Settings, with_checkpoint_settings


def new_run_dir(parent: Path, name: str) -> Path:
    """Creates and returns parent/<YYYYmmdd-HHMMSS>-<name>, adding -2, -3 ... if it exists."""
    stem = f'{time.strftime("%Y%m%d-%H%M%S")}-{name}'
    for attempt in range(1, 1000):
        folder = Path(parent) / (stem if attempt == 1 else f'{stem}-{attempt}')
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise UserError(f'EXPERIMENTS_DIR: could not create a new run folder in "{parent}".')


def run_name(s: Settings) -> str:
    """<model>-<loss>-<datasets>: the end of a training run's folder name (own data: its
    folder's or CSV's base name, never the path)."""
    sources = '+'.join(map(display_name, [s.SOURCES] if isinstance(s.SOURCES, str)
                                         else s.SOURCES))
    return f'{s.MODEL_NAME}-{s.LOSS}-{sources}'


def run_to_continue(checkpoint: Path, experiments_dir: Path, epoch: int) -> Path | None:
    """The run folder a RESUME checkpoint (of `epoch`) belongs to (<run>/<model>/<file>
    directly under EXPERIMENTS_DIR), or None: then a new run folder is made, never one beside
    a checkpoint the user keeps elsewhere, nor one holding checkpoints after `epoch`."""
    run = Path(checkpoint).resolve().parent.parent
    if run.parent != Path(experiments_dir).resolve():
        return None
    return None if later_checkpoints(run, epoch) else run


def later_checkpoints(run_dir: Path, epoch: int) -> list[Path]:
    """Numbered checkpoints of a run after `epoch`: resuming from `epoch` there would
    overwrite them, so such a resume continues as a new run."""
    return sorted(p for p in Path(run_dir).glob(f'*/{CHECKPOINT_PREFIX}*')
                  if checkpoint_epoch(p) > epoch)


def write_settings(run_dir: Path, s: Settings) -> Path:
    """settings.json: the run's settings as it uses them, written atomically (UserError when
    it cannot be written: a full disk)."""
    return write_atomically(Path(run_dir) / 'settings.json',
                            json.dumps(s.record(), indent=2) + '\n', 'the run\'s settings')


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest epoch in a run folder, or None."""
    found = [p for p in Path(run_dir).glob(f'*/{CHECKPOINT_PREFIX}*') if checkpoint_epoch(p) >= 0]
    return max(found, key=checkpoint_epoch) if found else None


def resume_point(run_dir: Path) -> Path | None:
    """The most recently written checkpoint of a run (numbered or rolling), or None."""
    found = [p for p in Path(run_dir).glob('*/*.pth.tar*') if not p.name.startswith('.')]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def latest_run_checkpoint(experiments_dir: Path) -> Path:
    """The newest numbered checkpoint of the run that trained most recently (by the time its
    checkpoints were written: testing an older run does not make it the latest)."""
    newest = {run: newest_checkpoint(run) for run in Path(experiments_dir).glob('*')
              if run.is_dir()}
    written = {run: max(p.stat().st_mtime for p in run.glob(f'*/{CHECKPOINT_PREFIX}*'))
               for run, checkpoint in newest.items() if checkpoint is not None}
    if not written:
        raise UserError(
            f'WEIGHTS is empty and no training run in "{experiments_dir}" has a checkpoint yet. '
            f'Train first (python main.py train), or pass --WEIGHTS=path/to/{CHECKPOINT_PREFIX}N.'
        )
    return newest[max(written, key=written.get)]


def recorded_settings(saved: dict) -> dict:
    """The settings a checkpoint recorded; for older checkpoints (ours before settings were
    stored, Torchreid's), what their fields tell: the architecture and the input size."""
    if isinstance(saved.get('settings'), dict):
        return saved['settings']
    recorded = {}
    if isinstance(saved.get('model_name'), str) and saved['model_name'] != 'unknown':
        recorded['MODEL_NAME'] = saved['model_name']
    if saved.get('input_size'):
        recorded['HEIGHT'], recorded['WIDTH'] = (int(v) for v in saved['input_size'])
    return recorded


def resolve_checkpoint(s: Settings, weights: Path | None = None, setting: str = 'WEIGHTS',
                       notes: list[str] | None = None) -> tuple[Path, dict, Settings]:
    """The checkpoint a command uses (`weights`, else the setting, else the newest run's), its
    contents (loaded safely) and the settings to use it with: with setting='RESUME', the run's
    own (see settings.with_checkpoint_settings); otherwise its model and input size.
    Notes go to `notes` if given, else are printed."""
    path = Path(weights or s[setting] or latest_run_checkpoint(Path(s.EXPERIMENTS_DIR)))
    saved = load_checkpoint(path, setting)
    s, found = with_checkpoint_settings(s, recorded_settings(saved),
                                        'resume' if setting == 'RESUME' else 'evaluate',
                                        f'{setting}: "{path}"')
    for note in found:
        notes.append(note) if notes is not None else print(f'Note: {note}.')
    check_checkpoint_fits(saved, s, path)
    return path, saved, s


def output_dir_for(checkpoint: Path, experiments_dir: Path, mode: str) -> Path:
    """A new folder for test/visrank outputs: inside the checkpoint's run when it has one
    under EXPERIMENTS_DIR, else a new run folder named after the mode."""
    checkpoint, experiments_dir = Path(checkpoint).resolve(), Path(experiments_dir).resolve()
    run = checkpoint.parent.parent
    if run.parent == experiments_dir:
        return new_run_dir(run, mode)
    return new_run_dir(experiments_dir, mode)


class _Tee:
    """Writes to the log file first, then to the terminal. A terminal that went away
    (`python main.py | tee run.log`, and Ctrl-C stops `tee` too) never costs the log a line; a
    log that cannot be written any more (a full disk) is dropped with a note on the terminal,
    and the run goes on."""

    def __init__(self, terminal: TextIO, log: TextIO | None):
        self.terminal, self.log = terminal, log

    def write(self, text: str) -> int:
        self.log_only(text)
        try:
            self.terminal.write(text)
        except BrokenPipeError:
            _silence(self.terminal)
        return len(text)

    def log_only(self, text: str) -> None:
        """`text` to the log alone (what the terminal gets another way, e.g. on stderr)."""
        if self.log is None:
            return
        try:
            self.log.write(text)
        except OSError as error:
            self._drop_log(error)

    def flush(self) -> None:
        if self.log is not None:
            try:
                self.log.flush()
            except OSError as error:
                self._drop_log(error)
        try:
            self.terminal.flush()
        except BrokenPipeError:
            _silence(self.terminal)

    def _drop_log(self, error: OSError) -> None:
        name, self.log = getattr(self.log, 'name', '?'), None
        self.write(f'\nNote: the log "{name}" could not be written ({reason(error)}); it stops '
                   f'here, the output goes on here.\n')

    def isatty(self) -> bool:
        return self.terminal.isatty()


def _silence(stream: TextIO) -> None:
    """Points a stream whose reader has gone at /dev/null, so that later prints and the flush
    at exit do not raise BrokenPipeError again (Python's documented remedy)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[_Tee]:
    """Everything printed inside the block also goes to `path` (appended); yields the tee,
    whose `log_only` writes what must reach the log but not stdout. If `path` cannot be
    written (a full disk), printing goes on without it, with a note."""
    previous = sys.stdout
    try:
        log = open(path, 'a', buffering=1)   # line-buffered: `tail -f log.txt` is live
    except OSError as error:
        print(f'Note: the log "{path}" cannot be written ({reason(error)}); output goes to the '
              f'terminal only.')
        log = None
    tee = sys.stdout = _Tee(previous, log)
    try:
        yield tee
    finally:
        sys.stdout = previous
        try:
            if log is not None:
                log.close()
        except OSError:
            pass


@contextlib.contextmanager
def log_once_there_is_a_folder() -> Iterator[Callable[[Path], None]]:
    """Everything printed inside the block is kept in memory until the yielded function is
    called with a log file's path: then what was kept is written there and the rest of the
    block's output is appended (for a command whose output folder is made only once there is
    a result to put in it, like search)."""
    kept = io.StringIO()
    previous = sys.stdout
    tee = sys.stdout = _Tee(previous, kept)
    opened = []

    def start(path: Path) -> None:
        try:
            log = open(path, 'a', buffering=1, encoding='utf-8', errors='surrogateescape')
            log.write(kept.getvalue())
        except OSError as error:
            tee.log = None
            print(f'Note: the log "{path}" cannot be written ({reason(error)}); output goes '
                  f'to the terminal only.')
            return
        tee.log = log
        opened.append(log)
    try:
        yield start
    finally:
        sys.stdout = previous
        for log in opened:
            try:
                log.close()
            except OSError:
                pass
