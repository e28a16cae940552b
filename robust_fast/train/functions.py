"""Each recipe as one call: train_<recipe>(model, train_data, config, **settings) → TrainResult.

The settings are the recipe's own (eps, steps, teacher, lambda_ce, ...); everything else
(eval_data, out_dir, resume, device) goes to fit.
"""
from __future__ import annotations

from typing import Optional

from typing import Sequence

from torch import nn

from robust_fast.models import TeacherMapStudent

from robust_fast.train.config import TrainConfig
from robust_fast.train.darht import DARHT
from robust_fast.train.loop import TrainResult, fit
from robust_fast.train.recipes import ARD, CRT, IBP, KD, PGDAT, RRM, FastAT, Gaussian, SmoothAdv, Standard

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
