"""mINP: mean over kept queries of (true matches) / (rank of the last true match)."""
import numpy as np
import pytest
import torch

from reidkit.evaluate.metrics import (Labels, NonFiniteError, evaluate_distances,
                                      evaluate_features, evaluate_rank)


def test_a_case_worked_out_by_hand():
    # Query 0 (pid 1, cam 0). Gallery by distance: g0 pid1 cam1 (match), g1 pid1 cam0 (same
    # camera: junk, dropped), g2 pid2, g3 pid1 cam2 (match), g4 pid3.
    # Kept order: MATCH, pid2, MATCH, pid3 -> matches at ranks 1 and 3.
    # AP = (1/1 + 2/3) / 2 = 5/6; INP = 2 matches / rank 3 of the last one = 2/3.
    # Query 1 (pid 2, cam 0): g0 pid1, g1 pid1, g2 pid2 cam0 (junk), g3 pid1, g4 pid3 ... its one
    # match is g5 (pid 2, cam 3), kept rank 5 -> AP = 1/5, INP = 1/5.
    # Query 2 (pid 9): no match anywhere -> skipped by CMC, mAP and mINP alike.
    # mINP = (2/3 + 1/5) / 2 = 13/30; mAP = (5/6 + 1/5) / 2 = 31/60.
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    q_pids, g_pids = np.array([1, 2, 9]), np.array([1, 1, 2, 1, 3, 2])
    q_cams, g_cams = np.array([0, 0, 0]), np.array([1, 0, 0, 2, 0, 3])
    cmc, mAP, mINP = evaluate_distances(distmat, Labels.of(q_pids, g_pids, q_cams, g_cams),
                                        max_rank=5)
    assert cmc.tolist() == [0.5, 0.5, 0.5, 0.5, 1.0]
    assert mAP == pytest.approx(31 / 60)
    assert mINP == pytest.approx(13 / 30)
    # Torchreid's two-value adapter gives the same
    cmc2, mAP2 = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=5)
    assert cmc2.tolist() == cmc.tolist() and mAP2 == mAP


def test_ties_count_against_the_last_match():
    # One query, pid 1 cam 0; gallery: a match and a wrong match at the same distance, then a
    # second match. Pessimistic: wrong one first -> matches at ranks 2 and 3 -> INP = 2/3.
    distmat = np.array([[0.5, 0.5, 0.7]])
    labels = Labels.of(np.array([1]), np.array([1, 2, 1]), np.array([0]), np.array([1, 1, 1]))
    _, _, mINP = evaluate_distances(distmat, labels, max_rank=3)
    assert mINP == pytest.approx(2 / 3)


def test_every_match_first_is_one():
    distmat = np.array([[0.1, 0.2, 0.9], [0.9, 0.8, 0.1]])
    labels = Labels.of(np.array([1, 2]), np.array([1, 1, 2]), np.array([0, 0]),
                       np.array([1, 2, 1]))
    _, mAP, mINP = evaluate_distances(distmat, labels, max_rank=3)
    assert mAP == mINP == 1.0


def _brute_force_minp(distmat, q_pids, g_pids, q_cams, g_cams):
    """One query at a time, the textbook way: sort, drop junk, find the last match."""
    inps = []
    for q in range(len(q_pids)):
        order = np.argsort(distmat[q], kind='stable')
        kept = ~((g_pids[order] == q_pids[q]) & (g_cams[order] == q_cams[q]))
        matches = (g_pids[order] == q_pids[q])[kept]
        if matches.any():
            inps.append(matches.sum() / (np.flatnonzero(matches)[-1] + 1))
    return float(np.mean(inps))


def test_equals_a_brute_force_count_on_random_tie_free_cases():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(100):
        num_q, num_g = int(rng.integers(1, 20)), int(rng.integers(1, 80))
        distmat = rng.permutation(num_q * num_g).reshape(num_q, num_g) / (num_q * num_g)
        ids = (rng.integers(0, 8, num_q), rng.integers(0, 8, num_g),
               rng.integers(0, 3, num_q), rng.integers(0, 3, num_g))
        try:
            _, _, mINP = evaluate_distances(distmat, Labels.of(*ids), max_rank=10)
        except ValueError:                     # no query has a valid match
            continue
        assert mINP == pytest.approx(_brute_force_minp(distmat, *ids), abs=1e-12)
        checked += 1
    assert checked > 50


def test_features_variant_equals_the_matrix_variant():
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(30, 16, generator=g), torch.randn(90, 16, generator=g)
    ids = (torch.randint(0, 10, (30,), generator=g), torch.randint(0, 10, (90,), generator=g),
           torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (90,), generator=g))
    distmat = torch.cdist(qf, gf).pow(2)
    cmc, mAP, mINP = evaluate_features(qf, gf, Labels.of(*ids), chunk=7)
    cmc_m, mAP_m, mINP_m = evaluate_distances(distmat, Labels.of(*ids))
    assert np.array_equal(cmc, cmc_m)
    assert mAP == pytest.approx(mAP_m) and mINP == pytest.approx(mINP_m)
    assert 0 < mINP <= 1


def test_non_finite_distances_are_an_error():
    distmat = np.array([[0.1, np.nan]])
    with pytest.raises(NonFiniteError):
        evaluate_distances(distmat, Labels.of(np.array([1]), np.array([1, 2]), np.array([0]),
                                              np.array([1, 1])))
