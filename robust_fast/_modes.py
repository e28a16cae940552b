"""Train/eval mode for the length of a block, each module's own flag restored afterwards."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def modules_in_mode(model, training: bool) -> Iterator[None]:
    """Puts every module of `model` in `training` mode; restores each one's flag on exit.
    (model.train(previous) would not: it overwrites submodules set apart, such as a frozen BN.)"""
    if not isinstance(model, nn.Module):  # a plain function has no mode
        yield
        return
    saved = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, was_training in saved:
            module.training = was_training
