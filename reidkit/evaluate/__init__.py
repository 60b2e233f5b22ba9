"""Scoring and showing a model's rankings (stands on reidkit.run).

- metrics: exact CMC, mAP and mINP; evaluate_rank with Torchreid's signature
- rerank: k-reciprocal re-ranking (re_ranking, Torchreid's signature)
- visrank: rank strips and the gallery page of visrank
- report: plots, metrics.json, TensorBoard, page helpers
"""
