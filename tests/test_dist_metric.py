"""DIST_METRIC ('euclidean', squared as Torchreid's, or 'cosine': 1 - cosine similarity) reaches
every evaluation (during training, test, visrank), re-ranking, the calibration and search, and
each takes the metric a checkpoint recorded."""
import csv
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torchreid.reid.metrics import compute_distance_matrix
from torchreid.reid.metrics.rank import eval_market1501

import config
import main
from reidkit.evaluate import metrics as evaluation
from reidkit.evaluate.calibration import Calibration, match_threshold
from reidkit.evaluate.rerank import Reranking, re_ranking, re_ranking_features
from reidkit.search import cache as gallery_cache
from reidkit.search import command as searching
from reidkit.search import index as search_index
from reidkit.run.checkpoints import save_checkpoint
from reidkit.run.errors import UserError
from reidkit.search.extractor import FeatureExtractor, _with_onnx_metric, load_extractor

with warnings.catch_warnings():
    warnings.simplefilter('ignore')             # "Cython evaluation ... unavailable"
    from torchreid.reid.utils import re_ranking as torchreid_re_ranking


def cosine_reference(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """1 - cosine similarity, written out: the reference every path is checked against."""
    query, gallery = np.asarray(query, np.float64), np.asarray(gallery, np.float64)
    dots = query @ gallery.T
    norms = np.linalg.norm(query, axis=1)[:, None] * np.linalg.norm(gallery, axis=1)[None, :]
    return 1 - dots / norms


def _clustered(num_q: int, num_g: int, dim: int = 16, seed: int = 0):
    """Identity centres plus noise, each row scaled by its own factor (cosine ignores it)."""
    g = torch.Generator().manual_seed(seed)
    pids = torch.randint(0, 8, (num_q + num_g,), generator=g)
    features = torch.randn(8, dim, generator=g)[pids] + 0.7 * torch.randn(num_q + num_g, dim,
                                                                          generator=g)
    features *= torch.rand(num_q + num_g, 1, generator=g) * 5 + 0.2
    return features[:num_q], features[num_q:]


def test_cosine_distances_are_one_minus_the_cosine_similarity():
    qf, gf = _clustered(9, 40)
    got = evaluation.distances(qf, gf, 'cosine').numpy()
    np.testing.assert_allclose(got, cosine_reference(qf, gf), atol=1e-6)
    assert not np.allclose(evaluation.distances(qf, gf, 'euclidean').numpy(), got, atol=1e-2)


@pytest.mark.parametrize('k1, k2, lambda_value', [(20, 6, 0.3), (5, 3, 0.5), (3, 1, 0.0)])
def test_cosine_re_ranking_from_features_equals_torchreids_on_cosine_matrices(k1, k2,
                                                                           lambda_value):
    qf, gf = _clustered(12, 50)
    matrices = [compute_distance_matrix(a, b, 'cosine').numpy()
                for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    np.testing.assert_allclose(matrices[0], cosine_reference(qf, gf), atol=1e-6)
    expected = torchreid_re_ranking(*matrices, k1, k2, lambda_value)
    np.testing.assert_allclose(re_ranking(*matrices, k1=k1, k2=k2, lambda_value=lambda_value),
                               expected, rtol=0, atol=1e-5)
    for chunk in (7, 4096):
        got = re_ranking_features(qf, gf, Reranking(k1, k2, lambda_value), chunk=chunk,
                                  metric='cosine')
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    euclidean = re_ranking_features(qf, gf, Reranking(k1, k2, lambda_value))
    assert not np.allclose(euclidean, expected, atol=1e-3)      # the metric matters here


def test_an_unknown_metric_is_refused_by_re_ranking():
    qf, gf = _clustered(3, 5)
    with pytest.raises(ValueError, match="'euclidean' or 'cosine'"):
        re_ranking_features(qf, gf, metric='manhattan')


# --- through main: training, test, the calibration ------------------------------------------

class FeatureSpy:
    """Records the features and labels of every evaluation (evaluate_features' arguments)."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = evaluation.evaluate_features

        def spy(qf, gf, labels, metric='euclidean', *args, **kwargs):
            self.calls.append((qf.detach().cpu().numpy(), gf.detach().cpu().numpy(), labels,
                               metric))
            return original(qf, gf, labels, metric, *args, **kwargs)
        monkeypatch.setattr(evaluation, 'evaluate_features', spy)


def _reference_scores(qf, gf, labels) -> tuple[float, float]:
    """Rank-1 and mAP by Torchreid's own (python) evaluator on the written-out distances."""
    cmc, mAP = eval_market1501(cosine_reference(qf, gf), labels.q_pids.numpy(),
                               labels.g_pids.numpy(), labels.q_camids.numpy(),
                               labels.g_camids.numpy(), 10)
    return float(cmc[0]), float(mAP)


@pytest.mark.slow
def test_training_and_test_rank_by_the_runs_metric_and_calibrate_for_it(tiny_settings,
                                                                        monkeypatch):
    spy = FeatureSpy(monkeypatch)
    s = tiny_settings.replace(MODEL_NAME='resnet18', DIST_METRIC='cosine', MATCH_FPIR=0.5)
    run_dir = main.train(s)
    log = (run_dir / 'log.txt').read_text()
    assert 'Evaluation: features on cpu, cosine distance' in log
    assert 'Computing CMC and mAP with metric=cosine' in log
    assert 'Verification (query-gallery pairs, cosine distance)' in log
    (qf, gf, labels, metric), = spy.calls
    assert metric == 'cosine'
    trained = json.loads((run_dir / 'metrics.json').read_text())
    assert trained['settings']['DIST_METRIC'] == 'cosine'
    rank1, mAP = _reference_scores(qf, gf, labels)
    assert trained['rank1'] == pytest.approx(rank1, abs=1e-6)
    assert trained['mAP'] == pytest.approx(mAP, abs=1e-5)

    # test with config.py's 'euclidean': the checkpoint's own metric, the same numbers
    plain = tiny_settings.replace(MODEL_NAME='resnet18', MATCH_FPIR=0.5)
    plain = type(plain)(dict(plain), given=plain.given - {'DIST_METRIC'})
    assert plain.DIST_METRIC == 'euclidean' and 'DIST_METRIC' not in plain.given
    tested_dir = main.test(plain)
    tested = json.loads((tested_dir / 'metrics.json').read_text())
    assert spy.calls[-1][3] == 'cosine'
    assert tested['rank1'] == pytest.approx(trained['rank1'], abs=1e-6)
    assert tested['mAP'] == pytest.approx(trained['mAP'], abs=1e-6)
    assert 'cosine distance' in (tested_dir / 'log.txt').read_text()
    # its calibration entry names the metric it was measured with
    (record,) = (run_dir / 'calibration').glob('*.json')
    entries = json.loads(record.read_text())['entries']
    assert entries and {entry['distance'] for entry in entries} == {'cosine'}
    # visrank draws the checkpoint's cosine distances: each query's strip is the reference's
    # nearest gallery images, at the reference's distances
    vis_dir = main.vis_rank(plain)
    qf, gf, labels, metric = spy.calls[-1]
    assert metric == 'cosine'
    page = (vis_dir / 'visrank_market1501' / 'index.html').read_text()
    rows = json.loads(re.search(r'application/json">(.*?)</script>', page, re.S).group(1))
    reference = cosine_reference(qf, gf)
    reference[labels.ignored().numpy()] = np.inf         # as the evaluation, left out
    assert len(rows) == len(qf)
    for row, distances in zip(rows, reference):
        shown = [match[1] for match in row['matches']]
        np.testing.assert_allclose(shown, np.sort(distances)[:len(shown)], atol=1e-4)  # as shown


def _as_older_checkpoint(checkpoint: Path) -> None:
    """The checkpoint as a run made before DIST_METRIC existed wrote it."""
    saved = torch.load(checkpoint, map_location='cpu', weights_only=False)
    for key in ('DIST_METRIC', 'NECK', 'LAST_STRIDE', 'RECIPE', 'CENTER_LOSS_WEIGHT',
                'CENTER_LR', 'WARMUP_EPOCHS', 'WARMUP_FACTOR'):
        saved['settings'].pop(key, None)
    torch.save(saved, checkpoint)


@pytest.mark.slow
def test_an_older_checkpoint_stays_euclidean_unless_the_command_line_says(tiny_settings,
                                                                        monkeypatch):
    s = tiny_settings.replace(MODEL_NAME='resnet18')
    run_dir = main.train(s)
    (checkpoint,) = (run_dir / 'model').glob('model.pth.tar-*')
    _as_older_checkpoint(checkpoint)
    spy = FeatureSpy(monkeypatch)
    monkeypatch.setattr(config, 'DIST_METRIC', 'cosine')        # config.py says cosine
    overrides = dict(_given(tiny_settings), MODEL_NAME='resnet18', WEIGHTS=str(checkpoint))
    from_config = main.load_settings(overrides)
    assert from_config.DIST_METRIC == 'cosine' and 'DIST_METRIC' not in from_config.given
    main.test(from_config)
    assert spy.calls[-1][3] == 'euclidean'
    given = main.load_settings(dict(overrides, DIST_METRIC='cosine'))
    main.test(given)
    assert spy.calls[-1][3] == 'cosine'


def _given(s) -> dict:
    """The tiny settings given on the command line (as conftest's fixture gives them)."""
    return {key: s[key] for key in s.given}


# --- search: exact, through the index, the cache, the threshold ------------------------------

def _on_disk(folder: Path, features: np.ndarray) -> np.ndarray:
    """`features` as search keeps them: a memory-mapped .npy."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / 'features.npy', np.asarray(features, np.float32))
    return np.load(folder / 'features.npy', mmap_mode='r')


def _same_ranking(order, distances, reference_row, rows) -> None:
    """(order, distances) are the reference's nearest `rows`: the same distances, the same
    order but where two distances differ by less than float32 rounding."""
    want_order = np.argsort(reference_row, kind='stable')[:rows]
    np.testing.assert_allclose(distances, reference_row[want_order], rtol=0, atol=2e-6)
    swapped = order != want_order
    assert np.all(np.abs(reference_row[order[swapped]] - reference_row[want_order[swapped]])
                  <= 2e-6)


def test_the_exact_search_ranks_by_cosine_as_the_reference(tmp_path):
    qf, gf = (f.numpy() for f in _clustered(20, 500, dim=32))
    gallery = _on_disk(tmp_path, gf)
    reference = cosine_reference(qf, gf)
    for (order, distances), row in zip(searching.rank_gallery(qf, gallery, 'cosine'),
                                       reference):
        _same_ranking(order, distances, row, len(gf))
    euclidean = searching.rank_gallery(qf, gallery)
    assert not all(np.array_equal(a[0], b[0]) for a, b in
                   zip(euclidean, searching.rank_gallery(qf, gallery, 'cosine')))


def test_the_cosine_index_ranks_as_the_reference(tmp_path):
    qf, gf = (f.numpy() for f in _clustered(20, 300, dim=16))
    features = _on_disk(tmp_path, gf)
    ids = np.arange(len(gf))
    shape = search_index.plan(len(ids), 16, metric='cosine')
    index = search_index.build(features, ids, shape)
    # every row a candidate: exactly the reference's order and distances
    ranked = search_index.rank_candidates(index, qf, features, ids, len(ids), nprobe=10 ** 6)
    for (order, distances), row in zip(ranked, cosine_reference(qf, gf)):
        _same_ranking(order, distances, row, len(ids))
    # few lists probed: the index proposes by cosine. On these rows of very different lengths
    # (euclidean and cosine neighbours differ) 2 of 32 lists find 82% of the cosine top 10;
    # proposals by euclidean distance, re-ranked by cosine, found 50%.
    qf, gf = (f.numpy() for f in _clustered(40, 1000, dim=16))
    ids = np.arange(len(gf))
    index = search_index.build(gf, ids, search_index.plan(len(ids), 16, metric='cosine'))
    exact = [set(np.argsort(row, kind='stable')[:10]) for row in cosine_reference(qf, gf)]
    ranked = search_index.rank_candidates(index, qf, gf, ids, 10, nprobe=2)
    assert np.mean([len(set(order) & want) / 10 for (order, _), want in zip(ranked, exact)]) \
        >= 0.75
    with pytest.raises(ValueError, match='cannot rank by'):
        gallery = gallery_cache.Gallery([f'/g/{i}.jpg' for i in ids], [], features, True, ids,
                                        gallery_cache.CacheFiles(tmp_path, 'key'),
                                        np.zeros(len(ids), np.uint64))
        searching.rank(qf, gallery, index, 10, 1, metric='euclidean')


def test_an_index_of_the_other_metric_is_rebuilt_never_used(tmp_path, capsys):
    _, gf = (f.numpy() for f in _clustered(1, 300, dim=16))
    features, ids, path = _on_disk(tmp_path, gf), np.arange(300), tmp_path / 'index.npz'
    euclidean, what = search_index.open_index(path, features, ids, 'ivfpq', metric='euclidean')
    assert what == 'built' and euclidean.plan.metric == 'euclidean'
    cosine, what = search_index.open_index(path, features, ids, 'ivfpq', metric='cosine')
    assert what == 'built' and cosine.plan.metric == 'cosine'
    assert "it ranks by DIST_METRIC='euclidean', this search by 'cosine'" in \
        capsys.readouterr().out
    reloaded, what = search_index.open_index(path, features, ids, 'ivfpq', metric='cosine')
    assert what == 'reused' and reloaded.plan.metric == 'cosine'
    # search keeps one file per metric beside the one feature cache
    files = gallery_cache.CacheFiles(tmp_path, 'key')
    assert files.index('ivfpq') == tmp_path / 'key.ivfpq.npz'
    assert files.index('ivfpq', 'cosine') != files.index('ivfpq', 'euclidean')


class _Grid(torch.nn.Module):
    """A stand-in model: each image's channel means over a 6x2 grid of cells."""

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images, (6, 2)).flatten(1)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)


def _noise_images(folder: Path, count: int, first: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(first, first + count):
        rng = np.random.default_rng(k)
        scale = 0.3 + 0.7 * (k % 3) / 2           # brightness: euclidean and cosine disagree
        pixels = (rng.integers(0, 256, (24, 8, 3)) * scale).astype(np.uint8)
        paths.append(folder / f'g{k:04d}.png')
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _grid_features(paths) -> np.ndarray:
    with torch.no_grad():
        return _Grid()(torch.stack([_to_tensor(Image.open(p).convert('RGB'))
                                    for p in paths])).numpy()


def _results(out: Path, query: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(open(out / query.name / 'results.csv')))
    return [Path(r['path']).name for r in rows], np.array([float(r['distance']) for r in rows])


def test_search_ranks_by_cosine_with_and_without_the_index_sharing_one_feature_cache(
        tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'weights')
    grid = FeatureExtractor(_Grid(), _to_tensor, torch.device('cpu'), checkpoint, 'grid')
    monkeypatch.setattr(searching, 'load_extractor', lambda s, weights: (grid, s))
    gallery = _noise_images(tmp_path / 'gallery', 300)
    (query,) = _noise_images(tmp_path / 'queries', 1, first=1000)
    s = main.load_settings(dict(EXPERIMENTS_DIR=str(tmp_path / 'experiments'), QUERY=str(query),
                                GALLERY=str(tmp_path / 'gallery'), BATCH_SIZE_TEST=64,
                                SEARCH_CSV_ROWS=40, SEARCH_TOPK=3, DIST_METRIC='cosine',
                                MATCH_THRESHOLD='off'))
    reference = cosine_reference(_grid_features([query]), _grid_features(gallery))[0]
    want = np.argsort(reference, kind='stable')[:40]
    for exact_up_to in (10 ** 6, 0):                     # exact, then through the index
        names, distances = _results(main.search(s.replace(SEARCH_EXACT_UP_TO=exact_up_to,
                                                          SEARCH_NPROBE=10 ** 6)), query)
        assert names == [gallery[k].name for k in want]
        np.testing.assert_allclose(distances, reference[want], atol=2e-6)
    printed = capsys.readouterr().out
    assert 'Ranking: cosine distance' in printed and 'Index: built' in printed
    # euclidean next: the same features from the cache, its own index, its own ranking
    names, _ = _results(main.search(s.replace(DIST_METRIC='euclidean', SEARCH_EXACT_UP_TO=0,
                                              SEARCH_NPROBE=10 ** 6)), query)
    printed = capsys.readouterr().out
    assert 'features from the cache' in printed and 'Index: built' in printed
    assert names != [gallery[k].name for k in want]
    cache = Path(s.EXPERIMENTS_DIR) / '.search-cache'
    assert len(list(cache.glob('*.json'))) == 1 and len(list(cache.glob('*.npy'))) == 1
    assert len(list(cache.glob('*.ivfpq.npz'))) == 1 and len(list(cache.glob('*.cosine.npz'))) == 1
    main.search(s.replace(SEARCH_EXACT_UP_TO=0, SEARCH_NPROBE=10 ** 6))
    assert 'Index: reused' in capsys.readouterr().out        # cosine's index is still there


def test_a_threshold_calibrated_for_one_metric_is_never_used_for_the_other(tmp_path):
    entry = dict(target='market1501', distance='euclidean', flip_test=False, threshold=0.7,
                 match_fpir=0.01, queries=30, gallery=100, date='2026-01-01T00:00:00+00:00')
    record = Calibration((entry,), 'a record')
    s = main.load_settings(dict(EXPERIMENTS_DIR=str(tmp_path)))
    assert match_threshold(s, record, tmp_path / 'm.pth')[0] == 0.7
    cosine = s.replace(DIST_METRIC='cosine')
    threshold, line = match_threshold(cosine, record, tmp_path / 'm.pth')
    assert threshold is None and 'distance=cosine' in line
    entry_for_cosine = dict(entry, distance='cosine', threshold=0.2)
    both = Calibration((entry, entry_for_cosine), 'a record')
    assert match_threshold(cosine, both, tmp_path / 'm.pth')[0] == 0.2
    assert match_threshold(s, both, tmp_path / 'm.pth')[0] == 0.7


# --- the checkpoint's (or exported file's) metric reaches search and export -----------------

def _checkpoint(s) -> Path:
    """An untrained checkpoint as training writes it, with the run's settings `s`."""
    from torchreid.reid.models import build_model
    torch.manual_seed(0)
    model = build_model(s.MODEL_NAME, num_classes=8, loss='softmax', pretrained=False)
    return save_checkpoint({'state_dict': model.state_dict(), 'epoch': 3,
                            'model_name': s.MODEL_NAME, 'input_size': [s.HEIGHT, s.WIDTH],
                            'settings': s.record()},
                           Path(s.EXPERIMENTS_DIR) / 'run' / 'model' / 'model.pth.tar-3')


def _search_folders(s, tmp_path) -> tuple[Path, list[Path]]:
    market = Path(s.DATA_ROOT) / 'market1501' / 'Market-1501-v15.09.15'
    query = sorted((market / 'query').glob('*.jpg'))[0]
    gallery = tmp_path / 'gallery'
    gallery.mkdir()
    for image in sorted((market / 'bounding_box_test').glob('*.jpg'))[:12]:
        shutil.copy(image, gallery / image.name)
    return query, sorted(gallery.iterdir())


def _reference(s, query: Path, gallery: list[Path]) -> np.ndarray:
    """1 - cos of the checkpoint's own features of `query` against `gallery`."""
    extractor, _ = load_extractor(s, None)
    (_, features, _), = extractor.batches([query, *gallery], 64, 'reference')
    return cosine_reference(features[:1], features[1:])[0]


@pytest.mark.slow
def test_search_and_export_take_the_checkpoints_metric(tiny_data_root, tmp_path, monkeypatch,
                                                       capsys):
    from conftest import TINY
    given = dict(TINY, MODEL_NAME='resnet18', HEIGHT=64, WIDTH=32, DATA_ROOT=str(tiny_data_root),
                 EXPERIMENTS_DIR=str(tmp_path / 'experiments'))
    checkpoint = _checkpoint(main.load_settings(dict(given, DIST_METRIC='cosine')))
    s = main.load_settings(dict(given, WEIGHTS=str(checkpoint), MATCH_THRESHOLD='off'))
    assert s.DIST_METRIC == 'euclidean'                         # config.py's
    query, gallery = _search_folders(s, tmp_path)
    s = s.replace(QUERY=str(query), GALLERY=str(gallery[0].parent))
    reference = _reference(s, query, gallery)
    want = np.argsort(reference, kind='stable')
    names, distances = _results(main.search(s), query)
    assert 'Ranking: cosine distance' in capsys.readouterr().out
    assert names == [gallery[k].name for k in want]
    np.testing.assert_allclose(distances, reference[want], atol=1e-5)

    # export names the metric; a search with the exported file ranks by it
    onnx_file = main.export(s)
    metadata = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert metadata['dist_metric'] == 'cosine'
    names, distances = _results(main.search(s.replace(WEIGHTS=str(onnx_file))), query)
    assert 'Ranking: cosine distance' in capsys.readouterr().out
    assert names == [gallery[k].name for k in want]
    np.testing.assert_allclose(distances, reference[want], atol=1e-4)
    # ... unless the command line chooses another
    main.search(s.replace(WEIGHTS=str(onnx_file), DIST_METRIC='euclidean'))
    assert 'Ranking: euclidean distance' in capsys.readouterr().out

    # a checkpoint from before DIST_METRIC: euclidean, whatever config.py says now
    _as_older_checkpoint(checkpoint)
    monkeypatch.setattr(config, 'DIST_METRIC', 'cosine')
    older = main.load_settings(dict(given, WEIGHTS=str(checkpoint), MATCH_THRESHOLD='off',
                                    QUERY=str(query), GALLERY=str(gallery[0].parent)))
    assert older.DIST_METRIC == 'cosine'
    main.search(older)
    assert 'Ranking: euclidean distance' in capsys.readouterr().out
    main.search(older.replace(DIST_METRIC='cosine'))
    assert 'Ranking: cosine distance' in capsys.readouterr().out


def test_an_exported_file_without_a_metric_ranks_by_euclidean(monkeypatch, tmp_path):
    monkeypatch.setattr(config, 'DIST_METRIC', 'cosine')
    s = main.load_settings({})
    assert _with_onnx_metric(s, None, tmp_path / 'm.onnx').DIST_METRIC == 'euclidean'
    assert _with_onnx_metric(s, 'cosine', tmp_path / 'm.onnx').DIST_METRIC == 'cosine'
    given = main.load_settings({'DIST_METRIC': 'euclidean'})
    assert _with_onnx_metric(given, 'cosine', tmp_path / 'm.onnx').DIST_METRIC == 'euclidean'
    with pytest.raises(UserError, match="names DIST_METRIC='hamming' in its metadata"):
        _with_onnx_metric(s, 'hamming', tmp_path / 'm.onnx')


def test_a_metric_other_than_the_runs_is_said_in_a_note():
    from reidkit.run.settings import resolve, settings_to_evaluate
    recorded = dict(resolve(config, {'DIST_METRIC': 'cosine'}).record())
    s, notes = settings_to_evaluate(resolve(config, {'DIST_METRIC': 'euclidean'}), recorded,
                                    'WEIGHTS: "run.pth"')
    assert s.DIST_METRIC == 'euclidean'
    assert "DIST_METRIC='euclidean' from the command line (the run had 'cosine')" in notes
    s, notes = settings_to_evaluate(resolve(config), recorded, 'WEIGHTS: "run.pth"')
    assert s.DIST_METRIC == 'cosine' and not any('DIST_METRIC' in note for note in notes)
    older = {key: value for key, value in recorded.items() if key != 'DIST_METRIC'}
    s, notes = settings_to_evaluate(resolve(config, {'DIST_METRIC': 'cosine'}), older, 'old')
    assert s.DIST_METRIC == 'cosine'
    assert "DIST_METRIC='cosine' from the command line (the run had 'euclidean')" in notes
