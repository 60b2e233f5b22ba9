"""Market-1501's folder layout and file names, as Torchreid's Market1501 loader reads them: the
one definition the demo writes, the checks read and own data recognises (no torch).

    DATA_ROOT/market1501/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}/
        <pid>_c<camera>s<sequence>_<frame>_<detection>.jpg     (pid -1: junk, 0: distractor)
"""
from __future__ import annotations

import re
from pathlib import Path

# Torchreid's dataset_dir for market1501, and the folder the dataset's zip unpacks to.
DATASET_DIR = 'market1501'
UNZIPPED_DIR = 'Market-1501-v15.09.15'
# The split folders, by split (train, query, gallery).
SPLIT_FOLDERS = {'train': 'bounding_box_train', 'query': 'query', 'gallery': 'bounding_box_test'}
# Torchreid's pattern for Market-1501 style names, searched in the whole path as its loaders
# (Market-1501, DukeMTMC-reID) do: <pid>_c<one camera digit>.
LOADER_NAME = re.compile(r'([-\d]+)_c(\d)')
JUNK_PID = -1


def market_data_dir(root: Path) -> Path:
    """Where Torchreid's Market1501 loader looks for the split folders under DATA_ROOT (when
    the unzipped folder is there; see `splits_dir`)."""
    return Path(root) / DATASET_DIR / UNZIPPED_DIR


def splits_dir(dataset_dir: Path) -> Path:
    """The folder holding the split folders: `dataset_dir`/Market-1501-v15.09.15 when that
    exists, else `dataset_dir` itself (Torchreid's loader accepts both)."""
    unzipped = Path(dataset_dir) / UNZIPPED_DIR
    return unzipped if unzipped.is_dir() else Path(dataset_dir)


def name_labels(names) -> list[tuple[int, int]]:
    """(person id, camera) of each Market-1501 file name as Torchreid's loader reads it: names
    that do not parse and junk (pid -1) left out, distractors (pid 0) kept."""
    found = (LOADER_NAME.search(name) for name in names)
    pairs = [(int(m.group(1)), int(m.group(2))) for m in found if m]
    return [(pid, camera) for pid, camera in pairs if pid != JUNK_PID]
