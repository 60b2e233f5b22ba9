"""The one model builder: Torchreid's model for the settings, with the Bag of Tricks' BNNeck
and last stride 1 where asked (Luo et al., "Bag of Tricks and a Strong Baseline for Deep
Person Re-identification", CVPRW 2019). Training, test, visrank, search, export and the
checkpoints' meta models all build through `build_model`, so they hold the same layers.

With NECK='none' and LAST_STRIDE='auto' the model is Torchreid's own module, unchanged: older
checkpoints and model-zoo files keep their keys. The neck and the stride change are set on
the module Torchreid built (its `build_model` cannot pass them); every other layer, and every
layer name (OPEN_LAYERS), stays Torchreid's.
"""
from __future__ import annotations

import contextlib
import functools
import io
import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn

from reidkit.run.errors import UserError
from reidkit.run.settings import Settings

# Settings that build a model, with the values of a plain Torchreid model (meta_model).
PLAIN = {'LOSS': 'softmax', 'PRETRAINED': False, 'NECK': 'none', 'LAST_STRIDE': 'auto',
         'CENTER_LOSS_WEIGHT': 0.0}
# BoT's classifier starts from N(0, 0.001^2) (Torchreid's linear layers: 0.01).
NECK_CLASSIFIER_STD = 0.001


def needs_features(s: Mapping[str, Any]) -> bool:
    """Whether training needs the pooled features beside the logits: for the triplet loss
    (LOSS='triplet') or the centre loss (CENTER_LOSS_WEIGHT > 0)."""
    return s['LOSS'] == 'triplet' or s['CENTER_LOSS_WEIGHT'] > 0


def build_model(s: Mapping[str, Any], num_classes: int,
                pretrained: bool | None = None) -> nn.Module:
    """Torchreid's MODEL_NAME (`torchreid.reid.models.build_model`) for `num_classes`
    identities, with ImageNet weights when PRETRAINED (or `pretrained`, when given), then
    LAST_STRIDE and NECK applied to it. `s`: settings, or any mapping with MODEL_NAME, LOSS,
    PRETRAINED, NECK, LAST_STRIDE and CENTER_LOSS_WEIGHT.

    What the model returns for images of shape (n, 3, HEIGHT, WIDTH):
    - eval mode: (n, dim) test features; with NECK='bnneck' taken after the neck's batch norm
      (BoT's "after");
    - training mode, when `needs_features(s)` (triplet or centre loss): a tuple (logits
      (n, num_classes), features (n, dim)), the features before the neck (what BoT's triplet
      and centre losses see); otherwise the logits alone. Torchreid's models return the
      features only when built with loss='triplet', so that is how they are built then.

    Raises UserError for a NECK or LAST_STRIDE that MODEL_NAME cannot take (`fit_to_model`
    says so before any work; under RECIPE's preset it leaves the trick out instead).
    """
    # here, not at the top: a search with an .onnx file never imports Torchreid
    from torchreid.reid.models import build_model as torchreid_model
    name = s['MODEL_NAME']
    model = torchreid_model(name, num_classes=num_classes,
                            loss='triplet' if needs_features(s) else 'softmax',
                            pretrained=s['PRETRAINED'] if pretrained is None else pretrained)
    if s['LAST_STRIDE'] == 1:
        keep_last_stage_size(model, name)
    if s['NECK'] == 'bnneck':
        add_bnneck(model, name)
    return model


class NeckClassifier(nn.Module):
    """BNNeck's head (BoT): a batch norm on the pooled feature, its bias frozen at zero
    (`neck`), then a linear classifier without bias (`linear`). (n, dim) features in,
    (n, num_classes) logits out. It takes the place of a Torchreid model's `classifier`, so
    the model's forward calls it on its pooled feature as it called its classifier, and
    OPEN_LAYERS=['classifier'] opens the neck with it."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.neck = nn.BatchNorm1d(dim)
        self.neck.bias.requires_grad_(False)
        self.linear = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.linear.weight, std=NECK_CLASSIFIER_STD)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.neck(features))


def add_bnneck(model: nn.Module, model_name: str = '') -> None:
    """Puts a NeckClassifier in the place of `model.classifier` (an nn.Linear: 46 of
    Torchreid 0.2.5's 49 models; not PCB's per-part classifiers nor HACNN's two), in place,
    and has the model return its test features after the neck (a forward hook: in eval mode
    Torchreid's forward returns the pooled feature, which the hook passes through the neck).
    UserError for a model without such a classifier."""
    linear = getattr(model, 'classifier', None)
    if not isinstance(linear, nn.Linear):
        raise UserError(_neck_refused(model_name or type(model).__name__))
    model.classifier = NeckClassifier(linear.in_features, linear.out_features).to(
        linear.weight.device)
    model.register_forward_hook(_test_features_after_neck)


def _test_features_after_neck(model: nn.Module, inputs, features):
    if not model.training:
        return model.classifier.neck(features)
    return None                     # training: the model's (logits, features) as they are


def freeze_neck_bias(model: nn.Module) -> None:
    """Keeps the neck's bias frozen after Torchreid's open_all_layers / open_specified_layers
    (FIXBASE_EPOCH) set every opened parameter trainable. No-op without a neck."""
    head = getattr(model, 'classifier', None)
    if isinstance(head, NeckClassifier):
        head.neck.bias.requires_grad_(False)


NECK_PREFIX = 'classifier.neck.'       # the neck's keys in a state_dict


def has_neck(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state_dict (a checkpoint's, 'module.' prefixes removed) holds a BNNeck."""
    return any(key.startswith(NECK_PREFIX) for key in state_dict)


def last_stage(model: nn.Module) -> nn.Module | None:
    """The first block of a ResNet-family model's last stage (`layer4[0]`: ResNet, ResNeXt,
    SE-ResNet(Xt), ResNet-IBN, ResNet-mid, PCB), or None for a model without one."""
    stage = getattr(model, 'layer4', None)
    return stage[0] if isinstance(stage, nn.Sequential) and len(stage) else None


def keep_last_stage_size(model: nn.Module, model_name: str = '') -> None:
    """LAST_STRIDE=1: the last stage's first block convolves with stride 1 where it had 2 (its
    3x3 or 1x1 convolution and its shortcut's), in place, so the last feature maps keep the
    size of the stage before (16x8 instead of 8x4 at 256x128). No weight changes; a model
    whose last stage already keeps it (resnet50_fc512, PCB) is left as it is. UserError for
    a model without a ResNet-style last stage."""
    block = last_stage(model)
    if block is None:
        raise UserError(_stride_refused(model_name or type(model).__name__))
    for layer in block.modules():
        if isinstance(layer, nn.Conv2d) and layer.stride != (1, 1):
            layer.stride = (1, 1)


def _neck_refused(model_name: str) -> str:
    return (f"NECK='bnneck' puts a batch norm between a model's pooled feature and its one "
            f"linear classifier, but MODEL_NAME={model_name!r} has no such classifier (PCB "
            f"classifies each part, HACNN a global and a local branch). Set NECK='none', or "
            f"pick a model that has one, such as resnet50 or osnet_x1_0 (46 of Torchreid's "
            f"49 models).")


def _stride_refused(model_name: str) -> str:
    return (f"LAST_STRIDE=1 keeps the size of a ResNet-family model's last stage (its "
            f"layer4), but MODEL_NAME={model_name!r} has no such stage. Set "
            f"LAST_STRIDE='auto' (the model's own), or pick a ResNet-family model such as "
            f"resnet50, se_resnet50 or resnet50_ibn_a.")


def fit_to_model(s: Settings) -> tuple[Settings, list[str]]:
    """`s` with the tricks MODEL_NAME cannot take (NECK='bnneck' without a linear
    classifier, LAST_STRIDE=1 without a ResNet last stage) left out where RECIPE's preset set
    them, with one note each for the log; the settings a run records are then those it
    trains with. UserError, before any work, for such a trick set in config.py or on the
    command line. An unknown MODEL_NAME is left to the name checks."""
    model = meta_model(s.MODEL_NAME)
    if model is None:
        return s, []
    unfit = {}
    if s.NECK != 'none' and not isinstance(getattr(model, 'classifier', None), nn.Linear):
        unfit['NECK'] = ('none', _neck_refused(s.MODEL_NAME))
    if s.LAST_STRIDE != 'auto' and last_stage(model) is None:
        unfit['LAST_STRIDE'] = ('auto', _stride_refused(s.MODEL_NAME))
    for key, (_, refusal) in unfit.items():
        if key not in s.preset:
            raise UserError(refusal)
    notes = [f"RECIPE={s.RECIPE!r} leaves out {key}={s[key]!r}: {s.MODEL_NAME} cannot take "
             f"it ({key}={off!r} for this run)" for key, (off, _) in unfit.items()]
    values = {**s, **{key: off for key, (off, _) in unfit.items()}}
    return Settings(values, s.given, s.preset - set(unfit)), notes


@functools.lru_cache(maxsize=None)
def meta_model(model_name: str, num_classes: int = 2, neck: str = 'none') -> nn.Module | None:
    """`model_name` built by `build_model` on the meta device (no memory, no weights,
    milliseconds; with `neck`), to read its layers and tensor names and shapes; None for a
    name Torchreid cannot build, or a neck it cannot take. Cached: never change or train
    it."""
    try:
        with torch.device('meta'), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return build_model({**PLAIN, 'MODEL_NAME': model_name, 'NECK': neck}, num_classes)
    except Exception:               # an unknown name, or a model that cannot go on meta
        return None
