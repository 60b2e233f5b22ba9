"""Checkpoints: written atomically, read without ever running code from the file.

Torchreid saves `rank1` as a numpy scalar, which `torch.load(weights_only=True)` (the default
since torch 2.6) refuses, so Torchreid's own loader breaks the tutorial's test step. We allow
exactly the numpy types such a checkpoint needs and nothing else: a file that asks for any
other Python object is refused, never executed.
"""
from __future__ import annotations

import functools
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from reidkit.run.atomic import atomic_file, temporary_name
from reidkit.run.errors import UserError
from reidkit.run.model import NECK_PREFIX, has_neck, meta_model
from reidkit.run.schedule import schedule_parts, warmup_factor
from reidkit.run.settings import Settings

CHECKPOINT_PREFIX = 'model.pth.tar-'   # Torchreid's naming: <save_dir>/model/model.pth.tar-<epoch>
LATEST_NAME = 'latest.pth.tar'         # rolling checkpoint written every LATEST_EVERY epochs
OPTIMIZER_DROPPED = 'optimizer_dropped'   # True in a checkpoint drop_optimizer_states rewrote
# A checkpoint's centre-loss state (CENTER_LOSS_WEIGHT > 0): the class centres and their SGD's
# state, reidkit.train.step.Centers.state_dict(); absent when the run had no centre loss.
CENTERS_KEY = 'center_loss'
# Hyper-parameters that tell optimisers apart in a saved state (Adam has betas, SGD momentum
# and dampening, RMSprop alpha); other keys vary with the torch version.
OPTIMISER_SIGNATURE = {'betas', 'momentum', 'dampening', 'nesterov', 'alpha', 'centered'}


def _numpy_scalar_globals() -> list:
    """The globals a pickled numpy scalar (like Torchreid's rank1) refers to."""
    core = getattr(np, '_core', None) or np.core
    kinds = [np.float64, np.float32, np.int64, np.int32, np.bool_]
    return [core.multiarray.scalar, np.dtype] + [type(np.dtype(kind)) for kind in kinds]


def checkpoint_path(save_dir: Path, epoch: int, name: str = 'model') -> Path:
    return Path(save_dir) / name / f'{CHECKPOINT_PREFIX}{epoch}'


def checkpoint_epoch(path: Path) -> int:
    """The epoch in a checkpoint's file name, or -1 for another name."""
    suffix = Path(path).name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if Path(path).name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else -1


def save_checkpoint(state: dict, path: Path) -> Path:
    """Writes `state` to `path` through a temporary file and a rename (`reidkit.run.atomic`), so a
    kill mid-write leaves the previous checkpoint, never a truncated one. A failed write (a
    full disk) removes the temporary file and is a one-line error."""
    # torch.save reports a short write as RuntimeError
    with atomic_file(path, 'wb', 'the checkpoint', catch=(OSError, RuntimeError), advice=(
            'Earlier checkpoints are intact; free some space (or fix the folder\'s permissions) '
            'and resume from the last one.')) as handle:
        torch.save(state, handle)
    return Path(path)


def drop_optimizer_states(model_dir: Path, keep: int) -> list[Path]:
    """Rewrites the numbered checkpoints in `model_dir` but the newest `keep` (>= 0) without
    their optimiser state (Adam's two moments: two thirds of a checkpoint), each atomically
    (`save_checkpoint`: a kill leaves it whole, with or without the state). They keep their
    weights, epoch, scores and settings: test, visrank, search and export use them; --RESUME
    refuses them (`reidkit.run.folders.resume_checkpoint`). A `latest.pth.tar` hard-linked to
    one of them keeps the state: the rename gives the numbered name a new file. Returns the
    files rewritten."""
    numbered = sorted((p for p in Path(model_dir).glob(f'{CHECKPOINT_PREFIX}*')
                       if checkpoint_epoch(p) >= 0), key=checkpoint_epoch, reverse=True)
    rewritten = []
    for path in numbered[max(keep, 0):]:
        state = _mapped(path)
        if state is None or state.get('optimizer') is None:
            continue
        save_checkpoint(dict(state, optimizer=None, **{OPTIMIZER_DROPPED: True}), path)
        rewritten.append(path)
    return rewritten


def _mapped(path: Path) -> dict | None:
    """A checkpoint of ours, its tensors mapped from the file rather than read (seeing whether
    it holds an optimiser state costs no read of its weights); None for one that cannot be
    read so (a foreign format: left as it is)."""
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:       # not ours, or not the zip format mmap needs: not ours to rewrite
        return None
    return state if isinstance(state, dict) else None


def weights_only(path: Path) -> bool:
    """Whether `path` is a checkpoint `drop_optimizer_states` left with its weights only
    (read from a mapping of the file: no read of its weights)."""
    return bool((_mapped(path) or {}).get(OPTIMIZER_DROPPED))


def newest_resumable(model_dir: Path) -> Path | None:
    """The checkpoint in `model_dir` (numbered, or latest.pth.tar) of the highest epoch that
    holds an optimiser state to resume from, or None."""
    found = {}
    for path in Path(model_dir).glob('*.pth.tar*'):
        state = _mapped(path) if not path.name.startswith('.') else None
        if state is not None and state.get('optimizer') is not None:
            # the same epoch twice (latest linked to it): the numbered name, which stays
            found[path] = (int(state.get('epoch') or 0), path.name != LATEST_NAME)
    return max(found, key=found.get) if found else None


def check_resumable(saved: dict, path: Path) -> None:
    """A checkpoint whose optimiser state was dropped (KEEP_OPTIMIZER) holds weights for test,
    visrank and search; training continues only from one that kept it: UserError naming the
    newest beside it."""
    if not saved.get(OPTIMIZER_DROPPED):
        return      # resumable, or never had a state (resume_training says so)
    newest = newest_resumable(Path(path).parent)
    raise UserError(
        f'RESUME: "{path}" holds the weights only (its optimiser state was dropped to save '
        f'space: KEEP_OPTIMIZER keeps it in the newest checkpoints only). It serves test, '
        f'visrank and search (--WEIGHTS={path}). '
        + (f'Resume from "{newest}", the newest checkpoint of the run that keeps its state.'
           if newest is not None else
           f'No checkpoint beside it keeps its state: start a new run from its weights with '
           f'--INIT_WEIGHTS={path} instead of --RESUME.'))


def link_latest(numbered: Path) -> Path | None:
    """Stores the epoch `numbered` (a checkpoint just written) holds once: where the rolling
    `latest.pth.tar` beside it holds the same epoch (written before that epoch's evaluation),
    latest becomes the same file as it, a hard link. A latest of another epoch (the one before
    a run's final epoch, or none: LATEST_EVERY=0) is left as it is: latest stays the rolling
    checkpoint, never moved to an epoch it was not written for. The link replaces the old
    latest by a rename (never a moment without one); a later rewrite of `numbered`
    (`drop_optimizer_states`) renames a new file over its name and leaves latest's intact.
    Returns latest's path once linked; None where it was left as it is or the file system has
    no hard links (FAT, some network file systems: latest stays a copy)."""
    numbered = Path(numbered)
    latest = numbered.with_name(LATEST_NAME)
    held = _mapped(latest) if latest.is_file() else None
    if held is None or held.get('epoch') != (_mapped(numbered) or {}).get('epoch'):
        return None
    temporary = temporary_name(latest)
    try:
        temporary.unlink(missing_ok=True)
        os.link(numbered, temporary)
        os.replace(temporary, latest)
    except OSError:     # no hard links here: keep the copy
        temporary.unlink(missing_ok=True)
        return None
    return latest


def load_checkpoint(path: Path, setting: str = 'WEIGHTS') -> dict:
    """A checkpoint's contents on the CPU, loaded safely; UserError (naming `setting`) if it
    is not one or its weights are not all finite (`check_finite_weights`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f'{setting}: no checkpoint file at "{path}". Pass the path of a file written by '
            f'training (e.g. experiments/<run>/model/{CHECKPOINT_PREFIX}<epoch> or '
            f'{LATEST_NAME})' + (', or leave WEIGHTS empty to use the newest run\'s.'
                                 if setting == 'WEIGHTS' else '.')
        )
    if path.suffix.lower() == '.onnx':
        raise _an_onnx_model(path, setting)
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r'GLOBAL ([\w.]+)', str(error))
        if refused:
            raise UserError(
                f'{setting}: "{path}" asks to run or create {refused.group(1)}, which is not a '
                f'tensor or number, so it was refused without running it (loading it could '
                f'execute code). Use a checkpoint written by Torchreid or this project; if you '
                f'made this file yourself and trust it, re-save just its state_dict.'
            ) from None
        raise _not_a_checkpoint(path, error, setting) from None
    except Exception as error:  # truncated or foreign files fail in many ways inside torch.load
        raise _not_a_checkpoint(path, error, setting) from None
    if isinstance(checkpoint, dict) and 'state_dict' not in checkpoint and \
            checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        checkpoint = {'state_dict': checkpoint}   # a bare state_dict is fine too
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
        raise UserError(
            f'{setting}: "{path}" loads, but holds no model weights (no "state_dict"). '
            f'Pass a checkpoint written by training.'
        )
    check_finite_weights(checkpoint['state_dict'], path, setting)
    return checkpoint


def check_finite_weights(state_dict: dict, path: Path, setting: str) -> None:
    """Every floating-point tensor of `state_dict` (read from `path`, given as `setting`) is
    finite: a model with NaN or infinite weights scores nothing and trains nothing (its loss is
    NaN from the first step). UserError naming the first bad tensor."""
    bad = next((key for key, value in state_dict.items() if isinstance(value, torch.Tensor)
                and value.is_floating_point() and not torch.isfinite(value).all()), None)
    if bad is not None:
        raise UserError(
            f'{setting}: "{path}" holds NaN or infinite values (first: {bad!r}): it was saved '
            f'from a model whose training diverged, or the file is damaged, and no result '
            f'computed with it would mean anything. Pick an earlier checkpoint of the run or '
            f'another file.')


def _an_onnx_model(path: Path, setting: str) -> UserError:
    """An exported model.onnx holds the feature extractor only (no classifier, no optimiser,
    no settings): search ranks with it; test, visrank, export and resume need the checkpoint."""
    beside = sorted(path.parent.glob(f'{CHECKPOINT_PREFIX}*'), key=checkpoint_epoch)
    hint = (f'e.g. --{setting}={beside[-1]}, the newest checkpoint beside it' if beside
            else f'a {CHECKPOINT_PREFIX}<epoch> file written by training')
    return UserError(
        f'{setting}: "{path}" is an ONNX model (written by python main.py export). It serves '
        f'search only: python main.py search --WEIGHTS={path} --QUERY=... --GALLERY=... '
        f'Here pass the PyTorch checkpoint it was exported from ({hint}).')


def _not_a_checkpoint(path: Path, error: Exception, setting: str) -> UserError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ''
    detail = type(error).__name__ + (f': {detail}' if detail and len(detail) < 120 else '')
    return UserError(
        f'{setting}: "{path}" is not a readable PyTorch checkpoint (it may be truncated by an '
        f'interrupted copy or download, or be another kind of file; {detail}). '
        f'Copy it again, or pick another checkpoint of the run.'
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel, DistributedDataParallel and our own wrappers (which name
    the model they wrap `wrapped`, as the fast path's FastModel does), or the model itself."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, parallel):
            model = model.module
        elif isinstance(getattr(model, 'wrapped', None), nn.Module):
            model = model.wrapped
        else:
            return model


def without_module_prefix(state_dict: dict) -> dict:
    """A state_dict saved from nn.DataParallel (as Torchreid's scripts save) with its keys'
    'module.' prefix removed."""
    return {key[len('module.'):] if key.startswith('module.') else key: value
            for key, value in state_dict.items()}


@functools.lru_cache(maxsize=None)
def classifier_keys(model_name: str, neck: str = 'none') -> frozenset[str] | None:
    """The state_dict keys of a Torchreid model's identity classifier: those whose shape follows
    `num_classes` (classifier.*, but HACNN's classifier_global.* and classifier_local.*, PCB's
    classifier.0.* ...; with neck='bnneck' classifier.linear.weight). Found by building the
    model twice on the meta device (no memory, no weights, milliseconds); None for a name
    Torchreid cannot build (or with a neck it cannot take)."""
    two, three = (meta_model(model_name, num_classes=n, neck=neck) for n in (2, 3))
    if two is None:
        return None
    two, three = two.state_dict(), three.state_dict()
    return frozenset(key for key in two if two[key].shape != three[key].shape)


def _classifier_of(model_name: str, keys) -> set[str]:
    """The classifier's keys among `keys` (of a model with or without a neck); by name
    (classifier*) where the model cannot be probed."""
    known = classifier_keys(model_name)
    if known is not None:
        return set(keys) & (known | (classifier_keys(model_name, 'bnneck') or frozenset()))
    return {key for key in keys if key.split('.')[0].startswith('classifier')}


def checkpoint_classes(checkpoint: dict, model_name: str) -> int | None:
    """The number of identities the checkpoint's classifier was trained on (what to build
    `model_name` with to load it whole), or None when it holds no classifier."""
    weights = without_module_prefix(checkpoint['state_dict'])
    for key in sorted(_classifier_of(model_name, weights)):
        if getattr(weights[key], 'ndim', 0) >= 1:
            return int(weights[key].shape[0])
    return None


def load_weights(model: nn.Module, checkpoint: dict, model_name: str, path: Path,
                 setting: str = 'WEIGHTS') -> None:
    """Loads a checkpoint's weights (read from `path`, given as `setting`) into `model` for
    testing.

    The classifier may differ (a checkpoint trained on other identities): it is not used at
    test time, so it is skipped with a one-line note. Any other mismatch means another
    architecture (or a neck on one side only: NECK), which is an error naming both.
    """
    target = unwrap(model)
    own = target.state_dict()
    theirs = without_module_prefix(checkpoint['state_dict'])
    mismatched = sorted(key for key in own
                        if key not in theirs or theirs[key].shape != own[key].shape)
    unexpected = sorted(key for key in theirs if key not in own)
    classifier = _classifier_of(model_name, set(own) | set(theirs))
    architecture = [key for key in mismatched + unexpected
                    if key not in classifier and not key.startswith(NECK_PREFIX)]
    if not architecture and has_neck(own) != has_neck(theirs):
        wanted = 'bnneck' if has_neck(theirs) else 'none'
        raise UserError(
            f'{setting}: "{path}" was trained with{"" if has_neck(theirs) else "out"} a BNNeck '
            f'and the model built here has {"none" if has_neck(theirs) else "one"}: use '
            f'NECK={wanted!r}, as the checkpoint\'s own settings do unless --NECK is given.')
    if any(key not in classifier for key in mismatched + unexpected):
        saved_from = checkpoint.get('model_name', 'another architecture')
        example = next(key for key in mismatched + unexpected if key not in classifier)
        raise UserError(
            f'{setting}: "{path}" was saved from {saved_from}, which does not match '
            f'MODEL_NAME={model_name!r}: '
            f'{len(mismatched)} of {len(own)} weights are missing or differ in shape '
            f'(first: {example!r}). Set MODEL_NAME to the architecture the checkpoint was '
            f'trained with, or pick a checkpoint of this architecture.'
        )
    if mismatched or unexpected:
        print('Note: the checkpoint\'s classifier was trained on other identities; it is '
              'skipped (testing uses features only).')
    own.update({key: value for key, value in theirs.items() if key not in mismatched
                and key not in unexpected})
    target.load_state_dict(own)


def resume_training(checkpoint: dict, path: Path, model: nn.Module, optimizer, scheduler,
                    centers=None) -> int:
    """Restores model, optimiser, scheduler and (CENTER_LOSS_WEIGHT > 0) the centre loss's
    `centers` (reidkit.train.step.Centers) from a checkpoint (read from `path`); returns its
    epoch. UserError, before anything is restored, for a checkpoint without training state
    (the centres' included), of another optimiser, or whose classifier counts other identities
    than `model`'s (the training data changed); after, for any other mismatch."""
    needed = {'epoch': 'epoch', 'optimizer': 'optimizer', 'scheduler': 'scheduler'}
    if centers is not None:
        needed[CENTERS_KEY] = 'centre-loss'
    for key, what in needed.items():
        if checkpoint.get(key) is None:
            raise UserError(f'RESUME: "{path}" has no {what} state, so training cannot continue '
                            f'from it. Resume from a checkpoint written by training.')
    saved_group = (checkpoint['optimizer'].get('param_groups') or [{}])[0]
    own_group = optimizer.state_dict()['param_groups'][0]
    if set(saved_group) & OPTIMISER_SIGNATURE != set(own_group) & OPTIMISER_SIGNATURE:
        # Another optimiser's state loads without complaint and fails at the first step
        # (e.g. SGD's KeyError: 'momentum' from an Adam checkpoint).
        raise UserError(
            f'RESUME: "{path}" holds the state of another optimiser than {type(optimizer).__name__} '
            f'(its settings: {", ".join(sorted(saved_group))}). Resume with the OPTIM the '
            f'run was started with.')
    model_name = str(checkpoint.get('model_name', ''))
    classes = [checkpoint_classes(state, model_name) for state in
               (checkpoint, {'state_dict': unwrap(model).state_dict()})]
    if None not in classes and classes[0] != classes[1]:
        raise UserError(
            f'RESUME: "{path}" does not fit the training data: its classifier has {classes[0]} '
            f'identities and SOURCES now has {classes[1]}, so the data changed since the run '
            f'trained on it (identities added or removed). Restore the data as it was (an own '
            f'folder\'s split.json in the run folder lists every image), or start a new run '
            f'from this checkpoint: --INIT_WEIGHTS={path} instead of --RESUME.')
    try:
        unwrap(model).load_state_dict(without_module_prefix(checkpoint['state_dict']))
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        if centers is not None:
            centers.load_state_dict(checkpoint[CENTERS_KEY])
    except (RuntimeError, ValueError, KeyError) as error:
        # PyTorch's first line is a header ("Error(s) in loading ..."): name the first mismatch
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[min(1, len(lines) - 1)].rstrip('.') if lines else type(error).__name__
        raise UserError(
            f'RESUME: "{path}" does not fit this configuration (saved from '
            f'{checkpoint.get("model_name", "another setup")}): {detail}. Resume with the '
            f'settings the run was started with.'
        ) from None
    return int(checkpoint['epoch'])


def continue_schedule(checkpoint: dict, scheduler, optimizer, epoch: int,
                      max_epoch: int) -> str | None:
    """Fits a restored learning-rate schedule (after `resume_training`) to MAX_EPOCH; returns
    a note for the log, or None when the run continues exactly as it was planned.

    A checkpoint records the MAX_EPOCH it was trained towards (its settings; Torchreid's and
    older ones: a cosine's T_max). With that MAX_EPOCH the restored schedule continues exactly.
    With another one:
    - cosine is re-planned: from the learning rate of the last epoch trained (`epoch`), along
      a half cosine that would reach its minimum one epoch after MAX_EPOCH, as the first plan
      did. The restored cosine would instead train at LR 0 after its old end, then rise.
      Re-planning from the LR the next epoch would have had cannot work for a finished run:
      that LR is the cosine's minimum, 0.
    - single_step (StepLR) and multi_step (MultiStepLR) are unchanged: the drops already made
      stay made, and the next ones come on the same epochs as before (multi_step's STEPSIZE
      epochs are kept as they are, even those past the new MAX_EPOCH).
    - a warm-up (reidkit.run.schedule) is never changed: WARMUP_EPOCHS stays, and the rules
      above apply to the schedule it multiplies (a cosine re-planned during the warm-up is
      still scaled by the warm-up's factor until it ends).
    """
    warmup, schedule = schedule_parts(scheduler)
    planned = (checkpoint.get('settings') or {}).get('MAX_EPOCH')
    if planned is None and isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR):
        planned = (checkpoint.get('scheduler') or {}).get('T_max')
    if planned is None or int(planned) == max_epoch:
        return None
    change = f'MAX_EPOCH={max_epoch} where the run planned {int(planned)}'
    warming = warmup is not None and epoch < warmup.total_iters
    during_warmup = (f' (times the warm-up\'s factor until epoch {warmup.total_iters}, '
                     f'WARMUP_EPOCHS)' if warming else '')
    if isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR):
        low, phase = schedule.eta_min, schedule.last_epoch
        # The LR epoch `epoch` trained with: the cosine one step before the restored position.
        last = [low + (base - low) * (1 + math.cos(math.pi * (phase - 1) / schedule.T_max)) / 2
                for base in schedule.base_lrs]
        span = max_epoch - epoch + 1
        plan = [[low + (lr - low) * (1 + math.cos(math.pi * k / span)) / 2 for lr in last]
                for k in range(1, span)]
        # Position 1 of a cosine from `last` over `span` epochs: PyTorch's step() continues it.
        schedule.base_lrs, schedule.T_max, schedule.last_epoch = last, span, 1
        rates = [lr * warmup_factor(warmup) for lr in plan[0]]
        for group, lr in zip(optimizer.param_groups, rates):
            group['lr'] = lr
        for part in {scheduler, schedule, warmup} - {None}:
            part._last_lr = list(rates)
        shown = ', '.join(f'{lrs[0]:.3g}' for lrs in plan) if len(plan) <= 6 else \
            f'{plan[0][0]:.3g} ... {plan[-1][0]:.3g}'
        return (f'{change}: the cosine learning-rate schedule is re-planned over epochs '
                f'{epoch + 1}-{max_epoch}, falling from epoch {epoch}\'s rate ({last[0]:.3g}) '
                f'as the first plan fell: {shown}{during_warmup}')
    lr = optimizer.param_groups[0]['lr']
    if isinstance(schedule, torch.optim.lr_scheduler.StepLR):
        return (f'{change}: single_step keeps multiplying the learning rate by '
                f'{schedule.gamma:g} every {schedule.step_size} epochs (STEPSIZE), counted '
                f'from the run\'s start; the drops already made stay. Epoch {epoch + 1} trains '
                f'at {lr:.3g}{during_warmup}')
    if isinstance(schedule, torch.optim.lr_scheduler.MultiStepLR):
        epochs = ', '.join(str(step) for step in sorted(schedule.milestones.elements()))
        return (f'{change}: multi_step keeps multiplying the learning rate by '
                f'{schedule.gamma:g} after epochs {epochs} (STEPSIZE, unchanged); the drops '
                f'already made stay. Epoch {epoch + 1} trains at {lr:.3g}{during_warmup}')
    return f'{change}: the learning-rate schedule continues as it was; epoch {epoch + 1} ' \
        f'trains at {lr:.3g}{during_warmup}'


def model_state(engine: Any, name: str, epoch: int, rank1: float, model_name: str) -> dict:
    """What a checkpoint of `engine`'s model `name` holds: Torchreid's fields, plain types."""
    optimizer, scheduler = engine._optims[name], engine._scheds[name]
    return {
        'state_dict': unwrap(engine._models[name]).state_dict(),
        'epoch': epoch,
        'rank1': float(rank1),
        'optimizer': optimizer.state_dict() if optimizer is not None else None,
        'scheduler': scheduler.state_dict() if scheduler is not None else None,
        'model_name': model_name,
        'input_size': [engine.datamanager.height, engine.datamanager.width],
    }


def check_checkpoint_fits(checkpoint: dict, s: Settings, path) -> None:
    """A checkpoint trained at another input size would give silently worse features."""
    size = checkpoint.get('input_size')
    if size and list(size) != [s.HEIGHT, s.WIDTH]:
        raise UserError(
            f'WEIGHTS: "{path}" was trained on {size[0]}x{size[1]} images, but HEIGHT x WIDTH '
            f'is {s.HEIGHT}x{s.WIDTH}. Drop --HEIGHT and --WIDTH to use the checkpoint\'s size, '
            f'or use a checkpoint trained at {s.HEIGHT}x{s.WIDTH}.'
        )
