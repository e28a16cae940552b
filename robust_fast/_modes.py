"""Train/eval mode for the length of a block, each module's own flag restored afterwards."""
from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

from torch import nn


@contextlib.contextmanager
def modules_in_mode(model, training: bool, keep_in_eval: Tuple[str, ...] = ()) -> Iterator[None]:
    """Puts every module of `model` in `training` mode; restores each one's flag on exit.
    (model.train(previous) would not: it overwrites submodules set apart, such as a frozen BN.)
    keep_in_eval: when training, modules whose class name contains one of these words (say
    "BatchNorm", "Dropout", as torchattacks' set_model_training_mode names them) stay in eval."""
    if not isinstance(model, nn.Module):  # a plain function has no mode
        yield
        return
    saved = [(module, module.training) for module in model.modules()]
    model.train(training)
    if training and keep_in_eval:
        for module in model.modules():
            if any(word in type(module).__name__ for word in keep_in_eval):
                module.eval()
    try:
        yield
    finally:
        for module, was_training in saved:
            module.training = was_training
