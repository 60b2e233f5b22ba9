"""Where a run's outputs go: one new folder per run, never an earlier run's."""
from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path
from typing import NamedTuple

from reidkit.run.atomic import write_atomically
from reidkit.run.checkpoints import (CHECKPOINT_PREFIX, LATEST_NAME, check_checkpoint_fits,
                                     check_resumable, checkpoint_epoch, load_checkpoint,
                                     weights_only)
from reidkit.run.errors import UserError
from reidkit.run.settings import (Settings, bounded, dataset_list, display_name,
                                  settings_to_evaluate, settings_to_resume)


def new_run_dir(parent: Path, name: str) -> Path:
    """Creates and returns parent/<YYYYmmdd-HHMMSS>-<name>, adding -2, -3 ... if it exists;
    an absolute path (every path printed under it is absolute, as the data's are)."""
    stem = f'{time.strftime("%Y%m%d-%H%M%S")}-{name}'
    for attempt in range(1, 1000):
        folder = Path(parent).resolve() / (stem if attempt == 1 else f'{stem}-{attempt}')
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise UserError(f'EXPERIMENTS_DIR: could not create a new run folder in "{parent}".')


# The most bytes of run_name: with new_run_dir's time stamp (16) and '-999' (4) a run folder's
# name stays within the 255 bytes a file name may have.
RUN_NAME_BYTES = 200


def run_name(s: Settings) -> str:
    """<model>-<loss>-<datasets>: the end of a training run's folder name (own data: its
    folder's or CSV's base name, never the path), at most RUN_NAME_BYTES long (a long one
    is cut and tagged with its hash: settings.bounded)."""
    sources = '+'.join(map(display_name, dataset_list(s.SOURCES)))
    return bounded(f'{s.MODEL_NAME}-{s.LOSS}-{sources}', RUN_NAME_BYTES)


def run_to_continue(checkpoint: Path, experiments_dir: Path, epoch: int) -> Path | None:
    """The run folder a RESUME checkpoint (of `epoch`) belongs to (<run>/<model>/<file>
    directly under EXPERIMENTS_DIR), or None: then a new run folder is made, never one beside
    a checkpoint the user keeps elsewhere, nor one holding checkpoints after `epoch`."""
    run = Path(checkpoint).resolve().parent.parent
    if run.parent != Path(experiments_dir).resolve():
        return None
    return None if later_checkpoints(run, epoch) else run


def later_checkpoints(run_dir: Path, epoch: int) -> list[Path]:
    """Checkpoints of a run after `epoch`: numbered ones by their name, the rolling
    latest.pth.tar by the epoch it holds (one that cannot be read counts as later). Resuming
    from `epoch` there would overwrite them, so such a resume continues as a new run."""
    return sorted(p for p in Path(run_dir).glob(f'*/{CHECKPOINT_PREFIX}*')
                  if checkpoint_epoch(p) > epoch) + sorted(
        p for p in Path(run_dir).glob(f'*/{LATEST_NAME}') if _saved_epoch(p) > epoch)


def _saved_epoch(path: Path) -> float:
    """The epoch a checkpoint holds; infinity when it cannot be read (it may be further on)."""
    try:
        return int(load_checkpoint(path, 'RESUME').get('epoch') or 0)
    except (UserError, TypeError, ValueError):
        return math.inf


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
    """The most recently written checkpoint of a run (numbered or rolling) that training can
    continue from (not one KEEP_OPTIMIZER left with its weights only), or None; of a
    latest.pth.tar linked to a numbered one (the same file), the numbered name."""
    found = [p for p in Path(run_dir).glob('*/*.pth.tar*')
             if not p.name.startswith('.') and not weights_only(p)]
    return max(found, key=lambda p: (p.stat().st_mtime, p.name != LATEST_NAME)) if found else None


def latest_run_checkpoint(experiments_dir: Path, data_root: Path | None = None) -> Path:
    """The newest numbered checkpoint (an absolute path) of the run that trained most recently
    (by the time its checkpoints were written: testing an older run does not make it the
    latest); with `data_root`, of the newest run whose settings.json records that DATA_ROOT (a
    --demo command: the newest demo run, not a model of other data). UserError when there is
    none."""
    runs = [run for run in Path(experiments_dir).resolve().glob('*') if run.is_dir()]
    if data_root is not None:
        runs = [run for run in runs if _recorded_data_root(run) == Path(data_root).resolve()]
    newest = {run: newest_checkpoint(run) for run in runs}
    written = {run: max(p.stat().st_mtime for p in run.glob(f'*/{CHECKPOINT_PREFIX}*'))
               for run, checkpoint in newest.items() if checkpoint is not None}
    if not written and data_root is not None:
        raise UserError(
            f'WEIGHTS is empty and no demo run in "{experiments_dir}" (a run trained on '
            f'DATA_ROOT="{data_root}") has a checkpoint yet. Train one first (python main.py '
            f'--demo), or pass --WEIGHTS=path/to/{CHECKPOINT_PREFIX}N.')
    if not written:
        raise UserError(
            f'WEIGHTS is empty and no training run in "{experiments_dir}" has a checkpoint yet. '
            f'Train first (python main.py train), or pass --WEIGHTS=path/to/{CHECKPOINT_PREFIX}N.'
        )
    return newest[max(written, key=written.get)]


def _recorded_data_root(run_dir: Path) -> Path | None:
    """The DATA_ROOT a run's settings.json records (absolute), or None (none, or unreadable)."""
    try:
        recorded = json.loads((Path(run_dir) / 'settings.json').read_text(encoding='utf-8'))
        return Path(recorded['DATA_ROOT']).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_checkpoint(experiments_dir: Path, data_root: Path | None = None) -> Path:
    """`latest_run_checkpoint`, announced as the default it is (WEIGHTS chooses another)."""
    path = latest_run_checkpoint(experiments_dir, data_root)
    print(f'Model ({"newest demo run" if data_root is not None else "newest run"}; set WEIGHTS '
          f'to choose): {path}')
    return path


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


def resolve_checkpoint(s: Settings, weights: Path | None = None) -> tuple[Path, dict, Settings]:
    """The checkpoint test, visrank, search and export use (`weights`, else WEIGHTS, else the
    newest run's), its contents (loaded safely) and the settings to use it with (its model,
    input size and data: settings.settings_to_evaluate); notes are printed. UserError for a
    missing or unreadable file, or one trained at another input size."""
    path = Path(weights or s.WEIGHTS or default_checkpoint(Path(s.EXPERIMENTS_DIR)))
    saved = load_checkpoint(path, 'WEIGHTS')
    s, notes = settings_to_evaluate(s, recorded_settings(saved), f'WEIGHTS: "{path}"')
    for note in notes:
        print(f'Note: {note}.')
    check_checkpoint_fits(saved, s, path)
    return path, saved, s


class Resumed(NamedTuple):
    """A RESUME checkpoint, checked: what training continues from."""
    path: Path                  # the file
    saved: dict                 # its contents (weights, optimiser, scheduler, epoch, settings)
    settings: Settings          # the run's own (settings.settings_to_resume)
    notes: list[str]            # for the log: flags that changed how it runs, missing data


def resume_checkpoint(s: Settings) -> Resumed:
    """The RESUME checkpoint with the run's settings; UserError for a missing, unreadable or
    finished one, one without its optimiser state (KEEP_OPTIMIZER), or a flag that changes
    the run."""
    path = Path(s.RESUME)
    saved = load_checkpoint(path, 'RESUME')
    check_resumable(saved, path)
    s, notes = settings_to_resume(s, recorded_settings(saved), f'RESUME: "{path}"')
    check_checkpoint_fits(saved, s, path)
    check_not_finished(saved, path, s)
    return Resumed(path, saved, s, notes)


def check_not_finished(saved: dict, checkpoint: Path, s: Settings) -> None:
    """Resuming a run that reached MAX_EPOCH would retrain its last epoch over its checkpoint."""
    epoch = int(saved.get('epoch') or 0)
    if epoch >= s.MAX_EPOCH:
        raise UserError(
            f'RESUME: "{checkpoint}" is from epoch {epoch} and the run\'s MAX_EPOCH is '
            f'{s.MAX_EPOCH}: it has finished, so there is nothing to train and nothing was '
            f'written. To train it further pass --MAX_EPOCH=N with N > {epoch}; to evaluate it: '
            f'python main.py test --WEIGHTS={shlex.quote(str(checkpoint))}')


def training_run_dir(s: Settings, resumed: Resumed | None) -> tuple[Path, list[str]]:
    """The folder a training writes to (the resumed checkpoint's own run when that is under
    EXPERIMENTS_DIR and has nothing after it, else a new one) and the notes for its log."""
    if resumed is None:
        return new_run_dir(Path(s.EXPERIMENTS_DIR), run_name(s)), []
    run_dir = run_to_continue(resumed.path, Path(s.EXPERIMENTS_DIR),
                              int(resumed.saved.get('epoch') or 0))
    if run_dir is not None:
        return run_dir, resumed.notes
    return new_run_dir(Path(s.EXPERIMENTS_DIR), run_name(s)), resumed.notes + [
        f'"{resumed.path}" is not the newest checkpoint of a run folder under EXPERIMENTS_DIR, '
        f'so the run continues in a new one (nothing is overwritten)']


def checkpoint_run(checkpoint: Path, experiments_dir: Path) -> Path | None:
    """The run folder a checkpoint belongs to (<run>/<model>/<file>, the run directly under
    EXPERIMENTS_DIR), or None for a file kept elsewhere: nothing is ever written beside it."""
    run = Path(checkpoint).resolve().parent.parent
    return run if run.parent == Path(experiments_dir).resolve() else None


def output_dir_for(checkpoint: Path, experiments_dir: Path, mode: str) -> Path:
    """A new folder for test/visrank outputs: inside the checkpoint's run when it has one
    under EXPERIMENTS_DIR, else a new run folder named after the mode."""
    run = checkpoint_run(checkpoint, experiments_dir)
    return new_run_dir(run if run is not None else Path(experiments_dir).resolve(), mode)
