"""Clean, robust (PGD, APGD or AutoAttack-style) and IBP-certified accuracy of a trained model:
the numbers `robust-fast eval` prints."""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from robust_fast._modes import modules_in_mode
from robust_fast.attacks import apgd, auto_attack, pgd

ATTACKS = ("pgd", "apgd", "auto")
CERTIFIERS = ("ibp",)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 0.1,
             steps: int = 20, alpha: Optional[float] = None, restarts: int = 1, early_stop: bool = True,
             batch_size: int = 500, seed: int = 0, robust: bool = True, attack: str = "pgd",
             certify: Optional[str] = None, auto_attacks: Optional[Sequence[str]] = None,
             backend: Optional[str] = None) -> Dict[str, Any]:
    """{"clean_acc", "robust_acc", "n", ...} of `model` on (images in [0, 1], labels).

    The attack is L-inf PGD-`steps` at eps, step alpha (eps/4 by default), a uniform random
    start, `restarts` restarts (a sample counts as robust only if no restart fools it), early
    stop (a fooled sample stops moving: never weaker). Batches of batch_size go through
    attacks.pgd in order with one generator seeded by `seed`, so the same call gives the same
    numbers. robust=False: clean accuracy only. The model runs in eval mode; its modes are
    restored.

    attack: "pgd" (above), "apgd" (APGD with the cross-entropy loss, `steps` iterations,
    `restarts` restarts) or "auto" (auto_attack: APGD-CE, APGD-T and Square in turn on the
    survivors, `steps` APGD iterations, or the attacks listed in auto_attacks; the result adds
    "fooled_by", samples per attack).
    certify="ibp": also "certified_acc", the fraction IBP certifies at eps
    (robust_fast.certify; the model must be one interval_bounds supports).
    """
    if attack not in ATTACKS:
        raise ValueError(f"evaluate: attack must be one of {ATTACKS}, got {attack!r}")
    if certify is not None and certify not in CERTIFIERS:
        raise ValueError(f"evaluate: certify must be None or one of {CERTIFIERS}, got {certify!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be an int >= 1, got {batch_size!r}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"evaluate: images and labels differ in length: {images.shape[0]} != {labels.shape[0]}")
    alpha = eps / 4 if alpha is None else alpha
    device = next(iter(model.parameters())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    clean = fooled_free = certified = 0
    fooled_by: Dict[str, int] = {}
    start = time.perf_counter()
    for first in range(0, images.shape[0], batch_size):
        x = images[first:first + batch_size].to(device)
        y = labels[first:first + batch_size].to(device)
        with modules_in_mode(model, False), torch.no_grad():
            clean += int((model(x).argmax(dim=1) == y).sum())
        if robust:
            if attack == "pgd":
                x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, restarts=restarts,
                            early_stop=early_stop, random_start=True, generator=generator, backend=backend)
            elif attack == "apgd":
                x_adv = apgd(model, x, y, eps=eps, steps=steps, loss="ce", restarts=restarts,
                             early_stop=early_stop, generator=generator, backend=backend)
            else:
                outcome = auto_attack(model, x, y, eps=eps, steps=steps, generator=generator, backend=backend,
                                      **({"attacks": tuple(auto_attacks)} if auto_attacks else {}))
                x_adv = outcome.x_adv
                for name, count in outcome.breakdown().items():
                    fooled_by[name] = fooled_by.get(name, 0) + int(count)
            with modules_in_mode(model, False), torch.no_grad():
                fooled_free += int((model(x_adv).argmax(dim=1) == y).sum())
        if certify == "ibp":
            from robust_fast.certify import certify as ibp_certify
            certified += int(ibp_certify(model, x, y, eps, backend=backend).sum())
    n = images.shape[0]
    result: Dict[str, Any] = {"n": n, "clean_acc": clean / n if n else math.nan}
    if robust:
        result.update(robust_acc=fooled_free / n if n else math.nan, attack=attack, norm="linf", eps=eps,
                      steps=steps, restarts=restarts, early_stop=early_stop, seed=seed)
        if attack == "pgd":
            result["alpha"] = alpha
        if attack == "auto":
            result["fooled_by"] = fooled_by
    if certify == "ibp":
        result.update(certified_acc=certified / n if n else math.nan, certifier="ibp", eps=eps)
    result["time_s"] = time.perf_counter() - start
    return result
