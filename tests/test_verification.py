"""Verification and open-set scores (reidkit.evaluate.verification) against references written
here: every pair listed, sorted and counted."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reidkit.evaluate import metrics as evaluation
from reidkit.evaluate import verification as ver


def _pairs(dist, labels):
    """(positive distances, negative distances) of every kept pair, listed one by one."""
    positives, negatives = [], []
    q_pids, g_pids = labels.q_pids.tolist(), labels.g_pids.tolist()
    q_cams, g_cams = labels.q_camids.tolist(), labels.g_camids.tolist()
    q_files = labels.q_files.tolist() if labels.q_files is not None else None
    g_files = labels.g_files.tolist() if labels.g_files is not None else None
    dist = np.asarray(dist).tolist()
    for q in range(len(q_pids)):
        for g in range(len(g_pids)):
            same = q_pids[q] == g_pids[g]
            if same and q_cams[q] == g_cams[g]:
                continue
            if q_files is not None and q_files[q] == g_files[g]:
                continue
            (positives if same else negatives).append(dist[q][g])
    return np.array(positives), np.array(negatives)


def _reference(dist, labels, match_fpir=0.1, seed=1):
    """Every number by its definition, from the pairs listed."""
    pos, neg = _pairs(dist, labels)
    P, N = len(pos), len(neg)
    ref = {'pairs': {'positive': P, 'negative': N}}
    # AUC: Mann-Whitney, every (positive, negative) pair compared
    wins = sum(np.sum(p < neg) + 0.5 * np.sum(p == neg) for p in pos)
    ref['auc'] = wins / (P * N)
    best = None
    for t in sorted(pos):
        tpr = np.sum(pos <= t) / P
        fpr = np.sum(neg <= t) / N
        gap = abs(fpr - (1 - tpr))
        if best is None or gap < best[0]:
            best = (gap, (fpr + 1 - tpr) / 2, t)
    ref['eer'], ref['eer_threshold'] = best[1], best[2]
    ref['tpr_at_fpr'] = {}
    for rate in (0.1, 0.01, 0.001):
        if rate * N < 10:
            ref['tpr_at_fpr'][f'{rate:g}'] = 'not enough negatives'
            continue
        ok = [t for t in sorted(pos) if np.sum(neg <= t) / N <= rate]
        ref['tpr_at_fpr'][f'{rate:g}'] = (
            {'tpr': np.sum(pos <= max(ok)) / P, 'threshold': max(ok)} if ok else
            {'tpr': 0.0, 'threshold': float(np.nextafter(np.float32(neg.min()),
                                                         np.float32(-np.inf)))})
    # open set: per query
    impostor, nearest = [], []
    for q in range(dist.shape[0]):
        one = labels.queries(q, q + 1)
        p, n = _pairs(dist[q:q + 1], one)
        impostor.append(n.min() if len(n) else np.inf)
        nearest.append(p.min() if len(p) else np.inf)
    impostor, nearest = np.array(impostor), np.array(nearest)
    mated = np.isfinite(nearest)

    def largest_t(scores, rate):
        if rate * len(scores) < 10:
            return None
        # the candidates: just below each impostor score, and above the largest finite one
        candidates = [float(np.nextafter(np.float32(s), np.float32(-np.inf))) for s in scores]
        candidates.append(float(np.finfo(np.float32).max))
        return max(t for t in candidates if np.mean(scores <= t) <= rate)

    def rates(imp, near, t):
        m = np.isfinite(near)
        return (float(np.mean(imp <= t)),
                float(np.sum(m & (near < imp) & (near <= t)) / m.sum()) if m.any() else None)

    ref['open'] = {'queries': len(impostor), 'mated': int(mated.sum()), 'dir_at_fpir': {}}
    for rate in (0.1, 0.01):
        t = largest_t(impostor, rate)
        ref['open']['dir_at_fpir'][f'{rate:g}'] = 'not enough queries' if t is None else \
            {'dir': rates(impostor, nearest, t)[1], 'threshold': t}
    t = largest_t(impostor, match_fpir)
    ref['open']['threshold_distance'] = t
    ref['impostor'] = impostor
    return ref


def _labels(rng, num_q, num_g, num_ids, cameras=True, junk=False, shared_files=False):
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids + 3, num_g)        # +3: distractor identities
    if junk:
        g_pids[:3] = -1                                  # junk: nobody's match
    q_cams = rng.integers(0, 3, num_q) if cameras else np.arange(num_q)
    g_cams = rng.integers(0, 3, num_g) if cameras else np.arange(num_q, num_q + num_g)
    labels = evaluation.Labels.of(q_pids, g_pids, q_cams, g_cams)
    if shared_files:             # the first queries are also gallery files
        q_paths = [f'/d/q{k}.jpg' for k in range(num_q)]
        g_paths = [f'/d/g{k}.jpg' for k in range(num_g)]
        for k in range(3):
            g_paths[k] = q_paths[k]
            g_pids[k] = q_pids[k]
        labels = evaluation.Labels.of(q_pids, g_pids, q_cams, g_cams).with_files(q_paths,
                                                                                   g_paths)
    return labels


def _unread(start, end, columns=None):
    raise AssertionError('the negatives were counted in a second pass')


def _run(dist, labels, chunk=7, match_fpir=0.1, rerank=False):
    """Pass and finish, asserting that the pass counted the negatives (no second pass)."""
    pairs = ver.PairScores(labels).collect(evaluation.matrix_rows(dist), chunk)
    return pairs.finish(_unread, match_fpir=match_fpir, chunk=chunk, rerank=rerank)


CASES = [dict(), dict(cameras=False), dict(junk=True), dict(shared_files=True),
         dict(cameras=False, shared_files=True)]


@pytest.mark.parametrize('tied', [False, True])
@pytest.mark.parametrize('case', CASES)
def test_every_number_equals_the_reference(case, tied):
    rng = np.random.default_rng(len(str(case)) + tied)
    labels = _labels(rng, 130, 40, 8, **case)
    dist = rng.random((130, 40), dtype=np.float32)
    if tied:                                             # a few distinct values: many ties
        dist = np.round(dist * 6).astype(np.float32) / 6
    _assert_equals_reference(_run(torch.from_numpy(dist), labels), dist, labels)


def _assert_equals_reference(result, dist, labels):
    verification, open_set, curves = result
    ref = _reference(dist, labels)
    assert verification['pairs'] == ref['pairs']
    assert verification['auc'] == pytest.approx(ref['auc'], abs=1e-12)
    assert verification['eer'] == pytest.approx(ref['eer'], abs=1e-12)
    assert verification['eer_threshold'] == ref['eer_threshold']
    for rate, value in ref['tpr_at_fpr'].items():
        got = verification['tpr_at_fpr'][rate]
        if isinstance(value, str):
            assert got == value
        else:
            assert got['tpr'] == pytest.approx(value['tpr'], abs=1e-12)
            assert got['threshold'] == value['threshold']
    assert open_set['queries'] == ref['open']['queries']
    assert open_set['mated'] == ref['open']['mated']
    for rate, value in ref['open']['dir_at_fpir'].items():
        got = open_set['dir_at_fpir'][rate]
        if isinstance(value, str):
            assert got == value
        else:
            assert got['dir'] == pytest.approx(value['dir'], abs=1e-12)
            assert got['threshold'] == value['threshold']
    assert open_set['threshold']['distance'] == ref['open']['threshold_distance']
    # the histograms hold every pair and every finite impostor score
    assert curves.positive.sum() == ref['pairs']['positive']
    assert curves.negative.sum() == ref['pairs']['negative']
    assert curves.impostor.sum() == np.isfinite(ref['impostor']).sum()


def test_a_pass_whose_positives_differ_from_those_expected_counts_again():
    """Where the pass's positive distances are not bit for bit those computed before it
    (here: expected from other distances), the negatives are counted in a second pass."""
    rng = np.random.default_rng(8)
    labels = _labels(rng, 130, 40, 8, junk=True)
    dist = rng.random((130, 40), dtype=np.float32)
    pairs = ver.PairScores(labels).expect(evaluation.matrix_rows(dist * 1.001), chunk=7)
    rows, read = evaluation.matrix_rows(dist), []
    for start in range(0, 130, 7):
        chunk = labels.queries(start, min(start + 7, 130))
        pairs.observe(rows(start, start + 7), *ver._pair_masks(chunk))

    def counted(start, end, columns=None):
        read.append(start)
        return rows(start, end, columns)
    _assert_equals_reference(pairs.finish(counted, match_fpir=0.1, chunk=7), dist, labels)
    assert read                                          # a second pass


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
def test_features_in_the_cmc_pass_equal_the_reference(metric):
    """From features, positives expected by `distance_rows` on the pass's chunks: every
    number as the reference's on the distances that pass ranks with."""
    rng = np.random.default_rng(9)
    labels = _labels(rng, 150, 70, 12, shared_files=True)
    qf, gf = torch.randn(150, 32), torch.randn(70, 32)
    rows = evaluation.distance_rows(qf, gf, metric)
    dist = torch.cat([rows(start, min(start + 9, 150)) for start in range(0, 150, 9)])
    pairs = ver.PairScores(labels).expect(rows, chunk=9)
    evaluation.evaluate_features(qf, gf, labels, metric, chunk=9, observe=pairs.observe)
    result = pairs.finish(rows, match_fpir=0.1, chunk=9)
    _assert_equals_reference(result, dist.numpy(), labels)


def test_auc_is_the_rank_sum_formula():
    """Mann-Whitney: U = R_pos - P(P+1)/2 with mid-ranks of the pooled sample, ranked from
    the largest distance down (the nearer a positive, the higher its rank)."""
    rng = np.random.default_rng(5)
    labels = _labels(rng, 60, 50, 6)
    dist = (np.round(rng.random((60, 50)) * 20) / 20).astype(np.float32)     # ties
    verification, _, _ = _run(torch.from_numpy(dist), labels)
    pos, neg = _pairs(dist, labels)
    pooled = np.concatenate([-pos, -neg])                # larger score = nearer
    order = np.argsort(pooled, kind='stable')
    ranks = np.empty(len(pooled))
    ranks[order] = np.arange(1, len(pooled) + 1)
    for value in np.unique(pooled):                      # mid-ranks for ties
        tied = pooled == value
        ranks[tied] = ranks[tied].mean()
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    assert verification['auc'] == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return
    truth = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    assert verification['auc'] == pytest.approx(roc_auc_score(truth, pooled), abs=1e-12)


@pytest.mark.parametrize('fpir', [0.05, 0.1, 0.25, 0.5])
def test_the_match_threshold_never_exceeds_the_target_fpir(fpir):
    rng = np.random.default_rng(int(fpir * 100))
    labels = _labels(rng, 200, 30, 10)
    dist = (np.round(rng.random((200, 30)) * 8) / 8).astype(np.float32)     # many ties
    _, open_set, _ = _run(torch.from_numpy(dist), labels, match_fpir=fpir)
    impostor = _reference(dist, labels, match_fpir=fpir)['impostor']
    t = open_set['threshold']['distance']
    assert np.mean(impostor <= np.float32(t)) <= fpir
    # the largest such: the next impostor score above it breaks the target
    above = impostor[impostor > t].min()
    assert np.mean(impostor <= above) > fpir
    assert open_set['threshold']['fpir'] == fpir


def test_too_few_queries_give_no_threshold():
    rng = np.random.default_rng(2)
    labels = _labels(rng, 90, 30, 10)
    dist = torch.rand(90, 30)
    verification, open_set, _ = _run(dist, labels, match_fpir=0.1)
    assert open_set['threshold']['distance'] is None            # 90 x 0.1 < 10
    assert open_set['dir_at_fpir'] == {'0.1': 'not enough queries',
                                       '0.01': 'not enough queries'}
    assert any('not enough queries' in line for line in ver.describe(verification, open_set))


def test_held_out_halves_use_disjoint_identities():
    pids = np.random.default_rng(0).integers(0, 300, 2000)
    first = ver.identity_halves(pids, seed=1)
    assert not set(pids[first]) & set(pids[~first])
    assert 0.35 < first.mean() < 0.65
    assert (ver.identity_halves(pids, seed=1) == first).all()     # repeatable
    assert (ver.identity_halves(pids, seed=2) != first).any()     # the seed changes it


def test_held_out_estimate_measures_each_half_with_the_others_threshold():
    rng = np.random.default_rng(3)
    labels = _labels(rng, 400, 60, 40)
    dist = rng.random((400, 60), dtype=np.float32)
    _, open_set, _ = _run(torch.from_numpy(dist), labels, match_fpir=0.1)
    ref = _reference(dist, labels)
    first = ver.identity_halves(labels.q_pids.numpy(), seed=1)
    for pick, measured in zip((first, ~first), open_set['threshold']['heldout']):
        t = ver.fpir_threshold(ref['impostor'][pick], 0.1)
        assert measured['fpir'] == pytest.approx(np.mean(ref['impostor'][~pick] <= t))


def test_chunked_equals_unchunked_and_the_cmc_pass_can_collect():
    rng = np.random.default_rng(4)
    labels = _labels(rng, 150, 70, 12, junk=True)
    qf, gf = torch.randn(150, 16), torch.randn(70, 16)
    rows = evaluation.distance_rows(qf, gf, 'euclidean')
    whole = ver.PairScores(labels).collect(rows, 1000).finish(rows, chunk=1000)
    pairs = ver.PairScores(labels)
    evaluation.evaluate_features(qf, gf, labels, chunk=9, observe=pairs.observe)
    chunked = pairs.finish(rows, chunk=9)
    assert whole[:2] == chunked[:2]
    assert (whole[2].negative == chunked[2].negative).all()


def test_with_rerank_no_open_set_and_a_note():
    rng = np.random.default_rng(6)
    labels = _labels(rng, 50, 40, 5)
    verification, open_set, curves = _run(torch.rand(50, 40), labels, rerank=True)
    assert open_set is None and curves.impostor is None
    assert verification['rerank'] is True and verification['auc'] is not None
    assert ver.RERANK_NOTE in '\n'.join(ver.describe(verification, open_set))


@pytest.mark.parametrize('value', [0, 1, -0.1, 1.5])
def test_match_fpir_outside_0_1_is_refused(tiny_settings, value):
    from reidkit.data.checks import check_numbers
    from reidkit.run.errors import UserError
    with pytest.raises(UserError, match='MATCH_FPIR'):
        check_numbers(tiny_settings.replace(MATCH_FPIR=value), training=False)
    check_numbers(tiny_settings.replace(MATCH_FPIR=0.05), training=False)


@pytest.mark.slow
def test_test_and_visrank_write_the_blocks_and_the_pictures(tiny_settings, capsys):
    import json

    import main
    s = tiny_settings.replace(MATCH_FPIR=0.2)
    main.train(s)
    capsys.readouterr()
    out_dir = main.test(s)
    printed = capsys.readouterr().out
    assert 'Verification (query-gallery pairs, squared euclidean distance)' in printed
    assert 'Match threshold at MATCH_FPIR=0.2' in printed
    metrics = json.loads((out_dir / 'metrics.json').read_text())
    block = metrics['targets'][0]
    assert metrics['verification'] == block['verification']       # the top level repeats it
    assert set(block['verification']) == {'distance', 'flip_test', 'rerank', 'pairs', 'auc',
                                          'eer', 'eer_threshold', 'tpr_at_fpr'}
    assert block['verification']['pairs']['positive'] > 0
    assert set(block['open_set']) == {'queries', 'mated', 'dir_at_fpir', 'threshold'}
    assert block['open_set']['queries'] == metrics['num_query']
    threshold = block['open_set']['threshold']
    assert threshold['fpir'] == 0.2 and len(threshold['heldout']) == 2
    assert (threshold['distance'] is None) == (metrics['num_query'] * 0.2 < 10)
    for picture in ('distances.png', 'roc.png'):
        assert (out_dir / picture).stat().st_size > 1000
    vis_dir = main.vis_rank(s.replace(RERANK=True))
    metrics = json.loads((vis_dir / 'metrics.json').read_text())
    assert metrics['open_set'] is None and metrics['verification']['rerank'] is True
    page = (vis_dir / 'visrank_market1501' / 'index.html').read_text()
    assert 'distances.png' in page and 'roc.png' in page


def test_non_finite_features_are_named_by_the_cmc_pass_not_an_index_error():
    """A diverged model's features: the positives expected before the pass are not finite, so
    nothing is counted from them and the CMC pass raises its NonFiniteError, as without them."""
    rng = np.random.default_rng(3)
    labels = _labels(rng, 40, 30, 6)
    qf, gf = torch.randn(40, 16), torch.randn(30, 16)
    qf[3, 2] = float('nan')
    rows = evaluation.distance_rows(qf, gf, 'euclidean')
    pairs = ver.PairScores(labels).expect(rows, chunk=9)
    assert not pairs.one_pass
    with pytest.raises(evaluation.NonFiniteError):
        evaluation.evaluate_features(qf, gf, labels, 'euclidean', chunk=9, observe=pairs.observe)
