"""reidkit.evaluate.metrics gives Torchreid's CMC and mAP, exactly, without Cython."""
import numpy as np
import pytest
import torch
from torchreid.reid.metrics import compute_distance_matrix
from torchreid.reid.metrics.rank import eval_market1501

from reidkit.run.errors import UserError
from reidkit.evaluate.metrics import (QUERY_CHUNK, Labels, NonFiniteError, evaluate_distances,
                                      evaluate_features, evaluate_rank, rank_queries)


def _random_case(rng):
    num_q, num_g = int(rng.integers(1, 40)), int(rng.integers(1, 160))
    num_ids, num_cams = int(rng.integers(1, 25)), int(rng.integers(1, 7))
    return (rng.permutation(num_q * num_g).reshape(num_q, num_g) / (num_q * num_g),  # tie-free
            rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g),
            rng.integers(0, num_cams, num_q), rng.integers(0, num_cams, num_g),
            int(rng.integers(1, 60)))


def test_identical_to_torchreids_python_evaluator_on_many_random_cases():
    rng = np.random.default_rng(0)
    compared = skipped_queries = 0
    for _ in range(400):
        distmat, q_pids, g_pids, q_cams, g_cams, max_rank = _random_case(rng)
        try:
            cmc_ref, map_ref = eval_market1501(distmat, q_pids, g_pids, q_cams, g_cams, max_rank)
        except (AssertionError, ValueError):
            # Torchreid fails when no query has a valid match (we raise too), or when kept
            # galleries are shorter than max_rank for some queries (a ragged array).
            continue
        cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank)
        assert cmc.dtype == cmc_ref.dtype == np.float32
        assert np.array_equal(cmc[:len(cmc_ref)], cmc_ref)
        assert np.all(cmc[len(cmc_ref):] == cmc_ref[-1])          # the curve stays flat
        assert abs(mAP - map_ref) < 1e-6
        compared += 1
        valid = ((g_pids[None] == q_pids[:, None]) & (g_cams[None] != q_cams[:, None])).any(1)
        skipped_queries += int((~valid).sum())
    assert compared > 150 and skipped_queries > 50    # the cases did exercise skipped queries


def test_a_case_worked_out_by_hand():
    # Query 0 (pid 1, cam 0). Gallery by distance: g0 pid1 cam0 (same camera: ignored),
    # g1 pid2, g2 pid1 cam1 (match), g3 pid3, g4 pid1 cam2 (match).
    # Kept order: pid2, MATCH, pid3, MATCH -> first match at rank 2; AP = (1/2 + 2/4) / 2 = 0.5.
    # Query 1 (pid 2, cam 1): g1 (pid2, cam 0) is first -> rank 1; AP = 1.
    # Query 2 (pid 9): no match anywhere -> skipped.
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5],
                        [0.9, 0.1, 0.2, 0.3, 0.4],
                        [0.1, 0.2, 0.3, 0.4, 0.5]])
    q_pids, g_pids = np.array([1, 2, 9]), np.array([1, 2, 1, 3, 1])
    q_cams, g_cams = np.array([0, 1, 0]), np.array([0, 0, 1, 0, 2])
    cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=4)
    assert cmc.tolist() == [0.5, 1.0, 1.0, 1.0]
    assert mAP == pytest.approx(0.75)


def test_no_valid_query_is_an_error_like_torchreid():
    with pytest.raises(ValueError, match='do not appear in gallery'):
        evaluate_rank(np.ones((1, 3)), np.array([5]), np.array([1, 2, 3]),
                      np.array([0]), np.array([0, 0, 0]))


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
def test_evaluate_features_in_small_chunks_equals_the_full_matrix(metric):
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(30, 64, generator=g)
    q_pids, g_pids = torch.randint(0, 30, (90,), generator=g), torch.randint(0, 30, (400,), generator=g)
    qf = centres[q_pids] + torch.randn(90, 64, generator=g)
    gf = centres[g_pids] + torch.randn(400, 64, generator=g)
    q_cams, g_cams = torch.randint(0, 6, (90,), generator=g), torch.randint(0, 6, (400,), generator=g)
    full = compute_distance_matrix(qf, gf, metric).numpy()
    expected = evaluate_rank(full, q_pids.numpy(), g_pids.numpy(), q_cams.numpy(), g_cams.numpy())
    cmc, mAP, _ = evaluate_features(qf, gf, Labels.of(q_pids, g_pids, q_cams, g_cams),
                                    metric=metric, chunk=7)
    assert np.array_equal(cmc, expected[0]) and mAP == pytest.approx(expected[1], abs=1e-9)
    reference = eval_market1501(full, q_pids.numpy(), g_pids.numpy(), q_cams.numpy(),
                                g_cams.numpy(), 50)
    assert np.array_equal(cmc, reference[0]) and mAP == pytest.approx(reference[1], abs=1e-6)


def _torchreid_cuhk03_average(distmat, q_pids, g_pids, q_cams, g_cams, max_rank, runs):
    """Torchreid's own single-gallery-shot evaluator (10 random samplings a call), averaged."""
    from torchreid.reid.metrics.rank import eval_cuhk03
    if not hasattr(np, 'bool'):
        np.bool = bool        # Torchreid 0.2.5 uses np.bool, removed in numpy 2
    np.random.seed(0)
    results = [eval_cuhk03(distmat, q_pids, g_pids, q_cams, g_cams, max_rank) for _ in range(runs)]
    return np.mean([r[0] for r in results], axis=0), results[0][1]


@pytest.mark.slow
def test_single_gallery_shot_is_the_expectation_torchreid_samples():
    rng = np.random.default_rng(5)
    for _ in range(3):
        num_q, num_g, num_ids = 30, 120, 15
        q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
        q_cams, g_cams = rng.integers(0, 2, num_q), rng.integers(0, 2, num_g)
        distmat = rng.permutation(num_q * num_g).reshape(num_q, num_g).astype(np.float64)
        cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10,
                                 use_metric_cuhk03=True)
        sampled, sampled_map = _torchreid_cuhk03_average(distmat, q_pids, g_pids, q_cams,
                                                         g_cams, 10, runs=100)
        assert np.abs(cmc - sampled).max() < 0.02          # 1,000 samplings per query
        assert abs(mAP - sampled_map) < 1e-6               # mAP does not sample
        assert cmc.dtype == np.float32 and np.all(np.diff(cmc) >= 0)


def test_single_gallery_shot_by_hand():
    # Query pid 1 cam 0. Kept gallery by distance: A1 (pid 2), M (pid 1, cam 1), A2 (pid 2), B (pid 3).
    # One image per identity: pid 2 is A1 or A2 (1/2 each), so the match is first with
    # probability 1/2 and second with 1/2; pid 3 is always after it.
    distmat = np.array([[0.1, 0.2, 0.3, 0.4]])
    cmc, _ = evaluate_rank(distmat, np.array([1]), np.array([2, 1, 2, 3]), np.array([0]),
                           np.array([1, 1, 1, 1]), max_rank=3, use_metric_cuhk03=True)
    assert cmc.tolist() == [0.5, 1.0, 1.0]


def _ids(num_q, num_g):
    """Query i is person i % 5 in camera 0; the gallery holds every person in cameras 1-2."""
    return (np.arange(num_q) % 5, np.arange(num_g) % 5, np.zeros(num_q, int),
            1 + np.arange(num_g) % 2)


def test_all_nan_distances_are_refused_not_scored_100_percent():
    distmat = np.full((4, 10), np.nan)
    for evaluate in (evaluate_rank, lambda d, *ids: rank_queries(d, Labels.of(*ids)),
                     lambda d, *ids: evaluate_distances(d, Labels.of(*ids)),
                     lambda *args: evaluate_rank(*args, use_metric_cuhk03=True)):
        with pytest.raises(NonFiniteError, match=r'^40 of the 40 query-gallery distances are '
                                                 r'NaN or infinite.*diverged.*--LR='):
            evaluate(distmat, *_ids(4, 10))
    assert issubclass(NonFiniteError, UserError)       # main.py prints it as one paragraph


def test_one_inf_in_any_chunk_is_found_and_every_chunk_counted():
    num_q, num_g = 2 * QUERY_CHUNK + 3, 10                     # three chunks
    rng = np.random.default_rng(0)
    distmat = rng.random((num_q, num_g))
    evaluate_rank(distmat, *_ids(num_q, num_g))                # finite: fine
    distmat[num_q - 1, 7] = np.inf                             # in the last chunk only
    with pytest.raises(NonFiniteError, match=f'^1 of the {num_q * num_g:,} '):
        evaluate_rank(distmat, *_ids(num_q, num_g))
    distmat[0, 0] = -np.inf                                    # and one in the first
    with pytest.raises(NonFiniteError, match=f'^2 of the {num_q * num_g:,} '):
        rank_queries(torch.from_numpy(distmat), Labels.of(*_ids(num_q, num_g)))


def test_nan_or_overflowing_features_are_refused():
    rng = np.random.default_rng(1)
    qf, gf = torch.from_numpy(rng.random((6, 8))), torch.from_numpy(rng.random((10, 8)))
    ids = Labels.of(*_ids(6, 10))
    evaluate_features(qf, gf, ids)                             # finite: fine
    nan_query, inf_gallery = qf.clone(), gf.clone()
    nan_query[2, 3] = float('nan')
    inf_gallery[9, 0] = float('inf')
    for metric in ('euclidean', 'cosine'):
        with pytest.raises(NonFiniteError, match=r'^2 of the 128 query and gallery feature '
                                                 r'values are NaN or infinite'):
            evaluate_features(nan_query, inf_gallery, ids, metric=metric, chunk=4)
    all_nan = torch.full((6, 8), float('nan'))
    with pytest.raises(NonFiniteError, match='^48 of the 128 '):
        evaluate_features(all_nan, gf, ids)
    # finite features whose squared distances overflow float32 are caught on the distances
    with pytest.raises(NonFiniteError, match='query-gallery distances'):
        evaluate_features(qf * 1e30, gf, ids)


# --- a file listed as query and as gallery is never its own match (issue 27) ----------------

def _files(tmp_path, names):
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    return [str(tmp_path / name) for name in names]


def test_a_query_is_never_matched_with_its_own_file(tmp_path):
    # Unknown cameras (queries 0, gallery 1): the query's own file, listed in the gallery too,
    # would be its match at distance 0. Gallery: q (itself, 0.0), x pid 2 (0.1), m pid 1 (0.2).
    q, x, m = _files(tmp_path, ['q.jpg', 'x.jpg', 'm.jpg'])
    query, gallery = [(q, 1, 0)], [(q, 1, 1), (x, 2, 1), (m, 1, 1)]
    labels = Labels.of_items(query, gallery)
    cmc, mAP, mINP = evaluate_distances(np.array([[0.0, 0.1, 0.2]]), labels, max_rank=2)
    # as without the duplicate: x (wrong), then m (the match at rank 2)
    assert cmc.tolist() == [0.0, 1.0] and mAP == 0.5 and mINP == 0.5
    without = evaluate_distances(np.array([[0.1, 0.2]]),
                                 Labels.of_items(query, gallery[1:]), max_rank=2)
    assert [x.tolist() if hasattr(x, 'tolist') else x for x in without] == \
        [cmc.tolist(), mAP, mINP]
    # the query's own file is left out of the ranking as a same-camera image is
    assert labels.ignored().tolist() == [[True, False, False]]
    from reidkit.evaluate.visrank import top_matches
    assert top_matches(np.array([[0.0, 0.1, 0.2]]), labels, 3)[0].tolist() == [[1, 2, -1]]


def test_a_link_to_the_query_is_the_same_file(tmp_path):
    q, other = _files(tmp_path, ['q.jpg', 'other.jpg'])
    (tmp_path / 'sym.jpg').symlink_to(q)
    os_link = tmp_path / 'hard.jpg'
    os_link.hardlink_to(q)
    gallery = [(str(tmp_path / 'sym.jpg'), 1, 1), (str(os_link), 1, 1),
               (str(tmp_path / '.' / 'q.jpg'), 1, 1), (other, 1, 1)]
    labels = Labels.of_items([(q, 1, 0), (other, 2, 0)], gallery)
    assert labels.ignored().tolist() == [[True, True, True, False], [False, False, False, True]]


def test_file_ids_change_nothing_where_no_file_repeats(tmp_path):
    rng = np.random.default_rng(1)
    distmat, q_pids, g_pids, q_cams, g_cams, _ = _random_case(rng)
    names = _files(tmp_path, [f'{k}.jpg' for k in range(len(q_pids) + len(g_pids))])
    query = list(zip(names[:len(q_pids)], q_pids, q_cams))
    gallery = list(zip(names[len(q_pids):], g_pids, g_cams))
    labels = Labels.of_items(query, gallery)
    assert labels.q_files is None and labels.g_files is None    # the same code path as ever
