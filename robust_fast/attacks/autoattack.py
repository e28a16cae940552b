"""AutoAttack-style evaluation (Croce & Hein, ICML 2020): several attacks in turn, each only on
the samples every earlier one failed to fool. The standard version's attacks are APGD-CE,
APGD-T, FAB-T and Square; FAB-T is not included here.
"""
from __future__ import annotations

import time
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from robust_fast._modes import modules_in_mode
from robust_fast._profiling import op_range
from robust_fast.attacks._common import check_attack_arguments, clean_predictions
from robust_fast.attacks.apgd import apgd, apgdt
from robust_fast.attacks.square import square

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "square")
DEFAULT_ATTACKS = ("apgd-ce", "apgd-t", "square")


class AutoAttackResult(NamedTuple):
    x_adv: torch.Tensor
    # Per sample: -1 still robust, 0 misclassified without attack, k >= 1 fooled by attacks[k-1].
    fooled_by: torch.Tensor
    attacks: Tuple[str, ...]
    seconds: Dict[str, float]  # wall time of each attack (and "clean")

    def robust_accuracy(self) -> float:
        return float((self.fooled_by == -1).float().mean()) if self.fooled_by.numel() else float("nan")

    def breakdown(self) -> Dict[str, int]:
        """How many samples each stage fooled (robust: never fooled)."""
        names = ("clean",) + self.attacks
        counts = {name: int((self.fooled_by == k).sum()) for k, name in enumerate(names)}
        counts["robust"] = int((self.fooled_by == -1).sum())
        return counts


def _elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def auto_attack(model, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, norm: str = "linf",
                attacks: Sequence[str] = DEFAULT_ATTACKS, steps: int = 100, n_target_classes: int = 9,
                n_queries: int = 5000, batch_size: Optional[int] = None,
                generator: Optional[torch.Generator] = None, clip=(0.0, 1.0),
                backend: Optional[str] = None) -> AutoAttackResult:
    """Runs `attacks` in order ("apgd-ce", "apgd-dlr", "apgd-t", "square"), each on the samples
    no earlier attack fooled. Returns AutoAttackResult: x_adv (the fooling point, or x where
    the sample stayed robust), fooled_by (which attack fooled each sample), the attacks and
    their wall times; result.robust_accuracy() is the AutoAttack-style robust accuracy.

    norm: "linf" or "l2", for every attack. steps: APGD's iterations; n_target_classes:
    APGD-T's targets; n_queries: Square's budget.
    FAB-T, one of the standard AutoAttack's four attacks, is not included.
    """
    eps, norm, clip = check_attack_arguments(model, x, y, eps, norm, steps, 1, 0.75, batch_size, clip, "auto_attack")
    if isinstance(attacks, str) or not all(a in ATTACKS for a in attacks):
        raise ValueError(f"auto_attack: attacks must be a sequence of names from {ATTACKS}, got {attacks!r}")
    if norm == "l2" and eps <= 0 and "square" in attacks:
        raise ValueError(f"auto_attack: eps must be > 0 for square with norm='l2', got {eps!r}")
    attacks = tuple(attacks)
    x = x.detach()
    seconds: Dict[str, float] = {}
    with modules_in_mode(model, False), op_range("auto_attack"), torch.no_grad():
        start = time.perf_counter()
        robust = clean_predictions(model, x, batch_size) == y
        seconds["clean"] = _elapsed(start, x.device)
        fooled_by = torch.where(robust, -1, 0)
        x_adv = x.clone()
        common = dict(eps=eps, norm=norm, batch_size=batch_size, generator=generator, clip=clip)
        for k, name in enumerate(attacks, start=1):
            start = time.perf_counter()
            index = robust.nonzero().squeeze(1)
            if index.numel():
                xs, ys = x[index], y[index]
                if name == "apgd-ce":
                    found = apgd(model, xs, ys, steps=steps, loss="ce", backend=backend, **common)
                elif name == "apgd-dlr":
                    found = apgd(model, xs, ys, steps=steps, loss="dlr", backend=backend, **common)
                elif name == "apgd-t":
                    found = apgdt(model, xs, ys, steps=steps, n_target_classes=n_target_classes,
                                  backend=backend, **common)
                else:
                    found = square(model, xs, ys, n_queries=n_queries, **common)
                fooled = clean_predictions(model, found, batch_size) != ys
                x_adv[index[fooled]] = found[fooled]
                fooled_by[index[fooled]] = k
                robust[index[fooled]] = False
            seconds[name] = _elapsed(start, x.device)
        return AutoAttackResult(x_adv, fooled_by, attacks, seconds)
