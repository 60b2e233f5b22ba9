"""Training (stands on reidkit.run, .data and .evaluate).

- engine: Torchreid's engines, subclassed: our evaluation, checkpoints, fast path
- step: the training step and its losses (one definition each)
- speed: the fast-path switches (AMP, CHANNELS_LAST, COMPILE, TRAIN_STEP, DATA_CACHE), DDP wrap
- fine_tune: a new run from a checkpoint (INIT_WEIGHTS) and its checks (FIXBASE_EPOCH, OPEN_LAYERS)
"""
