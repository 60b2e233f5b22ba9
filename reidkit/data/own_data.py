"""Datasets of the user's own, named by a folder or CSV path in SOURCES/TARGETS: no code.

Name or path: a value of SOURCES/TARGETS is own data when it contains '/' (or '\\'), starts
with '~' or '.', or ends in '.csv'; Torchreid's dataset names have none of these, so a name
always means Torchreid's dataset. Own-data values are stored absolute (`absolute`).

Layouts of a folder (each region: the whole folder, or each split folder, is read alone):
- Market-style file names anywhere under it, `<pid>_c<camera>...` (any number of digits),
  parsed from the file name only (folders above it are never read for ids), with Market-1501's
  meanings: `-1` is junk (dropped), `0`/`0000` a distractor (gallery only), `0001` and `1` one
  person;
- a folder per identity, `<identity>/<image>`: the camera from `c<digits>` in the file name,
  or unknown; or `<identity>/<camera>/<image>`: the sub-folder is the camera, whatever its name.
A CSV file has a header `path,pid,camid[,split]`: paths relative to the CSV, an empty camid
means unknown (for all rows or none), the split column (train/query/gallery) filled for all
rows or none.
Identity folder names and CSV pids are names: `0`, `-1` and `01` are people like any other,
and `01` and `1` two people (a name that is the only one with its number, like `0001` alone,
counts as that number: it is the same person as a Market-style `1`, in split folders read in
different layouts). Camera folder names and CSV camids are names too: `01` and `1` are two
cameras. A folder name need not be valid UTF-8 (shown with \\x escapes).

Numbers: identities are numbered by their own numbers when every one is a number, each
number names one identity and fits int64 (`7/` is pid 7, a distractor 0); otherwise, and so
for Market-style names with too many digits, by rank from 1 in natural order (distractors 0),
and strips show the name or Market number. Ties in natural order (`cam01`, `cam1`) are broken
by the name's bytes, for identities, cameras and images alike: the same data gets the same
numbers and split in every process.

Splits: `train/`, `query/`, `gallery/` folders (or Market's `bounding_box_train/`, `query/`,
`bounding_box_test/`) are used when present. Otherwise identities are split by a hash of
their id seeded by SPLIT_SEED (stable when identities are added): TEST_SHARE of them to test,
at least one on each side; each test identity gives one query per camera (one query when
cameras are unknown), the rest are its gallery; test identities with one image or one camera
are gallery distractors.

Unknown cameras: queries get camera id 0 and the gallery 1, so the same-camera rule discards
nothing: every other image of a query's identity is a match.

This module reads files only (no torch). The rule telling a name from a path is
reidkit.run.settings' (`is_own_data`), used before any file is read.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from reidkit.data import market
from reidkit.run.errors import UserError
from reidkit.run.words import counted
from reidkit.run.settings import absolute

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
# Market-1501 names, read from the start of the file name: any number of digits for both.
MARKET_NAME = re.compile(r'^(-1|\d+)_c(\d+)')
# A camera written in a file name: `c3` not preceded by a letter (so 'rec3' is no camera).
CAMERA_IN_NAME = re.compile(r'(?:^|[^A-Za-z])c(\d+)')
# The split folders, by split: ours first, then Market-1501's names.
SPLITS = ('train', 'query', 'gallery')
SPLIT_FOLDERS = {split: tuple(dict.fromkeys((split, market.SPLIT_FOLDERS[split])))
                 for split in SPLITS}
JUNK, DISTRACTOR = '-1', '0'        # identity keys with Market-1501's meanings
UNKNOWN_QUERY_CAMERA, UNKNOWN_GALLERY_CAMERA = 0, 1
INT64_MAX = 2 ** 63 - 1       # the largest pid Torchreid's int64 label tensors hold
CSV_COLUMNS = ('path', 'pid', 'camid')
SPLIT_FILE = 'split.json'             # in the run folder: every own dataset's split
SPLIT_MADE, SPLIT_GIVEN = 'made (TEST_SHARE, SPLIT_SEED)', 'folders/CSV'   # its `split` values
WHAT_TO_DO = ('Lay the images out as <pid>_c<camera>_<anything>.jpg, as <identity>/<image>, as '
              '<identity>/<camera>/<image>, or list them in a CSV file with the header '
              'path,pid,camid[,split] (docs/own-data.md).')


def natural_key(text: str):
    """Sort key that orders 'c2' before 'c10' (ties: 'c01' and 'c1'; see `name_order`)."""
    return [(0, int(part), '') if part.isdecimal() else (1, 0, part)
            for part in re.split(r'(\d+)', text) if part]


def raw(name: str) -> bytes:
    """A name's bytes as on disk: a folder name that is not UTF-8 comes from os.fsdecode with
    surrogates, which str.encode refuses; valid names give their UTF-8 bytes."""
    return name.encode('utf-8', 'surrogateescape')


def name_order(name: str):
    """Sort key: natural order, ties broken by the name's bytes (never by set order, which
    changes with the process's hash seed)."""
    return natural_key(name), raw(name)


def printable(name: str) -> str:
    """A name as messages, captions and pages show it: bytes that are not UTF-8 as \\x.."""
    return raw(name).decode('utf-8', 'backslashreplace')


def _key(name: str) -> str:
    """A Market-style number (pid or camera) as a key: '0001' and '1' are one."""
    return str(int(name)) if re.fullmatch(r'-?\d+', name) else name


@dataclass(frozen=True)
class Record:
    """One image as read: absolute path, identity key and name, camera name (None: unknown),
    split (None: to be made), where it was read from (for messages), and whether the key
    has Market-1501's meanings (a Market-style file name: -1 junk, 0 distractor)."""
    path: str
    key: str
    name: str
    camera: str | None
    split: str | None
    origin: str
    market: bool = False


@dataclass
class OwnData:
    """A parsed and split dataset of one's own. train/query/gallery: lists of
    (absolute image path, pid, camid); train pids are relabelled 0..N-1 (Torchreid's
    relabel=True), query and gallery keep their ids; camids are 0..C-1 in natural order of
    the camera names, ties by their bytes (unknown cameras: 0 for queries, 1 for the gallery)."""
    path: str
    layout: str
    cameras_known: bool
    split_made: bool
    test_share: float
    split_seed: int
    train: list = field(default_factory=list)
    query: list = field(default_factory=list)
    gallery: list = field(default_factory=list)
    identity_names: dict = field(default_factory=dict)   # query/gallery pid -> name
    train_names: list = field(default_factory=list)      # train label -> name
    camera_names: list = field(default_factory=list)     # camid -> name ([] when unknown)
    junk_dropped: int = 0
    recorded_in: str | None = None      # the split.json it was read from (None: read now)

    def label(self, pid: int, camid: int) -> tuple[str, str]:
        """(identity, camera) as rank strips and pages show a query or gallery item: the
        identity's folder or CSV name (Market-style names: the pid), the camera's name, '?'
        when the data has no camera information (its camids only serve the same-camera rule)."""
        name = self.identity_names.get(pid, str(pid))
        if self.layout.startswith('market-names'):     # Market's number ('0001': 1), even
            name = _key(name)                            # where pids are ranks (huge numbers)
        return printable(name), printable(self.camera_names[camid]) if self.cameras_known else '?'

    def digest(self) -> str:
        """sha256 of the split (paths relative to the dataset, ids, cameras): the same
        images split the same way give the same digest wherever the folder lies."""
        base = Path(self.path)
        base = base.parent if base.is_file() or base.suffix.lower() == '.csv' else base
        lines = sorted(f'{split}\t{os.path.relpath(p, base)}\t{pid}\t{camid}'
                       for split in SPLITS for p, pid, camid in getattr(self, split))
        return hashlib.sha256(raw('\n'.join(lines))).hexdigest()

    def summary(self) -> dict:
        """What metrics.json and split.json say about the dataset (no image lists)."""
        count = lambda items: len({pid for _, pid, _ in items})     # noqa: E731
        return dict(
            path=self.path, layout=self.layout, cameras_known=self.cameras_known,
            split=SPLIT_MADE if self.split_made else SPLIT_GIVEN,
            test_share=self.test_share, split_seed=self.split_seed, digest=self.digest(),
            **{f'{split}_ids': count(getattr(self, split)) for split in SPLITS},
            **{f'{split}_images': len(getattr(self, split)) for split in SPLITS},
            junk_dropped=self.junk_dropped,
            **({'recorded_in': printable(self.recorded_in)} if self.recorded_in else {}))

    def to_json(self) -> dict:
        """summary() plus every image's split, id and camera (paths relative to the data)."""
        base = Path(self.path)
        base = base.parent if base.suffix.lower() == '.csv' else base
        rows = lambda items, names: [[os.path.relpath(p, base), pid, names(pid), camid]  # noqa
                                     for p, pid, camid in items]
        return dict(self.summary(), camera_names=self.camera_names,
                    columns=['path', 'pid', 'identity', 'camid'],
                    train=rows(self.train, lambda pid: self.train_names[pid]),
                    query=rows(self.query, self.identity_names.get),
                    gallery=rows(self.gallery, self.identity_names.get))

    @classmethod
    def from_json(cls, block: dict, recorded_in: str | None = None) -> OwnData:
        """The split `to_json` wrote (one dataset's block of a run's split.json), its paths
        made absolute again from the dataset folder (a CSV's: the CSV's folder); `recorded_in`:
        the file it was read from. KeyError, TypeError or ValueError for a block that is not
        to_json's, or whose rows do not give its digest (changed since)."""
        base = Path(block['path'])
        base = base.parent if base.suffix.lower() == '.csv' else base
        items = lambda split: [(os.path.normpath(os.path.join(base, path)), int(pid),  # noqa
                                int(camid)) for path, pid, _, camid in block[split]]
        names = lambda split: {int(pid): name for _, pid, name, _ in block[split]}  # noqa
        if block['split'] not in (SPLIT_MADE, SPLIT_GIVEN):
            raise ValueError(f'split {block["split"]!r}')
        train_names = names('train')
        data = cls(str(block['path']), str(block['layout']), bool(block['cameras_known']),
                   block['split'] == SPLIT_MADE, float(block['test_share']),
                   int(block['split_seed']), items('train'), items('query'), items('gallery'),
                   identity_names=names('query') | names('gallery'),
                   train_names=[train_names[label] for label in range(len(train_names))],
                   camera_names=list(block['camera_names']),
                   junk_dropped=int(block['junk_dropped']), recorded_in=recorded_in)
        if data.digest() != block['digest']:
            raise ValueError(f'the rows of "{printable(data.path)}" do not give its digest')
        return data


def load(value: str, test_share: float = 0.5, split_seed: int = 0) -> OwnData:
    """The dataset a SOURCES/TARGETS path names, parsed and split (see the module docstring).

    Raises UserError (naming the path and what to do) for a missing or empty folder, images
    whose names and folders parse in no layout, a CSV with missing columns or a bad row, a
    TEST_SHARE outside (0, 1), or too few identities to split."""
    if not 0 < test_share < 1:
        raise UserError(f'TEST_SHARE={test_share!r} must be between 0 and 1 (the share of '
                        f'identities held out for testing, e.g. 0.5). Fix it in config.py or '
                        f'with --TEST_SHARE=...')
    path = Path(absolute(value))
    if path.suffix.lower() == '.csv':
        records, layout = read_csv(path), 'csv'
    else:
        records, layout = read_folder(path)
    return build(str(path), records, layout, test_share, split_seed)


# --- reading -----------------------------------------------------------------------------

def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (any depth, hidden files and folders skipped), sorted."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        if os.path.realpath(top) in seen:       # a linked folder met twice (or a link loop)
            dirs[:] = []
            continue
        seen.add(os.path.realpath(top))
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        found += [Path(top) / f for f in files
                  if not f.startswith('.') and f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found, key=lambda p: name_order(str(p)))


def split_folders(folder: Path) -> tuple[Path, dict[str, Path]]:
    """(the folder holding the split folders, {split: folder}), or (folder, {}) when there
    are none. A folder holding nothing but one sub-folder (an unpacked archive, like Market's
    Market-1501-v15.09.15/) is looked into, twice at most."""
    top = folder
    for _ in range(3):
        found = {split: folder / name for split, names in SPLIT_FOLDERS.items()
                 for name in reversed(names) if (folder / name).is_dir()}
        if found:
            return folder, found
        entries = [e for e in folder.iterdir() if not e.name.startswith('.')]
        if len(entries) != 1 or not entries[0].is_dir():
            break
        folder = entries[0]
    return top, {}


def read_folder(path: Path) -> tuple[list[Record], str]:
    """Every image of a dataset folder as a Record, and the layout's name."""
    if not path.is_dir():
        raise UserError(f'SOURCES/TARGETS: "{path}" is not a folder (nor a .csv file). Give the '
                        f'folder that holds your images, e.g. --SOURCES=./my-crops, or a CSV '
                        f'file path,pid,camid[,split].')
    root, splits = split_folders(path)
    regions = splits or {None: root}
    records, layouts = [], set()
    for split, region in regions.items():
        images = list_images(region)
        if not images:
            if split is None:
                raise UserError(f'SOURCES/TARGETS: "{path}" holds no images '
                                f'({", ".join(IMAGE_SUFFIXES)}). Put your crops there. '
                                + WHAT_TO_DO)
            continue
        region_records, layout = read_region(region, images, split)
        records += region_records
        layouts.add(layout)
    if not records:
        raise UserError(f'SOURCES/TARGETS: the split folders of "{path}" '
                        f'({", ".join(p.name for p in splits.values())}) hold no images. '
                        f'Put your crops there. ' + WHAT_TO_DO)
    layout = '+'.join(sorted(layouts))
    return records, (f'{layout} in split folders' if splits else layout)


def read_region(region: Path, images: list[Path], split: str | None) -> tuple[list[Record], str]:
    """The images of one region (the dataset folder or one split folder) as Records."""
    names = [MARKET_NAME.match(p.name) for p in images]
    if all(names):
        return [Record(str(p), _key(m.group(1)), m.group(1), 'c' + str(int(m.group(2))), split,
                       str(p), market=True) for p, m in zip(images, names)], 'market-names'
    parts = [p.relative_to(region).parts for p in images]
    depths = {len(part) for part in parts}
    if depths == {2}:
        cameras = [CAMERA_IN_NAME.search(p.name) for p in images]
        if any(cameras) and not all(cameras):
            bad = images[[bool(c) for c in cameras].index(False)]
            raise UserError(
                f'SOURCES/TARGETS: some images under "{region}" have a camera (c<digits>) in '
                f'their file name and some, like "{bad}", do not. Name every image with its '
                f'camera, none of them (cameras unknown), or put each identity\'s images in '
                f'one sub-folder per camera: <identity>/<camera>/<image>.')
        return [Record(str(p), part[0], part[0],
                       'c' + str(int(c.group(1))) if c else None, split, str(p))
                for p, part, c in zip(images, parts, cameras)], \
            'identity-folders' + ('' if any(cameras) else ' (cameras unknown)')
    if depths == {3}:
        return [Record(str(p), part[0], part[0], part[1], split, str(p))
                for p, part in zip(images, parts)], 'identity/camera folders'
    # the image to name: one lying loose, or one at the less common depth
    odd_depth = min(depths, key=lambda d: (d != 1, sum(len(part) == d for part in parts)))
    bad = next(p for p, part, m in zip(images, parts, names) if not m and len(part) == odd_depth)
    raise UserError(
        f'SOURCES/TARGETS: cannot tell the person and camera of images under "{region}": '
        f'"{bad}" has no Market-style name (<pid>_c<camera>...) and the images are not all '
        f'one or two folders below it (<identity>/<image> or <identity>/<camera>/<image>; '
        f'found depths {sorted(depths)}). ' + WHAT_TO_DO)


def read_csv(path: Path) -> list[Record]:
    """The rows of a dataset CSV file as Records (see the module docstring)."""
    if not path.is_file():
        raise UserError(f'SOURCES/TARGETS: the CSV file "{path}" does not exist. Give the path '
                        f'of a file with the header path,pid,camid[,split], paths relative to it.')
    try:
        with open(path, newline='', encoding='utf-8-sig') as file:
            rows = list(csv.reader(file))
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f'SOURCES/TARGETS: the CSV file "{path}" cannot be read as UTF-8 CSV '
                        f'({error}). Save it as UTF-8 text with the header path,pid,camid'
                        f'[,split] and one row per image.') from None
    header = [column.strip().lower() for column in rows[0]] if rows else []
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise UserError(f'SOURCES/TARGETS: the CSV file "{path}" lacks the column(s) '
                        f'{", ".join(missing)}: its first line must be the header '
                        f'path,pid,camid (and optionally split), e.g. '
                        f'"path,pid,camid" then "alice/1.jpg,alice,door".')
    column = {name: header.index(name) for name in header}
    records = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        problem = lambda what: UserError(      # noqa: E731
            f'SOURCES/TARGETS: "{path}", row {line}: {what}. Each row is path,pid,camid'
            + (',split' if 'split' in column else '') + ' (path relative to the CSV file, camid '
            'empty when unknown); fix or delete the row.')
        if len(row) != len(header):
            raise problem(f'{len(row)} fields where the header has {len(header)}')
        cell = {name: row[index].strip() for name, index in column.items()}
        if not cell['path'] or not cell['pid']:
            raise problem('the path or pid is empty')
        image = (path.parent / cell['path']).resolve()
        if not image.is_file():
            raise problem(f'the image "{image}" does not exist')
        split = cell.get('split') or None
        if split is not None and split not in SPLITS:
            raise problem(f'split {split!r} is none of {", ".join(SPLITS)}')
        camera = cell['camid'] or None       # a name, as a camera folder's: '01' is not '1'
        records.append(Record(str(image), cell['pid'], cell['pid'], camera, split,
                              f'"{path}", row {line}'))
    if not records:
        raise UserError(f'SOURCES/TARGETS: the CSV file "{path}" lists no images: add one row '
                        f'path,pid,camid per image under its header.')
    for attribute, what in (('split', 'the split column'), ('camera', 'camid')):
        filled = [getattr(r, attribute) is not None for r in records]
        if any(filled) and not all(filled):
            odd = records[filled.index(not filled[0])]
            raise UserError(f'SOURCES/TARGETS: {odd.origin}: {what} is '
                            f'{"empty" if filled[0] else "filled"} here but not in the first '
                            f'row. Fill '
                            f'{what} in every row or leave it empty in every row.')
    return records


# --- numbering and splitting -------------------------------------------------------------

def identity_hash(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by an identity's key and SPLIT_SEED alone."""
    digest = hashlib.sha256(raw(f'{seed}/{key}')).digest()
    return int.from_bytes(digest[:8], 'big') / 2 ** 64


def identity_keys(records: list[Record]) -> list[Record]:
    """`records` with each identity folder or CSV name that is the only one with its number
    keyed by that number ('0001' alone is 1, as a Market-style 0001 is; '01' beside '1' stays
    itself): the key numbers and splits it, the name stays as written."""
    numbered: dict[int, set] = {}
    for r in records:
        if not r.market and re.fullmatch(r'[0-9]+', r.key):
            numbered.setdefault(int(r.key), set()).add(r.key)
    alone = {next(iter(names)): str(number) for number, names in numbered.items()
             if len(names) == 1}
    return [dataclasses.replace(r, key=alone[r.key]) if not r.market and r.key in alone else r
            for r in records]


def numbering(keys: list[str], distractors: bool) -> dict[str, int]:
    """The pid of each identity key: its number when every key is a number without leading
    zeros that fits int64 (Torchreid's pid tensors) and none is 0 beside distractors (pid 0);
    else its rank from 1 in `name_order`."""
    numbers = all(re.fullmatch(r'0|[1-9][0-9]*', k) and int(k) <= INT64_MAX for k in keys) \
        and not (distractors and DISTRACTOR in keys)
    return {k: int(k) if numbers else rank
            for rank, k in enumerate(sorted(keys, key=name_order), start=1)}


def build(path: str, records: list[Record], layout: str, test_share: float,
          split_seed: int) -> OwnData:
    """Numbers identities and cameras, splits when no split was given, relabels train."""
    known = [r.camera is not None for r in records]
    if any(known) and not all(known):
        odd = records[known.index(False)]
        raise UserError(f'SOURCES/TARGETS: "{path}": {odd.origin} has no camera while other '
                        f'images have one. Give every image a camera or none.')
    cameras_known = all(known)
    camera_names = sorted({r.camera for r in records}, key=name_order) if cameras_known else []
    camid = {name: index for index, name in enumerate(camera_names)}
    kept = identity_keys([r for r in records if not (r.market and r.key == JUNK)])
    is_distractor = lambda r: r.market and r.key == DISTRACTOR     # noqa: E731
    people = [r for r in kept if not is_distractor(r)]
    distractors = [r for r in kept if is_distractor(r)]
    names = {}
    for r in people:
        names.setdefault(r.key, r.name)
    pid = numbering(list(names), bool(distractors))
    data = OwnData(path, layout, cameras_known, split_made=records[0].split is None,
                   test_share=test_share, split_seed=split_seed,
                   junk_dropped=len(records) - len(kept))
    pid_of = lambda r: 0 if is_distractor(r) else pid[r.key]        # noqa: E731
    item = lambda r, cam=None: (r.path, pid_of(r), camid[r.camera] if cameras_known  # noqa
                                else cam)
    if data.split_made:
        train, query, gallery = make_split(people, distractors, test_share, split_seed,
                                           cameras_known, path)
    else:
        train = [r for r in people if r.split == 'train']
        query = [r for r in people if r.split == 'query']
        gallery = [r for r in kept if r.split == 'gallery']
    data.query = [item(r, UNKNOWN_QUERY_CAMERA) for r in query]
    data.gallery = [item(r, UNKNOWN_GALLERY_CAMERA) for r in gallery]
    data.identity_names = {pid_of(r): distractors[0].name if is_distractor(r)
                           else names[r.key] for r in query + gallery}
    train_keys = sorted({r.key for r in train}, key=lambda k: pid[k])
    label = {k: index for index, k in enumerate(train_keys)}
    data.train = [(r.path, label[r.key], camid[r.camera] if cameras_known else 0) for r in train]
    data.train_names = [names[k] for k in train_keys]
    data.camera_names = camera_names
    if not (data.train or data.query):
        raise UserError(f'SOURCES/TARGETS: "{path}" has neither training nor query images '
                        f'(after dropping {data.junk_dropped} junk images, pid -1). '
                        + WHAT_TO_DO)
    return data


def make_split(records: list[Record], distractors: list[Record], test_share: float, seed: int,
               cameras_known: bool, path: str
               ) -> tuple[list[Record], list[Record], list[Record]]:
    """(train, query, gallery) Records of the people's `records` (the `distractors` go to the
    gallery): identities to train or test by `identity_hash`, at least one on each side; one
    query per camera of each test identity (seeded by SPLIT_SEED and the identity), each with
    a match from another camera left in the gallery."""
    by_key: dict[str, list[Record]] = {}
    for r in records:
        by_key.setdefault(r.key, []).append(r)
    usable = {k for k, images in by_key.items()
              if len(images) > 1 and (not cameras_known or len({r.camera for r in images}) > 1)}
    if len(by_key) < 2 or not usable:
        raise UserError(
            f'SOURCES/TARGETS: "{path}" has {len(by_key)} '
            f'identit{"y" if len(by_key) == 1 else "ies"}'
            f' and {len(usable)} with images from two cameras (or, cameras unknown, two images):'
            f' splitting into training and test identities needs at least two identities, one '
            f'of them with such images. Add identities, or give train/, query/ and gallery/ '
            f'folders yourself.')
    score = {k: identity_hash(k, seed) for k in by_key}
    test = {k for k in by_key if score[k] < test_share}
    if not test & usable:             # at least one test identity that gives a query
        test.add(min(usable, key=score.get))
    if test == set(by_key):           # at least one training identity
        test.discard(max(set(by_key) - {min(test & usable, key=score.get)}, key=score.get))
    train, query, gallery = [], [], list(distractors)
    for key in sorted(by_key, key=name_order):
        images = by_key[key]
        if key not in test:
            train += images
        elif key not in usable:
            gallery += images         # a distractor: no query can match it
        else:
            chosen = choose_queries(images, seed, cameras_known)
            query += chosen
            gallery += [r for r in images if r not in chosen]
    return train, query, gallery


def choose_queries(images: list[Record], seed: int, cameras_known: bool) -> list[Record]:
    """One image per camera (one in all when cameras are unknown), chosen by a generator
    seeded with SPLIT_SEED and the identity; a query whose camera would leave no image of
    another camera in the gallery is given back to the gallery."""
    rng = random.Random(raw(f'{seed}/{images[0].key}'))     # bytes: the str's seed, any name
    by_camera: dict = {}
    for r in images:
        by_camera.setdefault(r.camera if cameras_known else None, []).append(r)
    chosen = [rng.choice(by_camera[c])
              for c in sorted(by_camera, key=lambda c: name_order(c or ''))]
    while cameras_known:
        left = {c: len(by_camera[c]) - sum(q.camera == c for q in chosen) for c in by_camera}
        bad = [q for q in chosen if not any(n for c, n in left.items() if c != q.camera)]
        if not bad:
            break
        chosen.remove(bad[0])
    return chosen


def write_split(run_dir: Path, datasets: list[OwnData]) -> Path:
    """split.json in the run folder: each own dataset's summary and every image's split."""
    path = Path(run_dir) / SPLIT_FILE
    path.write_text(json.dumps([d.to_json() for d in datasets], indent=1) + '\n')
    return path


def read_split(run_dir: Path) -> dict[str, OwnData]:
    """The splits a run folder's split.json recorded (`write_split`), by dataset path; {}
    when it has none. UserError naming the file when it cannot be read or was changed."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        return {}
    try:
        splits = [OwnData.from_json(block, str(path))
                  for block in json.loads(path.read_text(encoding='utf-8'))]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise UserError(f'"{printable(str(path))}" cannot be read ({type(error).__name__}: '
                        f'{error}). It records which image went where in that run, and the '
                        f'run\'s checkpoint has no other record of it: restore the file from a '
                        f'copy of the run folder, then run again.') from None
    return {data.path: data for data in splits}


def own_split(value: str, s, recorded: dict[str, OwnData] | None = None) -> OwnData:
    """The split of own-data `value` a run reads (settings `s`): the one `recorded` for it (a
    run made before training files were recorded: training_files.recorded_splits), else the
    data read now (`load` with TEST_SHARE and SPLIT_SEED)."""
    if recorded and value in recorded:
        return recorded[value]
    return load(value, s.TEST_SHARE, s.SPLIT_SEED)


def missing_split(data: OwnData, split: str, setting: str = 'SOURCES/TARGETS') -> UserError:
    """The error for a dataset without images in `split` (train: it cannot be a source;
    query or gallery: it cannot be a target); `setting` names where its path was given."""
    if split == 'train':
        return UserError(f'{setting}: "{data.path}" has no training images (it holds query and '
                         f'gallery images only), so it can be a target but not a source: put it '
                         f'in TARGETS and train on another dataset, or add a train/ folder.')
    return UserError(f'{setting}: "{data.path}" has no {split} images, so it cannot be a target: '
                     f'add query/ and gallery/ folders, or remove the split folders to have the '
                     f'split made (TEST_SHARE).')


def check_own_data(value: str, s, as_source: bool,
                   recorded: dict[str, OwnData] | None = None) -> OwnData:
    """Pre-run check of one own-data value of SOURCES/TARGETS (settings `s`): it parses and
    splits (see `load`; or its split is `recorded`: see `own_split`), and a source has
    training images; prints what was found."""
    setting = 'SOURCES' if as_source else 'TARGETS'
    try:
        data = own_split(value, s, recorded)
    except UserError as error:          # name the setting that holds the path
        raise UserError(str(error).replace('SOURCES/TARGETS:', f'{setting}:', 1)) from None
    if as_source and not data.train:
        raise missing_split(data, 'train', setting)
    counts = data.summary()
    print(f'Own data "{printable(data.path)}": {data.layout}, '
          + ', '.join(f'{split} {counted(counts[f"{split}_ids"], "id")} / '
                      f'{counted(counts[f"{split}_images"], "image")}' for split in SPLITS)
          + (f', split made with TEST_SHARE={data.test_share:g}, SPLIT_SEED={data.split_seed}'
             if data.split_made else '')
          + ('' if data.cameras_known else ', cameras unknown')
          + (f', {data.junk_dropped} junk images (pid -1) dropped' if data.junk_dropped else '')
          + (f', as recorded in "{printable(data.recorded_in)}"' if data.recorded_in else '')
          + '.')
    return data
