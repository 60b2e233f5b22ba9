"""search: a trained checkpoint ranks a folder of the user's own images."""
import csv
import json
import re
import shutil
from pathlib import Path

import pytest

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
                                re.S).group(1).replace('<\\/', '</'))
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


def test_top1_equals_the_evaluations_rank1_and_the_cache_is_reused(trained, tmp_path, monkeypatch):
    s, page_dir, rows = trained
    row = rows[0]
    query, folder = _valid_gallery(tmp_path, row, page_dir)
    settings = s.replace(QUERY=str(query), GALLERY=str(folder), SEARCH_TOPK=3)
    out = main.search(settings) / query.stem
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
    again = main.search(settings) / query.stem
    assert calls == ['Queries']                  # the gallery came from the cache
    assert (again / 'results.csv').read_text() == (out / 'results.csv').read_text()
    (folder / 'new_0001.jpg').write_bytes((folder / Path(results[0]['path']).name).read_bytes())
    main.search(settings)
    assert calls.count('Gallery features') == 1  # a changed folder is extracted again


def test_bad_files_are_skipped_and_listed(trained, tmp_path):
    s, page_dir, rows = trained
    query, folder = _valid_gallery(tmp_path, rows[1], page_dir)
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really')
    (folder / 'notes.png').write_text('hello')
    (folder / 'readme.txt').write_text('not an image, not even looked at')
    (folder / 'sub').mkdir()
    shutil.copy(query, folder / 'sub' / 'nested.jpg')
    out = main.search(s.replace(QUERY=str(query), GALLERY=str(folder))) / query.stem
    skipped = (out / 'skipped.txt').read_text()
    assert 'broken.jpg' in skipped and 'notes.png' in skipped and 'readme.txt' not in skipped
    results = (out / 'results.csv').read_text()
    assert 'broken.jpg' not in results and 'nested.jpg' in results
    assert '2 unreadable files skipped' in (out / 'index.html').read_text()


def test_a_folder_of_queries_gives_one_result_set_each(trained, tmp_path):
    s, page_dir, rows = trained
    query, folder = _valid_gallery(tmp_path, rows[0], page_dir)
    queries = tmp_path / 'queries'
    queries.mkdir()
    for row in rows[:3]:
        shutil.copy(page_dir / row['path'], queries)
    out = main.search(s.replace(QUERY=str(queries), GALLERY=str(folder)))
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(r['path']).stem for r in rows[:3])


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
