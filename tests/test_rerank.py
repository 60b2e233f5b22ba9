"""reidkit.evaluate.rerank gives Torchreid's k-reciprocal re-ranking, also straight from features."""
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchreid.reid.metrics import compute_distance_matrix

from reidkit.evaluate.metrics import Labels, NonFiniteError, evaluate_distances
from reidkit.evaluate.rerank import Reranking, re_ranking, re_ranking_features
from reidkit.run.errors import UserError

with warnings.catch_warnings():
    warnings.simplefilter('ignore')             # "Cython evaluation ... unavailable"
    from torchreid.reid.utils import re_ranking as torchreid_re_ranking

ROOT = Path(__file__).resolve().parents[1]
PARAMETERS = [(20, 6, 0.3), (5, 3, 0.5), (3, 1, 0.0), (1, 2, 1.0), (8, 12, 0.2), (6, 6, 0.7)]


def _features(num_q, num_g, dim=8, num_ids=10, seed=0):
    """Identity centres plus noise, so neighbourhoods have structure (and no ties)."""
    g = torch.Generator().manual_seed(seed)
    pids = torch.randint(0, num_ids, (num_q + num_g,), generator=g)
    cams = torch.randint(0, 4, (num_q + num_g,), generator=g)
    features = torch.randn(num_ids, dim, generator=g)[pids] + \
        0.8 * torch.randn(num_q + num_g, dim, generator=g)
    ids = (pids[:num_q].numpy(), pids[num_q:].numpy(), cams[:num_q].numpy(),
           cams[num_q:].numpy())
    return features[:num_q], features[num_q:], ids


def _engine_matrices(qf, gf):
    """The three squared euclidean matrices Torchreid's engine passes to its re_ranking."""
    return (compute_distance_matrix(qf, gf).numpy(), compute_distance_matrix(qf, qf).numpy(),
            compute_distance_matrix(gf, gf).numpy())


@pytest.mark.parametrize('k1, k2, lambda_value', PARAMETERS)
def test_equals_torchreid_on_distance_matrices(k1, k2, lambda_value):
    for seed in range(3):
        qf, gf, _ = _features(12 + seed, 40 + 7 * seed, seed=seed)
        matrices = _engine_matrices(qf, gf)
        expected = torchreid_re_ranking(*matrices, k1, k2, lambda_value)
        result = re_ranking(*matrices, k1=k1, k2=k2, lambda_value=lambda_value)
        assert result.dtype == np.float32 and result.shape == expected.shape
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


def test_equals_torchreid_on_arbitrary_asymmetric_matrices():
    # Not distances at all: no zero diagonal, no symmetry, float64. This pins down Torchreid's
    # exact semantics: squared, cast to float32, each column scaled by its maximum, transposed.
    rng = np.random.default_rng(1)
    for k1, k2, lambda_value in PARAMETERS:
        q_g, q_q, g_g = rng.random((9, 30)), rng.random((9, 9)), rng.random((30, 30))
        expected = torchreid_re_ranking(q_g, q_q, g_g, k1, k2, lambda_value)
        result = re_ranking(q_g, q_q, torch.from_numpy(g_g), k1, k2, lambda_value)
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('k1, k2, lambda_value', PARAMETERS)
def test_features_version_equals_torchreid_on_the_matrices_it_would_build(k1, k2, lambda_value):
    qf, gf, ids = _features(25, 90, dim=16)
    expected = torchreid_re_ranking(*_engine_matrices(qf, gf), k1, k2, lambda_value)
    for chunk in (7, 32, 4096):           # blocks smaller than, across and beyond the queries
        result = re_ranking_features(qf, gf, Reranking(k1, k2, lambda_value), chunk=chunk)
        assert result.dtype == np.float32 and result.shape == expected.shape
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)
    cmc, mAP, mINP = evaluate_distances(result, Labels.of(*ids))
    cmc_ref, mAP_ref, mINP_ref = evaluate_distances(expected, Labels.of(*ids))
    assert np.array_equal(cmc, cmc_ref) and mAP == mAP_ref and mINP == mINP_ref


def test_features_from_numpy_and_a_larger_case():
    qf, gf, ids = _features(60, 400, dim=32, num_ids=40, seed=3)
    expected = torchreid_re_ranking(*_engine_matrices(qf, gf))
    result = re_ranking_features(qf.numpy(), gf.numpy(), chunk=100)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)
    assert np.array_equal(evaluate_distances(result, Labels.of(*ids)).cmc,
                          evaluate_distances(expected, Labels.of(*ids)).cmc)
    # and re-ranking did something: the ranking is not the original one
    original = compute_distance_matrix(qf, gf).numpy()
    assert not np.array_equal(result.argsort(1), original.argsort(1))


@pytest.mark.parametrize('num_q, num_g', [(3, 4), (1, 2), (2, 1)])
def test_k_larger_than_all_images(num_q, num_g):
    qf, gf, _ = _features(num_q, num_g, seed=num_q)
    matrices = _engine_matrices(qf, gf)
    for k1, k2, lambda_value in PARAMETERS:
        expected = torchreid_re_ranking(*matrices, k1, k2, lambda_value)
        np.testing.assert_allclose(re_ranking(*matrices, k1, k2, lambda_value), expected,
                                   rtol=0, atol=1e-5)
        np.testing.assert_allclose(re_ranking_features(qf, gf, Reranking(k1, k2, lambda_value),
                                                       chunk=2),
                                   expected, rtol=0, atol=1e-5)


def test_non_finite_inputs_are_an_error():
    qf, gf, _ = _features(5, 12)
    q_g, q_q, g_g = _engine_matrices(qf, gf)
    for bad in (float('nan'), float('inf')):
        broken = g_g.copy()
        broken[3, 4] = bad
        with pytest.raises(NonFiniteError, match='1 of the 144 gallery-gallery distances'):
            re_ranking(q_g, q_q, broken)
        features = gf.clone()
        features[2, 1] = bad
        with pytest.raises(NonFiniteError, match='gallery feature values'):
            re_ranking_features(qf, features)
    with pytest.raises(NonFiniteError):                 # finite, but squared twice: overflow
        re_ranking_features(qf * 1e12, gf * 1e12)


def test_identical_features_are_a_clear_error():
    with pytest.raises(UserError, match='distance 0 from every image'):
        re_ranking_features(torch.ones(2, 4), torch.ones(5, 4))


@pytest.mark.parametrize('k1, k2, lambda_value', [
    (0, 6, 0.3), (20, 0, 0.3), (-1, 6, 0.3), (2.5, 6, 0.3), (True, 6, 0.3), (20, 6, -0.1),
    (20, 6, 1.5), (20, 6, float('nan')), (20, 6, '0.3')])
def test_bad_parameters_are_a_clear_error(k1, k2, lambda_value):
    qf, gf, _ = _features(3, 5)
    with pytest.raises(UserError, match='re-ranking needs'):
        re_ranking_features(qf, gf, Reranking(k1, k2, lambda_value))
    with pytest.raises(UserError, match='re-ranking needs'):
        re_ranking(*_engine_matrices(qf, gf), k1, k2, lambda_value)


def test_mismatched_shapes_are_a_clear_error():
    qf, gf, _ = _features(3, 5)
    q_g, q_q, g_g = _engine_matrices(qf, gf)
    with pytest.raises(UserError, match='query x gallery, a query x query'):
        re_ranking(q_g, g_g, q_q)
    with pytest.raises(UserError, match='same width'):
        re_ranking_features(qf, gf[:, :3])
    with pytest.raises(UserError, match='non-empty'):
        re_ranking_features(qf[:0], gf)


def test_callers_reduced_precision_does_not_apply_and_comes_back():
    qf, gf, _ = _features(20, 70, dim=64)
    expected = torchreid_re_ranking(*_engine_matrices(qf, gf))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision('medium')      # bfloat16 matmuls where supported
        with torch.autocast('cpu', dtype=torch.bfloat16):
            result = re_ranking_features(qf.requires_grad_(), gf)
        assert torch.get_float32_matmul_precision() == 'medium'
    finally:
        torch.set_float32_matmul_precision(before)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_on_a_cuda_device_equals_the_cpu():
    qf, gf, _ = _features(30, 120, dim=64)
    expected = re_ranking_features(qf, gf)
    for features in ((qf, gf), (qf.cuda(), gf.cuda())):
        result = re_ranking_features(*features, device='cuda', chunk=50)
        assert isinstance(result, np.ndarray)
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


def test_memory_never_holds_a_gallery_squared_matrix():
    # 16,000 gallery images: a gallery x gallery float32 matrix alone would be 1 GB.
    script = textwrap.dedent('''
        import json, resource, torch
        from reidkit.evaluate.rerank import Reranking, re_ranking_features
        g = torch.Generator().manual_seed(0)
        qf, gf = torch.randn(50, 4, generator=g), torch.randn(16000, 4, generator=g)
        re_ranking_features(qf[:2], gf[:50])               # imports and first calls
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = re_ranking_features(qf, gf, Reranking(k1=6, k2=3), chunk=1024)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({'grew_mb': (after - before) / 1024, 'shape': list(result.shape)}))
    ''')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report['shape'] == [50, 16000]
    assert report['grew_mb'] < 250
