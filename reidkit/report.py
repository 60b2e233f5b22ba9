"""What a run leaves for people and scripts to read: metrics.json."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Mapping

import torch

CMC_RANKS = (1, 5, 10, 20)


def summarise(cmc, mAP: float) -> dict:
    """{'rank1': .., 'rank5': .., 'rank10': .., 'rank20': .., 'mAP': ..} as plain floats."""
    summary = {f'rank{r}': float(cmc[r - 1]) for r in CMC_RANKS if r <= len(cmc)}
    summary['mAP'] = float(mAP)
    return summary


def write_metrics(path: Path, mode: str, result: Mapping, settings: Mapping,
                  checkpoint: Path | None, seconds: float) -> dict:
    """Writes metrics.json for one mode of a run and returns what it wrote."""
    metrics = {
        'mode': mode,
        **summarise(result['cmc'], result['mAP']),
        'cmc': [float(v) for v in result['cmc']],
        'epoch': result.get('epoch'),
        'checkpoint': str(checkpoint) if checkpoint else None,
        'seconds': round(seconds, 1),
        'device': torch.cuda.get_device_name() if torch.cuda.is_available()
        and settings['DEVICE'] != 'cpu' else f'cpu ({platform.processor() or platform.machine()})',
        'settings': dict(settings),
    }
    Path(path).write_text(json.dumps(metrics, indent=2) + '\n')
    return metrics
