"""Images as a person sees them: with their EXIF orientation applied.

A phone stores a portrait photo as a landscape JPEG with an Orientation tag (6: turn it 90
degrees clockwise to view); viewers and browsers turn it, Pillow does not (Torchreid's own
`read_image` neither). Every reader of ours goes through `upright`, so the model sees the
person standing as in any viewer. Pillow only: `reidkit.search.onnx_features` uses it without torch.

`read_image` is what our datasets read with: Torchreid's retries an unreadable file forever
("Will redo. Don't worry. Just chill."); ours fails at once, naming the file.
"""
from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from reidkit.run.errors import UserError

# TIFF's byte-order marks and version (42; BigTIFF 43), little- and big-endian.
TIFF_HEADS = (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')
ORIENTATION = 0x0112                # the EXIF tag
SIDES_SWAPPED = (5, 6, 7, 8)        # orientations that turn the image by 90 or 270 degrees


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1 (as stored) when it has none or it is unreadable."""
    try:
        value = image.getexif().get(ORIENTATION, 1)
    except Exception:               # a broken EXIF block: the pixels are still fine
        return 1
    return value if value in range(1, 9) else 1


def upright(image: Image.Image) -> Image.Image:
    """The image turned (and mirrored) as its EXIF orientation says, without the tag; the
    image itself when it needs no turn (no copy)."""
    if orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as `upright(image)` will have them, from the header alone."""
    width, height = image.size
    return (height, width) if orientation(image) in SIDES_SWAPPED else (width, height)


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used ('empty', 'not an image', 'truncated', 'not a regular
    file'), or None. Reads every format own data accepts: JPEG, PNG, BMP, WebP, TIFF.

    Reads only its first and last bytes: fast enough for 30k files before every run. A JPEG
    cut short loses its end-of-image marker (FF D9).
    """
    try:
        # Stat before opening: open() on a FIFO blocks until a writer comes, i.e. forever.
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            return 'a folder, not an image file'
        if not stat.S_ISREG(mode):
            return 'not a regular file (a FIFO, socket or device)'
        with open(path, 'rb') as handle:
            head = handle.read(12)
            if not head:
                return 'empty (0 bytes)'
            handle.seek(-min(path.stat().st_size, 64), 2)
            tail = handle.read()
    except OSError as error:
        return f'unreadable ({error.strerror})'
    if head[:3] == b'\xff\xd8\xff':
        return None if b'\xff\xd9' in tail else 'a truncated JPEG (no end-of-image marker)'
    if head.startswith(b'\x89PNG') or head[:2] == b'BM' or head.startswith(TIFF_HEADS) \
            or (head[:4] == b'RIFF' and head[8:12] == b'WEBP'):
        return None
    return 'not a JPEG, PNG, BMP, WebP or TIFF image'


# Pillow's modes for 16-bit (and 32-bit integer) grey images; convert('RGB') clips their values
# at 255, so all but the darkest pixels come out white. Pillow reads 16-bit colour PNGs as
# 8-bit RGB/RGBA itself (keeping the high byte), so they need nothing.
WIDE_GREY_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N')


def read_image(path: str) -> Image.Image:
    """Torchreid's read_image, minus the endless retry: an unreadable file is an error.
    Upright: the EXIF orientation is applied (`reidkit.data.images`; Torchreid's reader ignores it).
    16-bit grey images are scaled to 8 bits (the high byte, as Pillow does for 16-bit colour)."""
    try:
        with Image.open(path) as stored:
            image = upright(stored)
            if image.mode in WIDE_GREY_MODES:
                high_byte = np.clip(np.asarray(image, dtype=np.int64) >> 8, 0, 255)
                return Image.fromarray(high_byte.astype(np.uint8)).convert('RGB')
            return image.convert('RGB')
    except Exception as error:      # PIL raises many types for broken files
        raise unreadable_image(path, error) from None


def unreadable_image(path, error: Exception) -> UserError:
    """The error for an image file PIL cannot open or decode (`error`, what PIL raised)."""
    return UserError(f'"{path}" cannot be read as an image ({error}). Delete or replace it and '
                     f'run again.')


# Rank strips (reidkit.evaluate.visrank, search): a query, then its matches, in one JPEG.
THUMB_HEIGHT, THUMB_WIDTH = 128, 64      # Market-1501's own crop size
GAP = 6
QUERY_GAP = 24
JPEG_MAX_SIDE = 65_500                   # libjpeg refuses wider images
# The most matches one strip can show; a wider strip cannot be saved as JPEG.
MAX_STRIP_MATCHES = (JPEG_MAX_SIDE - THUMB_WIDTH - QUERY_GAP) // (THUMB_WIDTH + GAP)
