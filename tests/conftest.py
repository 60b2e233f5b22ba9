"""Shared fixtures: every test makes its own small data; nothing is downloaded."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main  # noqa: E402
from reidkit.demo_data import make_demo_dataset  # noqa: E402

# Small enough to train an epoch in seconds on 2 CPU cores.
TINY = dict(HEIGHT=32, WIDTH=16, BATCH_SIZE_TRAIN=16, BATCH_SIZE_TEST=64, WORKERS=0,
            PRETRAINED=False, MAX_EPOCH=1, EVAL_FREQ=1, PRINT_FREQ=1000, VISRANK_TOPK=3)


@pytest.fixture(scope='session')
def tiny_data_root(tmp_path_factory) -> Path:
    """A 16-identity demo dataset in Market-1501's layout."""
    root = tmp_path_factory.mktemp('tiny-data')
    make_demo_dataset(root, num_train_ids=8, num_test_ids=8, seed=3, num_junk=4,
                      num_distractors=4)
    return root


@pytest.fixture
def tiny_settings(tiny_data_root, tmp_path):
    """Settings for a seconds-long run on the tiny dataset, writing into tmp_path."""
    return main.load_settings(dict(TINY, DATA_ROOT=str(tiny_data_root),
                                   EXPERIMENTS_DIR=str(tmp_path / 'experiments')))
