"""Which image files a model was trained on, and the check that no test ever scores one.

Two files are the same file when their resolved paths are equal, when they are one inode
(a hard link), or when their bytes are (equal sizes, then equal 64-bit BLAKE2b hashes of the
bytes: a copy under another name or in another folder, a person's folder renamed and split
again). A run records every training file of SOURCES twice:
- in full in the run folder (`training_files.csv.gz`: resolved path, size, hash, device and
  inode of each), to name both files of a leak;
- compactly inside every checkpoint (`training_files`: a size and a hash per file, 16 bytes),
  so that a checkpoint copied out of its run folder still knows what it was trained on. A run
  that starts from another checkpoint (INIT_WEIGHTS, RESUME) adds that checkpoint's record.

The check runs before training (TARGETS' query and gallery files against SOURCES' training
files: every evaluation during training would score them) and before test and visrank (the
targets against the checkpoint's record). A leak is refused, never dropped: the error names
the first files on both sides. A run made before records were kept has its split.json: its own
targets are tested on the split recorded there (recorded_splits) and checked against the
training files listed there. A model-zoo file carries neither: nothing to check against.
Hashing reads each training file once (the test files only when their size matches a
training file's); see docs/benchmarks.md ("The record of training files") for its cost on a
million files.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from reidkit.data import checks
from reidkit.data.own_data import SPLIT_FILE, OwnData, own_split, printable, read_split
from reidkit.run.atomic import atomic_file
from reidkit.run.errors import UserError
from reidkit.run.progress import progress
from reidkit.run.folders import recorded_settings
from reidkit.run.settings import dataset_list, display_name, is_own_data

RECORD_FILE = 'training_files.csv.gz'       # in the run folder
CHECKPOINT_KEY = 'training_files'           # in every checkpoint
COLUMNS = ('path', 'size', 'hash', 'device', 'inode')
PROGRESS_FROM = 5000        # files: fewer are hashed without a progress bar
SHOWN = 3                   # leaks named in the error


def content_hash(path: str | os.PathLike) -> int:
    """The first 8 bytes of the BLAKE2b hash of the file's bytes, as a signed int64."""
    with open(path, 'rb') as handle:
        digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=8)).digest()
    return int.from_bytes(digest, 'big', signed=True)


def _hash_all(paths: Sequence[str], what: str) -> list[int]:
    """content_hash of every path, in order; several files at once (hashlib releases the GIL
    on large buffers, and reading waits on the disk), with a progress bar for many files."""
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        hashes = pool.map(content_hash, paths, chunksize=64)
        if len(paths) >= PROGRESS_FROM:
            hashes = progress(hashes, total=len(paths), desc=what, unit='file', leave=False)
        return list(hashes)


@dataclass
class Leak:
    """A test file (`test`) that is a training file: `how` ('the same file as', 'the same
    file (same inode) as': a hard link or a moved file, 'byte-identical to'); `training`: that training file's path, or None when only
    the checkpoint's compact record (size and hash) is at hand."""
    test: str
    how: str
    training: str | None


@dataclass
class TrainingFiles:
    """The files a model was trained on: `sizes` and `hashes` (int64 arrays of shape (N,),
    bytes and `content_hash`), and, when known (this run, or its run folder's record),
    `paths` (resolved) and `inodes` (int64 array (N, 2): device, inode)."""
    sizes: np.ndarray
    hashes: np.ndarray
    paths: list[str] | None = None
    inodes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sizes)

    @classmethod
    def of_files(cls, files: Iterable[str | os.PathLike], what: str = 'Hashing training files'
                 ) -> TrainingFiles:
        """The record of `files` (each once, after resolving links), read now. OSError from a
        file that cannot be read (the pre-run image check has read them all before)."""
        paths = list(dict.fromkeys(os.path.realpath(p) for p in files))
        stats = [os.stat(p) for p in paths]
        for path, st in zip(paths, stats):     # reading a FIFO would wait for ever
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f'SOURCES: "{path}" is not a regular file (a FIFO, a device, a '
                                f'folder named like an image). Remove it, then run again.')
        return cls(np.array([st.st_size for st in stats], dtype=np.int64),
                   np.array(_hash_all(paths, what), dtype=np.int64), paths,
                   np.array([(st.st_dev, st.st_ino) for st in stats],
                            dtype=np.int64).reshape(-1, 2))

    def merged(self, other: TrainingFiles | None) -> TrainingFiles:
        """This record and `other`'s files (a starting checkpoint's): only sizes and hashes
        are kept for other's, so paths name this record's files alone."""
        if other is None or len(other) == 0:
            return self
        known = set(zip(self.sizes.tolist(), self.hashes.tolist()))
        extra = [i for i, pair in enumerate(zip(other.sizes.tolist(), other.hashes.tolist()))
                 if pair not in known]
        return TrainingFiles(np.concatenate([self.sizes, other.sizes[extra]]),
                             np.concatenate([self.hashes, other.hashes[extra]]),
                             self.paths, self.inodes)

    # --- in a checkpoint: 16 bytes a file --------------------------------------------------

    def compact(self) -> dict:
        """What a checkpoint holds: {'sizes', 'hashes'}: int64 tensors of shape (N,)."""
        return {'sizes': torch.from_numpy(self.sizes), 'hashes': torch.from_numpy(self.hashes)}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> TrainingFiles | None:
        """The record a checkpoint carries, or None (a model-zoo file, an older checkpoint)."""
        record = saved.get(CHECKPOINT_KEY) if isinstance(saved, dict) else None
        if not isinstance(record, dict) or not all(
                isinstance(record.get(key), torch.Tensor) for key in ('sizes', 'hashes')):
            return None
        return cls(record['sizes'].numpy().astype(np.int64),
                   record['hashes'].numpy().astype(np.int64))

    # --- in the run folder: every file in full ---------------------------------------------

    def write(self, run_dir: Path) -> Path:
        """training_files.csv.gz in `run_dir` (written whole or not at all): this record's
        own files (those with paths)."""
        path = Path(run_dir) / RECORD_FILE
        with atomic_file(path, 'wb', 'the record of training files') as handle:
            with gzip.GzipFile(fileobj=handle, mode='wb', mtime=0) as packed, \
                    io.TextIOWrapper(packed, encoding='utf-8', errors='surrogateescape',
                                     newline='') as text:
                rows = csv.writer(text)
                rows.writerow(COLUMNS)
                rows.writerows(zip(self.paths, self.sizes.tolist(), self.hashes.tolist(),
                                   self.inodes[:, 0].tolist(), self.inodes[:, 1].tolist()))
        return path

    @classmethod
    def read(cls, run_dir: Path) -> TrainingFiles | None:
        """The run folder's record, or None when it has none or it cannot be read."""
        path = Path(run_dir) / RECORD_FILE
        try:
            with gzip.open(path, 'rt', encoding='utf-8', errors='surrogateescape',
                           newline='') as text:
                rows = list(csv.reader(text))
            if not rows or tuple(rows[0]) != COLUMNS:
                return None
            rows = rows[1:]
            numbers = np.array([row[1:] for row in rows], dtype=np.int64).reshape(-1, 4)
        except (OSError, EOFError, ValueError, csv.Error):
            return None
        return cls(numbers[:, 0], numbers[:, 1], [row[0] for row in rows], numbers[:, 2:])

    # --- the check -------------------------------------------------------------------------

    def leaks(self, files: Iterable[str | os.PathLike]) -> list[Leak]:
        """Every file of `files` that is one of this record's (see the module docstring), in
        order and named as given: by resolved path (a symbolic link), by inode with the same
        size (a hard link, a moved file), else by size and then bytes (hashed only when a
        training file has its size). Vectorised: a million recorded files take two sorted
        int64 arrays, no Python set of them."""
        listed = list(dict.fromkeys(str(f) for f in files))      # as the dataset names them
        files = [os.path.realpath(f) for f in listed]
        stats = [os.stat(f) for f in files]
        sizes = np.array([st.st_size for st in stats], dtype=np.int64)
        how: list[tuple[str, int] | None] = [None] * len(files)    # (how, training index)
        if self.paths:
            index = {p: i for i, p in enumerate(self.paths)}
            for n, file in enumerate(files):
                if file in index:
                    how[n] = ('the same file as', index[file])
        if self.inodes is not None and len(self.inodes):
            inodes = np.array([(st.st_dev, st.st_ino) for st in stats], dtype=np.int64)
            for n, i in _lookup(_inode_keys(self.inodes), _inode_keys(inodes.reshape(-1, 2))):
                if how[n] is None and (self.inodes[i] == inodes[n]).all() \
                        and self.sizes[i] == sizes[n]:
                    how[n] = ('the same file (same inode) as', i)
        candidates = [n for n in np.flatnonzero(np.isin(sizes, self.sizes)).tolist()
                      if how[n] is None and stat.S_ISREG(stats[n].st_mode)]
        hashes = np.array(_hash_all([files[n] for n in candidates], 'Comparing test files'),
                          dtype=np.int64)
        for k, i in _lookup(self.hashes, hashes):
            if self.sizes[i] == sizes[candidates[k]]:
                how[candidates[k]] = ('byte-identical to', i)
        named = lambda i: self.paths[i] if self.paths and i < len(self.paths) else None  # noqa
        return [Leak(file, found[0], named(found[1]))
                for file, found in zip(listed, how) if found is not None]


def _inode_keys(inodes: np.ndarray) -> np.ndarray:
    """One int64 per (device, inode) row, equal for equal rows (rows are compared after)."""
    return (inodes[:, 0] << 40) ^ inodes[:, 1]


def _lookup(recorded: np.ndarray, wanted: np.ndarray) -> list[tuple[int, int]]:
    """(n, i) for each wanted[n] found in `recorded` (int64 arrays), i an index where
    recorded[i] == wanted[n]."""
    if not len(recorded) or not len(wanted):
        return []
    order = np.argsort(recorded, kind='stable')
    at = np.minimum(np.searchsorted(recorded[order], wanted), len(recorded) - 1)
    hit = recorded[order[at]] == wanted
    return list(zip(np.flatnonzero(hit).tolist(), order[at[hit]].tolist()))


# --- the files of SOURCES and TARGETS ------------------------------------------------------

def dataset_files(s, name: str, splits: Sequence[str],
                  recorded: dict[str, OwnData] | None = None) -> list[str]:
    """The image files of dataset `name` (a Torchreid name or an own-data path of SOURCES/
    TARGETS, settings `s`) in `splits` ('train', 'query', 'gallery'), as its loader reads
    them (file lists only: nothing is decoded); `recorded`: see own_data.own_split."""
    if is_own_data(name):       # read now: a registration of this process may be older
        data = own_split(name, s, recorded)
        items = {split: getattr(data, split) for split in splits}
    else:
        items = checks.torchreid_items(s, name)
    return [item[0] for split in splits for item in items[split]]


def test_files(s, recorded: dict[str, OwnData] | None = None) -> dict[str, list[str]]:
    """{target's display name: its query and gallery files} for every dataset of TARGETS."""
    return {display_name(name): dataset_files(s, name, ('query', 'gallery'), recorded)
            for name in dict.fromkeys(dataset_list(s.TARGETS))}


def record_sources(s) -> TrainingFiles:
    """The record of every training file of SOURCES (each file read once)."""
    return TrainingFiles.of_files(f for name in dict.fromkeys(dataset_list(s.SOURCES))
                                  for f in dataset_files(s, name, ('train',)))


def record_run(s, start: tuple[dict, Path] | None = None, resumed: bool = False
               ) -> TrainingFiles:
    """The record a training run keeps: every training file of SOURCES, with the files the
    checkpoint it starts from (RESUME's or INIT_WEIGHTS': `start` = (its contents, its path))
    was trained on (`checkpoint_record`: its record, or an older run's split.json). Checked
    first: a `resumed` run trains on no file its checkpoint was not trained on
    (`check_resumed_files`), and no query or gallery file of TARGETS is in the record (every
    evaluation during training would score it). Prints what it recorded."""
    started = time.time()
    record = record_sources(s)
    if start is not None:
        inherited, note = checkpoint_record(*start)
        if note:
            print(f'Note: {note}.')
        if resumed:
            check_resumed_files(record, inherited, start[1])
        record = record.merged(inherited)
    check_targets(record, s, 'SOURCES or the checkpoint this run starts from'
                  if start is not None else 'SOURCES (this run\'s training data)')
    print(f'Recorded {len(record)} training files (none is a test file of TARGETS) in '
          f'{time.time() - started:.1f}s.')
    return record


def check_targets(record: TrainingFiles, s, whose: str,
                  recorded: dict[str, OwnData] | None = None) -> None:
    """UserError when a query or gallery file of a TARGETS dataset (`recorded`: see
    own_data.own_split) is in `record` (`whose` training files, for the message: 'SOURCES''
    or 'the checkpoint'')."""
    for target, files in test_files(s, recorded).items():
        found = record.leaks(files)
        if found:
            raise leak_error(found, target, whose)


def leak_error(found: list[Leak], target: str, whose: str) -> UserError:
    """The one paragraph naming the first leaks, both sides where known."""
    shown = '; '.join(f'"{leak.test}" is ' + (
        'a training file itself' if leak.training == leak.test else
        f'{leak.how} "{leak.training}"' if leak.training else
        f'{leak.how} one of its training files (same size and bytes)') for leak in found[:SHOWN])
    more = f' (and {len(found) - SHOWN} more)' if len(found) > SHOWN else ''
    return UserError(
        f'TARGETS: {len(found)} query/gallery image(s) of {target} are training images of '
        f'{whose}: {shown}{more}. Rank-1 and mAP would be measured on images the model was '
        f'trained on. Remove those files from the test data (byte-identical copies too), or '
        f'test on other data; nothing was run.')


def check_resumed_files(record: TrainingFiles, carried: TrainingFiles | None,
                        checkpoint: Path) -> None:
    """RESUME: every training file of SOURCES now (`record`) is one the checkpoint was trained
    on (`carried`, its record); UserError naming the first new one otherwise (the data
    changed: resuming would train on other images than the run records). Nothing to compare
    without a record."""
    if carried is None:
        return
    known = {n for n, _ in _lookup(carried.hashes, record.hashes)}
    new = [n for n in range(len(record)) if n not in known]
    if new:
        raise UserError(
            f'RESUME: {len(new)} training image(s) of SOURCES are not among those "{checkpoint}" '
            f'was trained on (e.g. "{record.paths[new[0]]}"): the training data changed since '
            f'that run started, and a resumed run continues on the data it records. Restore '
            f'the data as it was, or start a new run from this checkpoint with '
            f'--INIT_WEIGHTS={checkpoint} instead of --RESUME.')


def run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint lies in (<run>/model/<file>)."""
    return Path(checkpoint).resolve().parent.parent


def older_run_splits(saved: dict, checkpoint: Path) -> dict[str, OwnData]:
    """A run made before training files were recorded (its checkpoint `saved` carries no
    record): the own-data splits its run folder's split.json recorded, by dataset path; {}
    for a checkpoint with a record, or with no split.json beside it. UserError when that
    split.json cannot be read (own_data.read_split)."""
    if TrainingFiles.from_checkpoint(saved) is not None:
        return {}
    return read_split(run_folder(checkpoint))


def recorded_splits(s, saved: dict, checkpoint: Path) -> dict[str, OwnData]:
    """Test and visrank of a run made before training files were recorded: {own-data target
    of TARGETS: the split its split.json recorded} (older_run_splits), unless TEST_SHARE or
    SPLIT_SEED is given on the command line (then split anew, and the leak check guards the
    new split). Data whose folder or CSV names read differently since (`0`, `-1`, `01`) would
    split differently now: its training images could land among the test images.

    UserError when a recorded query or gallery image is gone, naming it and split.json: the
    run's test set is the recorded one or none. Leaving an image out would measure another
    test set under the run's name (a query fewer changes the average; a gallery image fewer
    is a match or a distractor fewer, which moves rank-1 and mAP)."""
    if {'TEST_SHARE', 'SPLIT_SEED'} & s.given:
        return {}
    older = older_run_splits(saved, checkpoint)
    chosen = {name: older[name] for name in dict.fromkeys(dataset_list(s.TARGETS))
              if is_own_data(name) and name in older}
    for data in chosen.values():
        gone = next((path for split in ('query', 'gallery') for path, _, _ in getattr(data, split)
                     if not os.path.isfile(path)), None)
        if gone is not None:
            raise UserError(
                f'TARGETS: "{printable(gone)}", a test image of "{printable(data.path)}" as the '
                f'run of "{checkpoint}" recorded it in "{printable(data.recorded_in)}", is no '
                f'longer there (that run was made before training files were recorded, so it '
                f'is tested on the split it recorded, and a test without that image would not '
                f'be its test). Put the image back, or split the data anew with '
                f'--SPLIT_SEED=<n> (a test image that the run trained on is then refused).')
    return chosen


def older_run_record(saved: dict, checkpoint: Path) -> tuple[TrainingFiles | None, str]:
    """A run made before training files were recorded: (the record of the training files its
    split.json lists for its own-data SOURCES that are still there, or None when it lists
    none; the note for the log saying what the test images are checked against)."""
    splits = older_run_splits(saved, checkpoint)
    sources = recorded_settings(saved).get('SOURCES')     # None: not stored, take every split
    sources = dataset_list(sources) if sources is not None else list(splits)
    listed = [path for name in sources if name in splits for path, _, _ in splits[name].train]
    carries = f'"{checkpoint}" carries no record of its training images'
    if not listed:
        return None, (f'{carries} (a model-zoo file, or one written by an older version): '
                      f'nothing to check the test images against')
    there = [path for path in listed if os.path.isfile(path)]
    unknown = [display_name(name) for name in sources if name not in splits]
    return TrainingFiles.of_files(there, 'Hashing the run\'s recorded training files'), (
        f'{carries} (written by an older version): the test images are checked against the '
        f'{len(there)} training images its run\'s {SPLIT_FILE} lists'
        + (f' ({len(listed) - len(there)} more it lists are gone)' if len(there) < len(listed)
           else '')
        + (f'; those of {", ".join(unknown)} are not known' if unknown else ''))


def checkpoint_record(saved: dict, checkpoint: Path) -> tuple[TrainingFiles | None, str | None]:
    """What the checkpoint was trained on, and a note for the log (None when it needs none):
    its own record, with the full record of the run folder it lies in (<run>/model/<file>)
    for the files' names; else its run's split.json (older_run_record); None when there is
    neither."""
    carried = TrainingFiles.from_checkpoint(saved)
    if carried is None:
        return older_run_record(saved, checkpoint)
    in_run = TrainingFiles.read(run_folder(checkpoint))
    return (in_run.merged(carried) if in_run is not None else carried), None


def check_not_trained_on(s, saved: dict, checkpoint: Path,
                         recorded: dict[str, OwnData] | None = None) -> list[str]:
    """Test and visrank: no query or gallery file of TARGETS (`recorded`: own data tested on
    an older run's recorded split, see recorded_splits) is a training file of the checkpoint
    (`saved`, read from `checkpoint`); UserError (leak_error) if one is. Returns the notes
    for the log: the splits taken from split.json, and what the test images were checked
    against when the checkpoint carries no record ('nothing to check against' without one)."""
    notes = [f'"{printable(data.path)}" is tested on the split its run recorded in '
             f'"{printable(data.recorded_in)}" (made before training files were recorded; '
             f'today\'s reading of its names may split it differently)'
             for data in (recorded or {}).values()]
    record, note = checkpoint_record(saved, checkpoint)
    if record is not None:
        check_targets(record, s, f'the checkpoint "{checkpoint}"', recorded)
    return notes + ([note] if note else [])
