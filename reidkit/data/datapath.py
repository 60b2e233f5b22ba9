"""A data path that keeps up with a GPU: images decoded once, augmented per batch on the device.

Torchreid's loader decodes every JPEG and augments it with PIL in worker processes, every
epoch. Here each image of a dataset list is decoded once into uint8 memory (`DecodedImages`),
and each batch is resized, augmented and normalised by tensor operations on the device the
images live on (`DeviceTransform`), in the order and with the parameters of Torchreid's
`build_transforms` for 'random_flip', 'random_crop', 'color_jitter' and 'random_erase'
(Torchreid's RandomErasing, after normalisation, its boxes drawn per image on the device).
`CachedLoader` draws indices from Torchreid's own sampler object and yields batch dicts like
Torchreid's loaders, so its engines take them unchanged. `build_cached_loaders` builds the lot
from a datamanager, or says why Torchreid's loader should be kept.

PIL works in uint8 between steps; the device steps round (resizes) or truncate (colour) to
whole levels where PIL does. Each step is then within one level of PIL's on equal input (the
colour steps equal to it); through the whole training chain one level can grow to a few, in
under 2% of pixels (tests/test_datapath.py measures it).
"""
from __future__ import annotations

import math
import multiprocessing
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from reidkit.data.images import read_image, unreadable_image, upright_size
from reidkit.run import distributed
from reidkit.run.errors import UserError
from reidkit.run.progress import progress as progress_bar

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # Torchreid's defaults when norm_mean/norm_std are None
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_NORMALISATION = (IMAGENET_MEAN, IMAGENET_STD)
SUPPORTED_TRANSFORMS = ('random_flip', 'random_crop', 'color_jitter', 'random_erase')
FLIP_PROBABILITY = 0.5                  # torchvision's RandomHorizontalFlip() default
CROP_PROBABILITY = 0.5                  # Random2DTranslation's default p
CROP_ENLARGE = 1.125                    # Random2DTranslation's enlargement before the crop
BRIGHTNESS = (0.8, 1.2)                 # Torchreid's ColorJitter(brightness=0.2, contrast=0.15)
CONTRAST = (0.85, 1.15)
# Torchreid's RandomErasing() as build_transforms makes it (Zhong et al., AAAI 2020): erases with
# probability 0.5 a box of 0.02-0.4 of the image, its aspect (height / width) uniform in
# 0.3-1/0.3, the first of up to 100 drawn boxes that fits, filled with the normalisation's mean.
ERASE_PROBABILITY = 0.5
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 100
SMALL_LIST = 64                         # fewer images than this are decoded in this process
DECODE_CHUNK = 1024                     # images decoded on the host before going to the device
GPU_SHARE = 0.5                         # most of a GPU's free memory the cache may take


def _stored_size(path: str) -> tuple[int, int]:
    """(height, width) as `read_image` gives the image (upright: its EXIF orientation
    applied), from the file's header; PIL opens lazily, so nothing is decoded."""
    try:
        with Image.open(path) as image:
            width, height = upright_size(image)
    except Exception as error:          # PIL raises many types for broken files
        raise unreadable_image(path, error) from None
    return height, width


def _stored_sizes(items: Sequence) -> list[tuple[int, int]]:
    return [_stored_size(item[0]) for item in items]


def _decode(path: str) -> np.ndarray:
    """(H, W, 3) uint8, read as Torchreid reads it, but an unreadable file is our UserError."""
    return np.array(read_image(path))     # writable, so torch.from_numpy takes it quietly


def _index_on(device: torch.device, values: Sequence[int]) -> torch.Tensor:
    """int64 `values` on `device`, made on the host (pinned for a GPU) and copied without
    waiting: torch.tensor(values, device='cuda') is a blocking copy, one GPU sync per call."""
    index = torch.tensor(values, dtype=torch.int64)
    if device.type == 'cuda':
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:              # not on Linux
        return os.cpu_count() or 1


def loader_workers(requested: int) -> int:
    """The data-loading processes WORKERS asks for, at most the cores this process may use
    (os.sched_getaffinity): more only queue for the same cores, and PyTorch warns of each
    loader that has more (its "excessive worker creation" warning)."""
    return min(requested, _cpu_count())


def _cores_per_process() -> int:
    """This process's share of the cores: under DDP the processes on a machine share them."""
    return max(1, _cpu_count() // distributed.processes_on_this_machine())


class DecodedImages:
    """Every image of a Torchreid dataset list (items `(path, pid, camid, dsetid)`) decoded once,
    at its stored size, into uint8 (3, H, W) on `device` (the CPU by default). Images of one
    size share one contiguous (N, 3, H, W) tensor; a list of mixed sizes keeps one such tensor
    per size. The tensors are made on the device first and filled DECODE_CHUNK images at a
    time, so the host never holds more than a chunk (under DDP, every process decodes).

    `workers` processes decode (None: one per core of this process's share, at most 16);
    `sizes` are the images' (height, width) when already read from their headers; `progress`
    is the progress bar's text (None: no bar). UserError naming the file for an image that
    cannot be read."""

    def __init__(self, items: Sequence, workers: int | None = None,
                 sizes: Sequence[tuple[int, int]] | None = None,
                 progress: str | None = 'Decoding images', device='cpu'):
        items = list(items)
        device = torch.device(device)
        self.paths = [str(item[0]) for item in items]
        self.pids, self.camids, self.dsetids = (
            torch.tensor(values, dtype=torch.int64).to(device) for values in (
                [int(item[1]) for item in items], [int(item[2]) for item in items],
                [int(item[3]) if len(item) > 3 else 0 for item in items]))
        sizes = list(sizes) if sizes is not None else _stored_sizes(items)
        group_of_size: dict = {}
        group, slot, counts = [], [], []
        for size in sizes:
            g = group_of_size.setdefault(size, len(group_of_size))
            if g == len(counts):
                counts.append(0)
            group.append(g)
            slot.append(counts[g])
            counts[g] += 1
        self.groups = [torch.empty((count, 3, *size), dtype=torch.uint8, device=device)
                       for size, count in zip(group_of_size, counts)]
        self._group, self._slot = group, slot   # host lists: used only for mixed sizes
        self._fill(workers, progress)

    def _fill(self, workers: int | None, progress: str | None) -> None:
        workers = workers or min(_cores_per_process(), 16)
        if workers <= 1 or len(self.paths) < SMALL_LIST:
            pool = None
            decoded = map(_decode, self.paths)
        else:
            # The default start method (fork on Linux) starts in milliseconds, as the
            # DataLoader's workers do; the workers only run PIL, never CUDA.
            pool = multiprocessing.get_context().Pool(workers)
            decoded = pool.imap(_decode, self.paths, chunksize=32)
        try:
            bar = progress_bar(decoded, total=len(self.paths), desc=progress, unit='img',
                               disable=progress is None, leave=False)
            chunk = []
            for index, array in enumerate(bar):
                height, width = self.groups[self._group[index]].shape[2:]
                if array.shape != (height, width, 3):
                    raise UserError(f'"{self.paths[index]}" decodes to {array.shape[1]}x'
                                    f'{array.shape[0]} pixels where its header says '
                                    f'{width}x{height}. Re-save it as a plain RGB JPEG or '
                                    f'PNG and run again.')
                chunk.append((index, array))
                if len(chunk) == DECODE_CHUNK:
                    self._store(chunk)
                    chunk = []
            self._store(chunk)
        finally:
            if pool is not None:
                pool.terminate()

    def _store(self, chunk: list) -> None:
        """Copies (index, (H, W, 3) array) pairs of consecutive indices to their slots: one
        copy per size, as one size's slots in a run of indices are consecutive too."""
        of_group = defaultdict(list)
        for index, array in chunk:
            of_group[self._group[index]].append((self._slot[index], array))
        for group, placed in of_group.items():
            first = placed[0][0]
            stacked = torch.from_numpy(np.stack([array for _, array in placed]))
            self.groups[group][first:first + len(placed)].copy_(stacked.permute(0, 3, 1, 2))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def uniform(self) -> bool:
        """All images have one size (one tensor; a batch is one index_select)."""
        return len(self.groups) == 1

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [tuple(group.shape[2:]) for group in self.groups]

    @property
    def device(self) -> torch.device:
        return self.groups[0].device if self.groups else self.pids.device

    def to(self, device, non_blocking: bool = False) -> 'DecodedImages':
        """Moves the images and labels to `device` (in place, like nn.Module.to)."""
        self.groups = [g.to(device, non_blocking=non_blocking) for g in self.groups]
        self.pids, self.camids, self.dsetids = (t.to(device, non_blocking=non_blocking)
                                                for t in (self.pids, self.camids, self.dsetids))
        return self

    def pin_memory(self) -> 'DecodedImages':
        """Keeps the images in page-locked host memory, for fast copies to a GPU per batch."""
        self.groups = [g.pin_memory() for g in self.groups]
        self.pids, self.camids, self.dsetids = (t.pin_memory()
                                                for t in (self.pids, self.camids, self.dsetids))
        return self

    def gather(self, indices) -> torch.Tensor | list[torch.Tensor]:
        """The images at `indices`: a (B, 3, H, W) uint8 tensor when all share one size,
        else a list of (3, H_i, W_i) tensors (mixed sizes need the indices on the host)."""
        if self.uniform:
            indices = torch.as_tensor(indices, device=self.device)
            images = self.groups[0]
            if images.is_pinned():          # gathered into pinned memory: the copy is async
                out = torch.empty((len(indices), *images.shape[1:]), dtype=images.dtype,
                                  pin_memory=True)
                return torch.index_select(images, 0, indices, out=out)
            return images.index_select(0, indices)
        indices = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        return [self.groups[self._group[i]][self._slot[i]] for i in indices]


def _transform_names(transforms) -> list[str]:
    """The transform names as build_transforms reads them: None, one string or a list."""
    if transforms is None:
        return []
    if isinstance(transforms, str):
        return [transforms.lower()]
    return [str(name).lower() for name in transforms]


def _bilinear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's bilinear resize (antialiased when shrinking) of float 0..255 images, rounded to
    whole levels as PIL's uint8 output is: within one level of it, never more."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images                       # PIL returns a copy at the same size
    resized = F.interpolate(images, size=size, mode='bilinear', antialias=True,
                            align_corners=False)
    return resized.round_().clamp_(0, 255)


def _flip_and_crop(images: torch.Tensor, flip: torch.Tensor, crop: torch.Tensor,
                   top: torch.Tensor, left: torch.Tensor,
                   enlarged: tuple[int, int]) -> torch.Tensor:
    """RandomHorizontalFlip then Random2DTranslation, in one bilinear resample per image.

    Cropping a window at (top, left) of the image enlarged with PIL's bilinear resize is
    sampling the image at that window's pixel centres mapped back (PIL clamps at the edges, as
    padding_mode='border' does); flipping first mirrors those centres. Images neither cropped
    nor flipped are sampled at their own pixel centres, which rounding returns exactly."""
    _, _, height, width = images.shape
    dtype, device = images.dtype, images.device
    # Normalised sampling coordinates (align_corners=False): 2 * centre / span - 1, where the
    # span is the enlarged size for a cropped image and the image's own size otherwise.
    span_y = torch.where(crop, enlarged[0], height).to(dtype)[:, None]
    span_x = torch.where(crop, enlarged[1], width).to(dtype)[:, None]
    centre_y = (top * crop).to(dtype)[:, None] + torch.arange(height, device=device) + 0.5
    centre_x = (left * crop).to(dtype)[:, None] + torch.arange(width, device=device) + 0.5
    grid_y = 2 * centre_y / span_y - 1                                     # (B, h)
    grid_x = 2 * centre_x / span_x - 1                                     # (B, w)
    grid_x = torch.where(flip[:, None], -grid_x, grid_x)                   # the mirror
    grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1)
    resampled = F.grid_sample(images, grid, mode='bilinear', padding_mode='border',
                              align_corners=False)
    return resampled.round_().clamp_(0, 255)                # PIL's uint8 after its resize


def _mean_grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1) mean grey level as PIL's ImageEnhance.Contrast takes it: the mean of the
    'L' conversion (ITU-R 601 luma in 16-bit fixed point), rounded to a whole level."""
    # Whole numbers below 2**24 throughout: exact in float32, and their sum in float64.
    grey = (images[:, 0] * 19595 + images[:, 1] * 38470 + images[:, 2] * 7471) \
        .add_(32768).div_(65536).floor_()
    total = grey.sum(dim=(1, 2), dtype=torch.float64)
    mean = (total / (grey.shape[1] * grey.shape[2]) + 0.5).floor()
    return mean.to(images.dtype)[:, None, None, None]


def _blend(images: torch.Tensor, anchor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(anchor, image, factor), which both ImageEnhance.Brightness (anchor
    black) and ImageEnhance.Contrast (anchor the mean grey) are: truncated to whole levels."""
    return (anchor + factor * (images - anchor)).floor_().clamp_(0, 255)


def _color_jitter(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                  brightness_first: torch.Tensor) -> torch.Tensor:
    """ColorJitter's brightness and contrast, in each image's own order: two blends whose
    anchor and factor are chosen per image, so both orders cost one pass each."""
    def per_image(values):
        return values.view(-1, 1, 1, 1)
    b, c = per_image(brightness).to(images.dtype), per_image(contrast).to(images.dtype)
    first = per_image(brightness_first)
    x = _blend(images, torch.where(first, 0.0, _mean_grey(images)), torch.where(first, b, c))
    return _blend(x, torch.where(first, _mean_grey(x), 0.0), torch.where(first, c, b))


def _erase_boxes(u: torch.Tensor, height: int, width: int) -> dict:
    """RandomErasing's choices for each image of a batch, from `u`: (B, 3 + 2 * ERASE_ATTEMPTS)
    uniform draws in [0, 1) on the batch's device (no host work).

    As Torchreid's: erase when the first draw is <= p; each attempt draws an area (a share of
    height x width) and an aspect, h = round(sqrt(area x aspect)), w = round(sqrt(area / aspect))
    (half to even, as Python's round), and the first with h < height and w < width is taken
    (none fits: no erasing); its top-left corner is uniform over every position that fits
    (random.randint's inclusive ends). All attempts are drawn at once and the first fit picked.
    Returns {'erase': bool (B,), 'erase_top', 'erase_left', 'erase_height', 'erase_width':
    long (B,)}."""
    attempts = u[:, 3:].view(-1, 2, ERASE_ATTEMPTS)
    area = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * attempts[:, 0]) * (height * width)
    aspect = ERASE_ASPECT[0] + (ERASE_ASPECT[1] - ERASE_ASPECT[0]) * attempts[:, 1]
    tall = (area * aspect).sqrt().round().long()
    wide = (area / aspect).sqrt().round().long()
    fits = (tall < height) & (wide < width)
    first = fits.int().argmax(dim=1, keepdim=True)        # the first fit (argmax: first max)
    tall, wide = tall.gather(1, first)[:, 0], wide.gather(1, first)[:, 0]
    # randint(0, n) is floor(u * (n + 1)); the minimum guards float32's rounding of u * (n + 1)
    top = torch.minimum((u[:, 1] * (height - tall + 1)).floor().long(), height - tall)
    left = torch.minimum((u[:, 2] * (width - wide + 1)).floor().long(), width - wide)
    return {'erase': (u[:, 0] <= ERASE_PROBABILITY) & fits.any(dim=1), 'erase_top': top,
            'erase_left': left, 'erase_height': tall, 'erase_width': wide}


def _erase(images: torch.Tensor, params: dict, fill: torch.Tensor) -> torch.Tensor:
    """`images` (B, C, H, W) with each chosen image's box (`_erase_boxes`) set to `fill`
    (1, C, 1, 1): one masked select over the batch."""
    _, _, height, width = images.shape
    rows = torch.arange(height, device=images.device)[None, :, None]
    cols = torch.arange(width, device=images.device)[None, None, :]

    def per_image(values):
        return values[:, None, None]
    top, left = per_image(params['erase_top']), per_image(params['erase_left'])
    inside = ((rows >= top) & (rows < top + per_image(params['erase_height']))
              & (cols >= left) & (cols < left + per_image(params['erase_width']))
              & per_image(params['erase']))
    return torch.where(inside[:, None], fill, images)


class DeviceTransform:
    """Torchreid's transforms for a batch, on the batch's device.

    Test (train=False): resize to (height, width), to [0, 1], normalise: Torchreid's
    transform_te. Train: resize, then in Torchreid's order random_flip, random_crop and
    color_jitter where named, then to [0, 1] and normalise, then random_erase where named
    (filled with the normalisation's mean, as build_transforms passes it): its transform_tr.
    Each image gets
    its own random draws, from a torch.Generator on the device (seeded: a seed repeats an
    epoch; unseeded: seeded from torch's global generator, so torch.manual_seed repeats it).
    `normalisation` is Normalize's (mean, std) per channel, ImageNet's by default."""

    def __init__(self, height: int, width: int, transforms=None, train: bool = True,
                 normalisation: tuple[Sequence[float], Sequence[float]] = IMAGENET_NORMALISATION,
                 seed: int | None = None):
        names = _transform_names(transforms) if train else []
        if not self.supports(names):
            raise ValueError(f'DeviceTransform does not implement {self.unsupported(names)}; '
                             f'use Torchreid\'s loader for them')
        self.height, self.width, self.train = height, width, train
        self.flip = 'random_flip' in names
        self.crop = 'random_crop' in names
        self.jitter = 'color_jitter' in names
        self.erase = 'random_erase' in names
        # Python's round, as Random2DTranslation's int(round(...)): half to even.
        self.enlarged_size = (int(round(height * CROP_ENLARGE)), int(round(width * CROP_ENLARGE)))
        self.norm_mean, self.norm_std = (tuple(values) for values in normalisation)
        self._seed = int(torch.randint(2 ** 62, (1,))) if seed is None else int(seed)
        self._on_device: dict = {}        # per device: its generator, mean and std

    @staticmethod
    def unsupported(transforms) -> list[str]:
        return [name for name in _transform_names(transforms) if name not in SUPPORTED_TRANSFORMS]

    @staticmethod
    def supports(transforms) -> bool:
        """Whether every named training transform is implemented here (else: Torchreid's
        loader). Unknown names count as unsupported: Torchreid ignores them, we do not guess."""
        return not DeviceTransform.unsupported(transforms)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = ('generator', str(device))
        if key not in self._on_device:
            self._on_device[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._on_device[key]

    def random_state(self) -> dict:
        """{device: its generator's state} (a checkpoint keeps it, so a resumed run draws on)."""
        return {device: generator.get_state() for (kind, device), generator
                in self._on_device.items() if kind == 'generator'}

    def set_random_state(self, state: dict) -> None:
        """Continues the draws `random_state` read, on the devices this machine has (a GPU
        it lacks: that generator starts from the seed when next used, as before)."""
        for name, generator_state in state.items():
            device = torch.device(name)
            if device.type == 'cuda' and not (torch.cuda.is_available() and
                                              (device.index or 0) < torch.cuda.device_count()):
                continue
            self._generator(device).set_state(generator_state)

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (1, 3, 1, 1) tensors on `device`, copied there once."""
        key = ('normalisation', str(device))
        if key not in self._on_device:
            self._on_device[key] = tuple(torch.tensor(values, device=device).view(1, 3, 1, 1)
                                         for values in (self.norm_mean, self.norm_std))
        return self._on_device[key]

    def draw(self, batch_size: int, device) -> dict:
        """One image's random choices per row, drawn at once on `device`. Each follows the
        Torchreid/torchvision transform it stands for (see the comments)."""
        device = torch.device(device)
        u = torch.rand((batch_size, 7), generator=self._generator(device), device=device)
        max_top = self.enlarged_size[0] - self.height
        max_left = self.enlarged_size[1] - self.width
        return {
            # RandomHorizontalFlip: flips when torch.rand(1) < p.
            'flip': u[:, 0] < FLIP_PROBABILITY,
            # Random2DTranslation: keeps the image when uniform(0, 1) > p, else enlarges and
            # crops at round(uniform(0, max)) (ends of the range half as likely as the rest).
            'crop': u[:, 1] <= CROP_PROBABILITY,
            'left': (u[:, 2] * max_left).round().long(),
            'top': (u[:, 3] * max_top).round().long(),
            # ColorJitter(brightness=0.2, contrast=0.15): factors uniform in [1-0.2, 1+0.2]
            # and [1-0.15, 1+0.15], applied in a random order (torch.randperm).
            'brightness': BRIGHTNESS[0] + (BRIGHTNESS[1] - BRIGHTNESS[0]) * u[:, 4],
            'contrast': CONTRAST[0] + (CONTRAST[1] - CONTRAST[0]) * u[:, 5],
            'brightness_first': u[:, 6] < 0.5,
            # RandomErasing: drawn only where named, so other transforms keep their draws.
            **(_erase_boxes(torch.rand((batch_size, 3 + 2 * ERASE_ATTEMPTS), device=device,
                                       generator=self._generator(device)),
                            self.height, self.width) if self.erase else {}),
        }

    def resize(self, images) -> torch.Tensor:
        """float (B, 3, height, width) in whole levels 0..255, from a uint8 batch or a list of
        uint8 images of mixed sizes (resized a size at a time)."""
        size = (self.height, self.width)
        if isinstance(images, torch.Tensor):
            return _bilinear(images.float(), size)
        out = torch.empty((len(images), 3, *size), device=images[0].device)
        slots_of_size = defaultdict(list)
        for slot, image in enumerate(images):
            slots_of_size[tuple(image.shape)].append(slot)
        for slots in slots_of_size.values():
            same = torch.stack([images[slot] for slot in slots]).float()
            out[_index_on(out.device, slots)] = _bilinear(same, size)
        return out

    def apply(self, images, params: dict | None = None) -> torch.Tensor:
        """The transform with the given random choices (None: none, the test transform)."""
        x = self.resize(images)
        if params is not None:
            if self.flip or self.crop:
                x = _flip_and_crop(x, params['flip'] & self.flip, params['crop'] & self.crop,
                                   params['top'], params['left'], self.enlarged_size)
            if self.jitter:
                x = _color_jitter(x, params['brightness'], params['contrast'],
                                  params['brightness_first'])
        mean, std = self._normalisation(x.device)
        x = (x / 255 - mean) / std
        if params is not None and self.erase:
            x = _erase(x, params, mean)
        return x.contiguous()

    def __call__(self, images) -> torch.Tensor:
        if not self.train:
            return self.apply(images)
        first = images if isinstance(images, torch.Tensor) else images[0]
        count = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        return self.apply(images, self.draw(count, first.device))


class CachedLoader:
    """One epoch of batches from decoded images, like a Torchreid DataLoader with the same
    sampler, batch_size and drop_last: batch dicts {'img', 'pid', 'camid', 'impath', 'dsetid'}
    whose tensors are on `device`. The sampler's indices go to the device once an epoch; a
    batch is then a slice, a gather and the transform, with no host work in between."""

    def __init__(self, images: DecodedImages, transform: DeviceTransform, sampler,
                 batch_size: int, drop_last: bool, device=None):
        self.images, self.transform, self.sampler = images, transform, sampler
        self.batch_size, self.drop_last = batch_size, drop_last
        self.device = torch.device(device) if device is not None else images.device

    def __len__(self) -> int:
        count = len(self.sampler)           # what DataLoader's len reads, estimate or not
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        order = list(iter(self.sampler))    # Torchreid's sampler, drawn on the host as before
        store = self.images.device          # where the images are gathered
        indices = _index_on(store, order)
        count = len(order) // self.batch_size if self.drop_last else \
            math.ceil(len(order) / self.batch_size)
        for start in range(0, count * self.batch_size, self.batch_size):
            batch = indices[start:start + self.batch_size]
            images = self.images.gather(batch if self.images.uniform
                                        else order[start:start + self.batch_size])
            if store != self.device:        # pinned on the host: copy the batch over
                images = images.to(self.device, non_blocking=True) \
                    if isinstance(images, torch.Tensor) else \
                    [image.to(self.device, non_blocking=True) for image in images]
            yield {
                'img': self.transform(images),
                'pid': self.images.pids[batch].to(self.device, non_blocking=True),
                'camid': self.images.camids[batch].to(self.device, non_blocking=True),
                'impath': [self.images.paths[i] for i in order[start:start + self.batch_size]],
                'dsetid': self.images.dsetids[batch].to(self.device, non_blocking=True),
            }


def loader_like(loader: DataLoader, dataset=None, workers: int | None = None,
                sampler=None) -> DataLoader:
    """A DataLoader like `loader` (sampler, batch size, drop_last, pinning), with `dataset`,
    `workers` processes and `sampler` instead where given."""
    workers = loader.num_workers if workers is None else workers
    return DataLoader(loader.dataset if dataset is None else dataset,
                      batch_size=loader.batch_size,
                      sampler=loader.sampler if sampler is None else sampler,
                      num_workers=workers, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last)


def machine_workers() -> int:
    """Loader processes for a machine whose images are decoded by Torchreid's loader: one per
    core of this process's share (LOCAL_WORLD_SIZE processes share the machine), leaving one
    for the training process, at most 16."""
    return max(1, min(16, _cores_per_process() - 1))


def with_machine_workers(datamanager) -> int | None:
    """Gives the datamanager's loaders one worker per spare core where they have fewer;
    the new count, or None where nothing changed."""
    workers = machine_workers()
    if datamanager.train_loader.num_workers >= workers:
        return None
    datamanager.train_loader = loader_like(datamanager.train_loader, workers=workers)
    datamanager.test_loader = {
        name: {split: loader_like(loader, workers=workers) for split, loader in splits.items()}
        for name, splits in datamanager.test_loader.items()}
    return workers


def _normalisation(datamanager) -> tuple:
    """(mean, std) of the datamanager's own Normalize, so custom norm_mean/norm_std hold."""
    for step in getattr(datamanager.transform_te, 'transforms', []):
        if hasattr(step, 'mean') and hasattr(step, 'std'):
            return tuple(step.mean), tuple(step.std)
    return IMAGENET_NORMALISATION


def dataset_of(loader):
    """The Torchreid dataset under a loader, unwrapped from reidkit's reading wrapper."""
    dataset = loader.dataset
    return dataset if hasattr(dataset, 'data') else dataset.dataset


@dataclass(frozen=True)
class CacheRequest:
    """What `build_cached_loaders` builds: images resized to (height, width) and augmented by
    `transforms` (Torchreid's names) on `device`, at most `cap_gib` GiB decoded; the training
    split only with `train` (test and visrank never read it); training draws from `seed`
    (None: from torch's global generator); `workers` decoding processes (None: one per core);
    test features `test_batch_size` images at a time where given (BATCH_SIZE_TEST if larger):
    evaluation has no gradients to keep, so a GPU takes far more than 100 at once."""
    transforms: Sequence[str] | str | None
    height: int
    width: int
    device: torch.device | str
    cap_gib: float
    seed: int | None = None
    workers: int | None = None
    test_batch_size: int | None = None
    train: bool = True


def _no_room(gib: float, request: CacheRequest) -> str | None:
    """Why `gib` GiB of decoded images cannot be kept on `request.device` (over DATA_CACHE_GB,
    or over GPU_SHARE of a GPU's free memory: the rest is the model's, its activations' and
    the optimiser's), in words for the path line; None when they fit."""
    if gib > request.cap_gib:
        return f'the decoded images would take {gib:.2f} GiB, over DATA_CACHE_GB=' \
               f'{request.cap_gib:g}'
    device = torch.device(request.device)
    if device.type != 'cuda':
        return None
    free_gib = torch.cuda.mem_get_info(device)[0] / 2 ** 30
    if gib > GPU_SHARE * free_gib:
        return f'the decoded images would take {gib:.2f} GiB, over {GPU_SHARE:.0%} of the ' \
               f'GPU\'s free memory ({free_gib:.1f} GiB free)'
    return None


def build_cached_loaders(datamanager, request: CacheRequest):
    """(loaders, why): loaders is (train_loader, test_loaders) over images decoded once and
    kept on `request.device`, with test_loaders shaped like Torchreid's {name: {'query',
    'gallery'}} and train_loader None without `request.train`; or None when Torchreid's loader
    must stay (transforms not implemented here, k_tfm > 1, more than `request.cap_gib` GiB
    decoded, or more than GPU_SHARE of a GPU's free memory). `why` says which path, in words
    for the log. UserError naming the file for an image that cannot be read."""
    names = _transform_names(request.transforms)
    if not DeviceTransform.supports(names):
        return None, (f'{", ".join(DeviceTransform.unsupported(names))} not implemented on '
                      f'the device')
    train_data = dataset_of(datamanager.train_loader)
    if request.train and getattr(train_data, 'k_tfm', 1) != 1:
        return None, f'k_tfm={train_data.k_tfm} not implemented on the device'
    # (train?, loader, its dataset list), train first; test loaders keyed by (name, split).
    lists = {None: (True, datamanager.train_loader, train_data.data)} if request.train else {}
    for name, splits in datamanager.test_loader.items():
        for split, loader in splits.items():
            lists[(name, split)] = (False, loader, dataset_of(loader).data)
    sizes = {key: _stored_sizes(data) for key, (_, _, data) in lists.items()}
    gib = sum(3 * h * w for found in sizes.values() for h, w in found) / 2 ** 30
    too_large = _no_room(gib, request)
    if too_large:
        return None, too_large
    normalisation = _normalisation(datamanager)
    size = (request.height, request.width)
    train_transform = DeviceTransform(*size, names, train=True, normalisation=normalisation,
                                      seed=request.seed)
    test_transform = DeviceTransform(*size, train=False, normalisation=normalisation)
    cached = {}
    for key, (is_train, loader, data) in lists.items():
        what = 'train' if is_train else ' '.join(key)
        images = DecodedImages(data, workers=request.workers, sizes=sizes[key],
                               progress=f'Decoding {what} images', device=request.device)
        batch_size = loader.batch_size if is_train else \
            max(loader.batch_size, request.test_batch_size or 0)
        cached[key] = CachedLoader(images, train_transform if is_train else test_transform,
                                   loader.sampler, batch_size, loader.drop_last)
    test_loaders = {name: {split: cached[(name, split)] for split in splits}
                    for name, splits in datamanager.test_loader.items()}
    return (cached.get(None), test_loaders), f'{gib:.2f} GiB decoded'
