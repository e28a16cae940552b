"""Each recipe as one call: train_<recipe>(model, train_data, config, **settings) → TrainResult
(train_transfer(source, train_data, config, mode=...) builds its model from the source).

The settings are the recipe's own (eps, steps, teacher, lambda_ce, ...); everything else
(eval_data, out_dir, resume, device) goes to fit.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from torch import nn

from robust_fast.models import TeacherMapStudent
from robust_fast.train.config import TrainConfig
from robust_fast.train.darht import DARHT
from robust_fast.train.loop import TrainResult, fit
from robust_fast.train.recipes import ARD, CRT, IBP, KD, PGDAT, RRM, FastAT, Gaussian, SmoothAdv, Standard
from robust_fast.train.transfer import MODES, FineTune, LwF, TransferHead, transfer_model

_FIT_OPTIONS = ("eval_data", "out_dir", "resume", "device", "max_steps")


def _split(options: dict):
    fit_options = {k: options.pop(k) for k in _FIT_OPTIONS if k in options}
    return options, fit_options


def train_standard(model: nn.Module, train_data, config: Optional[TrainConfig] = None, **options) -> TrainResult:
    settings, fit_options = _split(options)
    return fit(Standard(**settings), model, train_data, config, **fit_options)


def train_pgd_at(model: nn.Module, train_data, config: Optional[TrainConfig] = None, **options) -> TrainResult:
    settings, fit_options = _split(options)
    return fit(PGDAT(**settings), model, train_data, config, **fit_options)


def train_fast_at(model: nn.Module, train_data, config: Optional[TrainConfig] = None, **options) -> TrainResult:
    settings, fit_options = _split(options)
    return fit(FastAT(**settings), model, train_data, config, **fit_options)


def train_rrm(model: nn.Module, train_data, config: Optional[TrainConfig] = None, *, teacher: nn.Module,
              **options) -> TrainResult:
    settings, fit_options = _split(options)
    return fit(RRM(teacher, **settings), model, train_data, config, **fit_options)


def train_kd(model: nn.Module, train_data, config: Optional[TrainConfig] = None, *, teacher: nn.Module,
             **options) -> TrainResult:
    settings, fit_options = _split(options)
    return fit(KD(teacher, **settings), model, train_data, config, **fit_options)


def train_ard(model: nn.Module, train_data, config: Optional[TrainConfig] = None, *, teacher: nn.Module,
              **options) -> TrainResult:
    settings, fit_options = _split(options)
    return fit(ARD(teacher, **settings), model, train_data, config, **fit_options)


def train_ibp(model: nn.Module, train_data, config: Optional[TrainConfig] = None, **options) -> TrainResult:
    settings, fit_options = _split(options)
    return fit(IBP(**settings), model, train_data, config, **fit_options)


def train_gaussian(model: nn.Module, train_data, config: Optional[TrainConfig] = None, **options) -> TrainResult:
    settings, fit_options = _split(options)
    return fit(Gaussian(**settings), model, train_data, config, **fit_options)


def train_smoothadv(model: nn.Module, train_data, config: Optional[TrainConfig] = None, **options) -> TrainResult:
    settings, fit_options = _split(options)
    return fit(SmoothAdv(**settings), model, train_data, config, **fit_options)


def train_crt(model: nn.Module, train_data, config: Optional[TrainConfig] = None, *, teacher: nn.Module,
              **options) -> TrainResult:
    settings, fit_options = _split(options)
    return fit(CRT(teacher, **settings), model, train_data, config, **fit_options)


def train_transfer(source: nn.Module, train_data, config: Optional[TrainConfig] = None, *, mode: str = "head",
                   classes=None, num_classes: Optional[int] = None, head_epochs: Optional[int] = None,
                   blocks: Optional[int] = -1, cache: bool = True, lambda_feat: Optional[float] = None,
                   scale: str = "relative", source_path: Optional[str] = None, **options) -> TrainResult:
    """Robust transfer learning from `source` (a trained robust_fast.models model, not modified) to
    the task of train_data (labels 0..k-1): a copy with a fresh head (transfer.transfer_model,
    drawn from config.seed), trained by mode "head" (TransferHead), "finetune" (FineTune) or "lwf"
    (LwF) for config.epochs. head_epochs: first train the head alone on the frozen extractor for
    that many epochs (the warm start; default 1 for lwf, 0 for finetune, not for head), with
    config's other settings, into out_dir/head when out_dir is given; resume= skips it (the
    checkpoint holds the warm-started model). blocks: the extractor's last n blocks trained too
    (head) or only they (finetune, lwf); -1: the mode's default (0; all). lambda_feat, scale:
    LwF's. Returns the last phase's TrainResult, with the warm start's time added and its epochs
    first in the history (each record's "phase" says which)."""
    if mode not in MODES:
        raise ValueError(f"train_transfer: mode must be one of {tuple(MODES)}, got {mode!r}")
    config = config if config is not None else TrainConfig()
    settings, fit_options = _split(options)
    if settings:
        raise TypeError(f"train_transfer: unknown settings {sorted(settings)}")
    if num_classes is None and classes is None:
        num_classes = int(train_data[1].max()) + 1 if train_data[1].numel() else 1
    model = transfer_model(source, classes=classes, num_classes=num_classes, seed=config.seed)
    heads = model.classifier.out_features
    if train_data[1].numel() and not 0 <= int(train_data[1].min()) <= int(train_data[1].max()) < heads:
        raise ValueError(f"train_transfer: the labels must be 0..{heads - 1} (the target task's {heads} classes, "
                         f"relabelled as data.class_subset does), got {int(train_data[1].min())}.."
                         f"{int(train_data[1].max())}")
    if head_epochs is None:
        head_epochs = 1 if mode == "lwf" else 0
    if mode == "head" and head_epochs:
        raise ValueError("train_transfer: head_epochs is the warm start of finetune and lwf; mode 'head' trains "
                         "the head for config.epochs")
    if isinstance(head_epochs, bool) or not isinstance(head_epochs, int) or head_epochs < 0:
        raise ValueError(f"train_transfer: head_epochs must be an int >= 0, got {head_epochs!r}")
    if mode == "head":
        return fit(TransferHead(blocks=0 if blocks == -1 else blocks, cache=cache), model, train_data, config,
                   **fit_options)
    warm = None
    if head_epochs and fit_options.get("resume") is None:
        head_options = dict(fit_options)
        if head_options.get("out_dir") is not None:
            head_options["out_dir"] = os.path.join(head_options["out_dir"], "head")
        warm = fit(TransferHead(cache=cache), model, train_data, dataclasses.replace(config, epochs=head_epochs),
                   **head_options)
    if mode == "finetune":
        recipe = FineTune(blocks=None if blocks == -1 else blocks, cache=cache)
    else:
        extra = {"lambda_feat": lambda_feat} if lambda_feat is not None else {}
        recipe = LwF(source, scale=scale, blocks=None if blocks == -1 else blocks, cache=cache,
                     source_path=source_path, **extra)
    result = fit(recipe, model, train_data, config, **fit_options)
    if warm is not None:
        for record in warm.history:
            record["phase"] = "head"
        for record in result.history:
            record["phase"] = mode
        result.history = warm.history + result.history
        result.train_time_s += warm.train_time_s
    return result


def train_darht(model: nn.Module, train_data, config: Optional[TrainConfig] = None, *,
                teachers: Sequence[nn.Module], **options) -> TrainResult:
    """DARHT from `teachers`. model: a TeacherMapStudent with one map slice per teacher, or any
    model of robust_fast.models, which is then wrapped in one (TeacherMapStudent(model,
    len(teachers))); the result's model is the student that was trained."""
    settings, fit_options = _split(options)
    prediction = settings.pop("prediction", "head")
    if not isinstance(model, TeacherMapStudent):
        model = TeacherMapStudent(model, len(teachers), prediction=prediction)
    return fit(DARHT(teachers, **settings), model, train_data, config, **fit_options)
