"""A command's log: everything it prints also goes to log.txt in its output folder.

`log_to` tees standard output into the log for a block; `log_once_there_is_a_folder` keeps
what is printed until the folder exists (search makes its folder only once there is a result).
A terminal that goes away never costs the log a line; a log that cannot be written (a full
disk) is dropped with a note and the command goes on.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, TextIO

from reidkit.run.atomic import reason
from reidkit.run.device import threads_line


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
    """Everything printed inside the block also goes to `path` (appended), after a line
    naming the thread count (device.threads_line); yields the tee,
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
    tee.log_only(threads_line() + '\n')     # what the weights' last bits depend on
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
