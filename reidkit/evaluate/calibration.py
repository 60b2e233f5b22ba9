"""The calibration record: up to which distance a checkpoint's features mean "same person", as
test and visrank measured it (the open-set threshold at MATCH_FPIR), kept with the run so that
search, and a model.onnx exported from the checkpoint, can say "no match in the gallery".

`<run folder>/calibration/<checkpoint file name>.json` holds one entry per target and distance
setting (the distance, FLIP_TEST), each with its threshold, MATCH_FPIR, the numbers of queries
and gallery images it was measured on (FPIR grows with the gallery) and the date. It is never
written into the checkpoint, nor beside a checkpoint kept outside EXPERIMENTS_DIR: that one's
record goes into the test's own output folder, and search with it then needs MATCH_THRESHOLD.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from reidkit.data.checks import MATCH_WORDS
from reidkit.run.atomic import exclusive, write_atomically
from reidkit.run.errors import UserError
from reidkit.run.folders import checkpoint_run
from reidkit.run.settings import Settings
from reidkit.run.words import counted

RECORD_FOLDER = 'calibration'
ENTRY_KEYS = ('target', 'distance', 'flip_test', 'threshold', 'match_fpir', 'queries', 'gallery',
              'date')
# What makes two entries of a record the same measurement: a new one replaces the old.
SAME_ENTRY = ('target', 'distance', 'flip_test')


def distance_settings(s: Settings) -> dict[str, Any]:
    """The settings a distance depends on, as entries record them: the metric (DIST_METRIC:
    'euclidean', squared as Torchreid's, or 'cosine') and FLIP_TEST. A threshold is only ever
    used with the settings it was measured with."""
    return {'distance': s.DIST_METRIC, 'flip_test': bool(s.FLIP_TEST)}


def record_path(checkpoint: Path, folder: Path) -> Path:
    """Where the record of `checkpoint` lives in `folder` (a run folder, or a test's output
    folder for a checkpoint kept outside EXPERIMENTS_DIR)."""
    return Path(folder) / RECORD_FOLDER / f'{Path(checkpoint).name}.json'


@dataclass(frozen=True)
class Calibration:
    """A model's calibration entries (dicts with ENTRY_KEYS) and where they were read from,
    for the log: a record file or an ONNX file's metadata."""
    entries: tuple[dict, ...]
    source: str

    def newest(self, s: Settings) -> dict | None:
        """The newest entry made with `s`'s distance settings (of one test's several targets,
        the first), or None."""
        wanted = distance_settings(s)
        fitting = [(datetime.fromisoformat(entry['date']), -row, entry)
                   for row, entry in enumerate(self.entries)
                   if all(entry[key] == value for key, value in wanted.items())]
        return max(fitting, key=lambda found: found[:2])[2] if fitting else None


def read_record(path: Path) -> Calibration:
    """The entries of the record at `path` (none when there is no such file). UserError for a
    file that is not a record (edited by hand, or not ours), naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except FileNotFoundError:
        return Calibration((), f'"{path}"')
    except OSError as error:
        raise UserError(f'the calibration record "{path}" cannot be read ({error.strerror}). '
                        f'Fix its permissions, or delete it and run test again.') from None
    try:
        stored = json.loads(text)
    except ValueError:
        stored = None
    entries = stored.get('entries') if isinstance(stored, dict) else None
    return Calibration(_checked(entries, f'the calibration record "{path}"',
                                'Delete it and run `python main.py test` on the checkpoint '
                                'again to make a new one.'), f'"{path}"')


def for_checkpoint(checkpoint: Path, experiments_dir: Path) -> Calibration:
    """The calibration of `checkpoint` in its run folder; none for a checkpoint outside
    EXPERIMENTS_DIR (its record, if any, is in a test's folder: see the module's doc)."""
    run = checkpoint_run(checkpoint, experiments_dir)
    if run is None:
        return Calibration((), f'"{checkpoint}" (outside EXPERIMENTS_DIR: no record is kept '
                               f'for it)')
    return read_record(record_path(checkpoint, run))


def from_onnx_metadata(text: str | None, onnx_file: Path) -> Calibration:
    """The entries `export` copied into an ONNX file's metadata (`text`, JSON; None: none)."""
    source = f'the metadata of "{onnx_file}"'
    if text is None:
        return Calibration((), source)
    try:
        entries = json.loads(text)
    except ValueError:
        entries = None
    return Calibration(_checked(entries, f'WEIGHTS: {source}: its calibration',
                                'Export the checkpoint again.'), source)


def _checked(entries: Any, what: str, advice: str) -> tuple[dict, ...]:
    """`entries` when it is a list of well-formed entries, else a UserError."""
    def well_formed(entry) -> bool:
        try:
            return (set(ENTRY_KEYS) <= set(entry) and isinstance(entry['threshold'], (int, float))
                    and entry['threshold'] >= 0
                    and datetime.fromisoformat(entry['date']).tzinfo is not None)
        except (TypeError, ValueError):
            return False
    if not isinstance(entries, list) or not all(map(well_formed, entries)):
        raise UserError(f'{what} is not a calibration record this version can read. {advice}')
    return tuple(entries)


def new_entries(results: Iterable[dict], s: Settings, date: datetime) -> list[dict]:
    """One entry per evaluated target that has a threshold: result['open_set']['threshold']
    ['distance'] (None when RERANK is on or too few queries resolve MATCH_FPIR: no entry)."""
    entries = []
    for result in results:
        threshold = (result.get('open_set') or {}).get('threshold') or {}
        if threshold.get('distance') is None:
            continue
        entries.append(dict(target=result['target'], **distance_settings(s),
                            threshold=float(threshold['distance']),
                            match_fpir=float(threshold['fpir']), queries=int(result['num_query']),
                            gallery=int(result['num_gallery']),
                            date=date.isoformat(timespec='seconds')))
    return entries


def write_record(checkpoint: Path, experiments_dir: Path, out_dir: Path, s: Settings,
                 results: list[dict]) -> list[str]:
    """test and visrank: adds the thresholds of `results` (the evaluation's per-target dicts)
    to the checkpoint's record, replacing the entries they measure again, atomically; in its
    run folder, or in `out_dir` (the test's folder) for a checkpoint outside EXPERIMENTS_DIR.
    Returns the lines to print (none when no target has a threshold). UserError when the
    record cannot be written (a full disk)."""
    entries = new_entries(results, s, datetime.now().astimezone())
    if not entries:
        return []
    run = checkpoint_run(checkpoint, experiments_dir)
    path = record_path(checkpoint, run if run is not None else out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # two tests of one checkpoint at once: each keeps the other's entries
    with exclusive(path.parent / f'.{path.name}.lock', 'Waiting for another test writing '
                                                          f'"{path}" ...'):
        try:
            kept = read_record(path).entries
        except UserError:       # unreadable: the new entries make a new record
            kept = ()
        measured = [tuple(entry[key] for key in SAME_ENTRY) for entry in entries]
        kept = [entry for entry in kept
                if tuple(entry[key] for key in SAME_ENTRY) not in measured]
        write_atomically(path, json.dumps({'checkpoint': Path(checkpoint).name,
                                           'entries': kept + entries}, indent=1) + '\n',
                         'the calibration record')
    lines = [f'Calibration: {entry["target"]}: "same person" up to distance '
             f'{entry["threshold"]:.6g} (FPIR {entry["match_fpir"]:g} with '
             f'{entry["gallery"]:,} gallery images), saved in "{path}"' for entry in entries]
    if run is None:
        lines.append(f'Note: "{checkpoint}" is outside EXPERIMENTS_DIR, so its calibration is '
                     f'kept in this test\'s folder, never beside your file: search with it needs '
                     f'--MATCH_THRESHOLD=<distance> (e.g. the one above)')
    return lines


def match_threshold(s: Settings, calibration: Calibration | None,
                    model: Path) -> tuple[float | None, str]:
    """search's threshold from MATCH_THRESHOLD ('auto': the newest calibration entry made with
    `s`'s distance settings; a number; 'off'; checked before: checks.check_match_threshold)
    and the line saying what it is and where it came from. None: results are not marked."""
    setting = s.MATCH_THRESHOLD
    if setting == MATCH_WORDS[1]:
        return None, 'Match threshold: off (MATCH_THRESHOLD=\'off\'): results are not marked'
    if setting != MATCH_WORDS[0]:
        return float(setting), f'Match threshold: distance <= {setting:g} (MATCH_THRESHOLD)'
    entry = calibration.newest(s) if calibration else None
    if entry is None:
        how = ('export it again once test has calibrated its checkpoint'
               if Path(model).suffix.lower() == '.onnx' else
               f'run `python main.py test --WEIGHTS={shlex.quote(str(model))}` (or visrank)')
        settings = ', '.join(f'{key}={value}' for key, value in distance_settings(s).items())
        return None, (f'Note: no match threshold: "{model}" has no calibration made with '
                      f'{settings}; to make one, {how}, or pass --MATCH_THRESHOLD=<distance>')
    return entry['threshold'], (
        f'Match threshold: distance <= {entry["threshold"]:.6g}, calibrated on '
        f'{entry["target"]} ({entry["date"]}: FPIR {entry["match_fpir"]:g} with '
        f'{counted(entry["queries"], "query", "queries")} and '
        f'{counted(entry["gallery"], "gallery image")}; a larger '
        f'gallery gives more false matches) in {calibration.source}')
