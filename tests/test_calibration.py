"""Issue 29: a calibrated match threshold that travels with the checkpoint (its record, the
ONNX metadata), MATCH_THRESHOLD, and search saying "no match in the gallery"."""
import csv
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from reidkit.evaluate import calibration
from reidkit.evaluate.calibration import Calibration
from reidkit.run.errors import UserError
from reidkit.run.settings import parse_override_args
from reidkit.search import command as searching
from reidkit.search.extractor import FeatureExtractor


def _result(target: str, distance, fpir: float = 0.01, queries: int = 30,
            gallery: int = 100) -> dict:
    """An evaluation's per-target result dict, as the engine gives it (the contract of #29)."""
    return {'target': target, 'num_query': queries, 'num_gallery': gallery,
            'open_set': {'queries': queries, 'mated': queries - 2, 'dir_at_fpir': {},
                         'threshold': {'fpir': fpir, 'distance': distance,
                                       'heldout': [{'fpir': 0.0, 'dir': 0.5}] * 2}}}


def _checkpoint_in_run(experiments: Path) -> Path:
    path = experiments / '20240101-000000-resnet50-softmax-market1501' / 'model' / \
        'model.pth.tar-3'
    path.parent.mkdir(parents=True)
    path.write_bytes(b'weights')
    return path


def _entry(target: str, threshold: float, flip_test: bool, date: datetime) -> dict:
    return dict(target=target, distance='euclidean', flip_test=flip_test, threshold=threshold,
                match_fpir=0.01, queries=10, gallery=50, date=date.isoformat(timespec='seconds'))


# --- the record -----------------------------------------------------------------------------

def test_the_record_is_kept_in_the_checkpoints_run_and_entries_are_replaced(tmp_path):
    experiments = tmp_path / 'experiments'
    checkpoint = _checkpoint_in_run(experiments)
    s = main.load_settings(dict(EXPERIMENTS_DIR=str(experiments)))
    out = experiments / checkpoint.parent.parent.name / 'test'
    lines = calibration.write_record(checkpoint, experiments, out, s,
                                     [_result('market1501', 4.5), _result('dukemtmc', None),
                                      dict(_result('cuhk03', 1.0), open_set=None)])
    path = checkpoint.parent.parent / 'calibration' / 'model.pth.tar-3.json'
    assert len(lines) == 1 and f'saved in "{path}"' in lines[0]
    stored = json.loads(path.read_text())
    assert stored['checkpoint'] == 'model.pth.tar-3'
    (entry,) = stored['entries']        # no threshold (None, RERANK's None): no entry
    assert entry['target'] == 'market1501' and entry['threshold'] == 4.5
    assert (entry['distance'], entry['flip_test'], entry['match_fpir'], entry['queries'],
            entry['gallery']) == ('euclidean', False, 0.01, 30, 100)
    assert datetime.fromisoformat(entry['date']).tzinfo is not None
    assert not (checkpoint.parent / 'calibration').exists() and not out.exists()

    # again with FLIP_TEST: a second entry; then the same measurement again replaces the first
    calibration.write_record(checkpoint, experiments, out, s.replace(FLIP_TEST=True),
                             [_result('market1501', 5.0)])
    calibration.write_record(checkpoint, experiments, out, s, [_result('market1501', 4.0)])
    entries = calibration.read_record(path).entries
    assert [(e['flip_test'], e['threshold']) for e in entries] == [(True, 5.0), (False, 4.0)]
    assert calibration.for_checkpoint(checkpoint, experiments).entries == entries


def test_a_checkpoint_outside_experiments_gets_its_record_in_the_tests_folder(tmp_path):
    experiments = tmp_path / 'experiments'
    mine = tmp_path / 'mine' / 'model' / 'best.pth'
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b'weights')
    out = experiments / '20240101-000000-test'
    s = main.load_settings(dict(EXPERIMENTS_DIR=str(experiments)))
    lines = calibration.write_record(mine, experiments, out, s, [_result('market1501', 2.0)])
    assert (out / 'calibration' / 'best.pth.json').is_file()
    assert sorted(p.name for p in tmp_path.joinpath('mine').rglob('*')) == ['best.pth', 'model']
    assert 'outside EXPERIMENTS_DIR' in lines[-1] and '--MATCH_THRESHOLD=' in lines[-1]
    assert calibration.for_checkpoint(mine, experiments).entries == ()


def test_the_record_is_written_whole_or_not_at_all(tmp_path, full_disk):
    experiments = tmp_path / 'experiments'
    checkpoint = _checkpoint_in_run(experiments)
    s = main.load_settings(dict(EXPERIMENTS_DIR=str(experiments)))
    path = calibration.record_path(checkpoint, checkpoint.parent.parent)
    path.parent.mkdir()
    before = json.dumps({'checkpoint': checkpoint.name, 'entries': [
        _entry('market1501', 3.0, False, datetime.now().astimezone())]})
    path.write_text(before)
    with pytest.raises(UserError, match='could not write the calibration record'):
        calibration.write_record(checkpoint, experiments, tmp_path / 'out', s,
                                 [_result('market1501', 9.0)])
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir() if 'partial' in p.name] == []


def test_the_newest_entry_with_searchs_distance_settings_is_used(tmp_path):
    now = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    entries = (_entry('old', 1.0, False, now - timedelta(days=1)),
               _entry('first', 2.0, False, now), _entry('second', 3.0, False, now),
               _entry('flipped', 4.0, True, now + timedelta(days=1)),
               # an older date in another time zone, written later: still older
               _entry('later-written', 5.0, False,
                      (now - timedelta(hours=1)).astimezone(timezone(timedelta(hours=5)))))
    found = Calibration(entries, 'here')
    s = main.load_settings()
    assert found.newest(s)['target'] == 'first'         # one test's targets: the first
    assert found.newest(s.replace(FLIP_TEST=True))['target'] == 'flipped'
    assert Calibration(entries[3:4], 'here').newest(s) is None
    threshold, line = calibration.match_threshold(s, found, Path('m.pth'))
    assert threshold == 2.0 and 'calibrated on first' in line and 'in here' in line


def test_a_broken_record_is_named(tmp_path):
    path = tmp_path / 'calibration' / 'x.json'
    path.parent.mkdir()
    for text in ('{not json', '{"entries": [{"target": "m"}]}', '[]'):
        path.write_text(text)
        with pytest.raises(UserError, match=f'calibration record "{path}" is not a calibration'):
            calibration.read_record(path)


# --- MATCH_THRESHOLD ---------------------------------------------------------------------------

@pytest.mark.parametrize('given, value', [('auto', 'auto'), ('off', 'off'), ('0.75', 0.75),
                                          ('2', 2.0), ('0', 0.0)])
def test_match_threshold_takes_a_word_or_a_distance(given, value):
    s = main.load_settings(parse_override_args([f'--MATCH_THRESHOLD={given}']))
    assert s.MATCH_THRESHOLD == value and type(s.MATCH_THRESHOLD) is type(value)
    main.checks.check_match_threshold(s)


def test_a_setting_of_several_types_lists_its_forms():
    for given in ('[1]', 'True', "{'a': 1}"):
        with pytest.raises(UserError, match=r"MATCH_THRESHOLD must be 'auto' \(the checkpoint's "
                                            r"calibration\), 'off' or a distance"):
            main.load_settings(parse_override_args([f'--MATCH_THRESHOLD={given}']))
    with pytest.raises(UserError, match='LR must be a float'):  # the others: the default's type
        main.load_settings(parse_override_args(['--LR=auto']))


@pytest.mark.parametrize('given', ['-1', '-0.5', 'maybe', 'nan', 'Auto'])
def test_a_bad_match_threshold_is_refused_before_any_work(given, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main, 'train', lambda *a: pytest.fail('trained'))
    code = main.main(['train', 'search', f'--MATCH_THRESHOLD={given}',
                      f'--EXPERIMENTS_DIR={tmp_path}', '--QUERY=q.jpg', '--GALLERY=g'])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: MATCH_THRESHOLD=') and "it must be 'auto'" in err, err


def test_match_threshold_names_where_it_came_from():
    s = main.load_settings()
    assert calibration.match_threshold(s.replace(MATCH_THRESHOLD=0.5), None, Path('m.pth')) == \
        (0.5, 'Match threshold: distance <= 0.5 (MATCH_THRESHOLD)')
    assert calibration.match_threshold(s.replace(MATCH_THRESHOLD='off'), None,
                                       Path('m.pth'))[0] is None
    threshold, note = calibration.match_threshold(s, Calibration((), 'x'), Path('my model.pth'))
    assert threshold is None and "python main.py test --WEIGHTS='my model.pth'" in note
    assert '--MATCH_THRESHOLD=<distance>' in note and '\n' not in note
    threshold, note = calibration.match_threshold(s, Calibration((), 'x'), Path('model.onnx'))
    assert threshold is None and 'export it again' in note


# --- search: "no match in the gallery" -------------------------------------------------------

class _Grid(torch.nn.Module):
    """A stand-in model: each image's channel means over a 6x2 grid of cells."""

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images, (6, 2)).flatten(1)


def _view(person: int, view: int) -> Image.Image:
    """Picture `view` of `person`: the person's random pattern, slightly changed per view."""
    pattern = np.random.default_rng(person).integers(30, 226, (24, 8, 3))
    jitter = np.random.default_rng(1000 * person + view).integers(-8, 9, (24, 8, 3))
    return Image.fromarray((pattern + jitter).astype(np.uint8))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)


@pytest.fixture
def people(tmp_path, monkeypatch):
    """Settings for search() with _Grid in the place of a checkpoint's model, whose calibration
    is set by `calibrate(threshold)`; a gallery of 8 people (2 views each) without person 7,
    and queries: a third view of person 3 (present) and of person 7 (absent)."""
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'weights')
    used = {}

    def calibrate(threshold):
        now = datetime.now().astimezone()
        used['extractor'] = FeatureExtractor(
            _Grid(), _to_tensor, torch.device('cpu'), checkpoint, 'grid',
            Calibration((_entry('old', 1e9, False, now - timedelta(days=1)),
                         _entry('demo', threshold, False, now)), '"the record"'))
    calibrate(0.0)
    monkeypatch.setattr(searching, 'load_extractor', lambda s, weights: (used['extractor'], s))
    gallery, queries = tmp_path / 'gallery', tmp_path / 'queries'
    gallery.mkdir()
    queries.mkdir()
    for person in range(8):
        for view in range(2):
            if person != 7:         # the absent person: removed from this copy of the gallery
                _view(person, view).save(gallery / f'{person:04d}_v{view}.png')
    for person in (3, 7):
        _view(person, 2).save(queries / f'{person:04d}_q.png')
    s = main.load_settings(dict(EXPERIMENTS_DIR=str(tmp_path / 'experiments'),
                                QUERY=str(queries), GALLERY=str(gallery), BATCH_SIZE_TEST=64,
                                SEARCH_TOPK=3))
    return s, calibrate


def _rows(folder: Path) -> list[dict]:
    return list(csv.DictReader(open(folder / 'results.csv')))


def test_search_says_no_match_exactly_when_the_best_distance_is_above_the_threshold(
        people, capsys, monkeypatch):
    s, calibrate = people
    plain = main.search(s.replace(MATCH_THRESHOLD='off'))
    assert "Match threshold: off" in (plain / searching.SEARCH_LOG).read_text()
    assert 'match' not in _rows(plain / '0003_q.png')[0]        # no threshold: no column
    best = {name: float(np.float32(_rows(plain / name)[0]['distance'])) for name in ('0003_q.png',
                                                                           '0007_q.png')}
    assert best['0003_q.png'] < best['0007_q.png']      # the present person is the nearer
    strips = []
    original = searching.write_results.__globals__['visrank'].draw_strip
    monkeypatch.setattr(searching.write_results.__globals__['visrank'], 'draw_strip',
                        lambda query, tiles: (strips.append(tiles), original(query, tiles))[1])
    # below both, between them, exactly the absent person's (a match: <=), above both
    for threshold in (best['0003_q.png'] * 0.5, sum(best.values()) / 2,
                      best['0007_q.png'], best['0007_q.png'] * 2):
        calibrate(threshold)
        strips.clear()
        capsys.readouterr()
        out = main.search(s)
        printed = capsys.readouterr().out
        absent = []
        for name in ('0003_q.png', '0007_q.png'):
            rows = _rows(out / name)
            assert [r['match'] for r in rows] == \
                ['yes' if float(np.float32(r['distance'])) <= threshold else 'no' for r in rows]
            page = (out / name / 'index.html').read_text()
            body = page.split('<body>', 1)[1]
            if rows[0]['match'] == 'no':
                absent.append(name)
                assert body.startswith('<p><b>No match in the gallery</b>')
            else:
                assert body.startswith('<p><b>Match</b>') and 'No match' not in page
            assert page.count(' match<br>') == 3        # 'match' or 'no match', each tile
        assert absent == [name for name, distance in best.items() if distance > threshold]
        if threshold == sum(best.values()) / 2:     # between them: the absent one is found out
            assert absent == ['0007_q.png']
        summary = f'No match in the gallery: {len(absent)} of 2 queries'
        log = (out / searching.SEARCH_LOG).read_text()
        assert summary in printed and summary in log
        assert f'Match threshold: distance <= {threshold:.6g}, calibrated on demo' in log
        assert 'in "the record"' in log
        flags = sorted(matched for tiles in strips for _, _, matched in tiles)
        assert len(flags) == 6 and all(flag is not None for flag in flags)


def test_a_number_is_used_as_given_and_without_a_calibration_auto_says_how(people, capsys):
    s, _ = people
    out = main.search(s.replace(MATCH_THRESHOLD=0))
    assert all(r['match'] == 'no' for name in ('0003_q.png', '0007_q.png')
               for r in _rows(out / name))
    assert 'Match threshold: distance <= 0 (MATCH_THRESHOLD)' in \
        (out / searching.SEARCH_LOG).read_text()
    out = main.search(s.replace(FLIP_TEST=True))        # calibrated without FLIP_TEST only
    log = (out / searching.SEARCH_LOG).read_text()
    assert 'Note: no match threshold' in log and 'flip_test=True' in log
    assert 'match' not in _rows(out / '0003_q.png')[0] and 'No match' not in log


# --- the whole path: test calibrates, search and the exported model.onnx use it --------------

@pytest.mark.slow
def test_test_calibrates_and_search_and_the_exported_onnx_use_it(tiny_settings, tmp_path,
                                                                 monkeypatch, capsys):
    # a share the tiny test set resolves (at least 10 of its queries' nearest strangers)
    s = tiny_settings.replace(MODEL_NAME='resnet18', EVAL_FREQ=-1, MATCH_FPIR=0.5)
    run = main.train(s)
    checkpoint = main.newest_checkpoint(run)
    out = main.test(s, checkpoint)
    record = run / 'calibration' / f'{checkpoint.name}.json'
    (entry,) = json.loads(record.read_text())['entries']
    metrics = json.loads((out / 'metrics.json').read_text())
    threshold = metrics['open_set']['threshold']['distance']
    assert entry['target'] == 'market1501' and entry['threshold'] == threshold is not None
    assert entry['gallery'] == metrics['num_gallery']
    assert f'saved in "{record}"' in (out / 'log.txt').read_text()

    onnx_file = main.export(s, checkpoint)
    assert 'match threshold copied into its metadata' in capsys.readouterr().out
    import onnx
    stored = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(stored['calibration']) == [entry]

    data = Path(s.DATA_ROOT) / 'market1501' / 'Market-1501-v15.09.15'
    query = sorted((data / 'query').glob('*.jpg'))[0]
    for weights in (checkpoint, onnx_file):
        found = main.search(s.replace(QUERY=str(query), GALLERY=str(data / 'bounding_box_test'),
                                      WEIGHTS=str(weights)))
        log = (found / searching.SEARCH_LOG).read_text()
        source = f'"{record}"' if weights == checkpoint else f'the metadata of "{onnx_file}"'
        assert f'Match threshold: distance <= {threshold:g}, calibrated on market1501' in log
        assert log.split('calibrated on market1501', 1)[1].split('\n')[0].endswith(source)
        rows = _rows(found / query.name)
        assert [r['match'] for r in rows] == \
            ['yes' if float(np.float32(r['distance'])) <= threshold else 'no' for r in rows]
