"""Scoring and showing a model's rankings (stands on reidkit.run).

- metrics: exact CMC, mAP and mINP (Labels in, Scores out, from distances or features);
  evaluate_rank with Torchreid's signature; the squared euclidean distance and flip test
- rerank: k-reciprocal re-ranking (re_ranking, Torchreid's signature)
- visrank: rank strips and the gallery page of visrank
- report: plots, metrics.json, TensorBoard, page helpers
"""
