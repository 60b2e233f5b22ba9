"""Training (stands on reidkit.run, .data and .evaluate).

- engine: Torchreid's engines, subclassed: our evaluation, checkpoints, fast path
- step: the training step and its losses (one definition each)
- speed: the fast-path switches (AMP, CHANNELS_LAST, COMPILE, TRAIN_STEP, DATA_CACHE), DDP wrap
- samplers: each DDP process's share of the training and test images
"""
