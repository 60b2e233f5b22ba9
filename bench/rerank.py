"""Benchmark: reidkit's k-reciprocal re-ranking against Torchreid's `re_ranking`, same machine.

    python bench/rerank.py            # Market-1501 scale, then MSMT17 scale (many minutes)
    python bench/rerank.py --quick    # a tenth of the sizes, for a smoke run
    python bench/rerank.py --only=market   # (or msmt) one of the two scales

Market-1501 scale: 3,368 queries x 15,913 gallery, 751 ids, 2048-d features (identity centres
plus noise), default k1=20, k2=6, lambda=0.3. Each side runs in a fresh process, so each peak
RSS is its own: Torchreid's engine path (its three distance matrices, then `re_ranking`),
our `re_ranking` on the same three matrices, and our `re_ranking_features`. Prints times, peak
RSS, the speed ratio, how far our distances are from Torchreid's and whether CMC, mAP and mINP
(our evaluator) are identical. Equal float32 distances at a neighbour-list boundary (a few rows
at this scale) are ordered arbitrarily by numpy's argsort and by torch.topk alike, so a few
rows can legitimately differ; the counts say how many. The load average is printed because
the other processes on a shared machine change every time here.
MSMT17 scale: 11,659 x 82,161, 2048-d: `re_ranking_features` only. Torchreid's is never run
there: its need for dense (queries + gallery)^2 matrices is computed and printed instead.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (queries, gallery, identities, noise); noise makes the original mAP about 0.3-0.4
SCALES = {'market': (3368, 15913, 751, 4.0), 'msmt': (11659, 82161, 3060, 4.0)}
DIM = 2048


def make_inputs(scale: str):
    from evaluation import make_inputs as identity_features      # bench/evaluation.py
    num_q, num_g, num_ids, noise = SCALES[scale.removesuffix('-quick')]
    if scale.endswith('-quick'):
        num_q, num_g, num_ids = num_q // 10, num_g // 10, num_ids // 10
    return identity_features(num_q, num_g, num_ids, DIM, noise=noise)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def cpu_seconds() -> float:
    """User + system time of this process, all its threads: less swayed than wall time by
    other processes on a shared machine (Torchreid's loops use one core, torch's ops all)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(which: str, scale: str, out_dir: str) -> dict:
    """Runs in a child process: one re-ranking on one scale; saves its result, returns stats."""
    import numpy as np
    import warnings
    warnings.filterwarnings('ignore', 'Cython evaluation')
    from torchreid.reid.metrics import compute_distance_matrix
    from torchreid.reid.utils import re_ranking as torchreid_re_ranking
    from reidkit.evaluate import rerank
    from reidkit.evaluate.metrics import Labels, evaluate_distances, evaluate_features
    qf, gf, qp, gp, qc, gc = make_inputs(scale)
    inputs_rss = peak_rss_gb()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    distances_s = 0.0
    if which == 'features':
        result = rerank.re_ranking_features(qf, gf)
    else:                         # the three matrices as Torchreid's engine makes them
        q_g = compute_distance_matrix(qf, gf).numpy()
        q_q, g_g = compute_distance_matrix(qf, qf), compute_distance_matrix(gf, gf)
        distances_s = time.perf_counter() - started
        rerank_fn = torchreid_re_ranking if which == 'torchreid' else rerank.re_ranking
        result = rerank_fn(q_g, q_q, g_g)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    peak = peak_rss_gb()
    labels = Labels.of(qp, gp, qc, gc)
    original = evaluate_features(qf, gf, labels)
    cmc, mAP, mINP = evaluate_distances(result, labels)
    if out_dir:
        np.save(Path(out_dir) / f'{which}.npy', result)
    return {'seconds': seconds, 'cpu_seconds': cpu, 'distances_s': distances_s, 'peak_rss_gb': peak,
            'inputs_rss_gb': inputs_rss, 'cmc': np.asarray(cmc).tolist(), 'mAP': mAP,
            'mINP': mINP, 'original': [float(original[0][0]), original[1], original[2]]}


def child(which: str, scale: str, out_dir: str = '') -> dict:
    out = subprocess.run([sys.executable, __file__, '--child', which, scale, out_dir],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f'{which} on {scale} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def torchreid_need_gb(num_q: int, num_g: int) -> tuple[float, float]:
    """(inputs, peak) GB of Torchreid's path: its engine's three float32 distance matrices,
    then inside `re_ranking` at its argsort: the N x N float32 original distances, V, the
    int64 argsort and its int32 copy, N = queries + gallery: 20 bytes x N^2."""
    n = num_q + num_g
    inputs = 4 * (num_q * num_g + num_q ** 2 + num_g ** 2) / 1024 ** 3
    return inputs, inputs + 20 * n ** 2 / 1024 ** 3


def _summary(stats: dict) -> str:
    return f'Rank-1 {stats["cmc"][0]:.4f}, mAP {stats["mAP"]:.4f}, mINP {stats["mINP"]:.4f}'


def market(suffix: str) -> None:
    import numpy as np
    num_q, num_g = (n // (10 if suffix else 1) for n in SCALES['market'][:2])
    print(f'\nMarket-1501 scale{" (quick: a tenth)" if suffix else ""}: {num_q:,} x {num_g:,}, '
          f'{DIM}-d, k1=20, k2=6, lambda=0.3')
    with tempfile.TemporaryDirectory() as out_dir:
        runs = {which: child(which, 'market' + suffix, out_dir)
                for which in ('torchreid', 'matrix', 'features')}
        results = {which: np.load(Path(out_dir) / f'{which}.npy') for which in runs}
    theirs, reference = runs['torchreid'], results['torchreid']
    names = {'torchreid': 'Torchreid re_ranking (its 3 distance matrices + re_ranking)',
             'matrix': 'reidkit re_ranking (same 3 matrices + ours)',
             'features': 'reidkit re_ranking_features (from features)'}
    print('| re-ranking | of which distances (s) | total (s) | CPU (s) | peak RSS (GB) | '
          'faster than Torchreid by (wall; CPU) |\n|---|---|---|---|---|---|')
    for which, stats in runs.items():
        ratio = '' if which == 'torchreid' else (
            f'{theirs["seconds"] / stats["seconds"]:.1f}x; '
            f'{theirs["cpu_seconds"] / stats["cpu_seconds"]:.1f}x')
        distances = f'{stats["distances_s"]:.1f}' if which != 'features' else '(inside)'
        print(f'| {names[which]} | {distances} | {stats["seconds"]:.1f} | '
              f'{stats["cpu_seconds"]:.1f} | {stats["peak_rss_gb"]:.2f} | {ratio} |')
    print('\n| against Torchreid\'s result | max abs diff | distances off by > 1e-5 | rows with '
          'any | CMC identical | mAP diff | mINP diff |\n|---|---|---|---|---|---|---|')
    for which in ('matrix', 'features'):
        diff = np.abs(results[which] - reference)
        off = diff > 1e-5
        print(f'| {names[which]} | {float(diff.max()):.1e} | {int(off.sum()):,} of '
              f'{off.size:,} | {int(off.any(1).sum())} of {len(off):,} | '
              f'{runs[which]["cmc"] == theirs["cmc"]} | '
              f'{abs(runs[which]["mAP"] - theirs["mAP"]):.1e} | '
              f'{abs(runs[which]["mINP"] - theirs["mINP"]):.1e} |')
    print(f'Original distances: Rank-1 {theirs["original"][0]:.4f}, mAP '
          f'{theirs["original"][1]:.4f}, mINP {theirs["original"][2]:.4f}; re-ranked: '
          f'{_summary(theirs)}')
    inputs, need = torchreid_need_gb(num_q, num_g)
    print(f'(Computed need of Torchreid\'s path here: {need:.1f} GB, of which its input '
          f'matrices {inputs:.1f} GB.)')


def msmt(suffix: str) -> None:
    num_q, num_g = (n // (10 if suffix else 1) for n in SCALES['msmt'][:2])
    print(f'\nMSMT17 scale{" (quick: a tenth)" if suffix else ""}: {num_q:,} x {num_g:,}, '
          f'{DIM}-d, re_ranking_features')
    ours = child('features', 'msmt' + suffix)
    print('| re-ranking | seconds | CPU (s) | peak RSS (GB) | of which making the inputs (GB) '
          '|\n|---|---|---|---|---|')
    print(f'| reidkit re_ranking_features | {ours["seconds"]:.1f} | {ours["cpu_seconds"]:.1f} | '
          f'{ours["peak_rss_gb"]:.2f} | {ours["inputs_rss_gb"]:.2f} |')
    inputs, need = torchreid_need_gb(num_q, num_g)
    print(f'| Torchreid re_ranking | not run | | {need:.1f} (computed: 20 bytes x (q+g)^2 '
          f'inside, + {inputs:.1f} of input matrices) | |')
    original = ours['original']
    print(f'Original distances: Rank-1 {original[0]:.4f}, mAP {original[1]:.4f}, mINP '
          f'{original[2]:.4f}; re-ranked: {_summary(ours)}')


def main() -> None:
    if sys.argv[1:2] == ['--child']:
        print(json.dumps(run_one(*sys.argv[2:5])))
        return
    import os
    import torch
    suffix = '-quick' if '--quick' in sys.argv else ''
    only = next((arg.split('=', 1)[1] for arg in sys.argv if arg.startswith('--only=')), None)
    print(f'CPU threads: {torch.get_num_threads()}; torch {torch.__version__}; load average '
          f'{os.getloadavg()[0]:.1f}')
    for name, scale in (('market', market), ('msmt', msmt)):
        if only in (None, name):
            scale(suffix)
    print(f'\nLoad average at the end: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
    main()
