"""RECIPE='strong' end to end on the CPU: every trick reaches training, the records, test and
visrank (a short MAX_EPOCH on the tiny dataset)."""
import json
from pathlib import Path

import pytest

import main
from conftest import TINY


@pytest.mark.slow
def test_the_strong_recipe_trains_tests_and_draws_rankings(tiny_data_root, tmp_path, capsys):
    s = main.load_settings(dict(TINY, DATA_ROOT=str(tiny_data_root), RECIPE='strong',
                                MAX_EPOCH=2, EVAL_FREQ=2, BATCH_SIZE_TRAIN=8,
                                EXPERIMENTS_DIR=str(tmp_path / 'experiments')))
    run_dir = main.train(s)
    log = (run_dir / 'log.txt').read_text()
    assert "Recipe 'strong' (config.STRONG, epochs scaled to MAX_EPOCH=2)" in log
    assert 'loss_t' in log and 'loss_x' in log and 'loss_c' in log      # all three terms
    assert 'cosine distance' in log
    recorded = json.loads((run_dir / 'settings.json').read_text())
    assert (recorded['NECK'], recorded['LAST_STRIDE'], recorded['DIST_METRIC'],
            recorded['LOSS'], recorded['LR_SCHEDULER']) == \
        ('bnneck', 1, 'cosine', 'triplet', 'multi_step')
    assert recorded['TRANSFORMS'][-1] == 'random_erase' and recorded['CENTER_LOSS_WEIGHT'] > 0
    # test and visrank take the model and the metric from the checkpoint, not from config.py
    plain = main.load_settings(dict(TINY, DATA_ROOT=str(tiny_data_root),
                                    EXPERIMENTS_DIR=s.EXPERIMENTS_DIR))
    tested = json.loads((main.test(plain) / 'metrics.json').read_text())
    trained = json.loads((run_dir / 'metrics.json').read_text())
    assert tested['settings']['DIST_METRIC'] == 'cosine' and tested['settings']['NECK'] == 'bnneck'
    assert tested['mAP'] == pytest.approx(trained['mAP']) and 0 < tested['mAP'] <= 1
    visrank = main.vis_rank(plain)
    assert list(visrank.glob('visrank_*/index.html'))
