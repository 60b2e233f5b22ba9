"""Training (stands on reidkit.run, .data and .evaluate).

- engine: Torchreid's engines, subclassed: our training loop and step, evaluation, checkpoints
- step: the training step and its losses (one definition each)
- speed: the fast-path switches (AMP, CHANNELS_LAST, COMPILE, DATA_CACHE)
- ddp: the model in DistributedDataParallel and each process's share of the images
- fine_tune: a new run from a checkpoint (INIT_WEIGHTS) and its checks (FIXBASE_EPOCH, OPEN_LAYERS)
"""
