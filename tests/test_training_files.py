"""A test never scores a training image: the record of training files (run folder and
checkpoint) and the check against it, for every way of presenting the same file twice."""
import csv
import dataclasses
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from conftest import TINY
from reidkit.data import checks, own_data, training_files
from reidkit.data.own_dataset import register_all, registered
from reidkit.data.training_files import RECORD_FILE, TrainingFiles
from reidkit.run.errors import UserError


def _noise_image(path: Path, seed: int) -> Path:
    """A small JPEG whose bytes no other seed gives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _people(root: Path, names, cameras=('door', 'lift'), per_camera=2, seed=0) -> Path:
    """<person>/<camera>/<i>.jpg, every image distinct."""
    for n, person in enumerate(names):
        for c, camera in enumerate(cameras):
            for i in range(per_camera):
                _noise_image(root / person / camera / f'{i}.jpg',
                             seed * 100_000 + n * 100 + c * 10 + i)
    return root


# --- the record and the comparison --------------------------------------------------------

def test_every_way_of_presenting_a_training_file_again_is_found(tmp_path):
    train = [_noise_image(tmp_path / 'train' / f'{i}.jpg', i) for i in range(4)]
    record = TrainingFiles.of_files(train)
    other = tmp_path / 'test'
    other.mkdir()
    (other / 'link.jpg').symlink_to(train[0])
    os.link(train[1], other / 'hard.jpg')
    shutil.copy(train[2], other / 'copy.jpg')
    fresh = _noise_image(other / 'fresh.jpg', 99)
    same_size = other / 'same-size.jpg'          # same size, other bytes: no leak
    data = bytearray(train[3].read_bytes())
    data[-3] ^= 0xFF
    same_size.write_bytes(bytes(data))
    found = record.leaks([train[3], other / 'link.jpg', other / 'hard.jpg', other / 'copy.jpg',
                          fresh, same_size])
    assert [(Path(f.test).name, f.how, Path(f.training).name) for f in found] == [
        ('3.jpg', 'the same file as', '3.jpg'),
        ('link.jpg', 'the same file as', '0.jpg'),        # a symbolic link
        ('hard.jpg', 'the same file (same inode) as', '1.jpg'),
        ('copy.jpg', 'byte-identical to', '2.jpg'),
    ]
    # a training file that is not among the test files is no leak
    assert record.leaks([fresh]) == []


def test_the_record_travels_in_the_checkpoint_and_the_run_folder(tmp_path):
    train = [_noise_image(tmp_path / 'data' / f'{i}.jpg', i) for i in range(5)]
    record = TrainingFiles.of_files(train + [train[0]])     # each file once
    assert len(record) == 5
    compact = record.compact()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in compact.items()} == {
        'sizes': (torch.int64, (5,)), 'hashes': (torch.int64, (5,))}   # 16 bytes a file
    path = tmp_path / 'checkpoint.pth'
    torch.save({'state_dict': {}, 'training_files': compact}, path)
    saved = torch.load(path, weights_only=True)
    carried = TrainingFiles.from_checkpoint(saved)
    assert carried.paths is None
    copy = shutil.copy(train[4], tmp_path / 'elsewhere.jpg')
    (leak,) = carried.leaks([copy])
    assert (leak.how, leak.training) == ('byte-identical to', None)
    # the full record, read back from the run folder, names both files
    record.write(tmp_path)
    read = TrainingFiles.read(tmp_path)
    assert read.paths == record.paths and (read.inodes == record.inodes).all()
    assert (read.sizes == record.sizes).all() and (read.hashes == record.hashes).all()
    assert read.leaks([copy])[0].training == str(train[4].resolve())
    with gzip.open(tmp_path / RECORD_FILE, 'rt') as text:
        assert next(csv.reader(text)) == ['path', 'size', 'hash', 'device', 'inode']
    assert TrainingFiles.from_checkpoint({'state_dict': {}}) is None
    assert TrainingFiles.read(tmp_path / 'nowhere') is None


def test_a_starting_checkpoints_files_are_kept(tmp_path):
    first = TrainingFiles.of_files([_noise_image(tmp_path / 'a.jpg', 1)])
    second = TrainingFiles.of_files([_noise_image(tmp_path / 'b.jpg', 2)])
    both = second.merged(TrainingFiles.from_checkpoint({'training_files': first.compact()}))
    assert len(both) == 2 and both.paths == second.paths
    assert [f.how for f in both.leaks([shutil.copy(tmp_path / 'a.jpg', tmp_path / 'c.jpg')])] \
        == ['byte-identical to']
    assert len(both.merged(both)) == 2


# --- before training: TARGETS against SOURCES ---------------------------------------------

def _settings(tmp_path, **more):
    return main.load_settings(dict(TINY, DEVICE='cpu', EXPERIMENTS_DIR=str(tmp_path / 'exp'),
                                   **more))


def test_a_csv_target_listing_training_files_is_refused_before_training(tmp_path):
    crops = _people(tmp_path / 'crops', [f'p{i}' for i in range(10)])
    s = _settings(tmp_path, SOURCES=str(crops), TARGETS=str(crops))
    record = training_files.record_sources(s)
    # the run's own training files, listed as a target
    rows = ['path,pid,camid,split']
    for n, path in enumerate(record.paths[:8]):
        rows.append(f'{path},{n // 4 + 1},{n % 2},{"query" if n % 4 == 0 else "gallery"}')
    (tmp_path / 'target.csv').write_text('\n'.join(rows) + '\n')
    s = s.replace(TARGETS=[str(crops), str(tmp_path / 'target.csv')])
    with pytest.raises(UserError, match=r'TARGETS: 8 query/gallery image\(s\) of target are '
                                        r'training images of SOURCES.*a training file itself'):
        main.train(s)
    assert not (tmp_path / 'exp').exists() or not any((tmp_path / 'exp').iterdir())


def test_a_byte_identical_copy_in_a_torchreid_dataset_is_refused(tmp_path, tiny_data_root):
    # Market-1501's layout: a gallery image that is a copy of a training image
    market = tmp_path / 'data'
    shutil.copytree(tiny_data_root, market)
    splits = market / 'market1501' / 'Market-1501-v15.09.15'
    train_image = sorted((splits / 'bounding_box_train').glob('*.jpg'))[0]
    shutil.copy(train_image, splits / 'bounding_box_test' / '0000_c1s1_000001_01.jpg')
    s = _settings(tmp_path, DATA_ROOT=str(market))
    with pytest.raises(UserError, match=f'byte-identical to "{train_image}"'):
        main.train(s)


# --- test and visrank: TARGETS against the checkpoint ------------------------------------

@pytest.mark.slow
def test_a_checkpoint_is_never_tested_on_what_it_was_trained_on(tmp_path, capsys):
    crops = _people(tmp_path / 'crops', [f'p{i:02d}' for i in range(12)])
    run_dir = main.train(_settings(tmp_path, SOURCES=str(crops), TARGETS=str(crops)))
    record = TrainingFiles.read(run_dir)
    split = json.loads((run_dir / 'split.json').read_text())
    assert len(record) == len(split[0]['train']) > 0
    checkpoint = main.newest_checkpoint(run_dir)
    assert len(torch.load(checkpoint, weights_only=False)['training_files']['sizes']) \
        == len(record)
    # the checkpoint copied out of its run folder, tested with another SPLIT_SEED: its own
    # record names the leak (size and bytes)
    copied = Path(shutil.copy(checkpoint, tmp_path / 'copied.pth.tar'))
    with pytest.raises(UserError, match=r'training images of the checkpoint .*copied.pth.tar.*'
                                        r'byte-identical to one of its training files'):
        main.test(_settings(tmp_path, WEIGHTS=str(copied), SPLIT_SEED=5, TEST_SHARE=0.9))
    # the same split: no leak, no note
    capsys.readouterr()
    main.test(_settings(tmp_path, WEIGHTS=str(copied)))
    assert 'nothing to check' not in capsys.readouterr().out
    # a trained person's folder renamed: split again under its new name, into the test side
    trained = sorted({row[2] for row in split[0]['train']})
    renamed = None
    for name in trained:
        (crops / name).rename(crops / f'z{name}')
        tested = {row[2] for block in ('query', 'gallery')
                  for row in own_data.load(str(crops)).to_json()[block]}
        if f'z{name}' in tested:
            renamed = name
            break
        (crops / f'z{name}').rename(crops / name)
    assert renamed, 'no renaming moved a trained person into the test split'
    with pytest.raises(UserError, match=r'training images of the checkpoint .*model.pth.tar.*'
                                        r'the same file \(same inode\) as "[^"]*/' + renamed + '/'):
        main.test(_settings(tmp_path, WEIGHTS=str(checkpoint)))
    (crops / f'z{renamed}').rename(crops / renamed)
    # a moved folder is the same data under another path: no leak
    moved = crops.rename(tmp_path / 'moved')
    main.test(_settings(tmp_path, WEIGHTS=str(checkpoint), TARGETS=str(moved)))
    # a model-zoo file (a bare state_dict) carries no record: said once
    zoo = tmp_path / 'zoo.pth'
    torch.save(torch.load(checkpoint, weights_only=False)['state_dict'], zoo)
    capsys.readouterr()
    main.test(_settings(tmp_path, WEIGHTS=str(zoo), SOURCES=str(moved), TARGETS=str(moved)))
    assert capsys.readouterr().out.count('nothing to check the test images against') == 1


def test_a_fifo_is_never_read(tmp_path):
    good = _noise_image(tmp_path / 'a.jpg', 1)
    os.mkfifo(tmp_path / 'b.jpg')
    with pytest.raises(UserError, match=r'"[^"]*b\.jpg" is not a regular file'):
        TrainingFiles.of_files([good, tmp_path / 'b.jpg'])
    empty = tmp_path / 'empty.jpg'
    empty.write_bytes(b'')
    record = TrainingFiles.of_files([empty])          # size 0, as a FIFO's
    assert record.leaks([tmp_path / 'b.jpg']) == []


@pytest.mark.slow
def test_a_resume_on_training_data_with_new_images_is_refused_and_rewrites_nothing(tmp_path):
    crops = _people(tmp_path / 'crops', [f'p{i:02d}' for i in range(8)])
    s = _settings(tmp_path, SOURCES=str(crops), TARGETS=str(crops))
    run_dir = main.train(s)
    records = {name: (run_dir / name).read_bytes()
               for name in ('settings.json', 'split.json', RECORD_FILE)}
    trained = json.loads((run_dir / 'split.json').read_text())[0]['train'][0][0]
    _noise_image(crops / Path(trained).parent / 'new.jpg', 12345)   # same people, one image more
    with pytest.raises(UserError, match=r'RESUME: 1 training image\(s\) of SOURCES are not among '
                                        r'those .* was trained on \(e.g. "[^"]*new\.jpg"\)'):
        main.train(_settings(tmp_path, RESUME=str(main.newest_checkpoint(run_dir)),
                             MAX_EPOCH=2))
    assert {name: (run_dir / name).read_bytes() for name in records} == records


def test_one_image_under_two_names_in_a_trained_and_a_tested_persons_folder(tmp_path):
    """A symbolic or hard link in a test person's folder to a training person's image: refused
    before training (the split puts the two people on two sides)."""
    for link in (os.symlink, os.link):
        crops = _people(tmp_path / link.__name__, [f'p{i:02d}' for i in range(10)])
        data = own_data.load(str(crops))
        trained, tested = data.train[0][0], data.gallery[0][0]
        link(trained, Path(tested).with_name('linked.jpg'))
        s = _settings(tmp_path, SOURCES=str(crops), TARGETS=str(crops))
        with pytest.raises(UserError, match=r'training images of SOURCES.*linked\.jpg" is '):
            main.train(s)
        assert not (tmp_path / 'exp').exists() or not any((tmp_path / 'exp').iterdir())


@pytest.mark.slow
def test_a_fine_tuning_run_never_evaluates_on_its_starting_checkpoints_training_files(tmp_path):
    first = _people(tmp_path / 'first', [f'p{i:02d}' for i in range(8)])
    second = _people(tmp_path / 'second', [f'q{i:02d}' for i in range(14)], seed=1)
    run_dir = main.train(_settings(tmp_path, SOURCES=str(first), TARGETS=str(first)))
    start = str(main.newest_checkpoint(run_dir))
    # the first run's training images, listed as a target of the fine-tuning run
    trained = [row[0] for row in json.loads((run_dir / 'split.json').read_text())[0]['train']]
    (tmp_path / 'old.csv').write_text('path,pid,camid,split\n' + ''.join(
        f'{first / path},{n // 2 + 1},{n % 2},{"query" if n % 2 == 0 else "gallery"}\n'
        for n, path in enumerate(trained[:8])))
    with pytest.raises(UserError, match=r'training images of SOURCES or the checkpoint this run '
                                        r'starts from.*one of its training files'):
        main.train(_settings(tmp_path, SOURCES=str(second), INIT_WEIGHTS=start,
                             TARGETS=[str(second), str(tmp_path / 'old.csv')]))
    # the fine-tuned checkpoint carries both runs' files: the first run's test split is fine,
    # its training split is not
    tuned = main.train(_settings(tmp_path, SOURCES=str(second), TARGETS=str(second),
                                 INIT_WEIGHTS=start))
    checkpoint = main.newest_checkpoint(tuned)
    main.test(_settings(tmp_path, WEIGHTS=str(checkpoint), TARGETS=str(first)))
    with pytest.raises(UserError, match='training images of the checkpoint'):
        main.test(_settings(tmp_path, WEIGHTS=str(checkpoint), TARGETS=str(tmp_path / 'old.csv')))


# --- a run made before training files were recorded: its split.json ----------------------

def _old_run(tmp_path, crops: Path, **more):
    """A run folder as an older version left it: split.json written when a person folder `0`
    was a distractor (Market's meaning, before folder names were names), and a checkpoint
    without a record of its training files. (settings, checkpoint path, its contents, the
    old split)."""
    s = _settings(tmp_path, SOURCES=str(crops), TARGETS=str(crops), **more)
    records, layout = own_data.read_folder(crops)
    old = own_data.build(str(crops), [dataclasses.replace(r, market=r.key == '0')
                                      for r in records], layout, s.TEST_SHARE, s.SPLIT_SEED)
    run_dir = tmp_path / 'exp' / 'old-run'
    (run_dir / 'model').mkdir(parents=True)
    own_data.write_split(run_dir, [old])
    return s, run_dir / 'model' / 'model.pth.tar', {'settings': dict(s.record())}, old


def test_an_older_run_is_tested_on_its_recorded_split(tmp_path, capsys):
    crops = _people(tmp_path / 'crops', ['0'] + [f'p{i:02d}' for i in range(9)])
    s, checkpoint, saved, old = _old_run(tmp_path, crops)
    assert any(pid == 0 for _, pid, _ in old.gallery)      # folder 0: a distractor then
    today = own_data.load(str(crops), s.TEST_SHARE, s.SPLIT_SEED)
    assert (today.query, today.gallery) != (old.query, old.gallery)     # a person now
    recorded = training_files.recorded_splits(s, saved, checkpoint)
    assert list(recorded) == [str(crops)]
    # the pre-run checks, the leak check and the datasets Torchreid reads: the recorded split
    checks.check_before_run(s, training=False, recorded=recorded)
    assert 'as recorded in' in capsys.readouterr().out
    assert training_files.dataset_files(s, str(crops), ('query', 'gallery'), recorded) == \
        [p for p, _, _ in old.query + old.gallery]
    notes = training_files.check_not_trained_on(s, saved, checkpoint, recorded)
    assert len(notes) == 2 and 'split.json' in notes[0] and 'nothing to check' not in notes[1]
    (data,) = register_all(s, evaluating=True, recorded=recorded)
    assert registered(str(crops)) is data
    assert (data.query, data.gallery, data.identity_names) == \
        (old.query, old.gallery, old.identity_names)
    assert data.summary()['digest'] == old.digest()
    # a recorded test image that is gone: refused, naming it and split.json
    gone = Path(old.gallery[-1][0])
    gone.rename(tmp_path / 'elsewhere.jpg')
    with pytest.raises(UserError, match=rf'"{gone}".*"{checkpoint.parent.parent}/split.json"'):
        training_files.recorded_splits(s, saved, checkpoint)


def test_an_older_run_split_anew_is_checked_against_its_recorded_training_images(tmp_path):
    crops = _people(tmp_path / 'crops', ['0'] + [f'p{i:02d}' for i in range(9)])
    s, checkpoint, saved, old = _old_run(tmp_path, crops)
    # another SPLIT_SEED: split anew, which moves trained people to the test side
    moved = s.replace(SPLIT_SEED=5, TEST_SHARE=0.9)
    assert training_files.recorded_splits(moved, saved, checkpoint) == {}
    trained = {p for p, _, _ in old.train}
    assert trained & set(training_files.dataset_files(moved, str(crops), ('query', 'gallery')))
    with pytest.raises(UserError, match=r'training images of the checkpoint .*model.pth.tar": '
                                        r'"[^"]*/crops/[^"]*" is a training file itself'):
        training_files.check_not_trained_on(moved, saved, checkpoint)
    # a checkpoint without a record and without a run folder: nothing to check against
    zoo = tmp_path / 'zoo' / 'model' / 'zoo.pth'
    (note,) = training_files.check_not_trained_on(moved, saved, zoo)
    assert 'nothing to check the test images against' in note


@pytest.mark.slow
def test_test_evaluates_an_older_runs_recorded_split(tmp_path):
    # a run trained now, then made to look older: no record, split.json as older rules made it
    crops = _people(tmp_path / 'crops', ['0'] + [f'p{i:02d}' for i in range(9)])
    run_dir = main.train(_settings(tmp_path, SOURCES=str(crops), TARGETS=str(crops)))
    checkpoint = main.newest_checkpoint(run_dir)
    saved = torch.load(checkpoint, weights_only=False)
    del saved['training_files']
    torch.save(saved, checkpoint)
    (run_dir / RECORD_FILE).unlink()
    records, layout = own_data.read_folder(crops)
    old = own_data.build(str(crops), [dataclasses.replace(r, market=r.key == '0')
                                      for r in records], layout, 0.5, 0)
    own_data.write_split(run_dir, [old])
    out = main.test(_settings(tmp_path, WEIGHTS=str(checkpoint)))
    metrics = json.loads((out / 'metrics.json').read_text())
    assert (metrics['num_query'], metrics['num_gallery']) == (len(old.query), len(old.gallery))
    assert metrics['own_data'][0]['digest'] == old.digest() != own_data.load(str(crops)).digest()
    log = (out / 'log.txt').read_text()
    assert log.count('is tested on the split its run recorded in') == 1
    assert f'checked against the {len(old.train)} training images' in log
    with pytest.raises(UserError, match='is a training file itself'):
        main.test(_settings(tmp_path, WEIGHTS=str(checkpoint), SPLIT_SEED=5, TEST_SHARE=0.9))


def test_a_recorded_split_reads_back_as_written(tmp_path):
    crops = _people(tmp_path / 'crops', [f'p{i}' for i in range(6)])
    rows = ['path,pid,camid'] + [f'../crops/{p.relative_to(crops)},{p.parts[-3]},{p.parts[-2]}'
                                 for p in sorted(crops.rglob('*.jpg'))]
    (tmp_path / 'lists').mkdir()
    (tmp_path / 'lists' / 'people.csv').write_text('\n'.join(rows) + '\n')
    for value in (crops, tmp_path / 'lists' / 'people.csv'):
        data = own_data.load(str(value))
        own_data.write_split(tmp_path, [data])
        (back,) = own_data.read_split(tmp_path).values()
        assert back.recorded_in == str(tmp_path / 'split.json')
        assert dataclasses.replace(back, recorded_in=None) == data
    (tmp_path / 'split.json').write_text('[{"path": ')
    with pytest.raises(UserError, match=r'split.json" cannot be read'):
        own_data.read_split(tmp_path)
