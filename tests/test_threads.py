"""Every run records the thread count its weights depend on: metrics.json and its log."""
import json

import numpy as np
import torch

from reidkit.evaluate import report
from reidkit.run.log import log_to


def test_metrics_json_and_the_log_name_the_thread_count(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 3)
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    result = {'target': 'market1501', 'dataset': 'market1501', 'cmc': np.array([0.5, 1.0]),
              'mAP': 0.6, 'mINP': 0.4, 'num_query': 2, 'num_gallery': 3, 'num_query_ids': 2,
              'num_gallery_ids': 2}
    path = tmp_path / 'metrics.json'
    report.write_metrics(path, [result], report.RunFacts('test', {'DEVICE': 'cpu'}, None, 1.0))
    assert json.loads(path.read_text())['threads'] == {'torch': 3, 'OMP_NUM_THREADS': '3'}

    monkeypatch.delenv('OMP_NUM_THREADS')
    report.write_metrics(path, [result], report.RunFacts('test', {'DEVICE': 'cpu'}, None, 1.0))
    assert json.loads(path.read_text())['threads'] == {'torch': 3, 'OMP_NUM_THREADS': None}

    with log_to(tmp_path / 'log.txt'):
        print('Run folder: here')
    first, second = (tmp_path / 'log.txt').read_text().splitlines()
    assert first.startswith('Threads: 3 ') and 'OMP_NUM_THREADS not set' in first
    assert second == 'Run folder: here'
