"""Clean and PGD robust accuracy of a trained model: the numbers `robust-fast eval` prints."""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

import torch
from torch import nn

from robust_fast._modes import modules_in_mode
from robust_fast.attacks import pgd


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 0.1,
             steps: int = 20, alpha: Optional[float] = None, restarts: int = 1, early_stop: bool = True,
             batch_size: int = 500, seed: int = 0, robust: bool = True,
             backend: Optional[str] = None) -> Dict[str, Any]:
    """{"clean_acc", "robust_acc", "n", ...} of `model` on (images in [0, 1], labels).

    The attack is L-inf PGD-`steps` at eps, step alpha (eps/4 by default), a uniform random
    start, `restarts` restarts (a sample counts as robust only if no restart fools it), early
    stop (a fooled sample stops moving: never weaker). Batches of batch_size go through
    attacks.pgd in order with one generator seeded by `seed`, so the same call gives the same
    numbers. robust=False: clean accuracy only. The model runs in eval mode; its modes are
    restored.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be an int >= 1, got {batch_size!r}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"evaluate: images and labels differ in length: {images.shape[0]} != {labels.shape[0]}")
    alpha = eps / 4 if alpha is None else alpha
    device = next(iter(model.parameters())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    clean = fooled_free = 0
    start = time.perf_counter()
    for first in range(0, images.shape[0], batch_size):
        x = images[first:first + batch_size].to(device)
        y = labels[first:first + batch_size].to(device)
        with modules_in_mode(model, False), torch.no_grad():
            clean += int((model(x).argmax(dim=1) == y).sum())
        if robust:
            x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, restarts=restarts,
                        early_stop=early_stop, random_start=True, generator=generator, backend=backend)
            with modules_in_mode(model, False), torch.no_grad():
                fooled_free += int((model(x_adv).argmax(dim=1) == y).sum())
    n = images.shape[0]
    result: Dict[str, Any] = {"n": n, "clean_acc": clean / n if n else math.nan}
    if robust:
        result.update(robust_acc=fooled_free / n if n else math.nan, attack="pgd", norm="linf", eps=eps,
                      alpha=alpha, steps=steps, restarts=restarts, early_stop=early_stop, seed=seed)
    result["time_s"] = time.perf_counter() - start
    return result
