"""Settings: config.py's constants, then checked command-line overrides, then frozen.

Overrides are `--KEY=VALUE`; VALUE is read as a Python literal (so --LR=1e-3, --PRETRAINED=False,
--TRANSFORMS="['random_flip']") and falls back to a plain string (--MODEL_NAME=osnet_x1_0).
Its type must match the default's; an unknown key is an error that suggests near matches.
"""
from __future__ import annotations

import ast
import difflib
from types import ModuleType
from typing import Any, Iterable, Mapping

from reidkit.errors import UserError

# config.py constants that are not settings themselves.
NOT_SETTINGS = {'DEMO'}


class Settings(Mapping):
    """A read-only set of named settings: `s.LR` or `s['LR']`; resolved once, never mutated."""

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, '_values', dict(values))

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
        return Settings(apply_overrides(self._values, changes, source='replace()'))


def defaults_from(config: ModuleType) -> dict[str, Any]:
    """The settings a config module defines: its upper-case constants, in file order."""
    return {name: value for name, value in vars(config).items()
            if name.isupper() and not name.startswith('_') and name not in NOT_SETTINGS}


def parse_value(text: str) -> Any:
    """A Python literal if VALUE is one, else the text itself (so names need no quotes)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _typed(key: str, value: Any, default: Any, source: str) -> Any:
    """`value` converted to the default's type, or a UserError saying what was expected."""
    expected = type(default)
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
        overrides[key] = parse_value(text)
    return overrides
