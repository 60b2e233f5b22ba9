"""The generated dataset is Market-1501 to Torchreid's own loader."""
import hashlib
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from torchreid.reid.data.datasets.image.market1501 import Market1501

from reidkit.data.demo import DONE_MARKER, make_demo_dataset
from reidkit.data.market import market_data_dir
from reidkit.run.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r'^(-1|\d{4})_c([1-6])s1_(\d{6})_(\d{2})\.jpg$')


def test_torchreids_market1501_loader_reads_it_with_the_expected_counts(tiny_data_root):
    dataset = Market1501(root=str(tiny_data_root), verbose=False)
    summary = make_demo_dataset(tiny_data_root, num_train_ids=8, num_test_ids=8, seed=3,
                                gallery_extras=4)
    assert dataset.num_train_pids == summary.train_ids == 8
    assert len(dataset.train) == summary.train_images
    assert len(dataset.query) == summary.query_images
    assert len(dataset.gallery) == summary.gallery_images
    assert {pid for _, pid, _, _ in dataset.query} == \
        {pid for _, pid, _, _ in dataset.gallery} - {0}                 # 8 test ids
    assert 0 in {pid for _, pid, _, _ in dataset.gallery}                # distractors
    train_ids = {int(p.name[:4]) for p in (summary.data_dir / 'bounding_box_train').glob('*.jpg')}
    assert train_ids.isdisjoint(pid for _, pid, _, _ in dataset.query)


def test_layout_names_and_protocol_follow_market1501(tiny_data_root):
    data_dir = market_data_dir(tiny_data_root)
    assert data_dir.parts[-2:] == ('market1501', 'Market-1501-v15.09.15')
    names = [p.name for split in ('bounding_box_train', 'query', 'bounding_box_test')
             for p in (data_dir / split).iterdir()]
    assert names and all(NAME.match(name) for name in names)
    assert any(name.startswith('-1_') for name in names)                # junk detections
    cameras = defaultdict(list)
    for path in (data_dir / 'query').glob('*.jpg'):
        cameras[path.name[:4]].append(path.name[6])
    for pid, cams in cameras.items():
        assert len(cams) == len(set(cams)) >= 2       # one query per camera, at least 2 cameras
    from PIL import Image
    with Image.open(next((data_dir / 'query').glob('*.jpg'))) as image:
        assert image.size == (64, 128)


def _digest(root):
    files = sorted(market_data_dir(root).rglob('*.jpg'))
    return hashlib.sha256(b''.join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    make_demo_dataset(tmp_path / 'a', num_train_ids=2, num_test_ids=2, seed=7, gallery_extras=1)
    make_demo_dataset(tmp_path / 'b', num_train_ids=2, num_test_ids=2, seed=7, gallery_extras=1)
    make_demo_dataset(tmp_path / 'c', num_train_ids=2, num_test_ids=2, seed=8, gallery_extras=1)
    assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b') != _digest(tmp_path / 'c')


def test_an_interrupted_generation_is_redone(tmp_path):
    make_demo_dataset(tmp_path, num_train_ids=2, num_test_ids=2, seed=1, gallery_extras=1)
    before = _digest(tmp_path)
    (market_data_dir(tmp_path) / DONE_MARKER).unlink()              # as if killed before the end
    next(market_data_dir(tmp_path).rglob('*.jpg')).unlink()
    make_demo_dataset(tmp_path, num_train_ids=2, num_test_ids=2, seed=1, gallery_extras=1)
    assert _digest(tmp_path) == before


def test_never_overwrites_data_it_did_not_generate(tmp_path):
    real = market_data_dir(tmp_path) / 'query'
    real.mkdir(parents=True)
    (real / '0001_c1s1_000151_01.jpg').write_bytes(b'a real image')
    with pytest.raises(UserError, match='did not generate, so --demo will not overwrite it'):
        make_demo_dataset(tmp_path, num_train_ids=2, num_test_ids=2)
    assert (real / '0001_c1s1_000151_01.jpg').read_bytes() == b'a real image'


def test_other_arguments_regenerate_its_own_folder(tmp_path):
    first = make_demo_dataset(tmp_path, num_train_ids=2, num_test_ids=2, gallery_extras=0)
    second = make_demo_dataset(tmp_path, num_train_ids=3, num_test_ids=2, gallery_extras=0)
    assert (first.train_ids, second.train_ids) == (2, 3)
    on_disk = Market1501(root=str(tmp_path), verbose=False)     # the files, not the summary
    assert on_disk.num_train_pids == 3 and len(on_disk.train) == second.train_images


def test_data_root_that_is_a_file_names_data_root(tmp_path):
    file = tmp_path / 'data.zip'
    file.write_bytes(b'PK not a folder')
    for root in (file, file / 'inside'):
        with pytest.raises(UserError, match=r'^DATA_ROOT: cannot make the demo dataset in '
                                            r'".*data.zip.*": ".*data.zip" is a file, not a '
                                            r'folder\. Point --DATA_ROOT at a folder'):
            make_demo_dataset(root, num_train_ids=2, num_test_ids=2)
    assert file.read_bytes() == b'PK not a folder'


# A child process: imports, says it is ready, waits for the go file, then generates.
CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from reidkit.data.demo import make_demo_dataset
root, ready, go = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
ready.touch()
while not go.exists():
    time.sleep(0.005)
make_demo_dataset(root, **SIZES)
"""
SIZES = dict(num_train_ids=6, num_test_ids=6, seed=4, gallery_extras=2)


def test_two_runs_generating_one_folder_at_once_take_turns(tmp_path):
    root, go = tmp_path / 'shared', tmp_path / 'go'
    ready = [tmp_path / f'ready{i}' for i in range(2)]
    children = [subprocess.Popen([sys.executable, '-c', CHILD.replace('SIZES', repr(SIZES)),
                                  str(ROOT), str(root), str(flag), str(go)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for flag in ready]
    deadline = time.time() + 60
    while not all(flag.exists() for flag in ready) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()                              # both start generating within milliseconds
    outputs = [child.communicate(timeout=600) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    # one generated, the other waited for it (generation takes far longer than the start gap)
    assert sum('Waiting for another run' in out for out, _ in outputs) == 1, outputs
    make_demo_dataset(tmp_path / 'alone', **SIZES)
    assert _digest(root) == _digest(tmp_path / 'alone')
    assert sorted(p.relative_to(root) for p in market_data_dir(root).rglob('*')) == \
        sorted(p.relative_to(tmp_path / 'alone') for p in market_data_dir(tmp_path / 'alone')
               .rglob('*'))


def test_identity_folders_say_what_they_wrote_where_the_readme_puts_them(tmp_path, capsys):
    from reidkit.data.demo import make_identity_folders
    root = make_identity_folders(tmp_path / 'crops', num_ids=3, seed=1)
    images = len(list(root.rglob('*.jpg')))
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f'Wrote 3 people ({images} images') and str(root) in line

    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    folder = re.search(r"make_identity_folders\('([^']+)'\)", readme).group(1)
    ignored = subprocess.run(['git', 'check-ignore', '-q', f'{folder}/person-001/door/1.jpg'],
                             cwd=Path(__file__).resolve().parents[1])
    assert ignored.returncode == 0, f'{folder}/ (the README\'s own-data example) is not ignored'
