"""The demo's floor: Rank-1 and mAP of an untrained ResNet50 on the demo dataset.

    python bench/demo_untrained.py

Uses the demo's settings and seed, the same data (generated if missing) and the same
evaluation as `python main.py --demo`, without training: the demo's trained Rank-1 should be
far above this (the demo is learnable, not trivial).
"""
import contextlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402
from reidkit.data.demo import make_demo_dataset  # noqa: E402
from torchreid.reid.utils import set_random_seed  # noqa: E402

s = main.load_settings(demo=True)
make_demo_dataset(Path(s.DATA_ROOT), seed=s.SEED)
set_random_seed(s.SEED)
with contextlib.redirect_stdout(io.StringIO()):
    datamanager, model, optimizer, scheduler = main.get_items(s)
    engine = main.build_engine(s, datamanager, model, optimizer, scheduler)
    engine.run(test_only=True)
result = engine.results[-1]
print(f'untrained {s.MODEL_NAME} on the demo data: Rank-1 {result["cmc"][0]:.1%}, '
      f'mAP {result["mAP"]:.1%}')
