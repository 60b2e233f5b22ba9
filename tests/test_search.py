"""search: a trained checkpoint ranks a folder of the user's own images."""
import csv
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from reidkit.run.errors import UserError
from reidkit.search import cache as gallery_cache
from reidkit.search import command as searching
from reidkit.search import extractor as extracting
from reidkit.search.extractor import FeatureExtractor


@pytest.fixture(scope='module')
def trained(module_tmp_path, tiny_data_root):
    from conftest import TINY
    experiments = module_tmp_path / 'experiments'
    s = main.load_settings(dict(TINY, DATA_ROOT=str(tiny_data_root),
                                EXPERIMENTS_DIR=str(experiments), MAX_EPOCH=2, EVAL_FREQ=-1))
    main.train(s)
    vis_dir = main.vis_rank(s)
    page = vis_dir / 'visrank_market1501' / 'index.html'
    rows = json.loads(re.search(r'application/json">(.*?)</script>', page.read_text(),
                                re.S).group(1))
    for row in rows:            # the page holds %-encoded links
        row['path'] = urllib.parse.unquote(row['path'])
    return s, page.parent, rows


def _valid_gallery(tmp_path, row, page_dir):
    """The query's gallery as the evaluation sees it: without its own person in its camera."""
    query = (page_dir / row['path']).resolve()
    gallery_dir = query.parent.parent / 'bounding_box_test'
    folder = tmp_path / 'gallery'
    folder.mkdir()
    own = f'{row["pid"]:04d}_c{row["cam"] + 1}'
    for image in gallery_dir.glob('*.jpg'):
        if not image.name.startswith(own) and not image.name.startswith('-1_'):
            shutil.copy(image, folder / image.name)
    return query, folder


@pytest.mark.slow
def test_top1_equals_the_evaluations_rank1_and_the_cache_is_reused(trained, tmp_path, monkeypatch):
    s, page_dir, rows = trained
    row = rows[0]
    query, folder = _valid_gallery(tmp_path, row, page_dir)
    settings = s.replace(QUERY=str(query), GALLERY=str(folder), SEARCH_TOPK=3)
    out = main.search(settings) / query.name
    results = list(csv.DictReader(open(out / 'results.csv')))
    assert len(results) == len(list(folder.glob('*.jpg')))
    assert Path(results[0]['path']).name == Path(row['matches'][0][0]).name
    assert float(results[0]['distance']) == pytest.approx(row['matches'][0][1], rel=1e-3)
    assert [int(r['rank']) for r in results] == list(range(1, len(results) + 1))
    assert (out / 'strip.jpg').is_file() and 'results.csv' in (out / 'index.html').read_text()

    calls = []
    original = extracting.extract_batches
    monkeypatch.setattr(extracting, 'extract_batches',
                        lambda *a, **k: (calls.append(a[5]), original(*a, **k))[1])
    again = main.search(settings) / query.name
    assert calls == ['Queries']                  # the gallery came from the cache
    assert (again / 'results.csv').read_text() == (out / 'results.csv').read_text()
    (folder / 'new_0001.jpg').write_bytes((folder / Path(results[0]['path']).name).read_bytes())
    main.search(settings)
    assert calls.count('Gallery features') == 1  # a changed folder is extracted again


@pytest.mark.slow
def test_bad_files_are_skipped_and_listed(trained, tmp_path):
    s, page_dir, rows = trained
    query, folder = _valid_gallery(tmp_path, rows[1], page_dir)
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really')
    (folder / 'notes.png').write_text('hello')
    (folder / 'readme.txt').write_text('not an image, not even looked at')
    (folder / 'sub').mkdir()
    shutil.copy(query, folder / 'sub' / 'nested.jpg')
    out = main.search(s.replace(QUERY=str(query), GALLERY=str(folder))) / query.name
    skipped = (out / 'skipped.txt').read_text()
    assert 'broken.jpg' in skipped and 'notes.png' in skipped and 'readme.txt' not in skipped
    results = (out / 'results.csv').read_text()
    assert 'broken.jpg' not in results and 'nested.jpg' in results
    assert '2 unreadable files skipped' in (out / 'index.html').read_text()


@pytest.mark.slow
def test_a_folder_of_queries_gives_one_result_set_each(trained, tmp_path):
    s, page_dir, rows = trained
    query, folder = _valid_gallery(tmp_path, rows[0], page_dir)
    queries = tmp_path / 'queries'
    queries.mkdir()
    for row in rows[:3]:
        shutil.copy(page_dir / row['path'], queries)
    out = main.search(s.replace(QUERY=str(queries), GALLERY=str(folder), FLIP_TEST=True))
    assert sorted(p.name for p in out.iterdir()) == \
        sorted([Path(r['path']).name for r in rows[:3]] + [searching.SEARCH_LOG])
    # The log says what ranked: the checkpoint (the newest of the run) and the switches on.
    log = (out / searching.SEARCH_LOG).read_text()
    assert re.search(r'^Model: ".*model\.pth\.tar-2" \(epoch 2; resnet50, 32x16 input, on cpu\)$',
                     log, re.M), log
    assert 'Ranking: euclidean distance, FLIP_TEST' in log
    assert f'Gallery: {len(list(folder.iterdir()))} images' in log
    assert log.rstrip().endswith('3 queries ranked against '
                                 f'{len(list(folder.iterdir())):,} gallery images')


@pytest.mark.slow
def test_bad_input_is_named(trained, tmp_path):
    s, page_dir, rows = trained
    query = page_dir / rows[0]['path']
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='GALLERY: no images'):
        main.search(s.replace(QUERY=str(query), GALLERY=str(tmp_path / 'empty')))
    with pytest.raises(UserError, match='QUERY: ".*missing.jpg" does not exist'):
        main.search(s.replace(QUERY=str(tmp_path / 'missing.jpg'), GALLERY=str(tmp_path)))
    with pytest.raises(UserError, match='does not match MODEL_NAME=.resnet18.'):
        main.search(s.replace(QUERY=str(query), GALLERY=str(query.parent), MODEL_NAME='resnet18'))


@pytest.mark.slow
def test_a_diverged_checkpoint_ranks_nothing(trained, tmp_path):
    from reidkit.run.checkpoints import load_checkpoint, save_checkpoint
    from reidkit.run.folders import latest_run_checkpoint
    s, page_dir, rows = trained
    saved = load_checkpoint(latest_run_checkpoint(Path(s.EXPERIMENTS_DIR)))
    saved['state_dict']['conv1.weight'].fill_(float('nan'))
    diverged = save_checkpoint(saved, tmp_path / 'diverged' / 'model.pth.tar-9')
    query, folder = _valid_gallery(tmp_path, rows[0], page_dir)
    experiments = tmp_path / 'experiments'
    with pytest.raises(UserError, match=r'WEIGHTS: ".*model.pth.tar-9" holds NaN or infinite '
                                        r"values \(first: 'conv1.weight'\)"):
        main.search(s.replace(QUERY=str(query), GALLERY=str(folder), WEIGHTS=str(diverged),
                              EXPERIMENTS_DIR=str(experiments)))
    assert not [p for p in experiments.glob('*') if p.name != '.search-cache']


def _search_folders(experiments: Path) -> set:
    return {p for p in Path(experiments).iterdir() if not p.name.startswith('.')}


@pytest.mark.slow
def test_query_file_names_give_distinct_folders_inside_the_search(trained, tmp_path):
    s, page_dir, rows = trained
    _, folder = _valid_gallery(tmp_path, rows[0], page_dir)
    queries = tmp_path / 'queries'
    (queries / 'sub').mkdir(parents=True)
    shutil.copy(page_dir / rows[0]['path'], queries / 'person.jpg')
    shutil.copy(page_dir / rows[0]['path'], queries / 'sub' / 'person.jpg')
    Image.open(page_dir / rows[1]['path']).save(queries / 'person.png')
    Image.open(page_dir / rows[2]['path']).save(queries / '...bmp', 'BMP')   # its stem is '..'
    before = _search_folders(s.EXPERIMENTS_DIR)
    out = main.search(s.replace(QUERY=str(queries), GALLERY=str(folder)))
    assert _search_folders(s.EXPERIMENTS_DIR) - before == {out}       # nothing beside it
    names = {'person.jpg': 'person.jpg', 'person.png': 'person.png', '_...bmp': '...bmp',
             'sub_person.jpg': 'person.jpg'}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(names)
    for name, query in names.items():
        assert f'Search: {query}<' in (out / name / 'index.html').read_text()
        results = list(csv.DictReader(open(out / name / 'results.csv')))
        assert all(Path(r['path']).is_absolute() and Path(r['path']).is_file() for r in results)
    png = list(csv.DictReader(open(out / 'person.png' / 'results.csv')))
    jpg = list(csv.DictReader(open(out / 'person.jpg' / 'results.csv')))
    assert [r['distance'] for r in png] != [r['distance'] for r in jpg]   # not overwritten


@pytest.mark.slow
def test_an_interrupted_search_never_looks_complete(trained, tmp_path, monkeypatch):
    from reidkit.evaluate import visrank
    s, page_dir, rows = trained
    _, folder = _valid_gallery(tmp_path, rows[0], page_dir)
    queries = tmp_path / 'queries'
    queries.mkdir()
    for row in rows[:3]:
        shutil.copy(page_dir / row['path'], queries)
    settings = s.replace(QUERY=str(queries), GALLERY=str(folder))
    drawn, draw_strip = [], visrank.draw_strip

    def interrupted_on_the_second_strip(*args):
        drawn.append(args)
        if len(drawn) == 2:
            raise KeyboardInterrupt
        return draw_strip(*args)

    monkeypatch.setattr(visrank, 'draw_strip', interrupted_on_the_second_strip)
    before = _search_folders(s.EXPERIMENTS_DIR)
    with pytest.raises(KeyboardInterrupt):
        main.search(settings)
    (out,) = _search_folders(s.EXPERIMENTS_DIR) - before
    assert 'before every query was done' in (out / searching.INCOMPLETE).read_text()
    finished = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith('.')]
    assert len(finished) == 1 and (finished[0] / 'strip.jpg').is_file()
    assert (finished[0] / 'index.html').is_file()
    (half,) = out.glob('.*.partial')          # the second query's, results.csv but no strip
    assert (half / 'results.csv').is_file() and not (half / 'strip.jpg').exists()

    monkeypatch.setattr(visrank, 'draw_strip', draw_strip)
    complete = main.search(settings)
    assert not (complete / searching.INCOMPLETE).exists()
    assert sorted(p.name for p in complete.iterdir()) == sorted(
        [Path(r['path']).name for r in rows[:3]] + [searching.SEARCH_LOG])


@pytest.mark.slow
def test_unreadable_queries_are_listed_and_none_readable_is_an_error(trained, tmp_path):
    s, page_dir, rows = trained
    _, folder = _valid_gallery(tmp_path, rows[0], page_dir)
    queries = tmp_path / 'queries'
    queries.mkdir()
    shutil.copy(page_dir / rows[0]['path'], queries / 'good.jpg')
    (queries / 'broken.jpg').write_bytes(b'\xff\xd8\xff not a picture')
    settings = s.replace(QUERY=str(queries), GALLERY=str(folder))
    out = main.search(settings)
    assert sorted(p.name for p in out.iterdir()) == ['good.jpg', 'log.txt', 'skipped_queries.txt']
    assert 'broken.jpg' in (out / 'skipped_queries.txt').read_text()

    (queries / 'good.jpg').unlink()
    before = _search_folders(s.EXPERIMENTS_DIR)
    with pytest.raises(UserError, match=r'QUERY: none of the 1 query images could be read\. '
                                        r'".*broken\.jpg" cannot be read'):
        main.search(settings)
    assert _search_folders(s.EXPERIMENTS_DIR) == before          # no empty output folder


# --- the gallery feature cache, with a stand-in model: features are channel means ----------

def _means_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def _small_gallery(folder: Path, count: int = 6) -> np.ndarray:
    """`count` one-colour images (and a broken file) under `folder`; their channel means."""
    folder.mkdir(parents=True)
    colours = [(40 * k, 255 - 30 * k, 90) for k in range(count)]
    for k, colour in enumerate(colours):
        Image.new('RGB', (8, 16), colour).save(folder / f'{k:02d}.png')
    (folder / 'broken.jpg').write_bytes(b'not an image')
    return np.array(colours, np.float32) / 255


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)


def _features(folder, cache_dir, checkpoint):
    extractor = FeatureExtractor(_means_model(), _to_tensor, torch.device('cpu'),
                                 Path(checkpoint), 'means')
    return gallery_cache.gallery_features(extractor, Path(folder), Path(cache_dir), 4)


def _check(gallery, folder: Path, means: np.ndarray) -> None:
    assert gallery.paths == [str((folder / f'{k:02d}.png').resolve()) for k in range(len(means))]
    assert [Path(p).name for p, _ in gallery.skipped] == ['broken.jpg']
    np.testing.assert_allclose(gallery.features, means, atol=1e-6)


WORKER = """
import json, sys, time
from pathlib import Path
import numpy as np, torch
from reidkit.search.cache import gallery_features
from reidkit.search.extractor import FeatureExtractor

gallery, checkpoint, cache, flags, role = sys.argv[1:]
flags = Path(flags)

class MeansAfterGo(torch.nn.Module):
    # Channel means, but only once the test says go: the other search starts meanwhile.
    def forward(self, x):
        (flags / 'started').touch()
        while not (flags / 'go').exists():
            time.sleep(0.05)
        return x.mean(dim=(2, 3))

while role == 'second' and not (flags / 'started').exists():
    time.sleep(0.05)        # until the first search is extracting, holding the lock
to_tensor = lambda image: torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)
extractor = FeatureExtractor(MeansAfterGo(), to_tensor, torch.device('cpu'), Path(checkpoint),
                             'means')
found = gallery_features(extractor, Path(gallery), Path(cache), 4)
print(json.dumps({'cached': found.cached, 'paths': found.paths, 'skipped': found.skipped,
                  'features': found.features.tolist()}))
"""


@pytest.mark.slow
def test_two_searches_at_once_on_one_gallery_share_one_extraction(tmp_path):
    means = _small_gallery(tmp_path / 'gallery')
    (tmp_path / 'model.pth').write_bytes(b'weights')
    (tmp_path / 'worker.py').write_text(WORKER)
    flags = tmp_path / 'flags'
    flags.mkdir()
    env = {**os.environ, 'PYTHONPATH': str(Path(main.__file__).parent)}
    logs = {role: tmp_path / f'{role}.log' for role in ('first', 'second')}
    workers = [subprocess.Popen([sys.executable, str(tmp_path / 'worker.py'),
                                 str(tmp_path / 'gallery'), str(tmp_path / 'model.pth'),
                                 str(tmp_path / 'cache'), str(flags), role],
                                stdout=open(log, 'w'), stderr=subprocess.DEVNULL, env=env,
                                cwd=tmp_path if role == 'first' else flags)
               for role, log in logs.items()]
    deadline = time.time() + 60
    while 'Waiting for another search' not in logs['second'].read_text() and \
            time.time() < deadline and workers[1].poll() is None:
        time.sleep(0.05)
    (flags / 'go').touch()
    assert [worker.wait(60) for worker in workers] == [0, 0]
    assert 'Waiting for another search' in logs['second'].read_text()
    first, second = (json.loads(log.read_text().splitlines()[-1]) for log in logs.values())
    assert (first['cached'], second['cached']) == (False, True)
    assert first == dict(second, cached=False)
    assert first['paths'] == [str(tmp_path / 'gallery' / f'{k:02d}.png') for k in range(6)]
    np.testing.assert_allclose(first['features'], means, atol=1e-6)
    assert not list((tmp_path / 'cache').glob('.*'))              # no temporary files left


@pytest.mark.parametrize('damage', ['truncated index', 'fewer rows', 'missing features',
                                    'relative paths'])
def test_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.chdir(tmp_path)
    means = _small_gallery(tmp_path / 'gallery')
    (tmp_path / 'model.pth').write_bytes(b'weights')
    assert not _features('gallery', 'cache', 'model.pth').cached
    (index,) = Path('cache').glob('*.json')
    features = index.with_suffix('.npy')
    if damage == 'truncated index':
        index.write_text(index.read_text()[:40])
    elif damage == 'fewer rows':
        np.save(features, np.load(features)[:-1])
    elif damage == 'missing features':
        features.unlink()
    else:                               # as caches were written before paths were absolute
        generation, saved = index.read_text().split('\n', 1)
        saved = json.loads(saved)
        saved['paths'] = [str(Path(p).relative_to(tmp_path)) for p in saved['paths']]
        index.write_text(generation + '\n' + json.dumps(saved))
    capsys.readouterr()
    rebuilt = _features('gallery', 'cache', 'model.pth')
    assert not rebuilt.cached
    assert 'cannot be used' in capsys.readouterr().out
    _check(rebuilt, tmp_path / 'gallery', means)
    again = _features('gallery', 'cache', 'model.pth')
    assert again.cached
    _check(again, tmp_path / 'gallery', means)


def test_a_cache_made_from_another_working_directory_gives_valid_paths(tmp_path, monkeypatch):
    means = _small_gallery(tmp_path / 'data' / 'gallery')
    (tmp_path / 'model.pth').write_bytes(b'weights')
    monkeypatch.chdir(tmp_path / 'data')
    assert not _features('gallery', tmp_path / 'cache', tmp_path / 'model.pth').cached
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path / 'elsewhere')
    gallery = _features('../data/gallery', tmp_path / 'cache', tmp_path / 'model.pth')
    assert gallery.cached
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in gallery.paths)
    _check(gallery, tmp_path / 'data' / 'gallery', means)


def test_only_new_or_changed_images_are_extracted_again(tmp_path, monkeypatch, capsys):
    gallery, cache, model = tmp_path / 'gallery', tmp_path / 'cache', tmp_path / 'model.pth'
    means = _small_gallery(gallery)
    model.write_bytes(b'weights')
    first = _features(gallery, cache, model)
    extracted, extract = [], extracting.extract_batches

    def recorded(model, transform, paths, *args):
        extracted.append([p.name for p in paths])
        return extract(model, transform, paths, *args)

    monkeypatch.setattr(extracting, 'extract_batches', recorded)
    (gallery / '00.png').unlink()                                       # removed
    Image.new('RGB', (8, 16), (200, 100, 50)).save(gallery / '03.png')  # changed
    os.utime(gallery / '03.png', ns=(1, 10 ** 18))
    Image.new('RGB', (8, 16), (10, 20, 30)).save(gallery / '06.png')    # added
    Image.new('RGB', (8, 16), (90, 90, 90)).save(gallery / 'broken.jpg')   # mended
    capsys.readouterr()
    second = _features(gallery, cache, model)
    assert extracted == [['03.png', '06.png', 'broken.jpg']]
    assert '3 new or changed images to extract, 3 gone or changed; 4 features kept' in \
        capsys.readouterr().out
    assert not second.cached and second.skipped == []
    rows = {Path(p).name: row for row, p in enumerate(second.paths)}
    assert sorted(rows) == ['01.png', '02.png', '03.png', '04.png', '05.png', '06.png',
                            'broken.jpg']
    old_ids = {Path(p).name: i for p, i in zip(first.paths, first.ids)}
    for name in ('01.png', '02.png', '04.png', '05.png'):           # kept, with their ids
        assert second.ids[rows[name]] == old_ids[name]
        np.testing.assert_allclose(second.features[rows[name]], means[int(name[:2])], atol=1e-6)
    assert second.ids[rows['03.png']] not in first.ids.tolist()     # changed: a new id
    assert list(second.ids) == sorted(second.ids)
    np.testing.assert_allclose(second.features[rows['03.png']], np.array([200, 100, 50]) / 255,
                               atol=1e-6)
    np.testing.assert_allclose(second.features[rows['broken.jpg']], [90 / 255] * 3, atol=0.02)
    third = _features(gallery, cache, model)
    assert third.cached and len(extracted) == 1
    assert third.paths == second.paths and list(third.ids) == list(second.ids)
    assert not list(cache.glob('.*'))


@pytest.mark.slow
def test_the_index_ranks_as_the_exact_search_and_follows_the_folder(trained, tmp_path, capsys):
    s, page_dir, rows = trained
    query, folder = _valid_gallery(tmp_path, rows[0], page_dir)
    exact = main.search(s.replace(QUERY=str(query), GALLERY=str(folder))) / query.name
    expected = list(csv.DictReader(open(exact / 'results.csv')))[:15]
    settings = s.replace(QUERY=str(query), GALLERY=str(folder), SEARCH_EXACT_UP_TO=0,
                         SEARCH_CSV_ROWS=15, SEARCH_TOPK=5)
    capsys.readouterr()
    out = main.search(settings) / query.name
    assert 'Index: built' in capsys.readouterr().out
    found = list(csv.DictReader(open(out / 'results.csv')))
    assert [r['path'] for r in found] == [r['path'] for r in expected]
    assert [float(r['distance']) for r in found] == \
        pytest.approx([float(r['distance']) for r in expected], rel=1e-4)
    assert 'the nearest 15 in <a href="results.csv">' in (out / 'index.html').read_text()

    shutil.copy(query, folder / 'new_0001.jpg')
    found = list(csv.DictReader(open(main.search(settings) / query.name / 'results.csv')))
    assert 'Index: updated (1 added, 0 removed)' in capsys.readouterr().out
    assert Path(found[0]['path']).name == 'new_0001.jpg' and float(found[0]['distance']) < 1e-3
    (folder / 'new_0001.jpg').unlink()
    found = list(csv.DictReader(open(main.search(settings) / query.name / 'results.csv')))
    assert 'Index: updated (0 added, 1 removed)' in capsys.readouterr().out
    assert [r['path'] for r in found] == [r['path'] for r in expected]
    main.search(settings)
    assert 'Index: reused' in capsys.readouterr().out


# --- issue 21: the cache, its index and the files they pair, all through search() ----------
# A stand-in model (no training): each image's channel means over a 6x2 grid of cells.

class _Grid(torch.nn.Module):
    def __init__(self, cells=(6, 2)):
        super().__init__()
        self.cells = cells

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images, self.cells).flatten(1)


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """Settings for search() with _Grid in the place of a checkpoint's model; index settings
    as in the issue (nprobe 1: a wrong code loses its image)."""
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'weights')
    grid = FeatureExtractor(_Grid(), _to_tensor, torch.device('cpu'), checkpoint, 'grid')
    monkeypatch.setattr(searching, 'load_extractor', lambda s, weights: (grid, s))
    return main.load_settings(dict(EXPERIMENTS_DIR=str(tmp_path / 'experiments'),
                                   QUERY=str(tmp_path / 'queries'),
                                   GALLERY=str(tmp_path / 'gallery'), BATCH_SIZE_TEST=64,
                                   SEARCH_NPROBE=1, SEARCH_CSV_ROWS=10, SEARCH_TOPK=3))


def _noise(seed: int) -> Image.Image:
    """A random 8x24 picture: its BMP file has the same byte size as every other one."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (24, 8, 3), dtype=np.uint8))


def _noise_gallery(folder: Path, count: int, first: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f'g{k:04d}.bmp' for k in range(first, first + count)]
    for k, path in enumerate(paths, first):
        _noise(k).save(path)
    return paths


def _ask_for(s, images) -> None:
    """The query folder: a copy of each of `images` (query k is gallery file k's picture)."""
    folder = Path(s.QUERY)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for image in images:
        shutil.copy(image, folder / image.name)


def _top1(s) -> dict:
    """Each query's first result: {query name: (gallery file name, distance)}."""
    out = main.search(s)
    found = {}
    for folder in (p for p in out.iterdir() if p.is_dir()):
        first = next(csv.DictReader(open(folder / 'results.csv')))
        found[folder.name] = (Path(first['path']).name, float(first['distance']))
    return found


def _found_themselves(found: dict) -> bool:
    return all(name == query and abs(distance) < 1e-5 for query, (name, distance) in found.items())


def _cache_files(s) -> tuple[Path, Path, Path]:
    (manifest,) = (Path(s.EXPERIMENTS_DIR) / '.search-cache').glob('*.json')
    return manifest, manifest.with_suffix('.npy'), manifest.with_suffix('.ivfpq.npz')


def test_a_cache_rebuilt_after_removals_is_never_paired_with_the_old_index(stand_in, tmp_path,
                                                                           capsys):
    paths = _noise_gallery(tmp_path / 'gallery', 300)
    s = stand_in.replace(SEARCH_EXACT_UP_TO=0)
    _ask_for(s, paths[100::20])
    assert _found_themselves(_top1(s))
    for path in paths[:40]:
        path.unlink()
    manifest, _, _ = _cache_files(s)
    manifest.write_text(manifest.read_text()[:-5])          # damaged: the cache is rebuilt
    capsys.readouterr()
    found = _top1(s)
    out = capsys.readouterr().out
    assert _found_themselves(found), found
    assert 'cannot be used' in out and 'Index: built' in out


def test_an_index_from_an_older_cache_is_updated_or_rebuilt_never_trusted(stand_in, tmp_path,
                                                                          capsys):
    paths = _noise_gallery(tmp_path / 'gallery', 300)
    s = stand_in.replace(SEARCH_EXACT_UP_TO=0)
    _ask_for(s, paths[100::20])
    _top1(s)
    _, _, index = _cache_files(s)
    first_index = index.read_bytes()
    for path in paths[:20]:
        path.unlink()
    added = _noise_gallery(tmp_path / 'gallery', 20, first=1000)
    _ask_for(s, paths[100::20] + added[::5])
    capsys.readouterr()
    assert _found_themselves(_top1(s))
    assert 'Index: updated (20 added, 20 removed)' in capsys.readouterr().out
    # An index of an earlier version of this cache: its ids still mean the same images.
    index.write_bytes(first_index)
    found = _top1(s)
    assert 'Index: updated (20 added, 20 removed)' in capsys.readouterr().out
    assert _found_themselves(found), found
    # The cache is rebuilt (its rows numbered afresh): no earlier index may be updated.
    manifest, _, _ = _cache_files(s)
    manifest.write_text('{}')
    _top1(s)
    index.write_bytes(first_index)
    capsys.readouterr()
    found = _top1(s)
    assert re.search(r'the index ".*" is rebuilt \(.*another version of the feature cache',
                     capsys.readouterr().out)
    assert _found_themselves(found), found


def test_a_hand_edited_manifest_is_not_trusted(stand_in, tmp_path, capsys):
    paths = _noise_gallery(tmp_path / 'gallery', 20)
    s = stand_in                                     # exact search: no index involved
    _ask_for(s, paths[3:5])
    assert _found_themselves(_top1(s))
    manifest, _, _ = _cache_files(s)
    lines = manifest.read_text().split('\n')
    at = next(k for k, line in enumerate(lines) if '"paths"' in line)
    saved = json.loads(lines[at])
    for rows in (saved[key] for key in saved if key != 'ids'):    # paths and their stamps
        if isinstance(rows, list) and len(rows) == 20:
            rows[3], rows[4] = rows[4], rows[3]
    lines[at] = json.dumps(saved)                    # the same files, paired with other rows
    manifest.write_text('\n'.join(lines))
    capsys.readouterr()
    found = _top1(s)
    assert _found_themselves(found), found
    assert 'cannot be used' in capsys.readouterr().out


@pytest.mark.parametrize('replacement', ['rows reordered', "an older cache's",
                                         'newer than the manifest (a crash between renames)'])
@pytest.mark.parametrize('exact', [True, False], ids=['exact', 'index'])
def test_a_replaced_features_file_is_not_trusted(stand_in, tmp_path, capsys, replacement, exact):
    paths = _noise_gallery(tmp_path / 'gallery', 300 if not exact else 20)
    s = stand_in.replace(SEARCH_EXACT_UP_TO=10 ** 6 if exact else 0)
    _ask_for(s, paths[5:15])
    assert _found_themselves(_top1(s))
    _, features, _ = _cache_files(s)
    if replacement == 'rows reordered':
        rows = np.load(features)
        np.save(features, rows[::-1])               # same shape, rows for other files
    else:
        manifest, _, _ = _cache_files(s)
        older = manifest if replacement.startswith('newer') else features
        kept = older.read_bytes()
        paths[0].unlink()                            # one removed, one added: same row count
        _noise_gallery(tmp_path / 'gallery', 1, first=1000)
        _top1(s)
        older.write_bytes(kept)
    capsys.readouterr()
    found = _top1(s)
    assert _found_themselves(found), found
    assert 'cannot be used' in capsys.readouterr().out


def test_images_removed_and_added_back_are_found_again(stand_in, tmp_path, capsys):
    paths = _noise_gallery(tmp_path / 'gallery', 300)
    s = stand_in.replace(SEARCH_EXACT_UP_TO=0)
    _ask_for(s, paths[:100:10])
    _top1(s)
    aside = tmp_path / 'aside'
    aside.mkdir()
    for path in paths[:100]:
        shutil.move(path, aside / path.name)
    _top1(s.replace(SEARCH_EXACT_UP_TO=10 ** 6))     # an exact search: the index is not touched
    for path in paths[:100]:
        shutil.copy2(aside / path.name, path)        # back, as cp -p would: same size and mtime
    capsys.readouterr()
    found = _top1(s)
    assert 'Index: updated (100 added, 100 removed)' in capsys.readouterr().out
    assert _found_themselves(found), found


@pytest.mark.parametrize('how', ['cp -p (in place)', 'rsync -a (renamed over)'])
def test_a_file_replaced_with_the_same_size_and_mtime_is_extracted_again(stand_in, tmp_path, how):
    paths = _noise_gallery(tmp_path / 'gallery', 20)
    s = stand_in
    newcomer = tmp_path / 'newcomer' / 'g0007.bmp'
    newcomer.parent.mkdir()
    _noise(999).save(newcomer)
    _ask_for(s, [newcomer])
    ((name, distance),) = _top1(s).values()
    assert distance > 0.01                           # not in the gallery yet
    target = paths[7]
    before = target.stat()
    assert newcomer.stat().st_size == before.st_size
    if how.startswith('cp'):
        target.write_bytes(newcomer.read_bytes())    # same inode, truncated and rewritten
    else:
        shutil.copy(newcomer, target.with_suffix('.part'))
        os.replace(target.with_suffix('.part'), target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == \
        (before.st_size, before.st_mtime_ns)
    assert _top1(s) == {'g0007.bmp': ('g0007.bmp', pytest.approx(0, abs=1e-5))}


class _FullDisk:
    """`open` for a module whose writes into `folder` fail with ENOSPC once `room` bytes are
    written (a disk filling up); every other file opens as usual."""

    def __init__(self, folder: Path, room: int):
        self.folder, self.room, self.failed = Path(folder).resolve(), room, 0

    def __call__(self, file, mode='r', *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        inside = Path(file).resolve().is_relative_to(self.folder)
        return _Metered(handle, self) if inside and ('w' in mode or 'a' in mode) else handle


class _Metered:
    def __init__(self, handle, disk):
        self.handle, self.disk = handle, disk

    def write(self, data):
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if size > self.disk.room:
            self.disk.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.room -= size
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def _cache_listing(s) -> dict:
    return {p.name: p.read_bytes() for p in (Path(s.EXPERIMENTS_DIR) / '.search-cache').iterdir()
            if not p.name.endswith('.lock')}


@pytest.mark.parametrize('room', [0, 2_000, 30_000], ids=['nothing fits', 'a few rows fit',
                                                          'the rows fit, not the manifest'])
def test_a_full_disk_while_writing_features_is_a_message(stand_in, tmp_path, monkeypatch, room):
    paths = _noise_gallery(tmp_path / 'gallery', 200)
    s = stand_in
    _ask_for(s, paths[:2])
    assert _found_themselves(_top1(s))
    before = _cache_listing(s)
    for path in paths[100:150]:              # what is kept must be written again
        path.unlink()
    _noise_gallery(tmp_path / 'gallery', 10, first=1000)
    disk = _FullDisk(Path(s.EXPERIMENTS_DIR) / '.search-cache', room)
    monkeypatch.setattr(gallery_cache, 'open', disk, raising=False)
    searches = _search_folders(s.EXPERIMENTS_DIR)
    with pytest.raises(UserError, match=r'could not write .*\.search-cache.* \(No space left on '
                                        r'device\)\. .*free some space'):
        main.search(s)
    assert disk.failed == 1
    assert _cache_listing(s) == before               # the previous cache, nothing partial
    assert _search_folders(s.EXPERIMENTS_DIR) == searches
    monkeypatch.setattr(gallery_cache, 'open', open, raising=False)
    assert _found_themselves(_top1(s))


def test_a_full_disk_when_saving_the_index_is_one_line(stand_in, tmp_path, monkeypatch, capsys):
    from reidkit.search import index as search_index
    paths = _noise_gallery(tmp_path / 'gallery', 300)
    s = stand_in.replace(SEARCH_EXACT_UP_TO=0)
    _ask_for(s, paths[::30])
    _top1(s)
    _, _, index = _cache_files(s)
    saved = index.read_bytes()
    added = _noise_gallery(tmp_path / 'gallery', 5, first=1000)
    _ask_for(s, paths[::30] + added)
    disk = _FullDisk(index.parent, 0)
    monkeypatch.setattr(search_index, 'open', disk, raising=False)
    capsys.readouterr()
    found = _top1(s)                                 # the index updated in memory serves
    assert disk.failed and _found_themselves(found), found
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if 'No space left on device' in line]
    assert len(notes) == 1 and 'the previous file stays' in notes[0]
    assert index.read_bytes() == saved and not list(index.parent.glob('.*'))
    monkeypatch.setattr(search_index, 'open', open, raising=False)
    assert _found_themselves(_top1(s))
    assert 'Index: updated (5 added, 0 removed)' in capsys.readouterr().out


@pytest.mark.parametrize('file', ['index', 'features'])
def test_a_folder_where_a_cache_file_goes_is_named(stand_in, tmp_path, capsys, file):
    paths = _noise_gallery(tmp_path / 'gallery', 50)
    _ask_for(stand_in, paths[:1])
    _top1(stand_in)
    manifest, features, index = _cache_files(stand_in)
    blocked = index if file == 'index' else features
    blocked.unlink(missing_ok=True)
    blocked.mkdir()
    (paths[1]).unlink()                              # so that the features are written again
    capsys.readouterr()
    code = main.main(['search', f'--QUERY={stand_in.QUERY}', f'--GALLERY={stand_in.GALLERY}',
                      f'--EXPERIMENTS_DIR={stand_in.EXPERIMENTS_DIR}', '--SEARCH_EXACT_UP_TO=0',
                      '--SEARCH_NPROBE=1'])
    err = capsys.readouterr().err
    assert code == 2 and 'Traceback' not in err
    assert re.match(rf'error: .*"{re.escape(str(blocked))}" is a folder', err), err


FULL_DISK_WORKER = """
import sys
from pathlib import Path
import numpy as np, torch
import main
from reidkit.search import command as search
from reidkit.search.extractor import FeatureExtractor

class Pixels(torch.nn.Module):          # a stand-in model: 576 values per 8x24 picture
    def forward(self, images):
        return images.flatten(1)

to_tensor = lambda image: torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)
checkpoint = Path(sys.argv[1])
pixels = FeatureExtractor(Pixels(), to_tensor, torch.device('cpu'), checkpoint, 'pixels')
search.load_extractor = lambda s, weights: (pixels, s)
sys.exit(main.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_disk_that_fills_up_while_features_are_written_is_a_message(tmp_path):
    """A real full disk (a 256 KB tmpfs; mounting needs root, else skipped): 300 features of
    2.3 KB do not fit. Through a memory map this was SIGBUS (exit -7) and a .partial file."""
    paths = _noise_gallery(tmp_path / 'gallery', 300)
    cache = tmp_path / 'experiments' / '.search-cache'
    cache.mkdir(parents=True)
    try:
        mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', str(cache)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip('no mount command here')
    if mounted.returncode != 0:
        pytest.skip(f'a small tmpfs cannot be mounted here: {mounted.stderr.strip()}')
    try:
        (tmp_path / 'worker.py').write_text(FULL_DISK_WORKER)
        (tmp_path / 'model.pth').write_bytes(b'weights')
        done = subprocess.run(
            [sys.executable, str(tmp_path / 'worker.py'), str(tmp_path / 'model.pth'), 'search',
             f'--QUERY={paths[0]}', f'--GALLERY={tmp_path / "gallery"}',
             f'--EXPERIMENTS_DIR={tmp_path / "experiments"}'],
            capture_output=True, text=True,
            env={**os.environ, 'PYTHONPATH': str(Path(main.__file__).parent)})
        errors = [line for line in done.stderr.splitlines() if line.startswith('error:')]
        assert done.returncode == 2 and 'Traceback' not in done.stderr, done.stderr[-3000:]
        assert re.match(r'error: could not write the gallery features ".*\.search-cache/\w+\.npy" '
                        r'\(No space left on device\)\. The previous feature cache is intact',
                        errors[0])
        assert [p.suffix for p in cache.iterdir()] == ['.lock']        # nothing partial
        assert _search_folders(tmp_path / 'experiments') == set()
    finally:
        subprocess.run(['umount', str(cache)], check=True)


# --- issue 27: a query that is itself in the gallery is not its own result -----------------

def _results(folder: Path) -> list[tuple[str, float]]:
    return [(row['path'], float(row['distance']))
            for row in csv.DictReader(open(folder / 'results.csv'))]


@pytest.mark.parametrize('exact', [True, False], ids=['exact', 'index'])
def test_a_query_in_the_gallery_is_left_out_of_its_own_results(stand_in, tmp_path, capsys,
                                                               exact):
    paths = _noise_gallery(tmp_path / 'gallery', 20 if exact else 300)
    s = stand_in.replace(SEARCH_EXACT_UP_TO=10 ** 6 if exact else 0)
    queries = Path(s.QUERY)
    queries.mkdir()
    (queries / 'link.bmp').symlink_to(paths[3])          # a link to a gallery file
    shutil.copy(paths[5], queries / 'copy.bmp')           # a copy: another file, still a match
    _noise(999).save(queries / 'own.bmp')
    (tmp_path / 'gallery' / 'link-to-own.bmp').symlink_to(queries / 'own.bmp')
    out = main.search(s)
    printed = capsys.readouterr().out
    assert '2 queries were found in the gallery themselves and left out of their own ' \
           'results' in printed
    for query, own, listed in (('link.bmp', paths[3], 'g0003.bmp'),
                               ('own.bmp', queries / 'own.bmp', 'link-to-own.bmp')):
        found = _results(out / query)
        assert len(found) == 10 and all(Path(p).resolve() != own.resolve() for p, _ in found)
        assert found[0][1] > 1e-5                        # nothing at distance 0: itself is out
        page = (out / query / 'index.html').read_text()
        tiles = page.split('<figure>')[1:]              # the results (not the query's figure)
        assert 'own file is in the gallery (as 1 image' in page
        assert len(tiles) == 3 and not any(listed in tile for tile in tiles)
    nearest, distance = _results(out / 'copy.bmp')[0]
    assert nearest == str(paths[5].resolve()) and distance < 1e-5
    assert 'own file' not in (out / 'copy.bmp' / 'index.html').read_text()

    # QUERY a file inside GALLERY; every other image listed; the feature cache is untouched
    single = s.replace(QUERY=str(paths[7]), SEARCH_CSV_ROWS=1000)
    out = main.search(single) / paths[7].name
    printed = capsys.readouterr().out
    assert 'features from the cache' in printed
    assert '1 query was found in the gallery itself and left out of its own results' in printed
    found = _results(out)
    gallery = len(paths) + 1
    assert str(paths[7]) not in [p for p, _ in found] and found[0][1] > 1e-5
    page = (out / 'index.html').read_text()
    assert f'{gallery - 1:,} gallery images ranked; ' in page
    if exact:                       # (the index lists what its probed lists hold)
        assert len(found) == gallery - 1 and 'ranked; all of them' in page
    manifest, _, _ = _cache_files(s)
    assert str(paths[7]) in manifest.read_text() and str(paths[3]) in manifest.read_text()


def test_an_empty_gallery_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    query = tmp_path / 'person.jpg'
    Image.new('RGB', (16, 32)).save(query)
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    (tmp_path / 'empty' / 'notes.txt').write_text('no image here')

    def no_model(*args, **kwargs):
        raise AssertionError('a model was loaded')
    monkeypatch.setattr(searching, 'load_extractor', no_model)
    monkeypatch.setattr(main, 'train', no_model)
    s = main.load_settings(dict(QUERY=str(query), GALLERY=str(tmp_path / 'empty'),
                                EXPERIMENTS_DIR=str(tmp_path / 'experiments')))
    with pytest.raises(UserError, match='GALLERY: no images .* under ".*empty"'):
        main.search(s)
    with pytest.raises(UserError, match='GALLERY: no images'):   # nor a training first
        main._run_modes(['train', 'search'], False, s, None)
    with pytest.raises(UserError, match='GALLERY: ".*missing" is not a folder'):
        main.search(s.replace(GALLERY=str(tmp_path / 'missing')))
