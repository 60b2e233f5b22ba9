"""One feature extractor for search and export: a trained checkpoint through Torchreid, or an
exported model.onnx through onnxruntime alone (no Torchreid), with its own preprocessing and,
when FLIP_TEST asks, the flip-test average; the images it reads, decoded in threads.

Torchreid is imported inside the function that builds a checkpoint's model
(reidkit.run.model.build_model), so a search with an .onnx file never imports it.
"""
from __future__ import annotations

import contextlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from reidkit.data import checks
from reidkit.data.images import read_image
from reidkit.evaluate.calibration import Calibration, for_checkpoint, from_onnx_metadata
from reidkit.evaluate.metrics import flip_averaged
from reidkit.run.checkpoints import checkpoint_classes, load_weights
from reidkit.run.device import choose_device, place_model
from reidkit.run.errors import UserError
from reidkit.run.progress import progress
from reidkit.run.folders import resolve_checkpoint
from reidkit.run.model import build_model
from reidkit.run.settings import BEFORE_RECORDED, Settings
from reidkit.search.onnx_features import CALIBRATION, DIST_METRIC, OnnxExtractor

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')


def list_images(folder: Path, outputs: Path | None = None) -> list[Path]:
    """Every image under `folder`, recursively, in a stable order; none under `outputs` (our
    own EXPERIMENTS_DIR, where earlier searches wrote their strips)."""
    return sorted(images_under(folder, outputs))


def images_under(folder: Path, outputs: Path | None = None) -> Iterator[Path]:
    """list_images's images as they are found, unsorted (`next()` of it: whether there is one)."""
    outputs = Path(outputs).resolve() if outputs else None
    return (p for p in Path(folder).rglob('*')
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and
            not (outputs and p.resolve().is_relative_to(outputs)))


def decode(path: Path) -> tuple[Image.Image | None, str]:
    """(the image, '') or (None, why it cannot be used)."""
    try:
        return read_image(str(path)), ''
    except UserError as error:
        return None, str(error)


def extract_batches(model: nn.Module, transform, paths: list[Path], batch_size: int,
                    device: torch.device, description: str
                    ) -> Iterator[tuple[list[Path], np.ndarray | None, list[tuple[Path, str]]]]:
    """Yields (readable paths, their (n, dim) float32 features or None when there are none,
    [(unreadable path, why)]) batch by batch, with a progress bar; decoding runs in threads
    ahead of the model."""
    model.eval()
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool, \
            progress(total=len(paths), desc=description, unit='img') as bar:
        for start in range(0, len(paths), batch_size):
            batch = paths[start:start + batch_size]
            decoded = list(zip(batch, pool.map(decode, batch)))
            good = [(path, image) for path, (image, _) in decoded if image is not None]
            bad = [(path, why) for path, (image, why) in decoded if image is None]
            features = None
            if good:
                tensor = torch.stack([transform(image) for _, image in good]).to(device)
                with torch.no_grad():
                    features = model(tensor).float().cpu().numpy()
            bar.update(len(batch))
            yield [path for path, _ in good], features, bad


def checkpoint_model(checkpoint: dict, path: Path, s: Mapping[str, Any]) -> nn.Module:
    """The checkpoint's model (`s`: the settings to evaluate it with, its own MODEL_NAME, NECK
    and LAST_STRIDE: resolve_checkpoint), built as training built it but without ImageNet
    weights (the checkpoint replaces them)."""
    classes = checkpoint_classes(checkpoint, s['MODEL_NAME']) or 1
    model = build_model(s, num_classes=classes, pretrained=False)
    load_weights(model, checkpoint, s['MODEL_NAME'], path)
    return model


def quiet_test_transform(height: int, width: int):
    """Torchreid's test transform (resize, tensor, ImageNet normalisation), built silently."""
    from torchreid.reid.data.transforms import build_transforms
    with contextlib.redirect_stdout(io.StringIO()):
        return build_transforms(height, width, transforms=[])[1]


class FlipTest(nn.Module):
    """FLIP_TEST: the mean of the features of each image and of its mirror image."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return flip_averaged(self.model, images)


class OnnxModel(nn.Module):
    """An exported model.onnx in the place of the PyTorch model: onnxruntime computes the
    features (`reidkit.search.onnx_features`, no Torchreid), `transform` is its own
    preprocessing."""

    def __init__(self, path: Path):
        super().__init__()
        self.extractor = OnnxExtractor(path)

    def transform(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.extractor.preprocess([image])[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        session, name = self.extractor.session, self.extractor.input.name
        return torch.from_numpy(np.asarray(session.run(None, {name: images.numpy()})[0],
                                           dtype=np.float32))


@dataclass(frozen=True)
class FeatureExtractor:
    """A model with its preprocessing: `transform` turns a PIL image into the model's input
    tensor; the model maps a batch of them to (n, dim) features on `device`. `source` is the
    checkpoint or .onnx file, `key` what else decides its features (model, input size,
    flip-test): with the file's identity, they name the gallery's feature cache.
    `calibration`: the match thresholds that came with the model (its checkpoint's record,
    or the .onnx file's metadata), None when unknown."""
    model: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    device: torch.device
    source: Path
    key: str
    calibration: Calibration | None = None

    def flip_tested(self) -> FeatureExtractor:
        """The same extractor averaging each image's features with its mirror image's."""
        return replace(self, model=FlipTest(self.model), key=self.key + '|flip')

    def batches(self, paths: list[Path], batch_size: int,
                description: str) -> Iterator[tuple[list, np.ndarray]]:
        """extract_batches with this model and preprocessing."""
        return extract_batches(self.model, self.transform, paths, batch_size, self.device,
                               description)


def load_extractor(s: Settings, weights: Path | None) -> tuple[FeatureExtractor, Settings]:
    """The feature extractor for a search, flip-tested when FLIP_TEST says so, and the
    settings (a checkpoint's own MODEL_NAME, input size, ... in place): an exported .onnx
    file through onnxruntime alone, or a PyTorch checkpoint (`weights`, WEIGHTS or the newest
    run's) through Torchreid. DIST_METRIC, unless given on the command line, is the one the
    checkpoint's run recorded, or the one the .onnx file's metadata names ('euclidean' for
    files that name none). UserError when the file is missing or not a model."""
    given = Path(weights or s.WEIGHTS or '')
    if given.suffix.lower() == '.onnx':
        extractor, s = _onnx_extractor(given, s)
    else:
        extractor, s = _checkpoint_extractor(s, weights)
    return (extractor.flip_tested() if s.FLIP_TEST else extractor), s


def _onnx_extractor(path: Path, s: Settings) -> tuple[FeatureExtractor, Settings]:
    if not path.is_file():
        raise UserError(f'WEIGHTS: "{path}" does not exist. Pass an exported model.onnx '
                        f'(python main.py export writes one beside its checkpoint).')
    model = OnnxModel(path)
    meta = model.extractor
    s = _with_onnx_metric(s, meta.metadata.get(DIST_METRIC), path)
    print(f'Model: "{path}" (ONNX, run by onnxruntime; {meta.model_name}, '
          f'{meta.height}x{meta.width} input)')
    return FeatureExtractor(model, model.transform, torch.device('cpu'), path,
                            f'onnx|{meta.model_name}|{meta.height}x{meta.width}',
                            from_onnx_metadata(meta.metadata.get(CALIBRATION), path)), s


def _with_onnx_metric(s: Settings, named: str | None, path: Path) -> Settings:
    """`s` with the DIST_METRIC an exported file's metadata names (BEFORE_RECORDED's for a
    file exported before it was written), unless given on the command line. UserError for a
    name that is no metric."""
    if 'DIST_METRIC' in s.given:
        return s
    metric = BEFORE_RECORDED['DIST_METRIC'] if named is None else named
    if metric not in checks.DIST_METRICS:
        raise UserError(f'WEIGHTS: "{path}" names DIST_METRIC={metric!r} in its metadata, '
                        f'which is no metric this version knows ('
                        f'{", ".join(map(repr, checks.DIST_METRICS))}). Export the checkpoint '
                        f'again, or pass --DIST_METRIC=... to choose one.')
    # as a checkpoint's recorded settings are taken: not counted as given on the command line
    return Settings({**s, 'DIST_METRIC': metric}, s.given, s.preset)


def _checkpoint_extractor(s: Settings,
                          weights: Path | None) -> tuple[FeatureExtractor, Settings]:
    checkpoint, saved, s = resolve_checkpoint(s, weights)
    checks.check_names(s)
    device = choose_device(s.DEVICE)
    model = place_model(checkpoint_model(saved, checkpoint, s), device)
    print(f'Model: "{checkpoint}" (epoch {saved.get("epoch", "?")}; {s.MODEL_NAME}, '
          f'{s.HEIGHT}x{s.WIDTH} input, on {device.type})')
    # Where place_model put it (under DDP: this process's GPU): its inputs go there.
    device = next(model.parameters(), torch.empty(0)).device
    return FeatureExtractor(model, quiet_test_transform(s.HEIGHT, s.WIDTH), device, checkpoint,
                            f'{s.MODEL_NAME}|{s.HEIGHT}x{s.WIDTH}',
                            for_checkpoint(checkpoint, Path(s.EXPERIMENTS_DIR))), s
