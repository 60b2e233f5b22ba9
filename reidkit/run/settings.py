"""Settings: config.py's constants, then checked command-line overrides, then frozen.

Overrides are `--KEY=VALUE`; VALUE is read as a Python literal (so --LR=1e-3, --PRETRAINED=False,
--TRANSFORMS="['random_flip']") and falls back to a plain string (--MODEL_NAME=osnet_x1_0).
Its type must match the default's (or be one of those SEVERAL_TYPES allows for its key); an
unknown key is an error that suggests near matches.
Path-valued settings keep the text as given (a folder may be called `2024` or `True`).

Every setting belongs to one class, which says what a checkpoint does to it:
- run settings define what is trained; a run stores them (settings.json, every checkpoint) and
  resuming takes them from the checkpoint; a command-line flag that changes one is an error;
- schedule settings may change when resuming (a longer run, other log intervals), noted in the log;
- local settings belong to this machine and this command, never to a checkpoint.
"""
from __future__ import annotations

import ast
import hashlib
import os
import re
import shlex
import difflib
import math
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping, NamedTuple

from reidkit.run.errors import UserError

# config.py constants that are not settings themselves.
NOT_SETTINGS = {'DEMO', 'STRONG', 'STRONG_EPOCHS'}

# The class of every setting (see above); a setting added to config.py must be added here.
RUN_SETTINGS = ('SOURCES', 'TARGETS', 'HEIGHT', 'WIDTH', 'BATCH_SIZE_TRAIN', 'TRANSFORMS',
                'MODEL_NAME', 'LOSS', 'PRETRAINED', 'LABEL_SMOOTH', 'OPTIM', 'LR',
                'LR_SCHEDULER', 'STEPSIZE', 'SEED', 'LR_SCALING', 'SYNC_BN', 'TEST_SHARE',
                'SPLIT_SEED', 'INIT_WEIGHTS', 'FIXBASE_EPOCH', 'OPEN_LAYERS', 'NECK',
                'LAST_STRIDE', 'CENTER_LOSS_WEIGHT', 'CENTER_LR', 'DIST_METRIC', 'RECIPE',
                'WARMUP_EPOCHS', 'WARMUP_FACTOR')
RECIPES = ('tutorial', 'strong')
# What a run that recorded no value for a run setting trained with (an older checkpoint): the
# tutorial's built-in values, never config.py's current ones.
BEFORE_RECORDED = {'NECK': 'none', 'LAST_STRIDE': 'auto', 'CENTER_LOSS_WEIGHT': 0.0,
                   'CENTER_LR': 0.5, 'DIST_METRIC': 'euclidean', 'RECIPE': 'tutorial',
                   'WARMUP_EPOCHS': 0, 'WARMUP_FACTOR': 0.01}
SCHEDULE_SETTINGS = ('MAX_EPOCH', 'EVAL_FREQ', 'PRINT_FREQ', 'LATEST_EVERY', 'KEEP_OPTIMIZER')
LOCAL_SETTINGS = ('DATA_ROOT', 'BATCH_SIZE_TEST', 'WORKERS', 'CPU_THREADS', 'DEVICE', 'GPUS', 'AMP',
                  'CHANNELS_LAST', 'COMPILE', 'DATA_CACHE', 'DATA_CACHE_GB',
                  'RESUME', 'EXPERIMENTS_DIR', 'WEIGHTS', 'VISRANK_TOPK', 'FLIP_TEST', 'RERANK',
                  'RERANK_K1', 'RERANK_K2', 'RERANK_LAMBDA', 'MATCH_FPIR', 'QUERY', 'GALLERY',
                  'SEARCH_TOPK', 'SEARCH_CSV_ROWS', 'SEARCH_EXACT_UP_TO', 'SEARCH_INDEX',
                  'SEARCH_NPROBE', 'MATCH_THRESHOLD')
# Local settings a resumed run keeps from its checkpoint unless given again (how it ran:
# workers, test batch, device and speed switches, evaluation switches), so that resuming a
# --demo run or a tuned one continues it as it was. The others name this command's inputs.
# This command's inputs (the checkpoint it continues or reads, the images it searches) are
# never a run's: a run records them empty.
COMMAND_INPUTS = ('RESUME', 'WEIGHTS', 'QUERY', 'GALLERY')
RESUMED_LOCAL_SETTINGS = tuple(key for key in LOCAL_SETTINGS if key not in
                               COMMAND_INPUTS + ('DATA_ROOT', 'EXPERIMENTS_DIR'))
# Settings that name a file or folder: their text is kept as given.
PATH_SETTINGS = ('DATA_ROOT', 'EXPERIMENTS_DIR', 'WEIGHTS', 'RESUME', 'QUERY', 'GALLERY',
                 'INIT_WEIGHTS')
# Settings that take one dataset name or a list of them. A value with '/', starting with '~'
# or '.', or ending in '.csv' is a folder or CSV of the user's own (reidkit.data.own_data): kept as
# text on the command line and stored as an absolute path.
DATASET_LISTS = ('SOURCES', 'TARGETS')


def is_own_data(value) -> bool:
    """Whether a SOURCES/TARGETS value names a folder or CSV file rather than a Torchreid
    dataset: it contains '/' or '\\', starts with '~' or '.', or ends in '.csv'."""
    return isinstance(value, str) and (
        '/' in value or '\\' in value or value.startswith(('~', '.'))
        or value.lower().endswith('.csv'))


def dataset_list(value) -> list[str]:
    """SOURCES or TARGETS as a list of names and paths: one name becomes a one-item list."""
    return [value] if isinstance(value, str) else list(value)


def absolute(value, setting: str = 'SOURCES/TARGETS'):
    """An own-data value as an absolute path ('~' expanded); other values unchanged.
    UserError (naming `setting`) for a '~user' that does not exist."""
    return str(Path(home_expanded(value, setting)).resolve()) if is_own_data(value) else value


def home_expanded(value: str, setting: str) -> str:
    """A path with a leading '~' or '~user' replaced by that home folder; UserError naming
    `setting` when it cannot be (no such user, or no HOME)."""
    try:
        return str(Path(value).expanduser())
    except RuntimeError:        # pathlib's "Could not determine home directory."
        user = value[1:].split('/', 1)[0].split('\\', 1)[0]
        raise UserError(
            f'{setting}: "{value}" starts with ~{user}, but '
            + (f'there is no user "{user}" on this machine' if user else
               'the home folder is not known here (HOME is not set)')
            + f', so the path cannot be found. Write the path out in full, e.g. '
            f'--{setting.split("/")[0]}=/home/<name>/...') from None


# The most bytes of a display name: 'visrank_<name>' and run folder names stay well within
# the 255 bytes a file name may have.
DISPLAY_NAME_BYTES = 120


def display_name(value: str) -> str:
    """A short, safe name for run folders and titles: the folder's (or CSV's) base name with
    every character other than letters, digits, '.', '_' and '-' replaced by '_', at most
    DISPLAY_NAME_BYTES long (`bounded`)."""
    if not is_own_data(value):
        return value
    path = Path(value)
    base = path.stem if path.suffix.lower() == '.csv' else path.name
    return bounded(re.sub(r'[^A-Za-z0-9._-]', '_', base).lstrip('.') or 'data',
                   DISPLAY_NAME_BYTES)


def bounded(name: str, limit: int) -> str:
    """`name` when its UTF-8 form has at most `limit` bytes (limit > 9); else its start and
    '-' and 8 hex digits of its hash, `limit` bytes in all: readable, and two long names that
    differ only at the end stay apart."""
    data = name.encode('utf-8', 'surrogateescape')
    if len(data) <= limit:
        return name
    tag = hashlib.sha256(data).hexdigest()[:8]
    return data[:limit - 9].decode('utf-8', 'ignore') + '-' + tag



# The fast-path switches and their values ('auto': on with CUDA, off on the CPU).
SWITCH_CHOICES = {'AMP': ('auto', 'bf16', 'off'), 'CHANNELS_LAST': ('auto', 'on', 'off'),
                  'COMPILE': ('auto', 'on', 'off'), 'DATA_CACHE': ('auto', 'on', 'off')}


class Settings(Mapping):
    """A read-only set of named settings: `s.LR` or `s['LR']`; resolved once, never mutated.

    `given` names the settings set on the command line (or by `replace`), as opposed to taken
    from config.py: only those may override what a checkpoint recorded."""

    def __init__(self, values: Mapping[str, Any], given: Iterable[str] = (),
                 preset: Iterable[str] = ()):
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f'{key}={value!r} is not a finite number. Fix it in config.py '
                                f'or with --{key}=...')
        object.__setattr__(self, '_values', dict(values))
        object.__setattr__(self, 'given', frozenset(given))
        # the settings RECIPE's preset set (config.STRONG), unless given on the command line
        object.__setattr__(self, 'preset', frozenset(preset) - frozenset(given))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError('settings are frozen once resolved; pass overrides instead')

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return 'Settings({})'.format(', '.join(f'{k}={v!r}' for k, v in self._values.items()))

    def replace(self, **changes: Any) -> 'Settings':
        """A copy with `changes` applied, each checked like a command-line override."""
        return Settings(apply_overrides(self._values, changes, source='replace()'),
                        self.given | set(changes), self.preset)

    def recipe_line(self) -> str:
        """What RECIPE's preset set, for the log ('' for the tutorial's recipe)."""
        if not self.preset:
            return ''
        return (f'Recipe {self._values["RECIPE"]!r} (config.STRONG, epochs scaled to '
                f'MAX_EPOCH={self._values["MAX_EPOCH"]}): '
                + ', '.join(f'{key}={self._values[key]!r}' for key in sorted(self.preset)))

    def record(self) -> dict[str, Any]:
        """The settings as a run stores them: plain values, DATA_ROOT as an absolute path (so
        test, visrank and resume find the data from any working directory), COMMAND_INPUTS
        empty (a resumed run records what it started with)."""
        values = dict(self._values, **{key: '' for key in COMMAND_INPUTS if key in self._values})
        if values.get('DATA_ROOT'):
            values['DATA_ROOT'] = str(Path(values['DATA_ROOT']).expanduser().resolve())
        return values


def defaults_from(config: ModuleType) -> dict[str, Any]:
    """The settings a config module defines: its upper-case constants, in file order."""
    return {name: value for name, value in vars(config).items()
            if name.isupper() and not name.startswith('_') and name not in NOT_SETTINGS}


def resolve(config: ModuleType, overrides: Mapping[str, Any] | None = None,
            demo: bool = False) -> Settings:
    """config.py's values, then config.DEMO's (with demo), then `overrides`; checked
    (UserError for an unknown name, a wrong type or a value that is not finite)."""
    values = defaults_from(config)
    if demo:
        values = apply_overrides(values, config.DEMO, source='config.DEMO')
    values, preset = _with_recipe(config, values, apply_overrides(values, overrides or {}))
    values = apply_overrides(values, overrides or {})
    for key in PATH_SETTINGS:        # '~/x' means the home folder everywhere it is used
        if isinstance(values[key], str) and values[key].startswith('~'):
            values[key] = home_expanded(values[key], key)
    for key in DATASET_LISTS:        # own data: one absolute path, whatever the current folder
        values[key] = _absolute_datasets(key, values[key])
    return Settings(values, given=overrides or {}, preset=preset)


def _with_recipe(config: ModuleType, values: dict[str, Any], final: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], set[str]]:
    """`values` with RECIPE's preset applied, and the keys it set. `final`: the values with the
    command line applied, whose RECIPE and MAX_EPOCH decide (the command line is applied after
    the preset, so its flags still win). config.STRONG's epochs (of a STRONG_EPOCHS-epoch run)
    are scaled to MAX_EPOCH; its TRANSFORMS are added to the run's."""
    recipe = final['RECIPE']
    if recipe not in RECIPES:
        raise UserError(f'RECIPE={recipe!r} is not a recipe: choose one of '
                        f'{", ".join(map(repr, RECIPES))}. Fix it in config.py or with --RECIPE=...')
    if recipe == 'tutorial':
        return values, set()
    scale = final['MAX_EPOCH'] / config.STRONG_EPOCHS
    preset = {}
    for key, value in config.STRONG.items():
        if key == 'TRANSFORMS':
            value = list(values['TRANSFORMS']) + [t for t in value if t not in values['TRANSFORMS']]
        elif key == 'WARMUP_EPOCHS':
            value = int(round(value * scale))
        elif key == 'STEPSIZE':
            value = scaled_steps(value, scale, final['MAX_EPOCH'])
        preset[key] = value
    return apply_overrides(values, preset, source='config.STRONG'), set(preset)


def scaled_steps(steps: Any, scale: float, max_epoch: int) -> Any:
    """A multi_step schedule's epochs times `scale` (rounded, each at least 1, distinct, below
    `max_epoch` where they can be); one number for single_step."""
    if isinstance(steps, int):
        return max(1, int(round(steps * scale)))
    scaled = sorted({max(1, int(round(step * scale))) for step in steps})
    return [step for step in scaled if step < max_epoch] or scaled[:1]


def parse_value(text: str, path: bool = False) -> Any:
    """A Python literal if VALUE is one, else the text itself (so names need no quotes).
    For a path setting, only a quoted string is read as a literal: `2024` stays a folder name."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return text if path and not isinstance(value, str) else value


def _absolute_datasets(key: str, value: Any) -> Any:
    """SOURCES/TARGETS (`key`) with own-data paths made absolute (names and other types
    unchanged). UserError for a dataset given twice (the same folder however written: a
    trailing '/', a link, '..'), which Torchreid would train on or test twice."""
    if isinstance(value, str):
        return absolute(value, key)
    if not isinstance(value, list):
        return value
    seen = {}
    for given in value:
        place = _dataset_place(given, key)
        if place in seen:
            raise UserError(
                f'{key}: {seen[place]!r} and {given!r} are the same dataset given twice, so '
                + ('every image would be trained on twice, under two labels' if key == 'SOURCES'
                   else 'it would be tested twice, in two reports')
                + f'. Give each dataset once in {key} (config.py or --{key}=...).')
        seen[place] = given
    return [absolute(v, key) for v in value]


def _dataset_place(value, key: str) -> Any:
    """What a SOURCES/TARGETS value points at: a Torchreid name itself; own data, its folder
    or file (device and inode where it exists, else its absolute path)."""
    if not is_own_data(value):
        return value
    path = absolute(value, key)
    try:
        found = os.stat(path)
    except OSError:
        return path
    return found.st_dev, found.st_ino


class Forms(NamedTuple):
    """The types a setting of several types accepts, and how its forms read in a message."""
    types: tuple[type, ...]
    text: str


# Settings whose value may take several types (any other must have its default's type); what
# each form means is checked where the setting is used (reidkit.data.checks).
SEVERAL_TYPES = {
    'MATCH_THRESHOLD': Forms((str, float), "'auto' (the checkpoint's calibration), 'off' or a "
                                           "distance (a number >= 0)"),
    'STEPSIZE': Forms((int, list), 'an epoch count (single_step) or a list of epochs '
                                   '(multi_step), e.g. 20 or [40, 70]'),
    'LAST_STRIDE': Forms((str, int), "'auto' (the model's own) or 1"),
}


def _typed(key: str, value: Any, default: Any, source: str) -> Any:
    """`value` converted to the default's type (or, for a key of SEVERAL_TYPES, to one of its
    types), or a UserError saying what was expected."""
    if key in SEVERAL_TYPES:
        return _one_of(key, value, SEVERAL_TYPES[key], source)
    expected = type(default)
    if key in DATASET_LISTS and isinstance(value, (list, tuple)) and value and \
            all(isinstance(name, str) for name in value):
        return _absolute_datasets(key, list(value))     # several datasets: Torchreid takes a list
    if key in DATASET_LISTS and isinstance(value, str):
        return _absolute_datasets(key, value)
    if expected is float and type(value) is int:
        return float(value)
    if expected is list and isinstance(value, tuple):
        return list(value)
    if expected is list and isinstance(value, str):
        return [value]          # --TRANSFORMS=random_flip means one transform
    if type(value) is expected:
        return value
    article = 'an' if expected.__name__[0] in 'aeiou' else 'a'
    raise UserError(
        f'{source}: {key} must be {article} {expected.__name__} like its default {default!r}, '
        f'but got {value!r} ({type(value).__name__}). Write it as a Python literal, '
        f'e.g. --{key}={default!r}.'
    )


def _one_of(key: str, value: Any, forms: Forms, source: str) -> Any:
    """`value` if its type is one of `forms.types` (an int where a float is allowed becomes
    one; a bool is no number), else a UserError listing the forms."""
    if float in forms.types and type(value) is int:
        return float(value)
    if list in forms.types and isinstance(value, tuple):
        return list(value)
    if type(value) in forms.types:
        return value
    raise UserError(f'{source}: {key} must be {forms.text}, but got {value!r} '
                    f'({type(value).__name__}). Fix it in config.py or with --{key}=...')


def apply_overrides(defaults: Mapping[str, Any], overrides: Mapping[str, Any],
                    source: str = 'command line') -> dict[str, Any]:
    """`defaults` updated with `overrides`; unknown keys and wrong types raise UserError."""
    values = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            near = difflib.get_close_matches(key.upper(), list(defaults), n=3, cutoff=0.5)
            hint = f' Did you mean {" or ".join(near)}?' if near else ''
            raise UserError(
                f'{source}: unknown setting {key!r}.{hint} Every setting is a constant in '
                f'config.py; `python main.py --help` lists them all.'
            )
        values[key] = _typed(key, value, defaults[key], source)
    return values


def parse_override_args(args: Iterable[str]) -> dict[str, Any]:
    """`['--LR=0.001', '--PRETRAINED=False']` -> `{'LR': 0.001, 'PRETRAINED': False}`."""
    overrides = {}
    for arg in args:
        body = arg[2:] if arg.startswith('--') else arg
        key, sep, text = body.partition('=')
        if not sep or not key:
            raise UserError(
                f'command line: {arg!r} is not an override. Write --KEY=VALUE, '
                f'e.g. --MAX_EPOCH=10 (no spaces around "=").'
            )
        # --SOURCES=./2024 stays text; a list, even of paths, is read as a list
        own_path = key in DATASET_LISTS and is_own_data(text) and not text.lstrip().startswith('[')
        overrides[key] = parse_value(text, path=key in PATH_SETTINGS or own_path)
    return overrides


def command_line_flag(key: str, value: Any) -> str:
    """`--KEY=VALUE` as typed in a shell, so that pasted it gives `value` back
    (parse_override_args): a text that reads as itself is bare (--MODEL_NAME=resnet50), any
    other value a literal; a flag holding quotes or spaces goes in double quotes
    ("--TRANSFORMS=['random_flip']"), or single ones where a double would be expanded."""
    bare = isinstance(value, str) and parse_override_args([f'--{key}={value}'])[key] == value
    flag = f'--{key}={value if bare else repr(value)}'
    if shlex.quote(flag) == flag or any(char in flag for char in '"$`\\!'):
        return shlex.quote(flag)
    return f'"{flag}"'


# What test, visrank and search take from a checkpoint unless given on the command line:
# the model it holds, the input size its features were learnt at, and its datasets.
EVALUATION_SETTINGS = ('MODEL_NAME', 'LOSS', 'HEIGHT', 'WIDTH', 'SOURCES', 'TARGETS',
                       'TEST_SHARE', 'SPLIT_SEED',     # own data: test on the run's split
                       'NECK', 'LAST_STRIDE', 'DIST_METRIC')
# Run settings an evaluation may change from the command line, said in a note when it does.
EVALUATION_CHOICES = ('DIST_METRIC',)


def _same(key: str, value: Any, recorded: Any) -> bool:
    """Whether two values of a setting mean the same ('market1501' and ['market1501'] do)."""
    if key in DATASET_LISTS:
        return dataset_list(value) == dataset_list(recorded)
    return value == recorded


def settings_to_resume(current: Settings, stored: Mapping[str, Any],
                       source: str) -> tuple[Settings, list[str]]:
    """The settings a resumed run continues with, and notes for its log: run, schedule and
    RESUMED_LOCAL_SETTINGS come from the checkpoint's `stored` settings unless given on the
    command line. A flag that changes a run setting is a UserError (`source` names the
    checkpoint); one that changes another setting applies and is noted."""
    stored = with_tutorial_values(stored, RUN_SETTINGS)
    changed = [key for key in RUN_SETTINGS if key in stored and key in current.given
               and not _same(key, current[key], stored[key])]
    if changed:
        raise UserError(
            f'{source} was trained with ' + ', '.join(f'{key}={stored[key]!r}' for key in changed)
            + ', but the command line gives ' + ', '.join(f'--{key}={current[key]!r}'
                                                           for key in changed)
            + '. Settings that define a run (model, loss, input size, transforms, optimiser, '
            'learning rate and schedule, batch size, seed, datasets) cannot change when '
            'resuming: drop those flags to continue the run as it was, or start a new run '
            'without --RESUME.'
        )
    s, notes = _from_checkpoint(current, stored,
                                RUN_SETTINGS + SCHEDULE_SETTINGS + RESUMED_LOCAL_SETTINGS, source)
    return s, ['the run\'s settings come from the checkpoint; only command-line flags change '
               'its schedule or how it runs here (edits to config.py are not read for them)',
               *notes]


def settings_to_evaluate(current: Settings, stored: Mapping[str, Any],
                         source: str) -> tuple[Settings, list[str]]:
    """The settings test, visrank, search and export use a checkpoint with, and notes for the
    log: EVALUATION_SETTINGS (its model, input size and data) come from the checkpoint's
    `stored` settings unless given on the command line."""
    return _from_checkpoint(current, stored, EVALUATION_SETTINGS, source)


def with_tutorial_values(stored: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """A checkpoint's recorded settings, with BEFORE_RECORDED's value for each of `keys` it
    lacks: what a run recorded before those settings existed trained with (the tutorial's
    values, never config.py's current ones)."""
    return {**{key: value for key, value in BEFORE_RECORDED.items() if key in keys}, **stored}


def _from_checkpoint(current: Settings, stored: Mapping[str, Any], taken: tuple[str, ...],
                     source: str) -> tuple[Settings, list[str]]:
    """`current` with the `taken` settings the checkpoint holds, but those given on the command
    line (a change of one that is not a run setting, or is in EVALUATION_CHOICES, is noted),
    and with the recorded DATA_ROOT
    unless given (or missing here). Keys the checkpoint does not hold keep their value."""
    stored = {key: value for key, value in with_tutorial_values(stored, taken).items()
              if key in current}
    values, notes = dict(current), []
    for key in taken:
        if key not in stored:
            continue
        if key in current.given:
            noted = key not in RUN_SETTINGS or key in EVALUATION_CHOICES
            if noted and current[key] != stored[key]:
                notes.append(f'{key}={current[key]!r} from the command line (the run had '
                             f'{stored[key]!r})')
            continue
        values[key] = stored[key]
    recorded_data = stored.get('DATA_ROOT')
    if recorded_data and 'DATA_ROOT' not in current.given:
        if Path(recorded_data).is_dir():
            values['DATA_ROOT'] = recorded_data
        elif Path(recorded_data) != Path(current.DATA_ROOT).resolve():
            notes.append(f'the data recorded with the checkpoint, "{recorded_data}", is not '
                         f'here; using DATA_ROOT={current.DATA_ROOT!r}')
    typed = apply_overrides(current, {k: v for k, v in values.items() if v != current[k]},
                            source=source)
    return Settings(typed, current.given, current.preset - set(taken)), notes
