"""Benchmark: the tutorial's recipe against RECIPE='strong' (config.STRONG, the Bag of Tricks),
trained from the same seed on the same data, side by side.

    python bench/recipe.py                         # the demo (its data and config.DEMO), seed 1
    python bench/recipe.py --seeds 2               # seeds 1 and 2 of each recipe
    python bench/recipe.py --no-demo --SOURCES=./crops --TARGETS=./crops --MAX_EPOCH=30
    python bench/recipe.py --MAX_EPOCH=3           # a short smoke run of the demo

Every flag it does not know goes to `python main.py ... train test` unchanged (any dataset,
model or epoch count); the recipes differ only by --RECIPE. Each run is a fresh process with
its own EXPERIMENTS_DIR in a temporary folder; the figures are the test's metrics.json (the
final checkpoint, every target: the first target is printed). On the CPU the demo runs with
one thread (config.DEMO's CPU_THREADS), so its figures repeat on any machine.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ('tutorial', 'strong')


def run_recipe(recipe: str, seed: int, flags: list[str], demo: bool, out: Path) -> dict:
    """Trains and tests one recipe in a fresh process; its test metrics.json, plus 'seconds'
    (wall time of train + test). RuntimeError with the output's tail when main.py fails."""
    command = [sys.executable, str(ROOT / 'main.py'), 'train', 'test', *(['--demo'] if demo
                                                                          else []),
               f'--RECIPE={recipe}', f'--SEED={seed}', f'--EXPERIMENTS_DIR={out}', *flags]
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - started
    found = re.findall(r'^Test results: (.+)$', done.stdout, re.MULTILINE)
    if done.returncode != 0 or not found:
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f'{" ".join(command)} failed (exit {done.returncode}):\n{tail}')
    metrics = json.loads((Path(found[-1]) / 'metrics.json').read_text())
    # metrics.json holds fractions; printed here as percentages
    percent = {key: 100 * metrics[key] for key in ('rank1', 'mAP', 'mINP') if key in metrics}
    return {**metrics, **percent, 'seconds': seconds}


def row(recipe: str, seed, metrics: dict) -> str:
    return (f'| {recipe} | {seed} | {metrics["rank1"]:.1f} | {metrics["mAP"]:.1f} | '
            f'{metrics.get("mINP", float("nan")):.1f} | {metrics["seconds"]:.0f} |')


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, default=1, help='seeds 1..N of each recipe')
    parser.add_argument('--no-demo', action='store_true',
                        help="your own data and settings instead of the demo's")
    args, flags = parser.parse_known_args()
    results = {recipe: [] for recipe in RECIPES}
    with tempfile.TemporaryDirectory(prefix='recipe-bench-') as folder:
        for seed in range(1, args.seeds + 1):
            for recipe in RECIPES:       # alternating, so a slower machine hurts both alike
                metrics = run_recipe(recipe, seed, flags, not args.no_demo,
                                     Path(folder) / f'{recipe}-{seed}')
                results[recipe].append(metrics)
                print(f'{recipe}, seed {seed}: Rank-1 {metrics["rank1"]:.1f}%, '
                      f'mAP {metrics["mAP"]:.1f}% ({metrics["seconds"]:.0f} s)', flush=True)
    first = results[RECIPES[0]][0]
    print(f'\ntarget: {first["target"]}; {first["num_query"]} queries, {first["num_gallery"]} '
          f'gallery images; device: {first["device"]}, threads: {first["threads"]["torch"]}; '
          f'MAX_EPOCH={first["settings"]["MAX_EPOCH"]}')
    print('| recipe | seed | Rank-1 (%) | mAP (%) | mINP (%) | train + test (s) |')
    print('|---|---|---|---|---|---|')
    for recipe in RECIPES:
        for seed, metrics in enumerate(results[recipe], start=1):
            print(row(recipe, seed, metrics))
    means = {recipe: {key: sum(m[key] for m in runs) / len(runs)
                      for key in ('rank1', 'mAP', 'mINP', 'seconds')}
             for recipe, runs in results.items()}
    if args.seeds > 1:
        for recipe in RECIPES:
            print(row(recipe, 'mean', means[recipe]))
    print(f'strong - tutorial: Rank-1 {means["strong"]["rank1"] - means["tutorial"]["rank1"]:+.1f}'
          f', mAP {means["strong"]["mAP"] - means["tutorial"]["mAP"]:+.1f} points')


if __name__ == '__main__':
    main_bench()
