"""docs/settings.md is generated from config.py and the settings code, and says what --help says."""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest

import config
from reidkit.run.cli import setting_comments, usage
from reidkit.run.settings import defaults_from, parse_override_args
from reidkit.run.settings_page import COMMAND, PAGE, page, setting_class

ROOT = Path(__file__).resolve().parents[1]


def rows_of(text: str) -> dict[str, list[str]]:
    """The page's table rows by setting name: their cells, unescaped."""
    rows = {}
    for line in text.splitlines():
        if line.startswith('| `'):
            cells = [cell.strip().replace('\\|', '|')
                     for cell in line.strip('|').replace('\\|', '\0').split('|')]
            cells = [cell.replace('\0', '|') for cell in cells]
            rows[cells[0].strip('`')] = cells
    return rows


def test_the_page_is_the_one_the_code_generates():
    assert PAGE == ROOT / 'docs' / 'settings.md'
    assert PAGE.read_text(encoding='utf-8') == page(config), (
        f'docs/settings.md no longer matches config.py and reidkit/run/settings.py: '
        f'regenerate it with `{COMMAND}` and commit the page')


def test_the_page_and_help_show_the_same_default_and_comment_for_every_setting():
    rows = rows_of(PAGE.read_text(encoding='utf-8'))
    assert set(rows) == set(defaults_from(config))
    help_text = usage('doc', config)
    help_lines = [line.strip() for line in help_text.splitlines()]
    for group, settings in setting_comments(config):
        for name, comment in settings:
            flag = rows[name][1].strip('`')
            # the default on the page pastes back to config.py's value, as help's does
            pasted = shlex.split(flag)
            assert parse_override_args(pasted) == {name: defaults_from(config)[name]}, name
            assert any(line.startswith(flag) for line in help_lines), (name, flag)
            assert rows[name][3] == comment and comment in help_text, name
    assert 'docs/settings.md' in help_text
    groups = [line[3:] for line in PAGE.read_text(encoding='utf-8').splitlines()
              if line.startswith('## ')]
    assert groups == [group for group, _ in setting_comments(config)]


def test_classes_and_presets_are_the_code_s():
    rows = rows_of(PAGE.read_text(encoding='utf-8'))
    assert rows['LR'][4] == 'run' and rows['MAX_EPOCH'][4] == 'schedule'
    assert rows['WORKERS'][4] == 'local' and rows['WORKERS'][6] == 'yes, unless given'
    assert rows['WEIGHTS'][5] == 'empty' and rows['MODEL_NAME'][7].startswith('yes')
    for preset, values in (('DEMO', config.DEMO), ('STRONG', config.STRONG)):
        for name, value in values.items():
            assert f'{preset}: `{value!r}`' in rows[name][8], (preset, name)


def fake_config(tmp_path: Path, extra: str):
    """config.py with `extra` appended to its text, as a module."""
    source = (ROOT / 'config.py').read_text(encoding='utf-8') + extra
    path = tmp_path / 'fake_config.py'
    path.write_text(source, encoding='utf-8')
    spec = importlib.util.spec_from_file_location('fake_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_changed_default_or_comment_makes_the_page_stale(tmp_path):
    changed = fake_config(tmp_path, "LR = 0.01                                    # changed\n")
    assert page(changed) != page(config)
    assert '`--LR=0.01`' in page(changed) and '| changed |' in page(changed)


def test_a_setting_in_no_class_is_named_with_the_fix(tmp_path):
    added = fake_config(tmp_path, "# --- new ---\nNEW_KNOB = 3                  # a knob\n")
    with pytest.raises(ValueError) as error:
        page(added)
    assert 'NEW_KNOB' in str(error.value) and 'RUN_SETTINGS' in str(error.value)
    assert COMMAND in str(error.value)
    assert setting_class('LR') == 'run'
