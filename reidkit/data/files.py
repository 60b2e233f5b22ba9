"""When two paths are one image file: a query is never matched with its own file (evaluation,
the checks before a run, search), wherever the file is listed twice or linked."""
from __future__ import annotations

import os

import numpy as np


def file_key(path) -> tuple[int, int] | str:
    """What makes two paths one file: (device, inode), which links and symlinks share; the
    resolved path where the file cannot be read (or the file system gives no inode)."""
    try:
        found = os.stat(path)
    except OSError:
        found = None
    if found is None or found.st_ino == 0:
        return os.path.realpath(path)
    return found.st_dev, found.st_ino


def file_ids(query_paths, gallery_paths) -> tuple[np.ndarray, np.ndarray] | None:
    """(query ids, gallery ids), int64, one per path, equal where two paths are one file
    (same resolved path, or same (st_dev, st_ino): a link or a duplicate listing); None when
    no query's file is also in the gallery (nothing to leave out)."""
    ids: dict = {}
    q_ids = np.array([ids.setdefault(file_key(p), len(ids)) for p in query_paths], np.int64)
    num_query_files = len(ids)
    g_ids = np.array([ids.setdefault(file_key(p), len(ids)) for p in gallery_paths], np.int64)
    if not (g_ids < num_query_files).any():
        return None
    return q_ids, g_ids
