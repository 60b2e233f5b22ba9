"""DIST_METRIC ('euclidean', squared as Torchreid's, or 'cosine': 1 - cosine similarity) reaches
every evaluation (during training, test, visrank), re-ranking, the calibration and search, and
each takes the metric a checkpoint recorded."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchreid.reid.metrics import compute_distance_matrix
from torchreid.reid.metrics.rank import eval_market1501

import config
import main
from reidkit.evaluate import metrics as evaluation
from reidkit.evaluate.rerank import Reranking, re_ranking, re_ranking_features

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
