"""Ranking your own images with a trained model, and ONNX export (stands on reidkit.run,
.data and .evaluate).

- command: the search command: gallery feature cache, extraction, ranking, result writers
- index: the FAISS index beside the feature cache
- onnx_features: features from an exported model with onnxruntime (imports neither torch nor
  Torchreid)
- export: a checkpoint as model.onnx, checked against PyTorch's features
"""
