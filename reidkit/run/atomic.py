"""Files written whole or not at all, one process at a time, and a full disk as one paragraph
instead of a traceback.

Every output file goes through `beside()`: its bytes go to a hidden temporary file in the same
folder (`.<name>.<pid>.partial`), which is renamed over the target only once it is complete.
A kill mid-write leaves the previous file (or none), never a truncated one (its partial file is
removed by the next write of that file); a failed write
(a full disk, a read-only folder) removes the temporary file and raises `UserError` naming
the file and the reason. The pid keeps two processes writing the same file apart.
Work that must not run twice at once (generating the demo data, filling a gallery's feature
cache) holds `exclusive(lock_file)`.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
from pathlib import Path
from typing import IO, Iterator

try:
    import fcntl
except ImportError:         # Windows: no lock; such work should not overlap there
    fcntl = None

from reidkit.run.errors import UserError

PARTIAL = '.partial'
RETRY = 'free some space (or fix the folder\'s permissions) and run again'


def temporary_name(path: Path) -> Path:
    """Where `path`'s bytes are written before the rename: hidden, beside it, per process."""
    path = Path(path)
    return path.with_name(f'.{path.name}.{os.getpid()}{PARTIAL}')


def _remove_leftovers(path: Path) -> None:
    """Partial files of `path` left by processes that were killed mid-write (a checkpoint's can
    be hundreds of MB); those of running processes stay."""
    for partial in path.parent.glob(f'.{glob.escape(path.name)}.*{PARTIAL}'):
        pid = partial.name[len(path.name) + 2:-len(PARTIAL)]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:      # no such process: its write will never finish
            partial.unlink(missing_ok=True)
        except OSError:                 # another user's process, alive
            pass


def reason(error: BaseException) -> str:
    """The short cause of a failed write: 'No space left on device', 'Permission denied' ..."""
    text = getattr(error, 'strerror', None) or str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0]


def disk_full(error: BaseException | None) -> OSError | None:
    """The OSError saying the disk (or the quota) is full, found anywhere in `error`'s chain of
    causes (libraries wrap it in their own types), or None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def write_error(path: Path, error: BaseException, what: str = 'the file',
                advice: str | None = None) -> UserError:
    """The one-paragraph error for a file that could not be written."""
    return UserError(f'could not write {what} "{path}" ({reason(error)}). '
                     f'{advice or f"Nothing was half-written; {RETRY}."}')


@contextlib.contextmanager
def beside(path: Path, what: str = 'the file', advice: str | None = None,
           catch: tuple = (OSError,), sync: bool = True) -> Iterator[Path]:
    """Yields the temporary path to write `path`'s contents to (by any means: a handle, numpy,
    matplotlib, an exporter); when the block ends normally the file is flushed to disk (unless
    `sync` is False: many small files that can be made again, where a power cut may leave
    them empty but a kill cannot) and renamed over `path`. An exception of a type in `catch`
    (raised in the block or by the rename) removes the temporary file and becomes
    `write_error(path, ...)`; any other (Ctrl-C included) removes it and goes on."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
        yield temporary
        if sync:
            with open(temporary, 'rb+') as handle:  # what the writer left in the page cache
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except catch as error:
        temporary.unlink(missing_ok=True)
        raise write_error(path, error, what, advice) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = 'wb', what: str = 'the file', advice: str | None = None,
                catch: tuple = (OSError,), sync: bool = True) -> Iterator[IO]:
    """`beside()` with the temporary file opened in `mode` (a writing mode; text modes write
    UTF-8): `with atomic_file(p, 'w') as f: f.write(..)`."""
    with beside(path, what, advice, catch, sync) as temporary:
        with open(temporary, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as handle:
            yield handle


def write_atomically(path: Path, data: bytes | str, what: str = 'the file',
                     advice: str | None = None, text_errors: str = 'strict',
                     sync: bool = True) -> Path:
    """Writes `data` (bytes, or text as UTF-8; `text_errors` as in str.encode) to `path` whole
    or not at all; returns `path`. UserError (see `write_error`) when it cannot be written."""
    if isinstance(data, str):
        data = data.encode('utf-8', text_errors)
    with atomic_file(path, 'wb', what, advice, sync=sync) as handle:
        handle.write(data)
    return Path(path)


@contextlib.contextmanager
def exclusive(lock_file: Path, waiting: str) -> Iterator[None]:
    """Holds an exclusive lock on `lock_file` (created if missing, never truncated nor deleted:
    deleting it would race) for the block; prints `waiting` first when another process holds
    it. Without fcntl (Windows) the block runs unlocked."""
    descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(waiting, flush=True)
                fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)        # releases the lock
