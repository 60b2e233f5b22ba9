"""The data a command uses, said once, in our words.

Torchreid's `ImageDataManager` prints its transforms, a table per dataset it loads and a
summary block: a training run printed the same Market-1501 table twice (as source, then as
target) and test and visrank a third time, under "Loading train (source) dataset" (Torchreid
always builds a training set; an evaluation makes it of TARGETS). `quiet_data_manager` builds
it without that and `data_lines` says what was loaded: the training set (where training: its
image size and transforms, which Torchreid listed too), and each target's query and gallery.
"""
from __future__ import annotations

import contextlib
import io
import sys
from typing import Callable, TypeVar

from reidkit.run.settings import display_name
from reidkit.run.words import counted

Built = TypeVar('Built')


def quiet_data_manager(build: Callable[[], Built]) -> Built:
    """`build()` (Torchreid's ImageDataManager(...)) with its printing held back; printed to
    stderr after all if building fails, so nothing that explains the failure is lost."""
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            return build()
    except BaseException:
        sys.stderr.write(chatter.getvalue())
        raise


def _people(rows) -> int:
    return len({row[1] for row in rows})


def _cameras(*row_lists) -> int:
    return len({row[2] for rows in row_lists for row in rows})


def data_lines(datamanager, transforms: list[str] | None = None) -> list[str]:
    """What a Torchreid ImageDataManager loaded, one line per set: with `transforms` (a
    training command: its TRANSFORMS), 'Training data: market1501: 100 identities, 921
    images, 6 cameras, at 64x32 with random_flip'; then per target 'Test data: market1501:
    181 queries of 60 identities, 396 gallery images of 61 identities, 6 cameras'."""
    lines = []
    if transforms is not None:
        train = datamanager.train_loader.dataset.train
        sources = ' + '.join(map(display_name, datamanager.sources))
        lines.append(f'Training data: {sources}: '
                     f'{counted(datamanager.num_train_pids, "identity", "identities")}, '
                     f'{counted(len(train), "image")}, '
                     f'{counted(datamanager.num_train_cams, "camera")}, at '
                     f'{datamanager.height}x{datamanager.width}'
                     + (f' with {", ".join(transforms)}' if transforms else ''))
    for name, sets in datamanager.test_dataset.items():
        query, gallery = sets['query'], sets['gallery']
        lines.append(f'Test data: {display_name(name)}: {counted(len(query), "query", "queries")} '
                     f'of {counted(_people(query), "identity", "identities")}, '
                     f'{counted(len(gallery), "gallery image")} of '
                     f'{counted(_people(gallery), "identity", "identities")}, '
                     f'{counted(_cameras(query, gallery), "camera")}')
    return lines
