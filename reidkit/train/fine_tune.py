"""Fine-tuning: a new run that starts from a trained model (INIT_WEIGHTS), optionally training
only some layers for its first epochs (FIXBASE_EPOCH, OPEN_LAYERS).

INIT_WEIGHTS is any checkpoint: one of ours, Torchreid's (a dict with 'state_dict', 'epoch',
a numpy-scalar 'rank1') or a model-zoo file (a bare state_dict, 'module.' prefixes allowed). It
is read with our safe loader (Torchreid's `load_pretrained_weights` refuses its own numpy-scalar
files on torch >= 2.6 and only warns when the architecture differs). Every tensor but the
classifier's is loaded, in place, into the model `get_items` built, before the optimiser's
first step, our training step, the fast path or DDP wrap it; the classifier is always left as
built (a new run learns its own identities). A BNNeck (NECK='bnneck') present on one side only
starts fresh (the run's) or is dropped (the checkpoint's). Another architecture is
`load_weights`' error.

FIXBASE_EPOCH and OPEN_LAYERS are Torchreid's `fixbase_epoch` and `open_layers` (counted inside
MAX_EPOCH): the engine applies them to the model itself (`ReidkitEngineMixin.
two_stepped_transfer_learning`), whatever wraps it, and DDP allows the unused parameters of
frozen layers (`reidkit.train.ddp.distributed_model`). The neck lives inside the model's
`classifier`, so OPEN_LAYERS=['classifier'] (the default) opens it too.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import NamedTuple

import torch.nn as nn

from reidkit.run.checkpoints import (_classifier_of, load_checkpoint, load_weights, unwrap,
                                     without_module_prefix)
from reidkit.run.errors import UserError
from reidkit.run.folders import recorded_settings
from reidkit.run.model import NECK_PREFIX, has_neck, meta_model
from reidkit.run.settings import Settings


def check_fine_tune(s: Settings) -> None:
    """The fine-tuning settings of a training command, before any work: INIT_WEIGHTS and RESUME
    are not given together on the command line; FIXBASE_EPOCH >= 0; with FIXBASE_EPOCH > 0,
    OPEN_LAYERS names one or more layers of MODEL_NAME, one of them with weights. A resumed run
    keeps the values it recorded (checked when it started). Raises UserError."""
    if s.RESUME and s.INIT_WEIGHTS and 'INIT_WEIGHTS' in s.given:
        raise UserError(
            f'INIT_WEIGHTS={s.INIT_WEIGHTS!r} and RESUME={s.RESUME!r} were given together. '
            f'RESUME continues a run with the weights it has reached (a fine-tuned run '
            f'recorded its INIT_WEIGHTS and does not reload them); INIT_WEIGHTS starts a new '
            f'run from a checkpoint. Drop one of the two flags.')
    if s.RESUME:
        return
    if s.FIXBASE_EPOCH < 0:
        raise UserError(f'FIXBASE_EPOCH={s.FIXBASE_EPOCH} must be 0 (train every layer from '
                        f'the start) or the number of first epochs that train only OPEN_LAYERS.')
    if s.FIXBASE_EPOCH > 0:
        _check_open_layers(s)


def _check_open_layers(s: Settings) -> None:
    """OPEN_LAYERS: a non-empty list of names of MODEL_NAME's layers (its attributes that are
    modules, as Torchreid's `open_specified_layers` looks them up), not all without weights."""
    model = meta_model(s.MODEL_NAME)
    if model is None:
        return                  # an unknown MODEL_NAME: the name checks say so
    layers = [name for name, _ in model.named_children()]
    names = s.OPEN_LAYERS
    wrong = [name for name in names if not isinstance(name, str) or name not in layers]
    # a pooling or activation layer has nothing to train: the first epochs would fail
    weightless = [name for name in names if name in layers
                  and next(getattr(model, name).parameters(), None) is None]
    if names and not wrong and len(weightless) < len(names):
        return
    near = [match for name in wrong if isinstance(name, str)
            for match in difflib.get_close_matches(name, layers, n=1)]
    heads = sorted({key.split('.')[0] for key in _classifier_of(s.MODEL_NAME,
                                                                 model.state_dict())})
    raise UserError(
        f'OPEN_LAYERS={names!r}: '
        + (f'{s.MODEL_NAME} has no layer named {", ".join(map(repr, wrong))}'
           + (f' (did you mean {" or ".join(map(repr, near))}?)' if near else '')
           if wrong else f'{", ".join(map(repr, weightless))} '
           f'{"has" if len(weightless) == 1 else "have"} no weights, so nothing would train'
           if names else 'no layer is named, so nothing would train')
        + f'. With FIXBASE_EPOCH={s.FIXBASE_EPOCH}, the first epochs train only these layers '
        f'of the model and keep the others frozen. {s.MODEL_NAME}\'s layers are: '
        f'{", ".join(layers)}. E.g. --OPEN_LAYERS="{heads or layers[-1:]}" (its classifier), or '
        f'--FIXBASE_EPOCH=0.')


class InitWeights(NamedTuple):
    """What a run starts from (read_init_weights)."""
    settings: Settings      # INIT_WEIGHTS absolute, PRETRAINED=False
    saved: dict             # the checkpoint's contents
    notes: list[str]        # for the log: another input size


def read_init_weights(s: Settings) -> InitWeights:
    """INIT_WEIGHTS' contents, loaded safely (UserError for a missing or unsafe file), and the
    settings to train with: INIT_WEIGHTS as an absolute path (the run records where it started
    from) and PRETRAINED=False (no ImageNet weights are downloaded: the checkpoint replaces
    them). A checkpoint trained at another input size is allowed, with a note."""
    path = Path(s.INIT_WEIGHTS).expanduser().resolve()
    saved = load_checkpoint(path, setting='INIT_WEIGHTS')
    recorded = recorded_settings(saved)
    size = recorded.get('HEIGHT'), recorded.get('WIDTH')
    notes = []
    if all(size) and tuple(size) != (s.HEIGHT, s.WIDTH):
        notes.append(f'INIT_WEIGHTS was trained on {size[0]}x{size[1]} images and this run '
                     f'trains on {s.HEIGHT}x{s.WIDTH} (HEIGHT x WIDTH): its features adapt to '
                     f'the new size as it trains')
    return InitWeights(s.replace(INIT_WEIGHTS=str(path), PRETRAINED=False), saved, notes)


def load_init_weights(model: nn.Module, checkpoint: dict, model_name: str, path) -> tuple[int, int]:
    """Copies every tensor of `checkpoint` (INIT_WEIGHTS, read from `path`) but the classifier's
    into `model` (unwrapped), in place; prints and returns (tensors loaded, tensors skipped).
    A BNNeck (NECK='bnneck') on one side only: the run's own neck starts fresh (counted as new)
    where the checkpoint has none; the checkpoint's is dropped, with a note, where the run has
    none. UserError naming INIT_WEIGHTS when the checkpoint holds another architecture."""
    theirs = without_module_prefix(checkpoint['state_dict'])
    own = unwrap(model).state_dict()
    skipped = _classifier_of(model_name, theirs)
    fresh = set() if has_neck(theirs) else {key for key in own if key.startswith(NECK_PREFIX)}
    dropped = set() if has_neck(own) else {key for key in theirs if key.startswith(NECK_PREFIX)}
    kept = {key: value for key, value in theirs.items() if key not in skipped | dropped}
    # The model's new classifier (and new neck) stands in for the checkpoint's, so that
    # load_weights compares every other tensor and refuses another architecture with its own
    # message.
    own_classifier = _classifier_of(model_name, own)
    load_weights(model, {**checkpoint, 'state_dict': {
        **kept, **{key: own[key] for key in own_classifier | fresh}}}, model_name, path,
        setting='INIT_WEIGHTS')
    loaded = len(kept)
    trained = checkpoint.get('epoch')
    print(f'INIT_WEIGHTS: {loaded} tensors loaded from "{path}"'
          + (f' (epoch {trained})' if trained is not None else '')
          + f', {len(skipped)} skipped (the classifier: this run learns its own identities)'
          + (f', {len(fresh)} new (the neck: NECK=\'bnneck\' where INIT_WEIGHTS has none)'
             if fresh else ''))
    if dropped:
        print(f'Note: INIT_WEIGHTS has a BNNeck and this run has none (NECK=\'none\'): its '
              f'{len(dropped)} neck tensors are dropped, and the features are taken before '
              f'where it took them after the neck.')
    return loaded, len(skipped)
