"""Own datasets (reidkit.data.own_data) registered with Torchreid, so that its ImageDataManager,
samplers and transforms, and our data path, read them unchanged.

Each own-data value of SOURCES/TARGETS is registered under its absolute path, once per
process (Torchreid refuses a name twice; a later registration in the same process, e.g. test
after train, replaces our own entry so that its TEST_SHARE/SPLIT_SEED apply). The folder is
listed once per registration: Torchreid builds each dataset several times per ImageDataManager
from the registered factory, which holds the parsed split (a functools.partial, picklable
for spawned loader workers).
"""
from __future__ import annotations

import functools
from pathlib import Path

from torchreid.reid.data import register_image_dataset
from torchreid.reid.data.datasets.dataset import ImageDataset

from reidkit.data.own_data import OwnData, missing_split, own_split, printable, write_split
from reidkit.run.errors import UserError
from reidkit.run.settings import dataset_list, display_name, is_own_data

_noted_unknown_cameras: set[str] = set()


class OwnImageDataset(ImageDataset):
    """A Torchreid ImageDataset over an `OwnData` split; `mode` picks train, query or gallery.

    Raises UserError when the training split is asked for and the data has none (a folder
    with only query/ and gallery/ is a target, not a source), unless `evaluating`: test and
    visrank build their datamanager from TARGETS alone, and Torchreid's ImageDataManager
    always builds a training loader (never read then), so it gets one stand-in image."""

    def __init__(self, data: OwnData, mode: str = 'train', verbose: bool = True,
                 evaluating: bool = False, **kwargs):
        lists = {split: list(getattr(data, split)) for split in ('train', 'query', 'gallery')}
        if mode in lists and not lists[mode] and not (evaluating and mode == 'train'):
            raise missing_split(data, mode)
        kwargs.pop('root', None)
        self.own = data
        # Torchreid's Dataset reads the first item of each list: an empty list (no training
        # split) gets a stand-in, emptied again below.
        stand_in = next(items[0] for items in lists.values() if items)
        super().__init__(*(items or [stand_in] for items in lists.values()), mode=mode,
                         verbose=False, **{k: v for k, v in kwargs.items()
                                           if k in ('transform', 'k_tfm', 'combineall')})
        for split, items in lists.items():
            if not items and split != mode:
                setattr(self, split, [])
        self.num_train_pids = self.get_num_pids(self.train)
        self.num_train_cams = self.get_num_cams(self.train)
        self.data = getattr(self, mode)
        if verbose:
            self.show_summary()


def registry() -> dict:
    import torchreid.reid.data.datasets as datasets
    return vars(datasets)['__image_datasets']


def register(data: OwnData, evaluating: bool = False) -> OwnData:
    """Registers the split of an own dataset with Torchreid under its absolute path (its
    `path`); returns it. `evaluating`: a missing training split is no error (see
    OwnImageDataset)."""
    factory = functools.partial(OwnImageDataset, data, evaluating=evaluating)
    names = registry()
    if data.path not in names:
        register_image_dataset(data.path, factory)
    elif isinstance(names[data.path], functools.partial) and \
            names[data.path].func is OwnImageDataset:
        names[data.path] = factory          # ours, from an earlier get_items in this process
    if not data.cameras_known and data.path not in _noted_unknown_cameras:
        _noted_unknown_cameras.add(data.path)
        print(f'Note: "{printable(data.path)}" has no camera information: each query\'s other images '
              f'are its matches (nothing is discarded by the same-camera rule), so same-camera '
              f'matches count in its CMC and mAP.')
    return data


def own_data_values(s) -> list[str]:
    """The own-data values of s.SOURCES and s.TARGETS, each once, in order."""
    return list(dict.fromkeys(v for key in ('SOURCES', 'TARGETS') for v in dataset_list(s[key])
                              if is_own_data(v)))


def register_all(s, evaluating: bool = False, recorded: dict[str, OwnData] | None = None
                 ) -> list[OwnData]:
    """Registers every own-data value of s.SOURCES and s.TARGETS, parsed and split now (see
    own_data.load: UserError for bad data) or as `recorded` (own_data.own_split); their
    splits, in order. `evaluating`: see register."""
    return [register(own_split(v, s, recorded), evaluating) for v in own_data_values(s)]


def registered(value: str) -> OwnData | None:
    """The split registered for an own-data value in this process, or None."""
    factory = registry().get(value)
    return factory.args[0] if isinstance(factory, functools.partial) and \
        factory.func is OwnImageDataset else None


def display_labels(value: str):
    """The labeller of rank strips and pages (`OwnData.label`: (pid, camid) -> (identity,
    camera) texts) for a registered own dataset; None for Torchreid's datasets."""
    data = registered(value)
    return None if data is None else data.label


def write_run_split(run_dir: Path, s) -> Path | None:
    """split.json in the run folder for the own datasets of s (registered ones), or None."""
    datasets = [registered(v) for v in own_data_values(s)]
    datasets = [d for d in datasets if d is not None]
    return write_split(run_dir, datasets) if datasets else None


def unknown_camera_targets(s) -> list[str]:
    """Display names of the registered own targets without camera information."""
    return [display_name(t) for t in dataset_list(s.TARGETS)
            if (data := registered(t)) is not None and not data.cameras_known]


def target_summaries(targets) -> list[dict]:
    """metrics.json's block per own-data target registered in this process: path, layout,
    split share/seed/digest, ids and images per split, cameras known or not."""
    return [data.summary() for data in map(registered, dataset_list(targets))
            if data is not None]
