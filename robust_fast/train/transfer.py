"""Adversarially robust transfer learning (Shafahi et al., ICLR 2020) on the one loop.

A source model's feature extractor moves to a new task (another set of classes) with a new head:

    transfer_model(source, classes)   a copy of the source with a fresh head for the target task
    TransferHead                      the extractor frozen (eval mode, no gradient), the head trained on
                                      clean target images: its robustness is the source's
    FineTune                          every layer trained by cross-entropy (forgets the robustness)
    LwF                               every layer trained by CE + lambda * ||z - z0||_1 / s, z0 the frozen
                                      source's features of the same clean image (learning without
                                      forgetting, through multi_teacher_loss kind "l1"), s the source
                                      features' mean L1 norm on the training set (scale="relative")

`blocks` retrains only the last n blocks of the extractor (a block: a layer with parameters and
the parameter-free layers after it); the layers before them are frozen. Where a part is frozen,
its output of each training image never changes, so prepare() computes it once for the whole
training set and each batch looks its rows up (cache=True): a head epoch then costs a matrix
product instead of a pass through the network. z0 is computed once per image the same way.
train_transfer (train/functions.py) runs the head warm start (head_epochs) and then the mode.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_fast.losses import LwFLoss
from robust_fast.train.recipes import RECIPES, Recipe

SCALES = ("relative", "absolute")
_CHUNK = 512


def _extractor_layers(model: nn.Module) -> List[nn.Module]:
    """The feature extractor's layers in order (robust_fast.models: SmallCNN's layers but the last;
    WideCNN / ResNetSmall's normalisation and body)."""
    if isinstance(model, nn.Sequential) and getattr(model, "forward_is_sequential", False):
        return list(model)[:-1]
    if hasattr(model, "normalize") and isinstance(getattr(model, "body", None), nn.Sequential):
        return [model.normalize] + list(model.body)
    raise TypeError(f"transfer: {type(model).__name__} is not a robust_fast.models model "
                    f"(SmallCNN, WideCNN, ResNetSmall): its feature extractor's layers are unknown")


def feature_blocks(model: nn.Module) -> List[nn.Sequential]:
    """The extractor as blocks, each a layer with parameters and the parameter-free layers that
    follow it (the first block also takes any parameter-free layers before it). The blocks share
    the model's modules."""
    blocks: List[List[nn.Module]] = []
    leading: List[nn.Module] = []
    for layer in _extractor_layers(model):
        if any(True for _ in layer.parameters()):
            blocks.append(leading + [layer])
            leading = []
        elif blocks:
            blocks[-1].append(layer)
        else:
            leading.append(layer)
    if leading:
        blocks.append(leading)
    return [nn.Sequential(*layers) for layers in blocks]


def _check_model(model: nn.Module, caller: str) -> None:
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "classifier", None), nn.Linear) \
            or not hasattr(model, "feature_dim"):
        raise TypeError(f"{caller}: the model must be a robust_fast.models model (features, feature_dim, "
                        f"a Linear classifier), got {type(model).__name__}")


def transfer_model(source: nn.Module, classes: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                   seed: int = 0) -> nn.Module:
    """A copy of `source` whose head (classifier) is a fresh Linear(feature_dim, k), drawn from
    `seed`, for the target task: k = len(classes), or num_classes. The source is not modified. The
    copy's spec (what checkpoints store) says k outputs and, when given, the classes."""
    _check_model(source, "transfer_model")
    if classes is not None:
        classes = [int(c) for c in classes]
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"transfer_model: num_classes={num_classes} but {len(classes)} classes were named")
        num_classes = len(classes)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"transfer_model: num_classes must be an int >= 1 (or classes given), got {num_classes!r}")
    model = copy.deepcopy(source)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    old = model.classifier
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    head = head.to(device=old.weight.device, dtype=old.weight.dtype)
    if isinstance(model, nn.Sequential):
        model[len(model) - 1] = head
    else:
        model.classifier = head
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    spec = copy.deepcopy(getattr(source, "spec", None))
    if spec is not None:
        spec["kwargs"]["num_classes"] = num_classes
        spec.pop("classes", None)
        if classes is not None:
            spec["classes"] = classes
        model.spec = spec
    return model.train(source.training)


class TransferNet(nn.Module):
    """The model split where its frozen part ends: forward(x) or forward(cached=h), h the frozen
    part's output, → (features, logits). Its state_dict holds the model's under "model.".
    The frozen part stays in eval mode whatever train() asks."""

    def __init__(self, model: nn.Module, blocks: Optional[int]):
        super().__init__()
        self.model = model
        all_blocks = feature_blocks(model)
        if blocks is None:
            blocks = len(all_blocks)
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= len(all_blocks):
            raise ValueError(f"transfer: blocks must be an int in [0, {len(all_blocks)}] (the extractor's "
                             f"blocks), got {blocks!r}")
        cut = len(all_blocks) - blocks
        # plain lists: the modules are registered once, under self.model
        self._frozen: List[nn.Module] = [layer for block in all_blocks[:cut] for layer in block]
        self._tuned: List[nn.Module] = [layer for block in all_blocks[cut:] for layer in block]
        for layer in self._frozen:
            for parameter in layer.parameters():
                parameter.requires_grad_(False)
        for layer in self._tuned + [model.classifier]:  # trained again after an earlier frozen phase
            for parameter in layer.parameters():
                parameter.requires_grad_(True)
        self.train(model.training)

    @property
    def frozen_parameters(self) -> List[nn.Parameter]:
        return [p for layer in self._frozen for p in layer.parameters()]

    def has_frozen_part(self) -> bool:
        return bool(self._frozen)

    def frozen_output(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for layer in self._frozen:
                x = layer(x)
        return x

    def train(self, mode: bool = True):
        super().train(mode)
        for layer in self._frozen:
            layer.eval()
        return self

    def forward(self, x: Optional[torch.Tensor] = None, cached: Optional[torch.Tensor] = None):
        h = cached if cached is not None else self.frozen_output(x)
        for layer in self._tuned:
            h = layer(h)
        return h, self.model.classifier(h)


def _chunked(fn, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """fn over the images in fixed chunks (the same values on every run and resume), on device."""
    with torch.no_grad():
        return torch.cat([fn(chunk.to(device)) for chunk in images.split(_CHUNK)])


class _Transfer(Recipe):
    """Shared by the transfer recipes: the frozen part, its cached output, the loss of a batch."""
    default_blocks: Optional[int] = None

    def __init__(self, blocks: Optional[int] = -1, cache: bool = True):
        self.blocks = self.default_blocks if blocks == -1 else blocks
        self.cache = bool(cache)
        self._net: Optional[TransferNet] = None
        self._cached: Optional[torch.Tensor] = None

    def settings(self):
        return {"blocks": self.blocks, "cache": self.cache}

    def trainable(self, model):
        _check_model(model, type(self).__name__)
        self._net = TransferNet(model, self.blocks)
        return self._net

    def prepare(self, images, device):
        net = self._net
        if self.cache and net is not None and net.has_frozen_part() and images.shape[0]:
            with torch.random.fork_rng(devices=[]):  # no draw here: the same stream with or without the cache
                self._cached = _chunked(net.frozen_output, images, device)

    def _forward(self, batch):
        if self._cached is not None and batch.index is not None:
            return batch.net(cached=self._cached[batch.index.to(self._cached.device)])
        return batch.net(batch.x)

    def batch_loss(self, batch):
        features, logits = self._forward(batch)
        return self.loss(features, logits, batch), logits

    def loss(self, features, logits, batch):
        return F.cross_entropy(logits, batch.y)


class TransferHead(_Transfer):
    """A new head on the source's frozen feature extractor (in eval mode, no gradient), trained
    by cross-entropy on clean target images (Shafahi et al.'s first phase). blocks = n also
    retrains the extractor's last n blocks. cache: the frozen part's output of each training
    image is computed once (prepare), so an epoch costs only the trained part."""
    name = "transfer_head"
    default_blocks = 0

    def __init__(self, blocks: int = 0, cache: bool = True):
        super().__init__(blocks, cache)


class FineTune(_Transfer):
    """Every layer (or the last `blocks` blocks and the head) trained by cross-entropy on clean
    target images: the naive fine-tuning that forgets the source's robustness."""
    name = "transfer_finetune"

    def __init__(self, blocks: Optional[int] = None, cache: bool = True):
        super().__init__(blocks, cache)


class LwF(_Transfer):
    """Fine-tuning with learning without forgetting (Shafahi et al. 2020): on clean target images
    CE(logits, y) + lambda_feat / s * mean_b d(z(x), z0(x)) (losses.LwFLoss; d the L1 distance,
    kind="l1", as in the authors' code), z the trained model's penultimate features and z0 the
    frozen source's on the same image, computed once per training image (prepare).

    scale="relative" (default): s = mean_b ||z0||_1 over the training set, so lambda_feat weighs
    the features' relative change and does not depend on their size (a small CNN's features
    had s ~ 72, where the published absolute lambda = 0.005 barely held them). scale="absolute":
    s = 1, the published form (lambda_feat = 0.005 there)."""
    name = "transfer_lwf"

    def __init__(self, source: nn.Module, lambda_feat: float = 4.0, scale: str = "relative", kind: str = "l1",
                 blocks: Optional[int] = None, cache: bool = True, source_path: Optional[str] = None):
        super().__init__(blocks, cache)
        _check_model(source, "LwF")
        if isinstance(lambda_feat, bool) or not isinstance(lambda_feat, (int, float)) or not 0 <= lambda_feat < float("inf"):
            raise ValueError(f"LwF: lambda_feat must be a finite number >= 0, got {lambda_feat!r}")
        if scale not in SCALES:
            raise ValueError(f"LwF: scale must be one of {SCALES}, got {scale!r}")
        self.source = copy.deepcopy(source).eval()   # the caller's model is left as it is
        for parameter in self.source.parameters():
            parameter.requires_grad_(False)
        self.lambda_feat, self.scale, self.source_path = float(lambda_feat), scale, source_path
        self.criterion = LwFLoss(lambda_feat=0.0, kind=kind)
        self.source_norm: Optional[float] = None   # s: the mean L1 norm of z0 (relative scale)
        self._source_features: Optional[torch.Tensor] = None

    def settings(self):
        return {**super().settings(), "lambda_feat": self.lambda_feat, "scale": self.scale,
                "kind": self.criterion.kind, "source": self.source_path, "source_norm": self.source_norm}

    def _source_on(self, device) -> nn.Module:
        if next(self.source.parameters()).device != torch.device(device):
            self.source.to(device)
        return self.source

    def prepare(self, images, device):
        super().prepare(images, device)
        if not images.shape[0]:
            return
        z0 = _chunked(self._source_on(device).features, images, device)
        self.source_norm = float(z0.abs().sum(1).mean())
        self._source_features = z0 if self.cache else None
        self.criterion.lambda_feat = self.lambda_feat / (self.source_norm if self.scale == "relative" else 1.0)
        if self.scale == "relative" and not self.source_norm > 0:
            raise ValueError("LwF: the source's features are all zero on the training set: a relative scale "
                             "has nothing to scale by (scale='absolute')")

    def loss(self, features, logits, batch):
        if self._source_features is not None and batch.index is not None:
            z0 = self._source_features[batch.index.to(self._source_features.device)]
        else:
            with torch.no_grad():
                z0 = self._source_on(batch.x.device).features(batch.x)
        self.criterion.backend = batch.backend
        return self.criterion(logits, features, z0, batch.y)

    def epoch_record(self):
        return {"lambda_effective": self.criterion.lambda_feat}


MODES = {"head": TransferHead, "finetune": FineTune, "lwf": LwF}
RECIPES.update({cls.name: cls for cls in MODES.values()})

__all__ = ["FineTune", "LwF", "MODES", "SCALES", "TransferHead", "TransferNet", "feature_blocks", "transfer_model"]
