"""Every evaluation switch (RERANK, FLIP_TEST, the metric) reaches every evaluation: those
during and after training, test, visrank, CUHK03's protocol and search, or is refused where it
cannot apply."""
import csv
import json
import re
import shutil
import urllib.parse
from pathlib import Path

import pytest

import main
import reidkit.train.engine as engine_module
from reidkit.run.errors import UserError
from reidkit.train.engine import SoftmaxEngine

SWITCHES = 'metric=euclidean, flip test, re-ranking (k1=20, k2=6, lambda=0.3)'


def _same_scores(a: dict, b: dict) -> None:
    for key in ('rank1', 'mAP', 'mINP'):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert a['cmc'] == pytest.approx(b['cmc'], abs=1e-6)


def _page_rows(vis_dir: Path) -> list:
    page = vis_dir / 'visrank_market1501' / 'index.html'
    rows = json.loads(re.search(r'application/json">(.*?)</script>', page.read_text(),
                                re.S).group(1))
    for row in rows:            # the page holds %-encoded links
        row['path'] = urllib.parse.unquote(row['path'])
    return rows


def _valid_gallery(folder: Path, query: Path, row: dict) -> Path:
    """The query's gallery as the evaluation sees it: without junk and without its own
    person in its own camera."""
    folder.mkdir()
    own = f'{row["pid"]:04d}_c{row["cam"] + 1}'
    for image in (query.parent.parent / 'bounding_box_test').glob('*.jpg'):
        if not image.name.startswith(own) and not image.name.startswith('-1_'):
            shutil.copy(image, folder / image.name)
    return folder


def _top_distance(out_dir: Path, query: Path) -> float:
    return float(next(csv.DictReader(open(out_dir / query.name / 'results.csv')))['distance'])


@pytest.mark.slow
def test_rerank_and_flip_test_reach_training_test_visrank_and_search(tiny_settings, monkeypatch,
                                                                     tmp_path):
    s = tiny_settings.replace(MODEL_NAME='resnet18', MAX_EPOCH=2, EVAL_FREQ=1, RERANK=True,
                              FLIP_TEST=True)
    reranked = []
    original = engine_module.re_ranking_features
    monkeypatch.setattr(engine_module, 're_ranking_features',
                        lambda *a, **k: (reranked.append(1), original(*a, **k))[1])
    run_dir = main.train(s)
    # Both evaluations of training (after epoch 1 and the final one) re-ranked, with the flip.
    assert len(reranked) == 2
    assert (run_dir / 'log.txt').read_text().count(f'Computing CMC and mAP with {SWITCHES}') == 2
    trained = json.loads((run_dir / 'metrics.json').read_text())
    assert trained['settings']['RERANK'] is True
    # test and visrank of the same checkpoint with the same switches: the same numbers.
    tested = json.loads((main.test(s) / 'metrics.json').read_text())
    _same_scores(tested, trained)
    vis_dir = main.vis_rank(s)
    _same_scores(json.loads((vis_dir / 'metrics.json').read_text()), trained)
    assert len(reranked) == 4
    assert SWITCHES in (vis_dir / 'log.txt').read_text()

    # search applies FLIP_TEST: its distances are visrank's with FLIP_TEST (not re-ranked).
    flip_rows = _page_rows(main.vis_rank(s.replace(RERANK=False)))
    row = flip_rows[0]
    query = (vis_dir / 'visrank_market1501' / row['path']).resolve()
    gallery = _valid_gallery(tmp_path / 'gallery', query, row)
    searched = s.replace(RERANK=False, QUERY=str(query), GALLERY=str(gallery),
                         EXPERIMENTS_DIR=str(tmp_path / 'search'),
                         WEIGHTS=str(run_dir / 'model' / 'model.pth.tar-2'))
    flipped = _top_distance(main.search(searched), query)
    assert flipped == pytest.approx(row['matches'][0][1], rel=1e-3)
    plain = _top_distance(main.search(searched.replace(FLIP_TEST=False)), query)
    assert plain != pytest.approx(flipped, rel=1e-3)          # the switch changes the result
    # RERANK cannot apply to search: refused, nothing written.
    before = sorted((tmp_path / 'search').iterdir())
    with pytest.raises(UserError, match='RERANK=True: search does not re-rank'):
        main.search(searched.replace(RERANK=True))
    assert sorted((tmp_path / 'search').iterdir()) == before


@pytest.mark.slow
def test_the_metric_and_switches_reach_training_and_cuhk03_evaluations(tiny_settings, capsys,
                                                                        monkeypatch):
    """Through the engine's API (no setting chooses the metric): Torchreid's run() passes the
    metric to every test(); re-ranking and the flip test reach CUHK03's protocol too."""
    s = tiny_settings.replace(MODEL_NAME='resnet18', FLIP_TEST=True)
    datamanager, model, optimizer, scheduler = main.get_items(s)
    engine = main.build_engine(s, datamanager, model, optimizer, scheduler)
    save_dir = str(Path(s.EXPERIMENTS_DIR) / 'run')
    engine.run(save_dir=save_dir, max_epoch=2, eval_freq=1, dist_metric='cosine', rerank=True)
    printed = capsys.readouterr().out
    assert printed.count('metric=cosine, flip test, re-ranking (k1=20') == 2
    assert [result['epoch'] for result in engine.results] == [1, 2]

    features = []
    original = SoftmaxEngine.test_features
    monkeypatch.setattr(SoftmaxEngine, 'test_features',
                        lambda self, images: (features.append(len(images)),
                                              original(self, images))[1])
    engine.run(save_dir=save_dir, test_only=True, use_metric_cuhk03=True, dist_metric='cosine',
               rerank=True)
    assert features                          # our features, with the flip test
    assert ("metric=cosine, flip test, re-ranking (k1=20, k2=6, lambda=0.3), CUHK03's "
            "single-gallery-shot CMC") in capsys.readouterr().out
    assert engine.results[-1]['mINP'] is None


def test_search_with_rerank_is_refused_before_training(tiny_settings, tmp_path, capsys):
    args = [f'--{key}={tiny_settings[key]!r}' for key in ('HEIGHT', 'WIDTH', 'WORKERS',
                                                          'PRETRAINED', 'MAX_EPOCH')]
    experiments = tmp_path / 'runs'
    code = main.main(['train', 'search', '--RERANK=True', f'--DATA_ROOT={tiny_settings.DATA_ROOT}',
                      f'--EXPERIMENTS_DIR={experiments}', f'--QUERY={tmp_path}',
                      f'--GALLERY={tmp_path}', *args])
    assert code == 2
    assert 'error: RERANK=True: search does not re-rank' in capsys.readouterr().err
    assert not experiments.exists()
