"""`python main.py export`: a checkpoint's feature extractor as one self-contained model.onnx
beside it, checked against PyTorch on the run's own test images before it is published.

The file is never written over an existing one: a second export of the same run's folder is
model-2.onnx, then model-3.onnx (as run folders get -2, -3), and the printed path and the
file's metadata (checkpoint, epoch) say which is which.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from reidkit.data import checks, own_data
from reidkit.data.checks import dataset_dir, torchreid_datasets
from reidkit.data.images import read_image
from reidkit.evaluate.calibration import for_checkpoint
from reidkit.run import atomic
from reidkit.run.errors import UserError
from reidkit.run.folders import resolve_checkpoint
from reidkit.run.settings import Settings, dataset_list, is_own_data
from reidkit.search import onnx_features as meta
from reidkit.search.extractor import checkpoint_model, quiet_test_transform

# 18: the exporter's own opset (it converts to others, op by op), and one that onnxruntime
# since 1.14, TensorRT 8.6 and OpenVINO 2023 all run.
OPSET = 18
MIN_COSINE = 0.9999          # per image, ONNX features against PyTorch's (issue #15)
CHECK_IMAGES = 64            # test images the check runs on, spread over query and gallery
RANDOM_IMAGES = 16           # when the run's data is not here
MAX_NAMES = 1000             # model.onnx, model-2.onnx ... model-999.onnx


def export(s: Settings, weights: Path | None = None) -> Path:
    """Exports the checkpoint (`weights`, WEIGHTS or the newest run's) to ONNX beside it;
    returns the new file. UserError, with nothing left behind, if the check fails."""
    _check_installed()
    checkpoint, saved, s = resolve_checkpoint(s, weights)
    checks.check_names(s)
    thresholds = for_checkpoint(checkpoint, Path(s.EXPERIMENTS_DIR)).entries   # search's 'auto'
    model = checkpoint_model(saved, checkpoint, s).float().eval()
    transform = quiet_test_transform(s.HEIGHT, s.WIDTH)
    normalize = transform.transforms[-1]      # Torchreid's ImageNet mean and std, as it uses
    epoch = saved.get('epoch')
    temporary = _writable(checkpoint.parent / f'.model.onnx.{os.getpid()}.partial', checkpoint)
    try:
        feature_dim = _write_onnx(model, s, temporary)
        _add_metadata(temporary, {
            meta.MODEL_NAME: s.MODEL_NAME, meta.HEIGHT: s.HEIGHT, meta.WIDTH: s.WIDTH,
            meta.FEATURE_DIM: feature_dim, meta.MEAN: json.dumps(list(normalize.mean)),
            meta.STD: json.dumps(list(normalize.std)), meta.CHECKPOINT: checkpoint.name,
            meta.EPOCH: '' if epoch is None else epoch,
            meta.PREPROCESSING: meta.PREPROCESSING_TEXT, meta.DIST_METRIC: s.DIST_METRIC,
            **({meta.CALIBRATION: json.dumps(list(thresholds))} if thresholds else {})})
        images, source = check_images(s)
        diff, cosine = compare(model, transform, meta.OnnxExtractor(temporary), images)
        line = (f'ONNX check on {len(images)} {source}: onnxruntime vs PyTorch features, '
                f'max abs diff {diff:.3g}, cosine min {cosine:.6f} (must be >= {MIN_COSINE})')
        if not cosine >= MIN_COSINE:       # `not >=`: a NaN cosine fails too
            raise UserError(f'{line}. The ONNX model does not compute what the checkpoint '
                            f'"{checkpoint}" does, so it was not kept. Report this with the '
                            f'MODEL_NAME ({s.MODEL_NAME}) and torch/onnxruntime versions.')
        print(line)
        path = _publish(temporary, checkpoint.parent)
    except OSError as error:       # a full disk while writing, converting or publishing
        raise atomic.write_error(checkpoint.parent / 'model.onnx', error, 'the ONNX model',
                                 'Nothing was kept; free some space (or fix the folder\'s '
                                 'permissions) and export again.') from None
    finally:
        temporary.unlink(missing_ok=True)
    size = path.stat().st_size / 2 ** 20
    print(f'ONNX model: {path} ({s.MODEL_NAME}, epoch {"?" if epoch is None else epoch}, '
          f'{s.HEIGHT}x{s.WIDTH} -> {feature_dim} features, dynamic batch, opset {OPSET}, '
          f'{size:.1f} MiB; ranked by {s.DIST_METRIC} distance, named in its metadata)')
    if thresholds:
        print(f'Calibration: the checkpoint\'s {len(thresholds)} match threshold'
              f'{"s" if len(thresholds) > 1 else ""} copied into its metadata (search uses them)')
    return path


def _check_installed() -> None:
    """Found out first: without onnxscript the exporter fails only after loading the model."""
    missing = [name for name in ('onnx', 'onnxscript', 'onnxruntime')
               if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f'export needs {" and ".join(missing)}, which '
                        f'{"is" if len(missing) == 1 else "are"} not installed. Install with '
                        f'`pip install {" ".join(missing)}` (listed in requirements.txt).')


def _writable(temporary: Path, checkpoint: Path) -> Path:
    """`temporary`, created empty: found out before seconds of exporting, not after."""
    try:
        temporary.touch(exist_ok=False)
    except OSError as error:
        raise UserError(f'export: cannot write beside the checkpoint "{checkpoint}" '
                        f'({error.strerror}). Copy the checkpoint into a folder you can write '
                        f'in and pass --WEIGHTS=<that copy>.') from None
    return temporary


def _write_onnx(model: torch.nn.Module, s: Settings, path: Path) -> int:
    """Writes the model to `path` with a dynamic batch axis; returns its feature size."""
    example = torch.randn(2, 3, s.HEIGHT, s.WIDTH)   # 2: a batch of 1 would be fixed as 1
    with torch.no_grad():
        feature_dim = int(model(example).shape[-1])
    chatter = io.StringIO()          # the exporter narrates each step; shown only on failure
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.onnx.export(model, (example,), str(path), input_names=['images'],
                              output_names=['features'], opset_version=OPSET, dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim('batch')},),
                              external_data=False)
    except Exception as error:      # each exporter stage has its own error types
        full = atomic.disk_full(error)
        if full is not None:
            raise full from None    # export() says so, as for its other writes
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UserError(f'export: torch.onnx cannot export MODEL_NAME={s.MODEL_NAME!r} '
                        f'({type(error).__name__}: {first}). Nothing was written. Other '
                        f'Torchreid models (resnet50, osnet_x1_0, ...) export; the exporter\'s '
                        f'own log: {chatter.getvalue().strip()[-300:] or "(none)"}') from None
    return feature_dim


def _add_metadata(path: Path, values: dict) -> None:
    """Records what a user of the file needs without Torchreid; checks the model is valid."""
    import onnx
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in values.items():
        model.metadata_props.add(key=key, value=str(value))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise UserError(f'export: the exporter wrote an invalid ONNX model ('
                        f'{str(error).strip()[:300]}); nothing was kept. Report this with the '
                        f'MODEL_NAME and torch/onnx versions.') from None
    onnx.save(model, str(path))


def check_images(s: Settings) -> tuple[list, str]:
    """Up to CHECK_IMAGES query and gallery images of the first TARGETS dataset, as Torchreid
    lists them for evaluation, evenly spread; random images (said so, loudly) when it is not
    here. Returns (PIL images, a description for the printout)."""
    from PIL import Image
    name = dataset_list(s.TARGETS)[0]
    paths, why = _own_test_image_paths(name, s) if is_own_data(name) else \
        _test_image_paths(name, Path(s.DATA_ROOT).expanduser())
    images = []
    for path in paths:
        try:
            images.append(read_image(path))
        except UserError:           # a broken file is for test to report; skip it here
            continue
    if images:
        return images, (f'test images of "{name}" (query and gallery)' if is_own_data(name)
                        else f'test images of {name} (query and gallery) in "{s.DATA_ROOT}"')
    print(f'Note: the ONNX check runs on {RANDOM_IMAGES} RANDOM images, not on real people: '
          f'{why or "none of its test images could be read"}. It still shows that the ONNX '
          f'graph computes what PyTorch does; pass --DATA_ROOT=... to check on the run\'s data.')
    rng = np.random.default_rng(0)
    return ([Image.fromarray(rng.integers(0, 256, (s.HEIGHT, s.WIDTH, 3), dtype=np.uint8))
             for _ in range(RANDOM_IMAGES)], 'random images')


def _own_test_image_paths(name: str, s: Settings) -> tuple[list[str], str]:
    """(paths, '') or ([], why not) for a dataset of one's own (reidkit.data.own_data)."""
    try:
        data = own_data.load(name, s.TEST_SHARE, s.SPLIT_SEED)
    except UserError as error:
        return [], f'your dataset cannot be read ({error})'
    return _spread([item[0] for item in data.query + data.gallery]), \
        '' if data.query or data.gallery else f'"{name}" has no query or gallery images'


def _spread(paths: list[str]) -> list[str]:
    """Up to CHECK_IMAGES of `paths`, evenly spread."""
    picks = np.unique(np.linspace(0, len(paths) - 1, min(CHECK_IMAGES, len(paths))).astype(int))
    return [paths[i] for i in picks] if paths else []


def _test_image_paths(name: str, root: Path) -> tuple[list[str], str]:
    """(paths, '') or ([], why not). Torchreid's loader is asked only for a folder that is
    there: for a missing one it would try to download the dataset."""
    folder = dataset_dir(root, name)
    if not folder.is_dir() or not any(folder.iterdir()):
        return [], f'dataset {name!r} is not in "{folder}"'
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            dataset = torchreid_datasets()[name](root=str(root), verbose=False)
    except Exception as error:      # Torchreid's loaders raise RuntimeError, OSError, ...
        return [], f'Torchreid cannot list the {name!r} images in "{folder}" ({error})'
    paths = [item[0] for item in dataset.query + dataset.gallery]
    if not paths:
        return [], f'Torchreid finds no query or gallery images in "{folder}"'
    return _spread(paths), ''


def compare(model: torch.nn.Module, transform, extractor: meta.OnnxExtractor,
            images: list) -> tuple[float, float]:
    """(max abs difference, lowest per-image cosine) of onnxruntime's features, with its own
    preprocessing, against PyTorch's with Torchreid's transform: what search would compute
    either way. The first image goes alone, so batch 1 and batch n-1 are both checked."""
    with torch.no_grad():
        expected = model(torch.stack([transform(im) for im in images])).float().numpy()
    if not np.isfinite(expected).all():
        raise UserError('export: the checkpoint\'s own features are NaN or infinite (the model '
                        'diverged in training), so there is nothing to export. Pick an earlier '
                        'checkpoint of the run with --WEIGHTS=...')
    got = np.concatenate([extractor(images[:1]), extractor(images[1:])])
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1)
    cosines = np.where(norms > 0, (expected * got).sum(1) / np.maximum(norms, 1e-30),
                       np.all(expected == got, axis=1).astype(np.float32))
    return float(np.abs(expected - got).max()), float(cosines.min())


def _publish(temporary: Path, folder: Path) -> Path:
    """Gives the checked file its name: model.onnx, else the first free model-N.onnx. A hard
    link never replaces an existing file, even one another export made a moment ago."""
    for number in range(1, MAX_NAMES):
        path = folder / ('model.onnx' if number == 1 else f'model-{number}.onnx')
        try:
            os.link(temporary, path)
        except FileExistsError:
            continue
        except OSError:             # a file system without hard links: check, then rename
            if path.exists():
                continue
            os.rename(temporary, path)
        if number > 1:
            print(f'Note: "{folder / "model.onnx"}" exists and is kept; this export is '
                  f'{path.name}.')
        return path
    raise UserError(f'export: "{folder}" already holds model.onnx to model-{MAX_NAMES - 1}.onnx.'
                    f' Move some away and export again.')
