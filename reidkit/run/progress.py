"""Progress bars that stay readable where the output goes.

On a terminal: tqdm's bar, redrawn in place. Where stderr is a file or a pipe
(`python main.py ... > out.txt 2>&1`, a CI log) a redrawn bar would write carriage returns that
run into the lines printed around it; there a bar says nothing for its first
`PIPED_EVERY_S` seconds (a short step leaves no trace) and then one plain line at most every
`PIPED_EVERY_S` seconds, each on its own line.
"""
from __future__ import annotations

import io
import sys
from typing import Iterable

from tqdm import tqdm

PIPED_EVERY_S = 30.0       # seconds between the lines of a bar whose stderr is not a terminal


class _OneLinePerUpdate(io.TextIOBase):
    """What tqdm writes, as whole lines: the carriage returns of a redraw dropped, and the
    blank redraw that clears a bar (leave=False) not written at all."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace('\r', '').strip()
        if line:
            self.stream.write(line + '\n')
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):        # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, **options) -> tqdm:
    """tqdm(iterable, **options) writing to stderr: the bar itself on a terminal; elsewhere
    silent for PIPED_EVERY_S seconds, then a line at most every PIPED_EVERY_S seconds."""
    stream = options.pop('file', None) or sys.stderr
    if _is_terminal(stream):
        return tqdm(iterable, file=stream, **options)
    return tqdm(iterable, file=_OneLinePerUpdate(stream), **dict(
        options, delay=PIPED_EVERY_S, mininterval=PIPED_EVERY_S, ascii=True))
