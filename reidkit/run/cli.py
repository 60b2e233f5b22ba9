"""The command line: modes, --demo, --KEY=VALUE overrides and --help, read without torch.

main.py calls `answer_early` before it imports torch (seconds, minutes on a busy machine), so
`--help` and a mistyped mode or setting are answered at once.
"""
from __future__ import annotations

import io
import os
import shlex
import sys
import tokenize
from pathlib import Path
from types import ModuleType

from reidkit.run.errors import UserError
from reidkit.run.settings import command_line_flag, defaults_from, parse_override_args, \
    resolve

MODES = ('train', 'test', 'visrank')       # run in this order when none is named
EXTRA_MODES = ('search', 'export')


def parse_command_line(argv: list[str]) -> tuple[list[str], bool, dict]:
    """(modes, demo, overrides) from the command line; UserError on an unknown mode or a
    flag that is not --KEY=VALUE (setting names are checked by apply_overrides)."""
    for flag, after in zip(argv, argv[1:]):
        if flag.startswith('--') and '=' not in flag and flag != '--demo' \
                and not after.startswith('-') and after not in MODES + EXTRA_MODES:
            raise UserError(f'command line: "{flag} {after}" gives a setting its value after '
                            f'a space; write {shlex.quote(f"{flag}={after}")} (no spaces around '
                            f'"=").')
    modes = [arg for arg in argv if not arg.startswith('-')]
    unknown = [mode for mode in modes if mode not in MODES + EXTRA_MODES]
    if unknown:
        raise UserError(f'command line: unknown mode {unknown[0]!r}. Modes are '
                        f'{", ".join(MODES + EXTRA_MODES)} (train, test and visrank, in order, '
                        f'when none is given).')
    flags = [arg for arg in argv if arg.startswith('-')]
    demo = '--demo' in flags
    overrides = parse_override_args(flag for flag in flags if flag != '--demo')
    return modes or list(MODES), demo, overrides


def setting_comments(config: ModuleType) -> list[tuple[str, list[tuple[str, str]]]]:
    """config.py's settings as [(group, [(name, comment), ...]), ...], in file order: the
    groups are its `# --- name ---` lines, each comment the one at the end of the setting's
    line. Read with `tokenize`, so a '#' inside a value is not taken for a comment."""
    source = Path(config.__file__).read_text(encoding='utf-8')
    settings = set(defaults_from(config))
    groups: list[tuple[str, list[tuple[str, str]]]] = [('', [])]
    assigned = None         # the setting assigned on the current line, until its comment
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[1] == 0:
            assigned = token.string if token.string in settings else None
        elif token.type == tokenize.COMMENT:
            text = token.string.lstrip('#').strip()
            if token.start[1] == 0 and text.startswith('---'):
                groups.append((text.strip('- '), []))
            elif assigned:
                groups[-1][1].append((assigned, text))
                assigned = None
        elif token.type == tokenize.NEWLINE and assigned:
            groups[-1][1].append((assigned, ''))        # a setting without a comment
            assigned = None
    return [(name, rows) for name, rows in groups if rows]


def usage(doc: str, config: ModuleType) -> str:
    """`python main.py --help`: main.py's docstring, the modes, then every setting with its
    config.py value and comment, by group."""
    values = defaults_from(config)
    lines = [doc.rstrip(), '', f'Modes: {", ".join(MODES + EXTRA_MODES)}', '',
             'Settings (the values in config.py; --KEY=VALUE changes one for a command;',
             'docs/settings.md says for each its type, class and presets):']
    for group, rows in setting_comments(config):
        lines.append(f'\n  {group}')
        flags = {name: command_line_flag(name, values[name]) for name, _ in rows}
        width = min(max(len(flag) for flag in flags.values()), 44)
        for name, comment in rows:
            flag = flags[name]
            gap = '\n' + ' ' * (width + 6) if len(flag) > width else ' ' * (width - len(flag) + 2)
            lines.append(f'    {flag}{gap}{comment}'.rstrip())
    return '\n'.join(lines) + '\n'


def answer_early(argv: list[str], doc: str, config: ModuleType) -> None:
    """Answers --help (exit 0) and a command line that cannot be right (exit 2: unknown mode,
    malformed flag, unknown setting or wrong type) before anything heavy is imported; returns
    for everything else. Value checks that need the data or torch come later, in main()."""
    if '-h' in argv or '--help' in argv:
        try:
            print(usage(doc, config))
        except BrokenPipeError:         # `python main.py --help | head`: the reader had enough
            sys.stdout = open(os.devnull, 'w')
        sys.exit(0)
    try:
        _, demo, overrides = parse_command_line(argv)
        resolve(config, overrides, demo=demo)
    except UserError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
