"""README.md and docs/ stay true: links resolve, every page is linked, CI runs the README's
commands, every `python main.py` line passes the early command-line check, and the blocks
marked runnable run."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import config
from reidkit.run.cli import parse_command_line
from reidkit.run.settings import resolve

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
PAGES = sorted((ROOT / 'docs').glob('*.md'))
DOCUMENTS = [README, ROOT / 'CHANGELOG.md', *PAGES]
RUNNABLE = '<!-- runnable -->'      # put on the line before a ```bash block to have it run


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r'[`*_]', lambda m: '_' if m.group(0) == '_' else '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip('#')) for line in path.read_text(encoding='utf-8').splitlines()
            if line.startswith('#') and not line.startswith('#!')}


def links(path: Path) -> list[str]:
    """The targets of Markdown links and images in `path`, outside code blocks."""
    text = re.sub(r'```.*?```', '', path.read_text(encoding='utf-8'), flags=re.S)
    return re.findall(r'\]\(([^)\s]+)\)', text)


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for document in DOCUMENTS:
        for target in links(document):
            if re.match(r'[a-z]+:', target):
                continue                                 # https://...: not checked offline
            file, _, anchor = target.partition('#')
            place = (document.parent / file).resolve() if file else document
            if not place.exists():
                broken.append(f'{document.name}: {target} (no such file)')
            elif anchor and place.suffix == '.md' and anchor not in anchors(place):
                broken.append(f'{document.name}: {target} (no such heading)')
    assert not broken, '\n'.join(broken)


def test_the_readme_links_every_docs_page_and_stays_short():
    linked = {(README.parent / target.partition('#')[0]).resolve() for target in links(README)}
    assert not [page.name for page in PAGES if page.resolve() not in linked]
    assert len(README.read_text(encoding='utf-8').splitlines()) <= 220


def test_ci_runs_the_readme_s_install_and_test_commands():
    """.ci/run's pip and pytest lines are the README's (pip's --quiet aside: CI's log only)."""
    readme = README.read_text(encoding='utf-8')
    commands = [line.strip() for line in (ROOT / '.ci' / 'run').read_text().splitlines()
                if line.strip().startswith(('pip install -r', 'pip install --quiet -r',
                                            'python -m pytest'))]
    assert len(commands) == 2, commands
    for command in commands:
        assert command.replace(' --quiet', '') in readme, command


def main_py_lines(path: Path) -> list[str]:
    """Every `python main.py ...` command in `path`: the lines of its code blocks (continued
    lines joined) and its inline code spans; also `torchrun ... main.py ...`."""
    text = path.read_text(encoding='utf-8')
    found = []
    for block in re.findall(r'```(?:bash)?\n(.*?)```', text, flags=re.S):
        found += [line for line in block.replace('\\\n', ' ').splitlines()
                  if re.search(r'(^|\s)(python|torchrun)\b.*\smain\.py\b', line)
                  and not line.lstrip().startswith('#')]
    outside = re.sub(r'```.*?```', '', text, flags=re.S)
    spans = (' '.join(span.split()) for span in re.findall(r'`([^`]+)`', outside))
    found += [span for span in spans if span.startswith('python main.py')]
    return found


def arguments(line: str) -> list[str]:
    """The arguments main.py gets from a documented command line: what follows `main.py`,
    with comments, optional `[--KEY=...]` parts and a bare `...` left out."""
    words = shlex.split(line, comments=True)
    words = words[words.index('main.py') + 1:]
    return [word for word in words if word != '...' and not
            (word.startswith('[') and word.endswith(']'))]


def test_every_documented_command_line_passes_the_early_check():
    """A line written `python main.py ... || ...` shows a mistake: it must be refused."""
    checked, wrong = 0, []
    for document in DOCUMENTS:
        for line in main_py_lines(document):
            command, mistake, _ = line.partition('||')
            if {'-h', '--help'} & set(arguments(command)):
                continue                        # answered before any check (cli.answer_early)
            try:
                _, demo, overrides = parse_command_line(arguments(command))
                resolve(config, overrides, demo=demo)
                refused = None
            except Exception as error:          # a UserError, or a line shlex cannot read
                refused = error
            if bool(refused) != bool(mistake):
                wrong.append(f'{document.name}: {line}\n    {refused or "not refused"}')
            checked += 1
    assert not wrong, '\n'.join(wrong)
    assert checked > 40          # the pages hold many; a broken extraction would find none


def test_a_renamed_setting_in_a_documented_line_would_be_caught():
    _, demo, overrides = parse_command_line(arguments('python main.py --MAX_EPOCHS=3  # typo'))
    try:
        resolve(config, overrides, demo=demo)
    except Exception as error:
        assert 'MAX_EPOCH' in str(error)
    else:
        raise AssertionError('an unknown setting passed the early check')


def runnable_blocks() -> list[tuple[str, str]]:
    """(page, block) for every ```bash block marked RUNNABLE in README.md and docs/."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding='utf-8')
        found += [(document.name, block) for block in
                  re.findall(re.escape(RUNNABLE) + r'\n```bash\n(.*?)```', text, flags=re.S)]
    return found


def test_blocks_marked_runnable_run_in_a_fresh_copy(tmp_path):
    blocks = runnable_blocks()
    assert blocks, f'no block is marked {RUNNABLE}'
    tracked = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    copy = tmp_path / 'clone'
    for name in tracked:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    path = f'{Path(sys.executable).parent}{os.pathsep}{os.environ.get("PATH", "")}'
    for page, block in blocks:
        done = subprocess.run(['bash', '-euo', 'pipefail', '-c', block], cwd=copy,
                              capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, PATH=path, OMP_NUM_THREADS='1'))
        assert done.returncode == 0, f'{page}:\n{block}\n{done.stdout[-2000:]}{done.stderr[-2000:]}'
