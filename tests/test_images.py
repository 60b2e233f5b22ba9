"""Every reader of ours sees a phone photo stored sideways (EXIF Orientation=6) standing up."""
import numpy as np
import pytest
from PIL import Image

from reidkit.data import images
from reidkit.data.images import read_image

HEIGHT, WIDTH = 64, 32


def upright_pixels() -> np.ndarray:
    """A 64x32 'person' whose four quarters differ, so a turn or a mirror shows."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[:HEIGHT // 2, :WIDTH // 2] = (250, 0, 0)
    pixels[:HEIGHT // 2, WIDTH // 2:] = (0, 250, 0)
    pixels[HEIGHT // 2:, :WIDTH // 2] = (0, 0, 250)
    pixels[HEIGHT // 2:, WIDTH // 2:] = (250, 250, 250)
    return pixels


def sideways_jpeg(path, orientation: int = 6):
    """The upright image stored as a camera would with `orientation`: turned 90 degrees
    counter-clockwise on disk (6) or clockwise (8), the tag saying how to turn it back."""
    turn = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    stored = Image.fromarray(upright_pixels()).transpose(turn)
    exif = Image.Exif()
    exif[images.ORIENTATION] = orientation
    stored.save(path, exif=exif.tobytes(), quality=95)
    return path


def close_to_upright(pixels) -> bool:
    pixels = np.asarray(pixels)
    return pixels.shape == (HEIGHT, WIDTH, 3) and \
        np.abs(pixels.astype(int) - upright_pixels()).mean() < 8


@pytest.mark.parametrize('orientation', [6, 8])
def test_read_image_applies_the_exif_orientation(tmp_path, orientation):
    path = sideways_jpeg(tmp_path / 'phone.jpg', orientation)
    with Image.open(path) as stored:
        assert stored.size == (HEIGHT, WIDTH)          # on disk: lying on its side
    image = read_image(str(path))
    assert close_to_upright(image)
    assert images.orientation(image) == 1              # turned once, never twice


def test_an_image_without_orientation_is_read_as_stored(tmp_path):
    Image.fromarray(upright_pixels()).save(tmp_path / 'plain.jpg', quality=95)
    assert close_to_upright(read_image(str(tmp_path / 'plain.jpg')))


def test_search_reads_queries_and_gallery_upright(tmp_path):
    from reidkit.search.extractor import decode
    image, why = decode(sideways_jpeg(tmp_path / 'phone.jpg'))
    assert why == '' and close_to_upright(image)


def test_the_device_cache_decodes_upright_at_the_upright_size(tmp_path):
    from reidkit.data.datapath import DecodedImages
    phone = sideways_jpeg(tmp_path / 'phone.jpg')
    Image.fromarray(upright_pixels()).save(tmp_path / 'plain.jpg', quality=95)
    items = [(str(phone), 0, 0, 0), (str(tmp_path / 'plain.jpg'), 1, 0, 0)]
    decoded = DecodedImages(items, workers=1, progress=None)
    assert len(decoded.groups) == 1 and decoded.groups[0].shape == (2, 3, HEIGHT, WIDTH)
    assert close_to_upright(decoded.groups[0][0].permute(1, 2, 0).numpy())


def test_the_onnx_preprocessing_turns_an_opened_phone_photo_upright(tmp_path):
    from reidkit.search.onnx_features import OnnxExtractor
    extractor = object.__new__(OnnxExtractor)          # preprocessing only: no model needed
    extractor.height, extractor.width = HEIGHT, WIDTH
    extractor.mean = np.zeros(3, np.float32)
    extractor.std = np.ones(3, np.float32)
    with Image.open(sideways_jpeg(tmp_path / 'phone.jpg')) as opened:
        batch = extractor.preprocess([opened, read_image(str(tmp_path / 'phone.jpg'))])
    for pixels in batch:
        assert close_to_upright((pixels.transpose(1, 2, 0) * 255).round())


def test_rank_strips_show_the_photo_upright(tmp_path):
    from reidkit.evaluate.visrank import _read_bgr
    bgr = _read_bgr(str(sideways_jpeg(tmp_path / 'phone.jpg')))   # OpenCV applies it itself
    assert close_to_upright(bgr[:, :, ::-1])


def test_the_engine_datasets_read_upright(tmp_path):
    from reidkit.train.engine import ReadingWithReidkit

    class Dataset:
        data = [(str(sideways_jpeg(tmp_path / 'phone.jpg')), 3, 1, 0)]
        transform = None
    item = ReadingWithReidkit(Dataset())[0]
    assert close_to_upright(item['img']) and item['pid'] == 3
