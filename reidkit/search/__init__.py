"""Ranking your own images with a trained model, and ONNX export (stands on reidkit.run,
.data and .evaluate).

- command: the search command: queries, exact ranking, and the steps below in order
- extractor: one feature extractor (a checkpoint through Torchreid, or an exported .onnx file),
  its preprocessing and flip-test, image listing and threaded extraction; export uses it too
- cache: the gallery's feature cache (features, manifest, lock), extracting only what changed
- index: the FAISS index beside the feature cache
- writers: a query's results.csv, strip.jpg, index.html and skipped.txt
- onnx_features: features from an exported model with onnxruntime (imports neither torch nor
  Torchreid)
- export: a checkpoint as model.onnx, checked against PyTorch's features
"""
