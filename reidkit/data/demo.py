"""Writes the embedded demo dataset: synthetic pedestrians in Market-1501's exact folder layout.

Torchreid's own Market1501 loader reads the result, so the demo exercises the real pipeline.
Identities differ by what a re-id model should learn (clothing colours and patterns, carried
objects, build); cameras change what it should ignore (light, colour cast, blur, scale,
position, background). Everything is drawn from one seeded generator: the same arguments
always give the same files.
"""
from __future__ import annotations

import colorsys
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from reidkit.data.market import SPLIT_FOLDERS, market_data_dir, name_labels
from reidkit.run.atomic import exclusive
from reidkit.run.errors import UserError
from reidkit.run.words import counted

# Market-1501's crops are 128 high and 64 wide, taken by 6 cameras.
IMAGE_HEIGHT = 128
IMAGE_WIDTH = 64
NUM_CAMERAS = 6
# Written first and last: a folder with the first is ours (safe to replace); one with the
# last is complete (an interrupted generation is redone).
STARTED_MARKER = '.demo-started'
DONE_MARKER = '.demo-complete'
# Beside the data folder (in DATA_ROOT/market1501/): held while generating, so that two demo
# runs started at once do not write the same folder together. Never deleted (that would race).
LOCK_FILE = '.demo.lock'

GENERATOR_VERSION = 3        # bump when drawing changes, so old demo folders are regenerated
PATTERNS = ('solid', 'horizontal_stripes', 'vertical_stripes', 'checks')
CARRIED = ('nothing', 'bag_left', 'bag_right', 'backpack')


@dataclass(frozen=True)
class Person:
    """What stays the same for one identity in every camera."""
    upper: np.ndarray
    upper_second: np.ndarray
    pattern: str
    lower: np.ndarray
    shoes: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    carried: str
    carried_colour: np.ndarray
    width_scale: float
    height_scale: float


@dataclass(frozen=True)
class Camera:
    """What one camera does to every picture it takes."""
    background: np.ndarray
    floor: np.ndarray
    clutter: tuple
    gain: float
    cast: np.ndarray
    blur: float
    scale: float
    shift_y: int


@dataclass(frozen=True)
class DemoSummary:
    """What was written, for printing and for tests."""
    data_dir: Path
    train_ids: int
    train_images: int
    query_ids: int
    query_images: int
    gallery_ids: int
    gallery_images: int


NEUTRALS = (np.array([235.0, 235, 235]), np.array([128.0, 128, 128]), np.array([30.0, 30, 30]))


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A clothing colour: one of 12 hues at two saturations and two brightnesses, or white,
    grey or black; coarse, so that two people can share one, yet each stays recognisable
    under every camera's light."""
    pick = rng.integers(12 * 4 + len(NEUTRALS))
    if pick >= 48:
        return NEUTRALS[pick - 48].copy()
    hue, saturation, value = pick // 4 / 12.0, (0.5, 0.9)[pick % 2], (0.45, 0.9)[pick // 2 % 2]
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255.0


def _make_person(rng: np.random.Generator) -> Person:
    return Person(
        upper=_colour(rng),
        upper_second=_colour(rng),
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        lower=_colour(rng),
        shoes=_colour(rng) * 0.5,
        skin=np.array([230, 190, 160]) * rng.uniform(0.45, 1.0),
        hair=_colour(rng) * rng.uniform(0.2, 0.6),
        carried=CARRIED[rng.integers(len(CARRIED))],
        carried_colour=_colour(rng),
        width_scale=float(rng.uniform(0.8, 1.2)),
        height_scale=float(rng.uniform(0.9, 1.05)),
    )


def _make_camera(rng: np.random.Generator) -> Camera:
    clutter = tuple(
        (
            int(rng.integers(0, IMAGE_WIDTH)), int(rng.integers(0, IMAGE_HEIGHT)),
            int(rng.integers(6, 30)), int(rng.integers(6, 50)), _colour(rng),
        )
        for _ in range(rng.integers(2, 5))
    )
    return Camera(
        background=_colour(rng),
        floor=_colour(rng) * 0.7,
        clutter=clutter,
        gain=float(rng.uniform(0.85, 1.15)),
        cast=rng.uniform(0.92, 1.08, size=3),
        blur=float(rng.uniform(0.0, 1.3)),
        scale=float(rng.uniform(0.8, 1.0)),
        shift_y=int(rng.integers(-6, 7)),
    )


def _box(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour) -> None:
    """Fills the rectangle [x0, x1) x [y0, y1), clipped to the canvas."""
    height, width = canvas.shape[:2]
    xa, xb = max(int(round(x0)), 0), min(int(round(x1)), width)
    ya, yb = max(int(round(y0)), 0), min(int(round(y1)), height)
    if xa < xb and ya < yb:
        canvas[ya:yb, xa:xb] = colour


def _ellipse(canvas: np.ndarray, cx: float, cy: float, rx: float, ry: float, colour) -> None:
    height, width = canvas.shape[:2]
    ys, xs = np.ogrid[:height, :width]
    canvas[((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0] = colour


def _draw_background(camera: Camera, rng: np.random.Generator) -> np.ndarray:
    canvas = np.empty((IMAGE_HEIGHT, IMAGE_WIDTH, 3))
    # The camera's scene, but lit and passed-by differently each time: most of the wall colour
    # and some clutter change per picture, so the background is a nuisance to learn to ignore.
    canvas[:] = 0.25 * camera.background + 0.75 * _colour(rng)
    _box(canvas, 0, IMAGE_HEIGHT * 0.75, IMAGE_WIDTH, IMAGE_HEIGHT, camera.floor)
    dx, dy = rng.integers(-8, 9, size=2)
    for x, y, w, h, colour in camera.clutter:
        _box(canvas, x + dx, y + dy, x + dx + w, y + dy + h, colour)
    for _ in range(2):
        x, y = rng.integers(0, IMAGE_WIDTH), rng.integers(0, IMAGE_HEIGHT)
        _box(canvas, x, y, x + rng.integers(6, 24), y + rng.integers(6, 40), _colour(rng))
    return canvas


def _draw_torso(canvas, person: Person, x0, y0, x1, y1) -> None:
    _box(canvas, x0, y0, x1, y1, person.upper)
    if person.pattern == 'solid':
        return
    period = 6
    for k in range(int((max(y1 - y0, x1 - x0)) // period) + 1):
        if person.pattern in ('horizontal_stripes', 'checks'):
            yy = y0 + k * period
            _box(canvas, x0, yy, x1, min(yy + period / 2, y1), person.upper_second)
        if person.pattern in ('vertical_stripes', 'checks'):
            xx = x0 + k * period
            _box(canvas, xx, y0, min(xx + period / 2, x1), y1, person.upper_second)


def _draw_person(canvas: np.ndarray, person: Person, camera: Camera,
                 rng: np.random.Generator, partial: bool = False) -> None:
    """Draws a standing person; `partial` crops them like a bad detection (Market's junk)."""
    scale = camera.scale * person.height_scale * rng.uniform(0.95, 1.05)
    body_h = IMAGE_HEIGHT * 0.9 * scale
    half_w = IMAGE_WIDTH * 0.27 * person.width_scale * scale
    cx = IMAGE_WIDTH / 2 + rng.uniform(-4, 4)
    top = (IMAGE_HEIGHT - body_h) / 2 + camera.shift_y + rng.uniform(-3, 3)
    if partial:
        cx += rng.choice([-1, 1]) * IMAGE_WIDTH * 0.45
        top += rng.uniform(-0.4, 0.4) * IMAGE_HEIGHT
    head_r = body_h * 0.07
    neck = top + head_r * 2
    waist = top + body_h * 0.5
    feet = top + body_h
    stride = rng.uniform(0, half_w * 0.5)

    if person.carried == 'backpack':
        _box(canvas, cx - half_w * 1.15, neck + 2, cx + half_w * 1.15, waist - 6,
             person.carried_colour)
    # legs, shoes, torso, arms, head, hair
    _box(canvas, cx - half_w * 0.8 - stride, waist, cx - 1, feet - 4, person.lower)
    _box(canvas, cx + 1, waist, cx + half_w * 0.8 + stride, feet - 4, person.lower)
    _box(canvas, cx - half_w * 0.8 - stride, feet - 4, cx - 1, feet, person.shoes)
    _box(canvas, cx + 1, feet - 4, cx + half_w * 0.8 + stride, feet, person.shoes)
    _draw_torso(canvas, person, cx - half_w, neck, cx + half_w, waist + 2)
    _box(canvas, cx - half_w - 4, neck + 2, cx - half_w, waist - 2, person.upper)
    _box(canvas, cx + half_w, neck + 2, cx + half_w + 4, waist - 2, person.upper)
    _ellipse(canvas, cx, top + head_r, head_r * 0.85, head_r, person.skin)
    _box(canvas, cx - head_r * 0.85, top, cx + head_r * 0.85, top + head_r * 0.6, person.hair)
    if person.carried in ('bag_left', 'bag_right'):
        side = -1 if person.carried == 'bag_left' else 1
        bx = cx + side * (half_w + 6)
        _box(canvas, bx - 5, waist - 8, bx + 5, waist + 10, person.carried_colour)


def _photograph(canvas: np.ndarray, camera: Camera, rng: np.random.Generator) -> Image.Image:
    """Applies the camera's light, colour cast, noise and blur."""
    light = camera.gain * rng.uniform(0.9, 1.1)
    pixels = canvas * camera.cast * light + rng.normal(0, 6, size=canvas.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if camera.blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(camera.blur))
    return image


def _render(person: Person | None, camera: Camera, rng: np.random.Generator,
            partial: bool = False) -> Image.Image:
    canvas = _draw_background(camera, rng)
    if person is not None:
        _draw_person(canvas, person, camera, rng, partial=partial)
    return _photograph(canvas, camera, rng)


def _make_data_root(root: Path) -> None:
    """Creates DATA_ROOT/market1501/ for the demo, or says in one paragraph why it cannot."""
    root = Path(root)
    try:
        market_data_dir(root).parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocking = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()),
                        None)
        reason = f'"{blocking}" is a file, not a folder' if blocking else error.strerror
        raise UserError(
            f'DATA_ROOT: cannot make the demo dataset in "{root}": {reason}. Point --DATA_ROOT '
            f'at a folder you can write in (config.DEMO uses "demo-data").'
        ) from None


def _generation_lock(folder: Path):
    """Holds an exclusive lock on `folder`/LOCK_FILE; says so when it has to wait for it."""
    return exclusive(folder / LOCK_FILE, f'Waiting for another run to finish generating the '
                                         f'demo dataset in "{folder}" ...')


# The seed of the demo dataset `python main.py --demo` writes. Not SEED (the training seed):
# changing that must never regenerate, under earlier runs, the data they recorded.
DEMO_DATA_SEED = 1


def make_demo_dataset(root: Path, num_train_ids: int = 100, num_test_ids: int = 60,
                      seed: int = 0, gallery_extras: int = 30,
                      images_per_camera: tuple[int, int] = (2, 4)) -> DemoSummary:
    """Writes train and test identities under `root` in Market-1501's layout.

    Like Market-1501: train and test identities are disjoint; every test identity is seen by at
    least two cameras and has one query image per camera; the gallery also holds
    `gallery_extras` junk detections (pid -1, ignored by the loader) and as many distractors
    (pid 0000). `images_per_camera`: (fewest, most) images of a person per camera.
    If `root` already holds a complete dataset made with the same arguments it is kept.
    Runs started at once on one `root` take turns: the later ones find it complete.
    Raises ValueError for no train or no test identity, UserError for a DATA_ROOT it cannot
    write or one holding data it did not generate.
    """
    if num_train_ids < 1 or num_test_ids < 1:
        raise ValueError('make_demo_dataset needs at least one train and one test identity')
    data_dir = market_data_dir(root)
    signature = (f'version={GENERATOR_VERSION} train={num_train_ids} test={num_test_ids} '
                 f'seed={seed} junk={gallery_extras} distractors={gallery_extras} '
                 f'per_camera={images_per_camera}')
    _make_data_root(root)
    with _generation_lock(data_dir.parent):    # a second run waits here, then finds it done
        marker = data_dir / DONE_MARKER
        if marker.is_file() and marker.read_text() == signature:
            return summarise_market_dir(data_dir)
        _start_generation(data_dir, signature)
        _draw_dataset(_ImageWriter(data_dir), np.random.default_rng(seed),
                      (num_train_ids, num_test_ids), gallery_extras, images_per_camera)
        marker.write_text(signature)
    return summarise_market_dir(data_dir)


def _start_generation(data_dir: Path, signature: str) -> None:
    """Empties `data_dir` for a new generation (only when the demo made what it holds) and
    marks it as ours; UserError when it holds data the demo did not generate."""
    if data_dir.exists() and any(data_dir.iterdir()):
        if not (data_dir / STARTED_MARKER).is_file():
            raise UserError(
                f'DATA_ROOT: "{data_dir}" already holds data that the demo did not '
                f'generate, so --demo will not overwrite it. Point --DATA_ROOT at another '
                f'folder for the demo (config.DEMO uses "demo-data"), or move that data '
                f'away first.'
            )
        shutil.rmtree(data_dir)
    for folder in SPLIT_FOLDERS.values():
        (data_dir / folder).mkdir(parents=True)
    (data_dir / STARTED_MARKER).write_text(signature)


class _ImageWriter:
    """Saves images under Market-1501 names, numbering frames in the order they are saved."""

    def __init__(self, data_dir: Path):
        self.data_dir, self.frame = data_dir, 0

    def save(self, image: Image.Image, split: str, pid: int, cam: int, det: int) -> None:
        """`split`: train, query or gallery; `cam` from 0; `pid` -1 for junk."""
        self.frame += 25
        person = f'{pid:04d}' if pid >= 0 else '-1'
        name = f'{person}_c{cam + 1}s1_{self.frame:06d}_{det:02d}.jpg'
        image.save(self.data_dir / SPLIT_FOLDERS[split] / name, quality=90)


def _draw_dataset(writer: _ImageWriter, rng: np.random.Generator, identities: tuple[int, int],
                  gallery_extras: int, images_per_camera: tuple[int, int]) -> None:
    """Draws (train, test) `identities` people, then the gallery's junk and distractors."""
    num_train_ids, num_test_ids = identities
    cameras = [_make_camera(rng) for _ in range(NUM_CAMERAS)]
    pids = rng.permutation(np.arange(1, 1502))[:num_train_ids + num_test_ids]
    for index, pid in enumerate(pids):
        person = _make_person(rng)
        is_train = index < num_train_ids
        seen_by = rng.choice(NUM_CAMERAS, size=rng.integers(2, 5), replace=False)
        for cam in sorted(seen_by):
            # a test identity needs a query and a gallery image per camera
            fewest = images_per_camera[0] if is_train else max(images_per_camera[0], 2)
            for det in range(1, int(rng.integers(fewest, images_per_camera[1] + 1)) + 1):
                split = 'train' if is_train else 'query' if det == 1 else 'gallery'
                writer.save(_render(person, cameras[cam], rng), split, pid, cam, det)
    for _ in range(gallery_extras):
        cam = int(rng.integers(NUM_CAMERAS))
        writer.save(_render(_make_person(rng), cameras[cam], rng, partial=True), 'gallery', -1,
                    cam, 1)
    for _ in range(gallery_extras):
        cam = int(rng.integers(NUM_CAMERAS))
        writer.save(_render(None, cameras[cam], rng), 'gallery', 0, cam, 1)


def summarise_market_dir(data_dir: Path) -> DemoSummary:
    """Counts identities and images per split the way Market-1501's loader does (pid -1 skipped)."""
    counts = {}
    for split, folder in SPLIT_FOLDERS.items():
        pids = [pid for pid, _ in name_labels(p.name for p in (data_dir / folder).glob('*.jpg'))]
        counts[split] = (len(set(pids)), len(pids))
    return DemoSummary(
        data_dir=data_dir,
        train_ids=counts['train'][0], train_images=counts['train'][1],
        query_ids=counts['query'][0], query_images=counts['query'][1],
        gallery_ids=counts['gallery'][0], gallery_images=counts['gallery'][1],
    )


# Camera names of `make_identity_folders`: any folder name is a camera (docs/own-data.md).
IDENTITY_FOLDER_CAMERAS = ('door', 'hall', 'lift', 'yard', 'gate', 'shop')


def make_identity_folders(root: Path, num_ids: int = 60, seed: int = 0,
                          num_cameras: int = 4, images_per_camera: tuple[int, int] = (2, 3)
                          ) -> Path:
    """Writes the demo's synthetic people in the folder-per-identity layout of one's own data:
    `root/person-<n>/<camera>/<k>.jpg` (cameras named `IDENTITY_FOLDER_CAMERAS`, no split
    folders: the split is made by TEST_SHARE and SPLIT_SEED). Each person is seen by two or
    more of `num_cameras` cameras. Same arguments, same files; another seed draws other
    people. Prints one line saying what it wrote; returns `root`. Raises ValueError for
    num_ids < 2 or num_cameras outside 2..6."""
    if num_ids < 2 or not 2 <= num_cameras <= len(IDENTITY_FOLDER_CAMERAS):
        raise ValueError('make_identity_folders needs 2+ identities and 2 to 6 cameras')
    root = Path(root)
    rng = np.random.default_rng(seed)
    cameras = [_make_camera(rng) for _ in range(num_cameras)]
    images = 0
    for n in range(1, num_ids + 1):
        person = _make_person(rng)
        seen_by = rng.choice(num_cameras, size=rng.integers(2, num_cameras + 1), replace=False)
        for cam in sorted(seen_by):
            folder = root / f'person-{n:03d}' / IDENTITY_FOLDER_CAMERAS[cam]
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(1, int(rng.integers(images_per_camera[0],
                                               images_per_camera[1] + 1)) + 1):
                _render(person, cameras[cam], rng).save(folder / f'{k}.jpg', quality=90)
                images += 1
    print(f'Wrote {counted(num_ids, "person", "people")} ({counted(images, "image")}, '
          f'{num_cameras} cameras) to "{root}" as person-<n>/<camera>/<k>.jpg')
    return root
