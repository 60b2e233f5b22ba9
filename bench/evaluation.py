"""Benchmark: reidkit's evaluator against Torchreid's own, same inputs, same machine, same run.

    python bench/evaluation.py            # Market-1501 scale, then MSMT17 scale
    python bench/evaluation.py --quick    # a tenth of the sizes, for a smoke run

Market-1501 scale: 3,368 queries x 15,913 gallery, 751 ids, 6 cameras, two distance matrices:
"features" from identity centres plus noise (Rank-1 around 85%), and "uniform"
random distances (true matches anywhere: the worst case for us). Prints the times, the ratio,
whether CMC is identical and the mAP difference, and each side's peak RSS (each side runs in a
fresh process so peaks do not mix). Torchreid's compiled Cython evaluator is not on PyPI; to
compare with it, build upstream's rank_cy.pyx outside this repository and set
TORCHREID_CYTHON_DIR to the folder holding the built module (never commit it).
MSMT17 scale: 11,659 queries x 82,161 gallery, 2048-d features, through evaluate_features;
prints time and peak RSS (Torchreid's path would need the full 3.8 GB float32 matrix and a
7.7 GB int64 argsort; it is not run).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_inputs(num_q: int, num_g: int, num_ids: int, dim: int, seed: int = 0,
                noise: float = 2.3):
    """Features = identity centre + noise, so that true matches tend to rank high."""
    import torch
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=g)
    q_pids = torch.randint(0, num_ids, (num_q,), generator=g)
    g_pids = torch.randint(0, num_ids, (num_g,), generator=g)
    q_cams = torch.randint(0, 6, (num_q,), generator=g)
    g_cams = torch.randint(0, 6, (num_g,), generator=g)
    qf = centres[q_pids] + noise * torch.randn(num_q, dim, generator=g)
    gf = centres[g_pids] + noise * torch.randn(num_g, dim, generator=g)
    return qf, gf, q_pids.numpy(), g_pids.numpy(), q_cams.numpy(), g_cams.numpy()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def run_one(which: str, scale: str) -> dict:
    """Runs in a child process: one evaluator on one scale; returns timings and results."""
    import os
    import numpy as np
    import reidkit  # noqa: F401
    from reidkit.evaluate import metrics as evaluation
    from torchreid.reid.metrics import compute_distance_matrix
    from torchreid.reid.metrics.rank import evaluate_py
    quick = scale.endswith('-quick')
    if scale.startswith('market'):
        n = (337, 1591, 75) if quick else (3368, 15913, 751)
        qf, gf, qp, gp, qc, gc = make_inputs(*n, dim=512)
        if 'uniform' in scale:
            distmat = np.random.default_rng(1).random((n[0], n[1]), dtype=np.float32)
        else:
            distmat = compute_distance_matrix(qf, gf).numpy()
        baseline_rss = peak_rss_gb()
        started = time.perf_counter()
        if which == 'torchreid':
            cmc, mAP = evaluate_py(distmat, qp, gp, qc, gc, 50, False)
        elif which == 'cython':
            sys.path.insert(0, os.environ['TORCHREID_CYTHON_DIR'])
            from rank_cy import evaluate_cy
            cmc, mAP = evaluate_cy(distmat, qp, gp, qc, gc, 50)
        else:
            cmc, mAP = evaluation.evaluate_rank(distmat, qp, gp, qc, gc, 50)
    else:
        n = (1166, 8216, 300) if quick else (11659, 82161, 3060)
        qf, gf, qp, gp, qc, gc = make_inputs(*n, dim=2048, noise=3.2)
        baseline_rss = peak_rss_gb()
        started = time.perf_counter()
        cmc, mAP, _ = evaluation.evaluate_features(qf, gf, evaluation.Labels.of(qp, gp, qc, gc))
    return {'seconds': time.perf_counter() - started, 'cmc': np.asarray(cmc).tolist(),
            'mAP': float(mAP), 'peak_rss_gb': peak_rss_gb(), 'inputs_rss_gb': baseline_rss}


def child(which: str, scale: str) -> dict:
    out = subprocess.run([sys.executable, __file__, '--child', which, scale],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ['--child']:
        print(json.dumps(run_one(sys.argv[2], sys.argv[3])))
        return
    import torch
    quick = '--quick' in sys.argv
    suffix = '-quick' if quick else ''
    print(f'CPU threads: {torch.get_num_threads()}; torch {torch.__version__}')
    import os
    cython = os.environ.get('TORCHREID_CYTHON_DIR')
    for kind in ('features', 'uniform'):
        scale = f'market-{kind}' + suffix
        print(f'\nMarket-1501 scale{" (quick: a tenth)" if quick else ""}, {kind} distances: '
              f'3,368 x 15,913, 751 ids, 6 cameras')
        ours = child('reidkit', scale)
        rows = [('Torchreid evaluate_py (pure Python, what PyPI ships)', child('torchreid', scale))]
        if cython:
            rows.append(('Torchreid evaluate_cy (compiled Cython, built locally)',
                         child('cython', scale)))
        print('| evaluator | seconds | peak RSS (GB) | reidkit faster by |\n|---|---|---|---|')
        for name, theirs in rows:
            print(f'| {name} | {theirs["seconds"]:.2f} | {theirs["peak_rss_gb"]:.2f} | '
                  f'{theirs["seconds"] / ours["seconds"]:.1f}x |')
        print(f'| reidkit evaluate_rank | {ours["seconds"]:.2f} | {ours["peak_rss_gb"]:.2f} | |')
        reference = rows[0][1]
        print(f'CMC identical to Torchreid: {ours["cmc"] == reference["cmc"]}; |mAP difference|: '
              f'{abs(ours["mAP"] - reference["mAP"]):.2e}; Rank-1 {ours["cmc"][0]:.4f}, '
              f'mAP {ours["mAP"]:.4f}')
    print('\nMSMT17 scale' + (' (quick: a tenth)' if quick else '') +
          ': 11,659 x 82,161, 2048-d features, evaluate_features')
    big = child('reidkit', 'msmt' + suffix)
    print('| evaluator | seconds | peak RSS (GB) | of which inputs (GB) |\n|---|---|---|---|')
    print(f'| reidkit evaluate_features | {big["seconds"]:.1f} | {big["peak_rss_gb"]:.2f} | '
          f'{big["inputs_rss_gb"]:.2f} |')
    print(f'Rank-1 {big["cmc"][0]:.4f}, mAP {big["mAP"]:.4f}')


if __name__ == '__main__':
    main()
