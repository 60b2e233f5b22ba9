"""Checks that run before any heavy work, each failing with one paragraph that says what to do."""
from __future__ import annotations

import re
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

from reidkit.run.errors import UserError
from reidkit.data.images import MAX_STRIP_MATCHES, image_problem
from reidkit.data.own_data import check_own_data
from reidkit.run.settings import SWITCH_CHOICES, Settings, is_own_data

LOSSES = ('softmax', 'triplet')
TRANSFORMS = ('random_flip', 'random_crop', 'random_patch', 'color_jitter')
# Market-1501 style names: <pid>_c<camera>... ; the loaders of Market-1501, DukeMTMC-reID and
# MSMT17 parse these.
MARKET_NAME = re.compile(r'([-\d]+)_c(\d)')
MARKET_SPLITS = ('bounding_box_train', 'query', 'bounding_box_test')
# Torchreid's RandomIdentitySampler puts this many images of each identity in a batch.
TRIPLET_INSTANCES = 4


def _choices(kind: str, value, valid) -> UserError:
    return UserError(f'{kind}={value!r} is not one Torchreid knows. Valid choices: '
                     f'{", ".join(sorted(valid))}. Fix it in config.py or with --{kind}=...')


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


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
    if s.LR_SCHEDULER == 'multi_step':
        raise UserError("LR_SCHEDULER='multi_step' needs a list of epochs, which STEPSIZE (one "
                        "number) cannot hold. Use 'single_step' (a drop every STEPSIZE epochs) "
                        "or 'cosine'.")
    for transform in s.TRANSFORMS:
        if transform not in TRANSFORMS:
            raise _choices('TRANSFORMS', transform, TRANSFORMS)
    for key in ('SOURCES', 'TARGETS'):
        for name in _as_list(s[key]):
            if name not in torchreid_datasets() and not is_own_data(name):
                raise UserError(f'{_choices(key, name, torchreid_datasets())} For a folder or '
                                f'CSV file of your own, write it as a path: --{key}=./{name}')
    for key, valid in SWITCH_CHOICES.items():
        if s[key] not in valid:
            raise UserError(f'{key}={s[key]!r}: valid choices are {", ".join(valid)}. Fix it '
                            f'in config.py or with --{key}=...')


def check_numbers(s: Settings, training: bool) -> None:
    """Sizes, rates and counts that make sense."""
    positive = ['HEIGHT', 'WIDTH', 'BATCH_SIZE_TRAIN', 'BATCH_SIZE_TEST', 'LR', 'STEPSIZE',
                'PRINT_FREQ', 'VISRANK_TOPK', 'SEARCH_TOPK'] + (['MAX_EPOCH'] if training else [])
    for key in positive:
        if not s[key] > 0:
            raise UserError(f'{key}={s[key]!r} must be greater than 0. Fix it in config.py '
                            f'or with --{key}=...')
    if not 0 <= s.SEED < 2 ** 32:
        raise UserError(f'SEED={s.SEED} must be between 0 and 2**32 - 1 (numpy\'s range). Fix it '
                        f'in config.py or with --SEED=...')
    if not s.DATA_CACHE_GB >= 0:
        raise UserError(f'DATA_CACHE_GB={s.DATA_CACHE_GB!r} must be 0 or more (GiB of memory the '
                        f'decoded images may take; 0 always uses Torchreid\'s loader).')
    if s.WORKERS < 0:
        raise UserError(f'WORKERS={s.WORKERS} must be 0 (load in the main process) or more.')
    if not (s.RERANK_K1 >= 1 and s.RERANK_K2 >= 1 and 0 <= s.RERANK_LAMBDA <= 1):
        raise UserError(f'Re-ranking needs RERANK_K1 >= 1, RERANK_K2 >= 1 and 0 <= '
                        f'RERANK_LAMBDA <= 1; got {s.RERANK_K1}, {s.RERANK_K2}, '
                        f'{s.RERANK_LAMBDA}. The usual values are 20, 6 and 0.3.')
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


def check_dataset(s: Settings) -> dict[str, int]:
    """Every dataset exists (Torchreid would otherwise try to download it, from a dead URL for
    Market-1501) and, for Market-1501's layout, every split has parseable, readable images.
    Returns the number of images checked per split folder."""
    checked = {}
    root = Path(s.DATA_ROOT).expanduser()
    for name in dict.fromkeys(_as_list(s.SOURCES) + _as_list(s.TARGETS)):
        if is_own_data(name):       # parsed and split here: bad data fails before any work
            check_own_data(name, s, as_source=name in _as_list(s.SOURCES))
            continue
        folder = dataset_dir(root, name)
        if not folder.is_dir() or not any(folder.iterdir()):
            raise UserError(
                f'DATA_ROOT: dataset {name!r} not found: "{folder.resolve()}" is missing or '
                f'empty. Download it and put it there'
                + (f' so that {folder}/Market-1501-v15.09.15/ holds {", ".join(MARKET_SPLITS)}'
                   if name == 'market1501' else '')
                + f', or set DATA_ROOT (config.py or --DATA_ROOT=...) to the folder that holds '
                f'{folder.name}/. To try the pipeline without it: python main.py --demo.'
            )
        if name == 'market1501':
            checked.update(check_market_layout(folder))
    return checked


def check_market_layout(folder: Path) -> dict[str, int]:
    data_dir = folder / 'Market-1501-v15.09.15'
    data_dir = data_dir if data_dir.is_dir() else folder
    for split in MARKET_SPLITS:
        if not (data_dir / split).is_dir():
            raise UserError(
                f'DATA_ROOT: "{data_dir / split}" is missing. Market-1501 needs '
                f'{", ".join(MARKET_SPLITS)} inside "{data_dir}" (as in the unzipped '
                f'Market-1501-v15.09.15.zip).'
            )
    checked = {}
    for split in MARKET_SPLITS:
        split_dir = data_dir / split
        images = sorted(split_dir.glob('*.jpg'))
        named = [p for p in images if MARKET_NAME.search(p.name)]
        if not named:
            sample = next(iter(sorted(split_dir.iterdir())), None)
            raise UserError(
                f'DATA_ROOT: no Market-1501 image in "{split_dir}": the loader reads .jpg files '
                f'named like 0002_c1s1_000451_03.jpg (person id, camera)'
                + (f', but found e.g. "{sample.name}"' if sample else ', but the folder is empty')
                + '. Check that the dataset was unzipped completely into this folder.'
            )
        check_market_names(data_dir, named)
        for path in named:
            problem = image_problem(path)
            if problem:
                raise UserError(
                    f'DATA_ROOT: "{path}" is {problem}. Delete it or replace it with a good copy '
                    f'(re-extract the dataset), then run again.'
                )
        checked[split] = len(named)
    return checked


def check_market_names(data_dir: Path, named: list[Path]) -> None:
    """Names Torchreid's Market-1501 loader would misread: it searches the whole path for
    `<pid>_c<one digit>` and asserts 0 <= pid <= 1501 and cameras 1-6. A two-digit camera
    (`c10` read as `c1`) or a folder above named like `12_c3` silently gives wrong ids and
    cameras (wrong numbers); larger ids or cameras 7+ fail in its loader. UserError naming the
    file and pointing to the own-data path, which reads any digits from the file name only."""
    own = (f'Data that is not Market-1501 itself can be read as your own data, which takes '
           f'any number of digits from the file name only: --SOURCES={data_dir} '
           f'--TARGETS={data_dir} (see "Your own data" in the README).')
    for path in named:
        whole, name = MARKET_NAME.search(str(path)), MARKET_NAME.search(path.name)
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


def check_training_batches(s: Settings, datamanager) -> None:
    """An epoch trains at least one step: the loader drops an incomplete last batch, so a
    batch larger than the training set would 'train' zero steps and save an untrained model."""
    loader = datamanager.train_loader
    if len(loader) == 0:
        yielded = len(loader.sampler) if loader.sampler is not None else len(loader.dataset)
        raise UserError(
            f'BATCH_SIZE_TRAIN={s.BATCH_SIZE_TRAIN} is larger than what one epoch of the '
            f'training set gives ({yielded} images'
            + (' from the identity sampler' if s.LOSS == 'triplet' else '')
            + '), so training would take zero steps. Use a batch of at most '
            f'{yielded} (e.g. --BATCH_SIZE_TRAIN={max(2, min(32, yielded))}), or more data.')


def _market_dir(s: Settings) -> Path:
    """The folder holding Market-1501's splits under DATA_ROOT (as `check_market_layout`)."""
    data_dir = dataset_dir(Path(s.DATA_ROOT).expanduser(), 'market1501') / 'Market-1501-v15.09.15'
    return data_dir if data_dir.is_dir() else data_dir.parent


def check_triplet_identities(s: Settings) -> None:
    """The identity sampler fills a batch with BATCH_SIZE_TRAIN / 4 different people; with fewer
    training identities Torchreid fails on a bare assertion while building the loader."""
    train_dir = _market_dir(s) / 'bounding_box_train'
    ids = {match.group(1) for match in (MARKET_NAME.search(p.name)
                                        for p in train_dir.glob('*.jpg'))
           if match and match.group(1) != '-1'}
    needed = s.BATCH_SIZE_TRAIN // TRIPLET_INSTANCES
    if len(ids) < needed:
        raise UserError(
            f'BATCH_SIZE_TRAIN={s.BATCH_SIZE_TRAIN} with LOSS=\'triplet\' needs {needed} '
            f'different people per batch ({TRIPLET_INSTANCES} images each), but the training set '
            f'has {len(ids)}. Use a batch of at most {len(ids) * TRIPLET_INSTANCES}.')


def count_matchable_queries(query, gallery) -> int:
    """How many queries the evaluation can score: those whose person the gallery shows from
    another camera (Market-1501's protocol ignores the same person in the same camera).
    `query`, `gallery`: iterables of (person id, camera id)."""
    cameras = {}
    for pid, camid in gallery:
        cameras.setdefault(pid, set()).add(camid)
    return sum(1 for pid, camid in query if cameras.get(pid, set()) - {camid})


def _nothing_to_match(name: str, queries: int, where: str) -> UserError:
    return UserError(
        f'TARGETS: the test set {name!r} has nothing to match: none of its {queries} query '
        f'images has its person in the gallery seen by another camera ({where}), and the '
        f'evaluation scores only such matches, so there would be no Rank-1 or mAP. Nothing was '
        f'trained or extracted. Put each query person\'s images from other cameras in the '
        f'gallery (Market-1501 names: <person>_c<camera>...), or set TARGETS to another '
        f'dataset.')


def check_market_matches(s: Settings) -> None:
    """A Market-1501 test set (TARGETS) has queries the evaluation can score, read from the
    file names as Torchreid's loader reads them (junk, person -1, left out); UserError if none.
    Notes how many queries are left out when only some can be scored."""
    data_dir = _market_dir(s)

    def labels(split: str) -> list[tuple[int, int]]:
        found = (MARKET_NAME.search(p.name) for p in (data_dir / split).glob('*.jpg'))
        pairs = [(int(m.group(1)), int(m.group(2))) for m in found if m]
        return [(pid, camid) for pid, camid in pairs if pid != -1]
    query = labels('query')
    kept = count_matchable_queries(query, labels('bounding_box_test'))
    if not kept:
        raise _nothing_to_match('market1501', len(query), f'"{data_dir}"')
    if kept < len(query):
        print(f'Note: {len(query) - kept} of the {len(query)} queries of market1501 have no '
              f'match from another camera in the gallery; the evaluation leaves them out.')


def check_loaded_matches(datamanager) -> None:
    """Every test set Torchreid loaded has queries the evaluation can score (UserError if
    not): the same check as `check_market_matches`, on any dataset, from the loader's labels."""
    for name, splits in datamanager.test_dataset.items():
        query = [(item[1], item[2]) for item in splits['query']]
        gallery = [(item[1], item[2]) for item in splits['gallery']]
        if not count_matchable_queries(query, gallery):
            raise _nothing_to_match(name, len(query), 'as its loader reads it')


SEARCH_INDEX_KINDS = ('ivfpq',)      # the indexes search can keep (reidkit.search.index)


def check_search_switches(s: Settings) -> None:
    """Evaluation switches that search cannot apply are refused, never silently ignored:
    search ranks by plain feature distances (FLIP_TEST applies; re-ranking does not). Then
    the search settings make sense (before any model is loaded)."""
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


def check_before_run(s: Settings, training: bool, pretrained: bool = True) -> None:
    """All checks, cheapest first; prints what was checked and how long it took.
    `pretrained`: whether training will load ImageNet weights (not when resuming)."""
    started = time.time()
    check_names(s)
    check_numbers(s, training)
    checked = check_dataset(s)
    train_images = checked.get('bounding_box_train')
    if training and train_images is not None and s.BATCH_SIZE_TRAIN > train_images:
        raise UserError(
            f'BATCH_SIZE_TRAIN={s.BATCH_SIZE_TRAIN} is larger than the {train_images} training '
            f'images, so training would take zero steps. Use a batch of at most {train_images} '
            f'(e.g. --BATCH_SIZE_TRAIN={max(2, min(32, train_images))}), or more data.')
    if training and s.LOSS == 'triplet' and train_images is not None:
        check_triplet_identities(s)
    if 'market1501' in _as_list(s.TARGETS):
        check_market_matches(s)
    check_output_folder(Path(s.EXPERIMENTS_DIR))
    if training and pretrained:
        check_pretrained(s)
    if checked:
        print(f'Checked {sum(checked.values())} images in {time.time() - started:.1f}s '
              f'({", ".join(f"{k}: {v}" for k, v in checked.items())}).')
