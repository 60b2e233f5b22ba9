"""Every constant a user edits. Override any of them per run: python main.py --LR=0.001

Defaults are the tutorial's recipe: ResNet50, softmax + label smoothing, Market-1501.
"""

# --- data -----------------------------------------------------------------
DATA_ROOT = 'reid-data'                      # folder holding market1501/Market-1501-v15.09.15/
SOURCES = 'market1501'                       # dataset(s) to train on: Torchreid names or a folder/CSV path ('./crops')
TARGETS = 'market1501'                       # dataset(s) to test on: Torchreid names or a folder/CSV path ('./crops')
TEST_SHARE = 0.5                             # own data without split folders: share of identities held out to test
SPLIT_SEED = 0                               # own data: seed of that split (independent of SEED)
HEIGHT = 256                                 # input height in pixels
WIDTH = 128                                  # input width in pixels
BATCH_SIZE_TRAIN = 32                        # images per training step
BATCH_SIZE_TEST = 100                        # images per feature-extraction step
TRANSFORMS = ['random_flip', 'random_crop']  # training augmentations (also 'random_erase', 'random_patch', 'color_jitter')
WORKERS = 4                                  # data-loading processes, at most the cores (a GPU run uses every spare core)
CPU_THREADS = 0                              # torch's threads per process on the CPU (0: one per core)

# --- model ----------------------------------------------------------------
MODEL_NAME = 'resnet50'                      # any name in torchreid.models
LOSS = 'softmax'                             # 'softmax' or 'triplet'
PRETRAINED = True                            # start from ImageNet weights
LABEL_SMOOTH = True                          # label smoothing on the softmax loss
NECK = 'none'                                # 'bnneck': batch norm between feature and classifier (BoT)
LAST_STRIDE = 'auto'                         # 'auto' (the model's own) or 1: ResNet's last stage keeps its size (BoT)
CENTER_LOSS_WEIGHT = 0.0                     # centre loss (Wen et al. 2016) added with this weight (BoT: 5e-4)
CENTER_LR = 0.5                              # SGD learning rate of the centres (BoT: 0.5)
DIST_METRIC = 'euclidean'                    # test distance: 'euclidean' (squared, as Torchreid) or 'cosine'
RECIPE = 'tutorial'                          # 'tutorial', or 'strong': applies config.STRONG (below)

# --- optimiser ------------------------------------------------------------
OPTIM = 'adam'                               # adam, amsgrad, sgd, rmsprop, radam
LR = 0.0003                                  # learning rate
LR_SCHEDULER = 'single_step'                 # single_step, multi_step, cosine
STEPSIZE = 20                                # epochs between drops (single_step), or a list of epochs (multi_step)
WARMUP_EPOCHS = 0                            # epochs of linear learning-rate warm-up (BoT: 10)
WARMUP_FACTOR = 0.01                         # warm-up starts at this share of LR (BoT: 0.01)

# --- run ------------------------------------------------------------------
MAX_EPOCH = 60                               # training epochs
EVAL_FREQ = 10                               # evaluate (and checkpoint) every N epochs
PRINT_FREQ = 10                              # print the training log every N batches
SEED = 1                                     # random seed: a run repeats bit for bit at the same thread count
DEVICE = 'auto'                              # 'auto' (CUDA if present), 'cuda' or 'cpu'
GPUS = 0                                     # GPUs to train on (0 = all visible; several: DDP)
LR_SCALING = 'none'                          # 'linear': LR x processes (the global batch grows)
SYNC_BN = False                              # SyncBatchNorm across DDP processes (CUDA only)
AMP = 'auto'                                 # bf16 autocast: 'auto' (on with CUDA), 'bf16', 'off'
CHANNELS_LAST = 'auto'                       # channels_last memory format: 'auto', 'on', 'off'
COMPILE = 'auto'                             # torch.compile for training: 'auto', 'on', 'off'
DATA_CACHE = 'auto'                          # images decoded once, augmented on the device: 'auto', 'on', 'off'
DATA_CACHE_GB = 8.0                          # most memory the decoded images may take (else Torchreid's loader)
RESUME = ''                                  # checkpoint to continue training from ('' = new run)
LATEST_EVERY = 1                             # epochs between rolling resume checkpoints (0 = off)
KEEP_OPTIMIZER = 1                           # newest numbered checkpoints that keep the optimiser's state to resume from (older: weights only, 1/3 the size with Adam)

# --- fine-tuning: a new run from a trained model (python main.py train --INIT_WEIGHTS=...) ---
INIT_WEIGHTS = ''                            # checkpoint a new run starts from, not its classifier ('' = PRETRAINED's)
FIXBASE_EPOCH = 0                            # first epochs train only OPEN_LAYERS (counted in MAX_EPOCH)
OPEN_LAYERS = ['classifier']                 # the model's layers those epochs train (attribute names)

# --- output ---------------------------------------------------------------
EXPERIMENTS_DIR = 'experiments'              # each run gets its own folder in here
WEIGHTS = ''                                 # checkpoint for test/visrank; '' = newest run's
VISRANK_TOPK = 10                            # gallery matches drawn per query
FLIP_TEST = False                            # features of each test image and its mirror, averaged
RERANK = False                               # k-reciprocal re-ranking of test distances
RERANK_K1 = 20                               # re-ranking: neighbours in the reciprocal sets
RERANK_K2 = 6                                # re-ranking: neighbours in query expansion
RERANK_LAMBDA = 0.3                          # re-ranking: weight of the original distance
MATCH_FPIR = 0.01                            # match threshold: share of searches for an absent person that may match

# --- search: rank your own images (python main.py search --QUERY=... --GALLERY=...) ----
QUERY = ''                                   # a person image, or a folder of them
GALLERY = ''                                 # folder of images to rank (searched recursively)
SEARCH_TOPK = 20                             # matches drawn in each result strip
SEARCH_CSV_ROWS = 300                        # nearest gallery images listed in each results.csv
SEARCH_EXACT_UP_TO = 200_000                 # galleries up to this size are ranked exactly (0: never)
SEARCH_INDEX = 'ivfpq'                       # index above it: 'ivfpq' (IVF-PQ, re-ranked exactly)
SEARCH_NPROBE = 32                           # index lists read per query (more: slower, nearer exact)
MATCH_THRESHOLD = 'auto'                     # a match up to this distance: 'auto' (test's calibration), a number, 'off'

# --- demo -----------------------------------------------------------------
# `python main.py --demo` generates a small Market-1501-style dataset (100 train and 60 test
# identities, 6 cameras) and applies these overrides, so the same pipeline runs in minutes on
# a CPU. ImageNet weights cannot be assumed reachable, hence PRETRAINED=False; training from
# scratch at 64x32 learns faster with LR=0.001 than the tutorial's 0.0003, and colour jitter
# helps it see through each camera's light. One CPU thread: a run repeats bit for bit at the
# same thread count, so the demo's figures are the same on every machine, and a machine busy
# with other jobs does not slow it down (torch's threads wait on each other there).
DEMO = dict(
    DATA_ROOT='demo-data',
    CPU_THREADS=1,
    HEIGHT=64,
    WIDTH=32,
    TRANSFORMS=['random_flip', 'random_crop', 'color_jitter'],
    BATCH_SIZE_TEST=200,
    WORKERS=0,
    PRETRAINED=False,
    LR=0.001,
    MAX_EPOCH=18,
    STEPSIZE=14,
    EVAL_FREQ=6,
    PRINT_FREQ=10,
)

# --- the strong recipe ------------------------------------------------------
# RECIPE='strong' applies these after config.py and DEMO (before the command line): the Bag of
# Tricks (Luo et al., CVPRW 2019). Epochs are those of BoT's 120-epoch run, scaled to the run's
# MAX_EPOCH; 'random_erase' is added to the run's TRANSFORMS. Never sizes, epochs or LR.
STRONG = dict(
    LOSS='triplet',                  # softmax + batch-hard triplet, 4 images per identity
    TRANSFORMS=['random_erase'],     # added to TRANSFORMS
    WARMUP_EPOCHS=10,
    WARMUP_FACTOR=0.01,
    LR_SCHEDULER='multi_step',
    STEPSIZE=[40, 70],
    NECK='bnneck',
    LAST_STRIDE=1,
    CENTER_LOSS_WEIGHT=0.0005,
    CENTER_LR=0.5,
    DIST_METRIC='cosine',
)
STRONG_EPOCHS = 120                  # the run length STRONG's epochs are given for
