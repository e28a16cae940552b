"""AutoAttack (Croce & Hein, ICML 2020): several attacks in turn, each only on the samples every
earlier one failed to fool.

version="standard" is the evaluation people publish, with the reference code's settings:
APGD-CE (100 steps, 1 restart), APGD-T (100 steps, 9 target classes, 1 restart), FAB-T (100
steps, 9 target classes, 1 restart, alpha_max 0.1, eta 1.05, beta 0.9) and Square (5000
queries, p_init 0.8, 1 restart, the window schedule of 10000 queries: not rescaled).
version="fast" (the default, and this function's behaviour before the standard version
existed) runs APGD-CE, APGD-T and Square (the schedule rescaled to n_queries), without FAB-T.
"""
from __future__ import annotations

import time
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from robust_fast._modes import modules_in_mode
from robust_fast._profiling import op_range
from robust_fast._progress import Stage, check_progress
from robust_fast.attacks import fab as fab_settings
from robust_fast.attacks._common import check_attack_arguments, clean_predictions
from robust_fast.attacks.apgd import apgd, apgdt
from robust_fast.attacks.fab import fab_t
from robust_fast.attacks.square import square

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
VERSIONS = ("standard", "fast")
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
FAST_ATTACKS = ("apgd-ce", "apgd-t", "square")
DEFAULT_ATTACKS = FAST_ATTACKS  # the sequence of version="fast" (the name kept for old callers)
# The reference's standard settings (each attack one restart).
STANDARD_SETTINGS: Dict[str, Any] = {
    "steps": 100, "n_target_classes": 9, "n_queries": 5000, "square_rescale_schedule": False,
    "fab_steps": fab_settings.STEPS, "fab_n_target_classes": fab_settings.N_TARGET_CLASSES,
}
FAST_SETTINGS: Dict[str, Any] = dict(STANDARD_SETTINGS, square_rescale_schedule=True)


class AutoAttackResult(NamedTuple):
    x_adv: torch.Tensor
    # Per sample: -1 still robust, 0 misclassified without attack, k >= 1 fooled by attacks[k-1].
    fooled_by: torch.Tensor
    attacks: Tuple[str, ...]
    seconds: Dict[str, float]  # wall time of each attack (and "clean")
    version: str = "custom"    # "standard" or "fast" when run with that version's attacks and settings
    settings: Optional[Dict[str, Any]] = None  # the settings the attacks ran with

    def robust_accuracy(self) -> float:
        return float((self.fooled_by == -1).float().mean()) if self.fooled_by.numel() else float("nan")

    def breakdown(self) -> Dict[str, int]:
        """How many samples each stage fooled: "misclassified_clean" (wrong before any attack),
        each attack by name, and "robust" (never fooled)."""
        names = ("misclassified_clean",) + self.attacks
        counts = {name: int((self.fooled_by == k).sum()) for k, name in enumerate(names)}
        counts["robust"] = int((self.fooled_by == -1).sum())
        return counts


def _elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def auto_attack(model, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, norm: str = "linf",
                version: str = "fast", attacks: Optional[Sequence[str]] = None, steps: Optional[int] = None,
                n_target_classes: Optional[int] = None, n_queries: Optional[int] = None,
                square_rescale_schedule: Optional[bool] = None, fab_steps: Optional[int] = None,
                fab_n_target_classes: Optional[int] = None, batch_size: Optional[int] = None,
                generator: Optional[torch.Generator] = None, clip=(0.0, 1.0),
                backend: Optional[str] = None, progress=False) -> AutoAttackResult:
    """Runs the attacks of `version` ("standard": APGD-CE, APGD-T, FAB-T, Square with the
    reference's settings; "fast": APGD-CE, APGD-T, Square), or `attacks` in the order given
    (names from "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"), each on the samples no
    earlier attack fooled. Returns AutoAttackResult: x_adv (the fooling point, or x where the
    sample stayed robust), fooled_by (which attack fooled each sample), the attacks, their wall
    times, the version and the settings; result.robust_accuracy() is the robust accuracy.

    Settings left None take the version's: steps (APGD's iterations, 100), n_target_classes
    (APGD-T's targets, 9), n_queries (Square's budget, 5000), square_rescale_schedule (Square's
    window schedule stretched to n_queries: False in "standard", as the reference runs it, True
    in "fast"), fab_steps and fab_n_target_classes (FAB-T's, 100 and 9). A run whose attacks or
    settings differ from its version's reports version "custom". norm: "linf" or "l2", for
    every attack.

    progress: one stage per attack ("auto_attack 2/3: apgd-t"): with True (None: when stderr is
    a terminal) a bar over its steps or queries showing the target, the restart, the samples
    still robust and the time left; with "log" one line per attack when it ends (samples
    attacked, fooled, still robust, seconds); with False (the default) nothing. The results do
    not depend on it.
    """
    if version not in VERSIONS:
        raise ValueError(f"auto_attack: version must be one of {VERSIONS}, got {version!r}")
    eps, norm, clip = check_attack_arguments(model, x, y, eps, norm, 100 if steps is None else steps, 1, 0.75,
                                             batch_size, clip, "auto_attack")
    default_attacks = STANDARD_ATTACKS if version == "standard" else FAST_ATTACKS
    if attacks is None:
        attacks = default_attacks
    if isinstance(attacks, str) or not all(a in ATTACKS for a in attacks):
        raise ValueError(f"auto_attack: attacks must be a sequence of names from {ATTACKS}, got {attacks!r}")
    if norm == "l2" and eps <= 0 and "square" in attacks:
        raise ValueError(f"auto_attack: eps must be > 0 for square with norm='l2', got {eps!r}")
    attacks = tuple(attacks)
    progress = check_progress(progress, "auto_attack")
    given = {"steps": steps, "n_target_classes": n_target_classes, "n_queries": n_queries,
             "square_rescale_schedule": square_rescale_schedule, "fab_steps": fab_steps,
             "fab_n_target_classes": fab_n_target_classes}
    defaults = STANDARD_SETTINGS if version == "standard" else FAST_SETTINGS
    settings = {k: defaults[k] if v is None else v for k, v in given.items()}
    label = version if attacks == default_attacks and settings == defaults else "custom"
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
            with Stage(0, f"auto_attack {k}/{len(attacks)}: {name}", "query" if name == "square" else "step",
                       progress) as stage:
                common["progress"] = stage
                if index.numel():
                    xs, ys = x[index], y[index]
                    if name == "apgd-ce":
                        found = apgd(model, xs, ys, steps=settings["steps"], loss="ce", backend=backend, **common)
                    elif name == "apgd-dlr":
                        found = apgd(model, xs, ys, steps=settings["steps"], loss="dlr", backend=backend, **common)
                    elif name == "apgd-t":
                        found = apgdt(model, xs, ys, steps=settings["steps"],
                                      n_target_classes=settings["n_target_classes"], backend=backend, **common)
                    elif name == "fab-t":
                        found = fab_t(model, xs, ys, steps=settings["fab_steps"],
                                      n_target_classes=settings["fab_n_target_classes"], **common)
                    else:
                        found = square(model, xs, ys, n_queries=settings["n_queries"],
                                       rescale_schedule=settings["square_rescale_schedule"], **common)
                    fooled = clean_predictions(model, found, batch_size) != ys
                    x_adv[index[fooled]] = found[fooled]
                    fooled_by[index[fooled]] = k
                    robust[index[fooled]] = False
                seconds[name] = _elapsed(start, x.device)
                if stage.active:
                    stage.close(attacked=index.numel(), fooled=int((fooled_by == k).sum()),
                                robust=f"{int(robust.sum())}/{x.shape[0]}")
        return AutoAttackResult(x_adv, fooled_by, attacks, seconds, label, settings)
