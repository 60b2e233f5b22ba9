"""Checks that run before any heavy work, each failing with one paragraph that says what to do."""
from __future__ import annotations

import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from reidkit.data import market
from reidkit.data.files import file_ids
from reidkit.data.images import MAX_STRIP_MATCHES, image_problem
from reidkit.data.own_data import SPLITS as OWN_SPLITS, OwnData, check_own_data, missing_split
from reidkit.run.errors import UserError
from reidkit.run.model import fit_to_model
from reidkit.run.settings import SEVERAL_TYPES, SWITCH_CHOICES, Settings, dataset_list, \
    is_own_data
from reidkit.run.words import counted

LOSSES = ('softmax', 'triplet')
TRANSFORMS = ('random_flip', 'random_crop', 'random_patch', 'color_jitter', 'random_erase')
NECKS = ('none', 'bnneck')
DIST_METRICS = ('euclidean', 'cosine')
# Torchreid's RandomIdentitySampler puts this many images of each identity in a batch.
TRIPLET_INSTANCES = 4


def _choices(kind: str, value, valid) -> UserError:
    return UserError(f'{kind}={value!r} is not one Torchreid knows. Valid choices: '
                     f'{", ".join(sorted(valid))}. Fix it in config.py or with --{kind}=...')


def torchreid_datasets() -> dict:
    import torchreid.reid.data.datasets as datasets
    return vars(datasets)['__image_datasets']


def torchreid_models() -> dict:
    import torchreid.reid.models as models
    return vars(models)['__model_factory']


# Models whose forward pass calls .cuda() whatever the device: they are built on the CPU (and
# their checkpoints load there) but cannot compute a feature. Of Torchreid 0.2.5's 49 models,
# each run once on the CPU, only HACNN.
CUDA_ONLY_MODELS = ('hacnn',)


def check_names(s: Settings) -> None:
    """Model, loss, optimiser, scheduler, transforms and dataset names are ones Torchreid has."""
    from torchreid.reid.optim.lr_scheduler import AVAI_SCH
    from torchreid.reid.optim.optimizer import AVAI_OPTIMS
    if s.MODEL_NAME not in torchreid_models():
        raise _choices('MODEL_NAME', s.MODEL_NAME, torchreid_models())
    if s.MODEL_NAME in CUDA_ONLY_MODELS and (s.DEVICE == 'cpu' or not torch.cuda.is_available()):
        raise UserError(
            f'MODEL_NAME={s.MODEL_NAME!r} runs on CUDA only: Torchreid\'s {s.MODEL_NAME} moves '
            f'tensors to the GPU inside its forward pass (theta.cuda()), so on the CPU it fails '
            f'at the first image. Run it where PyTorch sees a CUDA GPU (DEVICE=\'auto\' or '
            f'\'cuda\'), or pick another MODEL_NAME.')
    if s.LOSS not in LOSSES:
        raise _choices('LOSS', s.LOSS, LOSSES)
    if s.OPTIM not in AVAI_OPTIMS:
        raise _choices('OPTIM', s.OPTIM, AVAI_OPTIMS)
    if s.LR_SCHEDULER not in AVAI_SCH:
        raise _choices('LR_SCHEDULER', s.LR_SCHEDULER, AVAI_SCH)
    check_stepsize(s)
    if s.NECK not in NECKS:
        raise invalid_choice('NECK', s.NECK, NECKS)
    if s.DIST_METRIC not in DIST_METRICS:
        raise invalid_choice('DIST_METRIC', s.DIST_METRIC, DIST_METRICS)
    if s.LAST_STRIDE not in ('auto', 1):
        raise UserError(f"LAST_STRIDE={s.LAST_STRIDE!r}: use 'auto' (the model's own) or 1 (the "
                        f"last stage of a ResNet keeps its size). Fix it in config.py or with "
                        f"--LAST_STRIDE=...")
    fit_to_model(s)         # a neck or last stride MODEL_NAME cannot take, set explicitly
    for transform in s.TRANSFORMS:
        if transform not in TRANSFORMS:
            raise _choices('TRANSFORMS', transform, TRANSFORMS)
    for key in ('SOURCES', 'TARGETS'):
        for name in dataset_list(s[key]):
            if name not in torchreid_datasets() and not is_own_data(name):
                raise UserError(f'{_choices(key, name, torchreid_datasets())} For a folder or '
                                f'CSV file of your own, write it as a path: --{key}=./{name}')
    for key, valid in SWITCH_CHOICES.items():
        if s[key] not in valid:
            raise invalid_choice(key, s[key], valid)


def check_stepsize(s: Settings) -> None:
    """STEPSIZE fits LR_SCHEDULER: an epoch count > 0 for single_step, a list of increasing
    epochs > 0 for multi_step (UserError otherwise; cosine reads neither)."""
    steps = s.STEPSIZE
    if s.LR_SCHEDULER == 'multi_step':
        if not (isinstance(steps, list) and steps and all(type(x) is int and x > 0 for x in steps)
                and steps == sorted(set(steps))):
            raise UserError(f"LR_SCHEDULER='multi_step' drops the learning rate at a list of "
                            f"epochs, but STEPSIZE={steps!r}. Give increasing epochs > 0, e.g. "
                            f"--STEPSIZE=[40,70], or use 'single_step' with one number.")
    elif s.LR_SCHEDULER == 'single_step' and not (type(steps) is int and steps > 0):
        raise UserError(f"LR_SCHEDULER='single_step' drops the learning rate every STEPSIZE "
                        f"epochs, so STEPSIZE must be one number > 0, but it is {steps!r}. For "
                        f"drops at a list of epochs use --LR_SCHEDULER=multi_step.")


def invalid_choice(key: str, value, valid) -> UserError:
    """The error for a setting whose value is none of `valid` (a switch, an index kind)."""
    return UserError(f'{key}={value!r}: valid choices are {", ".join(valid)}. Fix it in '
                     f'config.py or with --{key}=...')


def check_positive(s: Settings, keys) -> None:
    """Each setting of `keys` is greater than 0 (UserError naming the first that is not)."""
    for key in keys:
        if not s[key] > 0:
            raise UserError(f'{key}={s[key]!r} must be greater than 0. Fix it in config.py '
                            f'or with --{key}=...')


def check_numbers(s: Settings, training: bool) -> None:
    """Sizes, rates and counts that make sense."""
    check_positive(s, ['HEIGHT', 'WIDTH', 'BATCH_SIZE_TRAIN', 'BATCH_SIZE_TEST', 'LR',
                       'CENTER_LR', 'PRINT_FREQ', 'VISRANK_TOPK', 'SEARCH_TOPK']
                   + (['MAX_EPOCH'] if training else []))
    if not 0 <= s.SEED < 2 ** 32:
        raise UserError(f'SEED={s.SEED} must be between 0 and 2**32 - 1 (numpy\'s range). Fix it '
                        f'in config.py or with --SEED=...')
    if not s.DATA_CACHE_GB >= 0:
        raise UserError(f'DATA_CACHE_GB={s.DATA_CACHE_GB!r} must be 0 or more (GiB of memory the '
                        f'decoded images may take; 0 always uses Torchreid\'s loader).')
    if s.WORKERS < 0:
        raise UserError(f'WORKERS={s.WORKERS} must be 0 (load in the main process) or more.')
    if s.KEEP_OPTIMIZER < 0:
        raise UserError(f'KEEP_OPTIMIZER={s.KEEP_OPTIMIZER} must be 0 (only latest.pth.tar '
                        f'keeps the optimiser\'s state to resume from) or more.')
    if not (s.RERANK_K1 >= 1 and s.RERANK_K2 >= 1 and 0 <= s.RERANK_LAMBDA <= 1):
        raise UserError(f'Re-ranking needs RERANK_K1 >= 1, RERANK_K2 >= 1 and 0 <= '
                        f'RERANK_LAMBDA <= 1; got {s.RERANK_K1}, {s.RERANK_K2}, '
                        f'{s.RERANK_LAMBDA}. The usual values are 20, 6 and 0.3.')
    if not 0 < s.MATCH_FPIR < 1:
        raise UserError(f'MATCH_FPIR={s.MATCH_FPIR!r} must be between 0 and 1 (exclusive): the '
                        f'share of searches for someone absent from the gallery that may return '
                        f'a match, e.g. 0.01. Fix it in config.py or with --MATCH_FPIR=...')
    if s.WARMUP_EPOCHS < 0 or not 0 < s.WARMUP_FACTOR <= 1:
        raise UserError(f'Warm-up needs WARMUP_EPOCHS >= 0 and 0 < WARMUP_FACTOR <= 1 (the share '
                        f'of LR it starts from); got {s.WARMUP_EPOCHS} and {s.WARMUP_FACTOR}. '
                        f'BoT uses 10 and 0.01.')
    if training and s.WARMUP_EPOCHS >= s.MAX_EPOCH > 0:
        raise UserError(f'WARMUP_EPOCHS={s.WARMUP_EPOCHS} is not shorter than the run '
                        f'(MAX_EPOCH={s.MAX_EPOCH}), so the learning rate would never reach LR. '
                        f'Use fewer warm-up epochs (BoT: 10 of 120) or --WARMUP_EPOCHS=0.')
    if not s.CENTER_LOSS_WEIGHT >= 0:
        raise UserError(f'CENTER_LOSS_WEIGHT={s.CENTER_LOSS_WEIGHT!r} must be 0 (off) or more; '
                        f'BoT uses 5e-4.')
    if s.GPUS < 0:
        raise UserError(f'GPUS={s.GPUS} must be 0 (every visible GPU) or a number of GPUs.')
    if s.LR_SCALING not in ('none', 'linear'):
        raise UserError(f"LR_SCALING={s.LR_SCALING!r}: use 'none' (LR as set) or 'linear' "
                        f"(LR times the number of DDP processes).")
    if training and s.SYNC_BN and (s.DEVICE == 'cpu' or not torch.cuda.is_available()):
        raise UserError('SYNC_BN=True needs CUDA GPUs (PyTorch\'s SyncBatchNorm runs only '
                        'there). Pass --SYNC_BN=False to train on the CPU.')
    for key in ('VISRANK_TOPK', 'SEARCH_TOPK'):
        if s[key] > MAX_STRIP_MATCHES:
            raise UserError(f'{key}={s[key]} is more matches than one strip image can hold '
                            f'({MAX_STRIP_MATCHES}: JPEG images are at most 65,500 pixels wide). '
                            f'Use --{key}={MAX_STRIP_MATCHES} or fewer'
                            + ('; results.csv lists SEARCH_CSV_ROWS matches.'
                               if key == 'SEARCH_TOPK' else '.'))
    if training and s.BATCH_SIZE_TRAIN < 2:
        raise UserError(f'BATCH_SIZE_TRAIN={s.BATCH_SIZE_TRAIN}: training needs at least 2 '
                        f'images per batch (BatchNorm cannot normalise a batch of one). '
                        f'Fix it in config.py or with --BATCH_SIZE_TRAIN=...')
    if s.LOSS == 'triplet' and (s.BATCH_SIZE_TRAIN < TRIPLET_INSTANCES
                                or s.BATCH_SIZE_TRAIN % TRIPLET_INSTANCES):
        raise UserError(
            f'BATCH_SIZE_TRAIN={s.BATCH_SIZE_TRAIN} does not work with LOSS=\'triplet\': its '
            f'sampler takes {TRIPLET_INSTANCES} images of each identity per batch, so the batch '
            f'size must be a multiple of {TRIPLET_INSTANCES} (e.g. 32).'
        )


def dataset_dir(data_root: Path, name: str) -> Path:
    """The folder Torchreid's loader for `name` reads under DATA_ROOT."""
    return Path(data_root) / torchreid_datasets()[name].dataset_dir


@dataclass(frozen=True)
class SplitLabels:
    """One dataset of SOURCES/TARGETS as its loader will read it: (person id, camera id) of
    every image per split, junk (pid -1) left out. `name`: as SOURCES/TARGETS give it;
    `where`: where the labels were read, for messages; `checked`: images whose files were
    checked, per split (folder); `query_paths`, `gallery_paths`: the files of `query`
    and `gallery`, in order (a query is no match of its own file)."""
    name: str
    train: list
    query: list
    gallery: list
    where: str
    checked: dict = field(default_factory=dict)
    query_paths: list = field(default_factory=list)
    gallery_paths: list = field(default_factory=list)

    @property
    def train_ids(self) -> int:
        return len({pid for pid, _ in self.train})

    @property
    def shown(self) -> str:
        """The name as messages show it: a path in double quotes."""
        return f'"{self.name}"' if is_own_data(self.name) else self.name


def own_labels(data: OwnData) -> SplitLabels:
    """The labels of an own dataset's split (reidkit.data.own_data), as its loader reads them."""
    pairs = lambda items: [(pid, camid) for _, pid, camid in items]     # noqa: E731
    return SplitLabels(data.path, pairs(data.train), pairs(data.query), pairs(data.gallery),
                       f'"{data.path}"',
                       {split: len(getattr(data, split)) for split in OWN_SPLITS},
                       _paths(data.query), _paths(data.gallery))


def _paths(items) -> list[str]:
    """The files of dataset items, (path, pid, camid, ...) each."""
    return [item[0] for item in items]


def torchreid_items(s: Settings, name: str) -> dict[str, list]:
    """{'train', 'query', 'gallery': the items (path, pid, camid, ...) of Torchreid's dataset
    `name` under DATA_ROOT}, read by its own loader (file lists only: nothing is decoded)."""
    dataset = torchreid_datasets()[name](root=str(Path(s.DATA_ROOT).expanduser()),
                                         verbose=False)
    return {split: getattr(dataset, split) for split in ('train', 'query', 'gallery')}


def loader_labels(s: Settings, name: str) -> SplitLabels:
    """The labels of a Torchreid dataset, read by Torchreid's own loader for it (the file
    lists only: no image is decoded), as ImageDataManager will read them, its image files
    checked (`check_image_files`)."""
    splits = torchreid_items(s, name)
    check_image_files((item[0] for items in splits.values() for item in items), 'DATA_ROOT',
                      '(re-extract the dataset)')
    pairs = lambda items: [(item[1], item[2]) for item in items]       # noqa: E731
    return SplitLabels(name, *(pairs(items) for items in splits.values()),
                       'as its loader reads it',
                       {split: len(items) for split, items in splits.items()},
                       _paths(splits['query']), _paths(splits['gallery']))


def check_dataset(s: Settings, training: bool = True,
                  recorded: dict[str, OwnData] | None = None) -> dict[str, SplitLabels | None]:
    """Every dataset exists (Torchreid would otherwise try to download it, from a dead URL for
    Market-1501) and, for Market-1501's layout, every split has parseable names. Every image
    of own data (folders and CSV rows) and of Market-1501 is checked (`check_image_files`);
    Torchreid's other datasets are, by `loader_labels`.
    Own data is parsed and split here (bad data fails before any work), and a source must
    have training images, a target queries. Without `training` (test, visrank: the data is
    TARGETS alone) SOURCES is not looked at. `recorded`: own data whose split an older run
    recorded (own_data.own_split). Returns the labels of each dataset checked: own data and
    market1501; None for Torchreid's others."""
    found = {}
    root = Path(s.DATA_ROOT).expanduser()
    sources = dataset_list(s.SOURCES) if training else []
    for name in dict.fromkeys(sources + dataset_list(s.TARGETS)):
        if is_own_data(name):
            data = check_own_data(name, s, as_source=name in sources, recorded=recorded)
            if name in dataset_list(s.TARGETS) and not data.query:
                raise missing_split(data, 'query', 'TARGETS')
            found[name] = own_labels(data)
            check_image_files((item[0] for split in OWN_SPLITS for item in getattr(data, split)),
                              'SOURCES' if name in sources else 'TARGETS')
            continue
        folder = dataset_dir(root, name)
        if not folder.is_dir() or not any(folder.iterdir()):
            raise UserError(
                f'DATA_ROOT: dataset {name!r} not found: "{folder.resolve()}" is missing or '
                f'empty. Download it and put it there'
                + (f' so that {folder}/{market.UNZIPPED_DIR}/ holds '
                   f'{", ".join(market.SPLIT_FOLDERS.values())}'
                   if name == 'market1501' else '')
                + f', or set DATA_ROOT (config.py or --DATA_ROOT=...) to the folder that holds '
                f'{folder.name}/. To try the pipeline without it: python main.py --demo.'
            )
        found[name] = market_labels(folder) if name == 'market1501' else None
    return found


def market_labels(folder: Path) -> SplitLabels:
    """Labels of the Market-1501 dataset in `folder` (DATA_ROOT/market1501), read from the
    file names as Torchreid's loader reads them, after `check_market_layout`."""
    data_dir = market.splits_dir(folder)
    named = check_market_layout(folder)
    # the images the loader keeps (junk left out), in order: their labels and their files
    kept = {split: [p for p in named[split_folder] if market.name_labels([p.name])]
            for split, split_folder in market.SPLIT_FOLDERS.items()}
    labels = {split: market.name_labels(p.name for p in paths) for split, paths in kept.items()}
    return SplitLabels('market1501', labels['train'], labels['query'], labels['gallery'],
                       f'"{data_dir}"', {split: len(named[split_folder])
                                         for split, split_folder in market.SPLIT_FOLDERS.items()},
                       list(map(str, kept['query'])), list(map(str, kept['gallery'])))


def check_market_layout(folder: Path) -> dict[str, list[Path]]:
    """Market-1501's split folders are there under `folder` and hold images whose names
    Torchreid's loader reads correctly and whose files are readable (UserError naming the
    folder or file if not). Returns the images checked, per split folder."""
    data_dir = market.splits_dir(folder)
    splits = tuple(market.SPLIT_FOLDERS.values())
    for split in splits:
        if not (data_dir / split).is_dir():
            raise UserError(
                f'DATA_ROOT: "{data_dir / split}" is missing. Market-1501 needs '
                f'{", ".join(splits)} inside "{data_dir}" (as in the unzipped '
                f'{market.UNZIPPED_DIR}.zip).'
            )
    checked = {}
    for split in splits:
        split_dir = data_dir / split
        images = sorted(split_dir.glob('*.jpg'))
        named = [p for p in images if market.LOADER_NAME.search(p.name)]
        if not named:
            sample = next(iter(sorted(split_dir.iterdir())), None)
            raise UserError(
                f'DATA_ROOT: no Market-1501 image in "{split_dir}": the loader reads .jpg files '
                f'named like 0002_c1s1_000451_03.jpg (person id, camera)'
                + (f', but found e.g. "{sample.name}"' if sample else ', but the folder is empty')
                + '. Check that the dataset was unzipped completely into this folder.'
            )
        check_market_names(data_dir, named)
        check_image_files(named, 'DATA_ROOT', '(re-extract the dataset)')
        checked[split] = named
    return checked


def check_image_files(paths, setting: str, where: str = '') -> None:
    """Each file of `paths` is a whole image that can be read without blocking
    (`images.image_problem`: a FIFO named like an image would hang the loader); UserError
    naming `setting` and the first bad file. `where`: where a good copy comes from."""
    for path in paths:
        problem = image_problem(Path(path))
        if problem:
            raise UserError(
                f'{setting}: "{path}" is {problem}. Delete it or replace it with a good copy'
                + (f' {where}' if where else '') + ', then run again.')


def check_market_names(data_dir: Path, named: list[Path]) -> None:
    """Names Torchreid's Market-1501 loader would misread: it searches the whole path for
    `<pid>_c<one digit>` and asserts 0 <= pid <= 1501 and cameras 1-6. A two-digit camera
    (`c10` read as `c1`) or a folder above named like `12_c3` silently gives wrong ids and
    cameras (wrong numbers); larger ids or cameras 7+ fail in its loader. UserError naming the
    file and pointing to the own-data path, which reads any digits from the file name only."""
    own = (f'Data that is not Market-1501 itself can be read as your own data, which takes '
           f'any number of digits from the file name only: --SOURCES={data_dir} '
           f'--TARGETS={data_dir} (see docs/own-data.md).')
    for path in named:
        whole = market.LOADER_NAME.search(str(path))
        name = market.LOADER_NAME.search(path.name)
        if whole.group(0) != name.group(0) or whole.start() < len(str(path)) - len(path.name):
            raise UserError(
                f'DATA_ROOT: "{path}": a folder above the image is named like a Market-1501 '
                f'image ("{whole.group(0)}"), and Torchreid\'s Market-1501 loader would read '
                f'every image\'s person and camera from it. Rename that folder. {own}')
        camera = re.search(r'_c(\d+)', path.name).group(1)
        pid = int(name.group(1))
        if len(camera) > 1 or not 1 <= int(camera) <= 6 or pid > 1501 or pid < -1:
            raise UserError(
                f'DATA_ROOT: "{path.name}" in "{path.parent}" has person {pid} and camera '
                f'c{camera}; Torchreid\'s Market-1501 loader reads one camera digit (1-6) and '
                f'person ids up to 1501, so it would '
                + ('misread it (c10 is taken for c1, and the same-camera rule then drops the '
                   'wrong gallery images: wrong numbers)' if len(camera) > 1 and
                   1 <= int(camera[0]) <= 6 and 0 <= pid <= 1501 else 'stop on it') + f'. {own}')


def check_output_folder(path: Path, setting: str = 'EXPERIMENTS_DIR') -> None:
    """`path` is a folder we can write in, creating it if needed: found out before training,
    not when the first checkpoint is saved."""
    path = Path(path).expanduser()
    fix = f'Set {setting} (config.py or --{setting}=...) to a folder you can write in'
    if path.exists() and not path.is_dir():
        raise UserError(f'{setting}: "{path}" is a file, not a folder. {fix}, or move the file '
                        f'away.')
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        reason = f'"{blocking}" is a file' if blocking else error.strerror
        raise UserError(f'{setting}: cannot create the folder "{path}" ({reason}). {fix}.') \
            from None
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix='.write-test-') as probe:
            probe.write(b'reidkit')
            probe.flush()
    except OSError as error:
        raise UserError(f'{setting}: cannot write in "{path}" ({error.strerror}). Check its '
                        f'permissions and free space, or {fix[0].lower()}{fix[1:]}.') from None


def pretrained_file(model_name: str) -> tuple[str, Path] | None:
    """(url, cache path) of the ImageNet weights Torchreid downloads for `model_name`, if it
    downloads them with torch's model zoo (the ResNet family and most others)."""
    import sys
    module = sys.modules[torchreid_models()[model_name].__module__]
    url = getattr(module, 'model_urls', {}).get(model_name)
    if not url:
        return None
    return url, Path(torch.hub.get_dir()) / 'checkpoints' / Path(urlparse(url).path).name


def check_pretrained(s: Settings, timeout: float = 3.0) -> None:
    """PRETRAINED=True needs the ImageNet file in the torch hub cache or a reachable server:
    say so in seconds, rather than fail inside a download or fall back to random weights."""
    if not s.PRETRAINED:
        return
    found = pretrained_file(s.MODEL_NAME)
    if found is None:
        return
    url, cached = found
    if cached.is_file():
        return
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        raise UserError(
            f'PRETRAINED=True: the ImageNet weights for {s.MODEL_NAME} are not in the torch hub '
            f'cache and {host} cannot be reached (no network?). Download {url} on a machine '
            f'with network and copy it to "{cached}", or train from scratch with '
            f'--PRETRAINED=False (much lower accuracy on real data).'
        ) from None


def _zero_steps(s: Settings, yielded: int, what: str) -> UserError:
    """A batch larger than what one epoch yields: the loader drops an incomplete last batch,
    so training would take zero steps and save an untrained model."""
    return UserError(
        f'BATCH_SIZE_TRAIN={s.BATCH_SIZE_TRAIN} is larger than {what}, so training would take '
        f'zero steps. Use a batch of at most {yielded} '
        f'(e.g. --BATCH_SIZE_TRAIN={max(2, min(32, yielded))}), or more data.')


def check_training_batches(s: Settings, datamanager) -> None:
    """An epoch of this process's training loader (its DDP share) trains at least one step."""
    loader = datamanager.train_loader
    if len(loader) == 0:
        yielded = len(loader.sampler) if loader.sampler is not None else len(loader.dataset)
        raise _zero_steps(s, yielded, f'what one epoch of the training set gives ({yielded} '
                                      f'images'
                          + (' from the identity sampler' if s.LOSS == 'triplet' else '') + ')')


def _sources_named(sources: list[SplitLabels], count) -> str:
    """'market1501', or 'A (n) + B (m) together' with `count(source)` for several sources."""
    if len(sources) == 1:
        return sources[0].shown
    return ' + '.join(f'{source.shown} ({count(source)})' for source in sources) + ' together'


def check_training_split(s: Settings, sources: list[SplitLabels]) -> None:
    """The training split of SOURCES (all sources together, as Torchreid combines them, each
    keeping its own identities) can train: two identities or more and at least one full batch
    per epoch: BATCH_SIZE_TRAIN images, or with LOSS='triplet' BATCH_SIZE_TRAIN / 4 identities
    (its identity sampler takes 4 images of each, drawing again from an identity with fewer;
    with fewer identities Torchreid fails on a bare assertion). UserError naming the datasets
    and their numbers."""
    ids = sum(source.train_ids for source in sources)
    images = sum(len(source.train) for source in sources)
    people = (f'the training set{"s" if len(sources) > 1 else ""} of '
              + _sources_named(sources, lambda source: counted(source.train_ids, 'identity',
                                                               'identities')))
    has = 'have' if len(sources) > 1 else 'has'
    if ids < 2:
        raise UserError(
            f'SOURCES: {people} {has} {counted(ids, "identity", "identities")}: training a '
            f're-identification model needs at least two people to tell apart. Add '
            f'identities, or add a source with more of them.')
    needed = s.BATCH_SIZE_TRAIN // TRIPLET_INSTANCES
    if s.LOSS == 'triplet' and ids < needed:
        raise UserError(
            f'BATCH_SIZE_TRAIN={s.BATCH_SIZE_TRAIN} with LOSS=\'triplet\' needs {needed} '
            f'different people per batch ({TRIPLET_INSTANCES} images each), but {people} '
            f'{has} {ids}. Use a batch of at most {ids * TRIPLET_INSTANCES}.')
    if s.LOSS != 'triplet' and s.BATCH_SIZE_TRAIN > images:
        raise _zero_steps(s, images, f'the {images} training images of '
                          + _sources_named(sources, lambda source: len(source.train)))


def count_matchable_queries(query, gallery, files=None) -> int:
    """How many queries the evaluation can score: those whose person the gallery shows from
    another camera (Market-1501's protocol ignores the same person in the same camera) in an
    image that is not the query's own file (as the evaluator's `Labels.ignored`).
    `query`, `gallery`: sequences of (person id, camera id); `files`: their file ids
    (`reidkit.data.files.file_ids`), or None where no query's file is in the gallery."""
    # without file ids no gallery image is a query's file (ids are never negative)
    q_files, g_files = files if files is not None else ([-1] * len(query), [0] * len(gallery))
    seen = {}       # person -> camera -> the files showing the person from it
    for (pid, camid), file in zip(gallery, g_files):
        seen.setdefault(pid, {}).setdefault(camid, set()).add(file)
    return sum(1 for (pid, camid), file in zip(query, q_files)
               if any(camera != camid and shown - {file}
                      for camera, shown in seen.get(pid, {}).items()))


def check_test_split(target: SplitLabels) -> None:
    """A test set (TARGETS) has queries the evaluation can score (UserError if none); notes
    how many queries are left out when only some can be scored."""
    fix = ('Nothing was trained or extracted. Put each query person\'s images from other '
           'cameras in the gallery (Market-1501 names: <person>_c<camera>...), or set TARGETS '
           'to another dataset.')
    if not target.query:
        raise UserError(f'TARGETS: the test set {target.name!r} has no query images '
                        f'({target.where}, junk images of pid -1 left out), so there is nothing '
                        f'to evaluate. {fix}')
    files = file_ids(target.query_paths, target.gallery_paths)
    kept = count_matchable_queries(target.query, target.gallery, files)
    # queries whose only match from another camera is their own file, listed as gallery too
    own_only = 0 if files is None else \
        count_matchable_queries(target.query, target.gallery) - kept
    own = (f' ({own_only} of them only {"its" if own_only == 1 else "their"} own file, '
           f'listed as gallery too, which is never a query\'s match)' if own_only else '')
    if not kept:
        raise UserError(
            f'TARGETS: the test set {target.name!r} has nothing to match: none of its '
            f'{len(target.query)} query images has its person in the gallery seen by another '
            f'camera{own} ({target.where}), and the evaluation scores only such matches, so '
            f'there would be no Rank-1 or mAP. {fix}'
            + (' List each image once, as query or as gallery.' if own_only else ''))
    if kept < len(target.query):
        left_out = len(target.query) - kept
        print(f'Note: {left_out} of the {len(target.query)} queries of '
              f'{target.shown} {"has" if left_out == 1 else "have"} no match from another camera in the gallery{own}; the '
              f'evaluation leaves them out.')


SEARCH_INDEX_KINDS = ('ivfpq',)      # the indexes search can keep (reidkit.search.index)
MATCH_WORDS = ('auto', 'off')        # MATCH_THRESHOLD's words (reidkit.evaluate.calibration)


def check_search_switches(s: Settings) -> None:
    """Evaluation switches that search cannot apply are refused, never silently ignored:
    search ranks by plain feature distances (FLIP_TEST applies; re-ranking does not). Then
    the search settings make sense and QUERY and GALLERY are given (before any model is
    loaded, and before a training that `train search` runs first)."""
    if s.RERANK:
        raise UserError(
            'RERANK=True: search does not re-rank; its distances and order are plain feature '
            'distances, so they would not be the re-ranked ones the setting asks for. Run '
            'search with --RERANK=False (and set RERANK = False in config.py if it is True '
            'there); test and visrank re-rank.')
    if s.SEARCH_INDEX not in SEARCH_INDEX_KINDS:
        raise UserError(f'SEARCH_INDEX={s.SEARCH_INDEX!r}: valid choices are '
                        f'{", ".join(map(repr, SEARCH_INDEX_KINDS))}. Fix it in config.py or '
                        f'with --SEARCH_INDEX=...')
    for key in ('SEARCH_CSV_ROWS', 'SEARCH_NPROBE'):
        if not s[key] > 0:
            raise UserError(f'{key}={s[key]!r} must be greater than 0. Fix it in config.py or '
                            f'with --{key}=...')
    if not s.SEARCH_EXACT_UP_TO >= 0:
        raise UserError(f'SEARCH_EXACT_UP_TO={s.SEARCH_EXACT_UP_TO!r} must be 0 (always use the '
                        f'index) or a number of gallery images up to which search is exact. Fix '
                        f'it in config.py or with --SEARCH_EXACT_UP_TO=...')
    check_match_threshold(s)
    if not s.QUERY or not s.GALLERY:
        raise UserError('search needs --QUERY=path/to/person.jpg (or a folder of queries) '
                        'and --GALLERY=path/to/folder (searched recursively for images).')


def check_match_threshold(s: Settings) -> None:
    """MATCH_THRESHOLD is one of MATCH_WORDS or a distance >= 0 (UserError otherwise)."""
    value = s.MATCH_THRESHOLD
    if value in MATCH_WORDS or (type(value) in (int, float) and value >= 0):
        return
    raise UserError(f'MATCH_THRESHOLD={value!r}: it must be '
                    f'{SEVERAL_TYPES["MATCH_THRESHOLD"].text}. Fix it in config.py or with '
                    f'--MATCH_THRESHOLD=...')


def check_before_run(s: Settings, training: bool, pretrained: bool = True,
                     recorded: dict[str, OwnData] | None = None) -> None:
    """All checks, cheapest first; prints what was checked and how long it took.
    The batch, identity and match checks use the splits the loader will read: every source's
    training split (when `training`) and every target's query and gallery.
    `pretrained`: whether training will load ImageNet weights (not when resuming);
    `recorded`: own data whose split an older run recorded (own_data.own_split)."""
    started = time.time()
    check_names(s)
    check_numbers(s, training)
    found = check_dataset(s, training, recorded)
    labels = {name: found[name] or loader_labels(s, name) for name in found}
    if training:
        check_training_split(s, [labels[name] for name in dataset_list(s.SOURCES)])
    for name in dict.fromkeys(dataset_list(s.TARGETS)):
        check_test_split(labels[name])
    check_output_folder(Path(s.EXPERIMENTS_DIR))
    if training and pretrained:
        check_pretrained(s)
    checked = {}
    for data in labels.values():
        for split, count in data.checked.items():
            checked[split] = checked.get(split, 0) + count
    if checked:
        print(f'Checked {counted(sum(checked.values()), "image")} in {time.time() - started:.1f}s '
              f'({", ".join(f"{k}: {v}" for k, v in checked.items())}).')
