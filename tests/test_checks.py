"""Bad input fails fast with one clear paragraph and exit status 2; nothing hangs."""
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import main
from reidkit.data import checks, images
from reidkit.data.market import market_data_dir
from reidkit.run.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=600):
    """Runs main.py as a user would; a hang fails the test instead of hanging CI."""
    done = subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stderr


def _copy_data(tiny_data_root, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(tiny_data_root, root)
    return root, market_data_dir(root)


@pytest.mark.slow
def test_missing_dataset_is_reported_at_once_without_a_download(tmp_path):
    code, err = _cli('train', f'--DATA_ROOT={tmp_path}/nowhere', '--PRETRAINED=False',
                              f'--EXPERIMENTS_DIR={tmp_path}/exp')
    assert code == 2
    assert err.startswith('error: DATA_ROOT: dataset \'market1501\' not found')
    assert 'bounding_box_train' in err and '--demo' in err and 'Traceback' not in err
    assert not (tmp_path / 'nowhere').exists()          # no download attempt made a folder


def test_empty_split_and_unparseable_names(tiny_data_root, tmp_path, tiny_settings):
    root, data_dir = _copy_data(tiny_data_root, tmp_path)
    s = tiny_settings.replace(DATA_ROOT=str(root))
    for image in (data_dir / 'query').iterdir():
        image.unlink()
    with pytest.raises(UserError, match=r'no Market-1501 image in ".*query".*folder is empty'):
        checks.check_before_run(s, training=True)
    (data_dir / 'query' / 'person1.jpg').write_bytes(b'x')
    with pytest.raises(UserError, match='named like 0002_c1s1_000451_03.jpg.*"person1.jpg"'):
        checks.check_before_run(s, training=True)
    shutil.rmtree(data_dir / 'bounding_box_test')
    with pytest.raises(UserError, match='bounding_box_test" is missing'):
        checks.check_before_run(s, training=True)


@pytest.mark.parametrize('damage, problem', [
    (lambda data: b'', 'empty'),
    (lambda data: data[:len(data) // 2], 'truncated JPEG'),
    (lambda data: b'<html>404</html>', 'not a JPEG'),
])
def test_a_bad_image_is_named_before_training(tiny_data_root, tmp_path, tiny_settings,
                                              damage, problem):
    root, data_dir = _copy_data(tiny_data_root, tmp_path)
    victim = sorted((data_dir / 'bounding_box_train').glob('*.jpg'))[3]
    victim.write_bytes(damage(victim.read_bytes()))
    with pytest.raises(UserError, match=f'{victim.name}" is .*{problem}'):
        checks.check_before_run(tiny_settings.replace(DATA_ROOT=str(root)), training=True)


def test_the_loader_fails_on_an_unreadable_image_instead_of_retrying_forever(tmp_path):
    bad = tmp_path / '0001_c1s1_000001_01.jpg'
    bad.write_bytes(b'\xff\xd8\xff garbage \xff\xd9')
    with pytest.raises(UserError, match='cannot be read as an image'):
        images.read_image(str(bad))


@pytest.mark.slow
def test_a_fifo_named_like_an_image_is_reported_not_waited_on(tiny_data_root, tmp_path):
    root, data_dir = _copy_data(tiny_data_root, tmp_path)
    fifo = data_dir / 'bounding_box_train' / '0001_c1s1_999999_01.jpg'
    os.mkfifo(fifo)                 # open() on it would block until a writer comes: forever
    code, err = _cli('train', f'--DATA_ROOT={root}', '--PRETRAINED=False',
                              f'--EXPERIMENTS_DIR={tmp_path}/exp', timeout=600)
    assert code == 2
    assert f'{fifo}" is not a regular file (a FIFO, socket or device)' in err
    assert 'Traceback' not in err
    (data_dir / 'query' / 'folder.jpg').mkdir()
    assert images.image_problem(data_dir / 'query' / 'folder.jpg') == 'a folder, not an image file'


@pytest.mark.slow
def test_a_fifo_in_an_own_data_folder_is_reported_not_waited_on(tmp_path):
    from conftest import TINY
    from reidkit.data.demo import make_identity_folders
    crops = make_identity_folders(tmp_path / 'crops', num_ids=6, seed=1)
    fifo = sorted(crops.glob('*/*/*.jpg'))[0].with_name('99.jpg')
    os.mkfifo(fifo)                 # open() on it would block until a writer comes: forever
    flags = [f'--{key}={value!r}' for key, value in TINY.items()]
    code, err = _cli('train', *flags, f'--SOURCES={crops}', f'--TARGETS={crops}',
                     f'--EXPERIMENTS_DIR={tmp_path}/exp', timeout=120)   # against a hang only
    assert code == 2, err[-2000:]
    assert err.startswith(f'error: SOURCES: "{fifo}" is not a regular file (a FIFO, socket or '
                          f'device). Delete it'), err[-2000:]


def test_own_data_images_are_checked_in_every_format_it_reads(tmp_path, tiny_settings, capsys):
    from reidkit.data.demo import make_identity_folders
    crops = make_identity_folders(tmp_path / 'crops', num_ids=6, seed=1)
    jpgs = sorted(crops.glob('*/*/*.jpg'))
    for image, suffix in zip(jpgs, ('.webp', '.tif', '.tiff', '.png', '.bmp')):
        Image.open(image).save(image.with_suffix(suffix))
        image.unlink()
    rows = ['path,pid,camid'] + [f'{p.relative_to(crops)},{p.parts[-3]},{p.parts[-2]}'
                                 for p in sorted(crops.glob('*/*/*.*'))]
    (crops / 'people.csv').write_text('\n'.join(rows) + '\n')
    for data in (crops, crops / 'people.csv'):
        s = tiny_settings.replace(SOURCES=str(data), TARGETS=str(data))
        checks.check_before_run(s, training=True)
        assert f'Checked {len(rows) - 1} images' in capsys.readouterr().out
    victim = jpgs[-1]
    victim.write_bytes(victim.read_bytes()[:200])
    for data in (crops, crops / 'people.csv'):
        with pytest.raises(UserError, match=f'^TARGETS: "{victim}" is a truncated JPEG'):
            checks.check_before_run(tiny_settings.replace(TARGETS=str(data)), training=False)


def _write_16_bit_pngs(folder):
    """{name: (path, the 8-bit RGB pixels it should read as)} for 16-bit PNGs of each kind."""
    grey = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2801 + 13)      # 13 .. 64436
    rgb = np.stack([grey, grey[::-1], 65535 - grey], axis=-1)
    written = {}
    cv2.imwrite(str(folder / 'grey.png'), grey)
    written['grey'] = np.repeat((grey >> 8)[..., None], 3, axis=-1)
    Image.fromarray(grey).save(folder / 'grey_pil.png')                     # mode I;16
    written['grey_pil'] = written['grey']
    cv2.imwrite(str(folder / 'rgb.png'), rgb[..., ::-1])                   # cv2 writes BGR
    written['rgb'] = rgb >> 8
    alpha = np.full(grey.shape + (1,), 30000, np.uint16)
    cv2.imwrite(str(folder / 'rgba.png'), np.concatenate([rgb[..., ::-1], alpha], axis=-1))
    written['rgba'] = rgb >> 8
    return {name: (folder / f'{name}.png', pixels.astype(np.uint8))
            for name, pixels in written.items()}


def test_16_bit_pngs_are_read_scaled_to_8_bits_not_white(tmp_path):
    pngs = _write_16_bit_pngs(tmp_path)
    for name, (path, expected) in pngs.items():
        image = images.read_image(str(path))
        assert image.mode == 'RGB', name
        assert np.array_equal(np.asarray(image), expected), name
    grey = pngs['grey'][1]
    assert grey.min() == 0 and grey.max() == 251 and len(np.unique(grey)) == 24   # not clipped


def test_output_folder_is_created_and_left_clean(tmp_path):
    folder = tmp_path / 'a' / 'b' / 'experiments'
    checks.check_output_folder(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []       # the probe file is gone
    checks.check_output_folder(folder)                            # existing: fine too


def test_output_folder_that_is_a_file_or_under_one(tmp_path):
    file = tmp_path / 'notes.txt'
    file.write_text('not a folder')
    with pytest.raises(UserError, match=r'^EXPERIMENTS_DIR: ".*notes.txt" is a file, not a '
                                        r'folder\..*--EXPERIMENTS_DIR='):
        checks.check_output_folder(file)
    with pytest.raises(UserError, match=r'^SEARCH_DIR: cannot create the folder '
                                        r'".*notes.txt/runs" \(".*notes.txt" is a file\)'):
        checks.check_output_folder(file / 'runs', setting='SEARCH_DIR')
    assert file.read_text() == 'not a folder'


def test_output_folder_that_cannot_be_written(tmp_path, monkeypatch):
    # Tests run as root, which chmod does not stop: make creating the probe file fail instead.
    def refused(*args, **kwargs):
        raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(checks.tempfile, 'NamedTemporaryFile', refused)
    with pytest.raises(UserError, match=r'^EXPERIMENTS_DIR: cannot write in ".*" \(Permission '
                                        r'denied\).*--EXPERIMENTS_DIR='):
        checks.check_output_folder(tmp_path)


@pytest.mark.parametrize('key, value, listed', [
    ('MODEL_NAME', 'resnet51', 'resnet50'), ('OPTIM', 'adamw', 'amsgrad'),
    ('LR_SCHEDULER', 'step', 'single_step'), ('LOSS', 'arcface', 'triplet'),
    ('TRANSFORMS', ['random_flip', 'flip'], 'random_crop'), ('SOURCES', 'market', 'market1501'),
    ('TARGETS', 'duke', 'dukemtmcreid'),
])
def test_unknown_names_list_the_valid_choices(tiny_settings, key, value, listed):
    with pytest.raises(UserError, match=f'{key}=.*Valid choices: .*{listed}'):
        checks.check_before_run(tiny_settings.replace(**{key: value}), training=True)


@pytest.mark.parametrize('key, value', [('HEIGHT', 0), ('WIDTH', -5), ('LR', 0.0), ('LR', -1e-3),
                                        ('MAX_EPOCH', 0), ('BATCH_SIZE_TEST', 0),
                                        ('VISRANK_TOPK', 0), ('WORKERS', -1)])
def test_nonsense_numbers(tiny_settings, key, value):
    with pytest.raises(UserError, match=f'{key}={value!r} must be'):
        checks.check_before_run(tiny_settings.replace(**{key: value}), training=True)


def test_triplet_batch_must_fit_the_identity_sampler(tiny_settings):
    with pytest.raises(UserError, match='multiple of 4'):
        checks.check_before_run(tiny_settings.replace(LOSS='triplet', BATCH_SIZE_TRAIN=6), True)


@pytest.mark.slow
def test_weights_problems_exit_2_with_the_file_named(tmp_path, tiny_data_root):
    common = [f'--DATA_ROOT={tiny_data_root}', f'--EXPERIMENTS_DIR={tmp_path}/exp']
    code, err = _cli('test', f'--WEIGHTS={tmp_path}/none.pth', *common)
    assert code == 2 and 'no checkpoint file at' in err
    (tmp_path / 'notes.txt').write_text('not a model')
    code, err = _cli('visrank', f'--WEIGHTS={tmp_path}/notes.txt', *common)
    assert code == 2 and 'notes.txt" is not a readable PyTorch checkpoint' in err
    code, err = _cli('test', *common)
    assert code == 2 and 'no training run in' in err


def test_pretrained_without_cache_or_network_names_the_file(tiny_settings, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty-cache'))

    def offline(address, timeout):
        assert timeout <= 5                  # never waits long for a network that is not there
        raise OSError('Network is unreachable')
    monkeypatch.setattr(socket, 'create_connection', offline)
    with pytest.raises(UserError) as error:
        checks.check_before_run(tiny_settings.replace(PRETRAINED=True), training=True)
    message = str(error.value)
    assert 'resnet50-19c8e357.pth' in message and str(tmp_path / 'empty-cache') in message
    assert '--PRETRAINED=False' in message


def test_device_cuda_without_gpu_is_an_error_auto_falls_back(monkeypatch, capsys):
    from reidkit.run.device import choose_device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(UserError, match="DEVICE='cuda' but PyTorch sees no CUDA GPU"):
        choose_device('cuda')
    assert choose_device('auto').type == 'cpu'
    assert 'running on the CPU' in capsys.readouterr().out
    with pytest.raises(UserError, match="DEVICE must be"):
        choose_device('gpu')


def test_a_checkpoint_from_another_input_size_is_named(tiny_settings, tmp_path):
    from reidkit.run.checkpoints import save_checkpoint
    path = save_checkpoint({'state_dict': {}, 'input_size': [64, 32]}, tmp_path / 'demo.pth')
    with pytest.raises(UserError, match=r'trained on 64x32 images, but HEIGHT x WIDTH is 32x16.*'
                                        r'Drop --HEIGHT and --WIDTH'):
        main.test(tiny_settings.replace(WEIGHTS=str(path)))


@pytest.mark.parametrize('new_name, said', [
    ('0001_c10s1_000151_01.jpg', 'misread it (c10 is taken for c1'),   # silently wrong numbers
    ('2000_c1s1_000151_01.jpg', 'person 2000 and camera c1'),         # Torchreid's assertion
    ('0001_c7s1_000151_01.jpg', 'person 1 and camera c7'),
])
def test_names_torchreid_market_loader_misreads_point_to_own_data(tiny_data_root, tmp_path,
                                                                  tiny_settings, new_name, said):
    root, data_dir = _copy_data(tiny_data_root, tmp_path)
    victim = sorted((data_dir / 'bounding_box_test').glob('*.jpg'))[2]
    victim.rename(victim.with_name(new_name))
    with pytest.raises(UserError, match=re.escape(said)) as error:
        checks.check_before_run(tiny_settings.replace(DATA_ROOT=str(root)), training=True)
    assert new_name in str(error.value) and f'--SOURCES={data_dir}' in str(error.value)


def test_a_folder_above_named_like_an_image_is_refused(tiny_data_root, tmp_path, tiny_settings):
    root, data_dir = _copy_data(tiny_data_root, tmp_path / '12_c3')   # Torchreid: all id 12, c3
    with pytest.raises(UserError, match=r'a folder above the image is named like a Market-1501 '
                                        r'image \("12_c3"\)'):
        checks.check_before_run(tiny_settings.replace(DATA_ROOT=str(root)), training=True)


# Issue 22, part 3: the checks count what the loader will read, for any SOURCES/TARGETS.

def _duke(tiny_data_root, root: Path) -> Path:
    """The tiny dataset also as DukeMTMC-reID (no junk: Duke's loader has none), beside
    Market-1501 under `root`."""
    shutil.copytree(tiny_data_root, root)
    shutil.copytree(market_data_dir(root), root / 'dukemtmc-reid' / 'DukeMTMC-reID',
                    ignore=lambda folder, names: [n for n in names if n.startswith('-1_')])
    return root


def _refused_before_any_epoch(capsys, tmp_path, *flags) -> str:
    """The message of `main.py train *flags` on the tiny settings: exit 2, one paragraph, no
    run folder (nothing trained)."""
    from conftest import TINY
    argv = ['train', f'--EXPERIMENTS_DIR={tmp_path}/exp',
            *(f'--{key}={value!r}' for key, value in TINY.items()), *flags]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err
    assert not (tmp_path / 'exp').exists()
    return err


def test_a_second_source_counts_toward_the_identities_a_triplet_batch_needs(
        tiny_data_root, tmp_path, tiny_settings, capsys):
    """market1501 and dukemtmcreid (Torchreid's loader) combined: 8 + 8 training identities."""
    root = _duke(tiny_data_root, tmp_path / 'data')
    s = tiny_settings.replace(DATA_ROOT=str(root), SOURCES=['market1501', 'dukemtmcreid'],
                              LOSS='triplet')
    ids = {name: len({pid for _, pid, _, _ in checks.torchreid_datasets()[name](
        root=str(root), verbose=False).train}) for name in s.SOURCES}
    total = sum(ids.values())
    checks.check_before_run(s.replace(BATCH_SIZE_TRAIN=4 * total), training=True)   # fits
    err = _refused_before_any_epoch(
        capsys, tmp_path, f'--DATA_ROOT={root}', "--SOURCES=['market1501', 'dukemtmcreid']",
        "--LOSS='triplet'", f'--BATCH_SIZE_TRAIN={4 * total + 4}')
    assert (f"needs {total + 1} different people per batch (4 images each), but the training "
            f"sets of market1501 ({ids['market1501']} identities) + dukemtmcreid "
            f"({ids['dukemtmcreid']} identities) together have {total}. Use a batch of at most "
            f"{4 * total}.") in err


def test_a_market_target_with_an_own_source_counts_the_sources_images(
        tiny_data_root, tmp_path, tiny_settings, capsys):
    from reidkit.data.demo import make_identity_folders
    from reidkit.data.own_data import load
    people = make_identity_folders(tmp_path / 'people', num_ids=8, seed=2)
    own = load(str(people), tiny_settings.TEST_SHARE, tiny_settings.SPLIT_SEED)
    market_images = len(list((market_data_dir(tiny_data_root) / 'bounding_box_train')
                             .glob('*.jpg')))
    batch = len(own.train) + 1
    assert batch <= market_images           # Market's training split would have filled it
    err = _refused_before_any_epoch(capsys, tmp_path, f'--DATA_ROOT={tiny_data_root}',
                                    f'--SOURCES={people}', '--TARGETS=market1501',
                                    f'--BATCH_SIZE_TRAIN={batch}')
    assert (f'BATCH_SIZE_TRAIN={batch} is larger than the {len(own.train)} training images of '
            f'"{people}", so training would take zero steps') in err


def test_a_triplet_batch_the_training_split_cannot_fill_and_one_identity_are_refused(
        tmp_path, tiny_data_root, capsys):
    from reidkit.data.demo import make_identity_folders
    split = tmp_path / 'split'
    make_identity_folders(split / 'train', num_ids=5, seed=4)
    make_identity_folders(split / 'query', num_ids=2, seed=5)
    shutil.copytree(split / 'query', split / 'gallery')
    common = [f'--DATA_ROOT={tiny_data_root}', f'--SOURCES={split}', f'--TARGETS={split}']
    err = _refused_before_any_epoch(capsys, tmp_path, *common, "--LOSS='triplet'",
                                    '--BATCH_SIZE_TRAIN=24')
    assert (f'needs 6 different people per batch (4 images each), but the training set of '
            f'"{split}" has 5. Use a batch of at most 20.') in err
    for person in sorted((split / 'train').iterdir())[1:]:
        shutil.rmtree(person)
    err = _refused_before_any_epoch(capsys, tmp_path, *common)
    assert f'SOURCES: the training set of "{split}" has 1 identity: training' in err


def test_an_own_target_without_queries_is_refused_before_any_epoch(tmp_path, tiny_data_root,
                                                                   capsys):
    from reidkit.data.demo import make_identity_folders
    split = tmp_path / 'split'
    make_identity_folders(split / 'train', num_ids=3, seed=4)
    make_identity_folders(split / 'gallery', num_ids=2, seed=5)
    err = _refused_before_any_epoch(capsys, tmp_path, f'--DATA_ROOT={tiny_data_root}',
                                    f'--TARGETS={split}')
    assert f'TARGETS: "{split}" has no query images, so it cannot be a target' in err


def test_a_mistyped_model_name_is_named_before_the_demo_data_is_made(tmp_path, monkeypatch,
                                                                      capsys):
    import main

    def no_demo_data(*args, **kwargs):
        raise AssertionError('the demo dataset was made')
    monkeypatch.setattr(main, 'make_demo_dataset', no_demo_data)
    monkeypatch.chdir(tmp_path)
    assert main.main(['--demo', '--MODEL_NAME=resnet5']) == 2
    assert "MODEL_NAME='resnet5'" in capsys.readouterr().err
    assert not (tmp_path / 'demo-data').exists()
