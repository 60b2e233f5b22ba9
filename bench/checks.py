"""Benchmark: how long the pre-run dataset check takes on a Market-1501-sized folder.

    python bench/checks.py [--files 33000]

Copies the demo's images into a temporary Market-1501 layout until it holds --files images
(Market-1501 has 12,936 + 3,368 + 15,913 = 32,217), then times `check_market_layout`, the
check every train/test/visrank runs before any heavy work, cold and warm file cache aside.
"""
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reidkit.data.checks import check_market_layout  # noqa: E402
from reidkit.data.demo import make_demo_dataset  # noqa: E402
from reidkit.data.market import market_data_dir  # noqa: E402

total = int(sys.argv[sys.argv.index('--files') + 1]) if '--files' in sys.argv else 33_000
with tempfile.TemporaryDirectory() as tmp:
    source = make_demo_dataset(Path(tmp) / 'demo', num_train_ids=20, num_test_ids=20)
    images = sorted(source.data_dir.rglob('*.jpg'))
    target = market_data_dir(Path(tmp) / 'big')
    splits = {'bounding_box_train': 0.40, 'query': 0.10, 'bounding_box_test': 0.50}
    for split, share in splits.items():
        (target / split).mkdir(parents=True)
        for i in range(int(total * share)):
            image = images[i % len(images)]
            shutil.copy(image, target / split / f'{i % 1500 + 1:04d}_c{i % 6 + 1}s1_{i:06d}_01.jpg')
    started = time.perf_counter()
    checked = {split: len(paths) for split, paths in check_market_layout(target.parent).items()}
    seconds = time.perf_counter() - started
    print(f'checked {sum(checked.values())} images ({checked}) in {seconds:.2f} s '
          f'({sum(checked.values()) / seconds:,.0f} files/s)')
