"""Images as a person sees them: with their EXIF orientation applied.

A phone stores a portrait photo as a landscape JPEG with an Orientation tag (6: turn it 90
degrees clockwise to view); viewers and browsers turn it, Pillow does not (Torchreid's own
`read_image` neither). Every reader of ours goes through `upright`, so the model sees the
person standing as in any viewer. Pillow only: `reidkit.search.onnx_features` uses it without torch.
"""
from __future__ import annotations

from PIL import Image, ImageOps

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
