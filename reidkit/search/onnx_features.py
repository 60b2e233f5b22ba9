"""Features from an exported model.onnx with onnxruntime: no Torchreid, no torch.

A tracker (or `search` with an .onnx file) needs only this module (with reidkit.run.errors and
reidkit.data.images), numpy, Pillow and onnxruntime. The preprocessing is Torchreid's test
transform redone in numpy: resize to the model's HEIGHT x WIDTH (bilinear, with Pillow, as
torchvision's Resize does on a PIL image), scale to [0, 1], normalise by the mean and std
recorded in the file, NCHW.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from reidkit.data.images import upright
from reidkit.run.errors import UserError

# The metadata `python main.py export` writes into the file (ONNX metadata_props, strings);
# the first six are what this module needs to use the model.
MODEL_NAME, HEIGHT, WIDTH = 'model_name', 'input_height', 'input_width'
FEATURE_DIM, MEAN, STD = 'feature_dim', 'mean', 'std'
CHECKPOINT, EPOCH, PREPROCESSING = 'checkpoint', 'epoch', 'preprocessing'
CALIBRATION = 'calibration'     # its checkpoint's calibration entries, JSON (if it had any)
DIST_METRIC = 'dist_metric'     # the run's DIST_METRIC: 'euclidean' (squared) or 'cosine'
                                # (files exported before it was written: 'euclidean')
REQUIRED = (MODEL_NAME, HEIGHT, WIDTH, FEATURE_DIM, MEAN, STD)
PREPROCESSING_TEXT = ('RGB image resized to input_height x input_width (bilinear), scaled to '
                      '[0, 1], minus mean, divided by std (per channel), NCHW float32')


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError('onnxruntime is not installed, so an .onnx model cannot be run. '
                        'Install it with `pip install onnxruntime` (it is listed in '
                        'requirements.txt).') from None
    return onnxruntime


class OnnxExtractor:
    """`OnnxExtractor(path)(images)`: (n, feature_dim) float32 features of a list of RGB
    images (PIL images or HxWx3 uint8 arrays), computed by onnxruntime on the CPU."""

    def __init__(self, path: Path, threads: int | None = None,
                 providers: Sequence[str] = ('CPUExecutionProvider',)):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f'WEIGHTS: no ONNX model at "{self.path}". Write one with '
                            f'`python main.py export --WEIGHTS=<checkpoint>`.')
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.log_severity_level = 3          # errors only: its warnings mean nothing to a user
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=list(providers))
        except Exception as error:   # onnxruntime raises its own types for foreign files
            detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ''
            raise UserError(f'WEIGHTS: "{self.path}" is not an ONNX model onnxruntime can load '
                            f'({type(error).__name__}: {detail}). Pass a model.onnx written by '
                            f'`python main.py export`, or a checkpoint.') from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [key for key in REQUIRED if key not in self.metadata]
        if missing:
            raise UserError(f'WEIGHTS: "{self.path}" is an ONNX model, but not one written by '
                            f'`python main.py export`: its metadata lacks {", ".join(missing)}, '
                            f'so its input size and normalisation are unknown. Export the '
                            f'checkpoint again with `python main.py export --WEIGHTS=...`.')
        try:
            self.model_name = self.metadata[MODEL_NAME]
            self.height, self.width = int(self.metadata[HEIGHT]), int(self.metadata[WIDTH])
            self.feature_dim = int(self.metadata[FEATURE_DIM])
            self.mean = np.array(json.loads(self.metadata[MEAN]), dtype=np.float32)
            self.std = np.array(json.loads(self.metadata[STD]), dtype=np.float32)
        except (ValueError, TypeError) as error:
            raise UserError(f'WEIGHTS: "{self.path}" has unreadable export metadata ({error}). '
                            f'Export the checkpoint again.') from None
        self.input = self.session.get_inputs()[0]
        self._check_shapes()

    def _check_shapes(self) -> None:
        """A hand-edited file whose graph disagrees with its metadata would give wrong features
        or fail at the first batch; say so now."""
        expected = [3, self.height, self.width]
        inputs = self.input.shape[1:]     # a named (dynamic) axis is a str: any size fits
        output = self.session.get_outputs()[0].shape[-1]
        fits = (len(inputs) == 3 and self.mean.shape == self.std.shape == (3,)
                and all(not isinstance(d, int) or d == e for d, e in zip(inputs, expected))
                and (not isinstance(output, int) or output == self.feature_dim))
        if not fits:
            raise UserError(f'WEIGHTS: "{self.path}": its graph (input {self.input.shape}, '
                            f'output {output}) does not match its metadata (3x{self.height}x'
                            f'{self.width} in, {self.feature_dim} out, 3-channel mean and std). '
                            f'Export the checkpoint again.')

    def preprocess(self, images: Sequence) -> np.ndarray:
        """(n, 3, height, width) float32: Torchreid's test transform, in numpy. A PIL image
        is first turned upright as its EXIF orientation says (`Image.open` of a phone photo
        does not), as our other readers do."""
        batch = np.empty((len(images), 3, self.height, self.width), dtype=np.float32)
        for row, image in enumerate(images):
            if isinstance(image, Image.Image):
                image = upright(image)
            else:
                image = Image.fromarray(np.asarray(image, dtype=np.uint8))
            resized = image.convert('RGB').resize((self.width, self.height), Image.BILINEAR)
            pixels = np.asarray(resized, dtype=np.float32) / 255
            batch[row] = ((pixels - self.mean) / self.std).transpose(2, 0, 1)
        return batch

    def __call__(self, images: Sequence) -> np.ndarray:
        """(len(images), feature_dim) float32 features; one onnxruntime run for the list."""
        if not len(images):
            return np.empty((0, self.feature_dim), dtype=np.float32)
        features = self.session.run(None, {self.input.name: self.preprocess(images)})[0]
        return np.asarray(features, dtype=np.float32).reshape(len(images), -1)

    def __repr__(self) -> str:
        return (f'OnnxExtractor("{self.path}": {self.model_name}, {self.height}x{self.width} '
                f'-> {self.feature_dim})')
