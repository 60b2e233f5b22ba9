"""search: a trained checkpoint ranks a folder of the user's own images."""
import csv
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
from reidkit import search as searching
from reidkit.errors import UserError


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_data_root):
    from conftest import TINY
    experiments = tmp_path_factory.mktemp('experiments')
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
    original = searching.extract_batches
    monkeypatch.setattr(searching, 'extract_batches',
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
    out = main.search(s.replace(QUERY=str(queries), GALLERY=str(folder)))
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(r['path']).name for r in rows[:3])


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
    from reidkit.checkpoints import load_checkpoint, save_checkpoint
    from reidkit.runs import latest_run_checkpoint
    s, page_dir, rows = trained
    saved = load_checkpoint(latest_run_checkpoint(Path(s.EXPERIMENTS_DIR)))
    saved['state_dict']['conv1.weight'].fill_(float('nan'))
    diverged = save_checkpoint(saved, tmp_path / 'diverged' / 'model.pth.tar-9')
    query, folder = _valid_gallery(tmp_path, rows[0], page_dir)
    experiments = tmp_path / 'experiments'
    with pytest.raises(UserError, match=r'of the [\d,]+ query-gallery distances are NaN or '
                                        r'infinite, so no ranking'):
        main.search(s.replace(QUERY=str(query), GALLERY=str(folder), WEIGHTS=str(diverged),
                              EXPERIMENTS_DIR=str(experiments)))
    assert not [p for p in experiments.iterdir() if p.name != '.search-cache']


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
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name, query in names.items():
        assert f'Search: {query}<' in (out / name / 'index.html').read_text()
        results = list(csv.DictReader(open(out / name / 'results.csv')))
        assert all(Path(r['path']).is_absolute() and Path(r['path']).is_file() for r in results)
    png = list(csv.DictReader(open(out / 'person.png' / 'results.csv')))
    jpg = list(csv.DictReader(open(out / 'person.jpg' / 'results.csv')))
    assert [r['distance'] for r in png] != [r['distance'] for r in jpg]   # not overwritten


@pytest.mark.slow
def test_an_interrupted_search_never_looks_complete(trained, tmp_path, monkeypatch):
    from reidkit import visrank
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
    assert sorted(p.name for p in complete.iterdir()) == sorted(Path(r['path']).name
                                                                for r in rows[:3])


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
    assert sorted(p.name for p in out.iterdir()) == ['good.jpg', 'skipped_queries.txt']
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
    return searching.gallery_features(_means_model(), _to_tensor, Path(folder),
                                      Path(checkpoint), 'means', Path(cache_dir), 4,
                                      torch.device('cpu'))


def _check(gallery, folder: Path, means: np.ndarray) -> None:
    assert gallery.paths == [str((folder / f'{k:02d}.png').resolve()) for k in range(len(means))]
    assert [Path(p).name for p, _ in gallery.skipped] == ['broken.jpg']
    np.testing.assert_allclose(gallery.features, means, atol=1e-6)


WORKER = """
import json, sys, time
from pathlib import Path
import numpy as np, torch
from reidkit.search import gallery_features

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
found = gallery_features(MeansAfterGo(), to_tensor, Path(gallery), Path(checkpoint),
                         'means', Path(cache), 4, torch.device('cpu'))
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
        saved = json.loads(index.read_text())
        saved['paths'] = [str(Path(p).relative_to(tmp_path)) for p in saved['paths']]
        index.write_text(json.dumps(saved))
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
    extracted, extract = [], searching.extract_batches

    def recorded(model, transform, paths, *args):
        extracted.append([p.name for p in paths])
        return extract(model, transform, paths, *args)

    monkeypatch.setattr(searching, 'extract_batches', recorded)
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
