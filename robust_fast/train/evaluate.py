"""Clean, robust (PGD, APGD or AutoAttack, standard or fast, L-inf or L2) and certified (IBP or randomized
smoothing) accuracy of a trained model: the numbers `robust-fast eval` prints (evaluate), and the
two plain accuracies (accuracy, robust_accuracy) the PGD benchmark reports."""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from robust_fast._modes import modules_in_mode
from robust_fast._progress import Stage, check_progress, progress_bar
from robust_fast.attacks import apgd, auto_attack, pgd
from robust_fast.attacks.autoattack import VERSIONS
from robust_fast.certify import certify as ibp_certify
from robust_fast.data import batches
from robust_fast.train import distributed as dist_util
from robust_fast.train.evaluate_smoothing import SmoothingSettings, _shard, evaluate_smoothing

ATTACKS = ("pgd", "apgd", "auto")
NORMS = ("linf", "l2")
CERTIFIERS = ("ibp", "smoothing")


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 0.1,
             steps: Optional[int] = None, alpha: Optional[float] = None, restarts: int = 1, early_stop: bool = True,
             batch_size: int = 500, seed: int = 0, robust: bool = True, attack: str = "pgd",
             certify: Optional[str] = None, auto_attacks: Optional[Sequence[str]] = None,
             backend: Optional[str] = None, norm: str = "linf", smoothing: Optional[SmoothingSettings] = None,
             progress: Optional[bool] = None, auto_version: str = "fast") -> Dict[str, Any]:
    """{"clean_acc", "robust_acc", "n", ...} of `model` on (images in [0, 1], labels).

    The attack is PGD-`steps` in the L-inf ball of radius eps (norm="l2": the L2 ball of radius
    eps; every attack takes the norm), step alpha (eps/4 by default), a random start,
    `restarts` restarts (a sample counts as robust only if no restart fools it), early
    stop (a fooled sample stops moving: never weaker). Batches of batch_size go through
    attacks.pgd in order with one generator seeded by `seed`, so the same call gives the same
    numbers. robust=False: clean accuracy only. The model runs in eval mode; its modes are
    restored.

    steps: 20 by default for "pgd" and "apgd"; for "auto", the version's (100) unless given.
    attack: "pgd" (above), "apgd" (APGD with the cross-entropy loss, `steps` iterations,
    `restarts` restarts) or "auto" (auto_attack of version auto_version: "standard", APGD-CE,
    APGD-T, FAB-T and Square with the reference's settings, or "fast", APGD-CE, APGD-T and
    Square; or the attacks listed in auto_attacks; the result adds "auto_version" (the version
    that ran: "custom" where steps or the attacks differ from the version's), "fooled_by"
    (samples per attack) and "fooled_by_sample" (per image: -1 robust, 0 misclassified clean,
    k fooled by the k-th attack)). Each batch of "auto" draws from its own generator, seeded by
    `seed` and the batch's index, so under a process group (torchrun) the batches are split
    across ranks and rank 0 gathers every image's result: the same numbers as one process.
    certify="ibp": also "certified_acc", the fraction IBP certifies at eps (L-inf only;
    robust_fast.certify; the model must be one interval_bounds supports).
    certify="smoothing": certifies every image with the smoothed classifier of
    smoothing=SmoothingSettings(sigma, n0, n, alpha, batch_size) (robust_fast.certify.smoothing.certify,
    noise seeded by `seed`, the settings' batch_size noisy copies per forward pass, "auto" by
    default, progress: its bar) and adds
    evaluate_smoothing's fields: smoothed_clean_acc, certified_acc_by_radius, acr, abstain_rate,
    the settings and certify_time_s. Under a process group (torchrun) every rank passes the same
    images and the certification is split across ranks (the same numbers as one process); the
    attack runs on every rank alike. progress: a bar over the images (and for "auto" one per
    attack of each batch, with its steps, targets, samples left and time left) with True or None
    when stderr is a terminal; "log": one line per batch and (for "auto") per attack, never a
    carriage return; False: nothing. The numbers do not depend on it.
    """
    if attack not in ATTACKS:
        raise ValueError(f"evaluate: attack must be one of {ATTACKS}, got {attack!r}")
    if auto_version not in VERSIONS:
        raise ValueError(f"evaluate: auto_version must be one of {VERSIONS}, got {auto_version!r}")
    if norm not in NORMS:
        raise ValueError(f"evaluate: norm must be one of {NORMS}, got {norm!r}")
    if certify is not None and certify not in CERTIFIERS:
        raise ValueError(f"evaluate: certify must be None or one of {CERTIFIERS}, got {certify!r}")
    if certify == "ibp" and norm != "linf":
        raise ValueError("evaluate: certify='ibp' certifies L-inf balls: it needs norm='linf'")
    if (certify == "smoothing") != (smoothing is not None):
        raise ValueError("evaluate: certify='smoothing' goes with smoothing=SmoothingSettings(sigma=...), "
                         "and smoothing with certify='smoothing' only")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be an int >= 1, got {batch_size!r}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"evaluate: images and labels differ in length: {images.shape[0]} != {labels.shape[0]}")
    progress = check_progress(progress, "evaluate")
    if attack == "auto" and robust:
        return _evaluate_auto(model, images, labels, eps=eps, steps=steps, batch_size=batch_size, seed=seed,
                              norm=norm, auto_attacks=auto_attacks, version=auto_version, backend=backend,
                              certify=certify, smoothing=smoothing, progress=progress)
    steps = 20 if steps is None else steps
    alpha = eps / 4 if alpha is None else alpha
    device = next(iter(model.parameters())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    clean = fooled_free = certified = 0
    start = time.perf_counter()
    smoothed = {}
    if certify == "smoothing":  # first: under a process group every rank must reach it together
        smoothed = evaluate_smoothing(model, images, labels, smoothing, seed=seed,
                                      progress=progress)
    stage = ("clean" if not robust else {"pgd": f"PGD-{steps}", "apgd": f"APGD-CE-{steps}",
                                          "auto": "AutoAttack-style"}[attack])
    bar = progress_bar(images.shape[0], f"evaluate: {stage}", "image", progress,
                       log_lines=math.ceil(images.shape[0] / batch_size))
    for first in range(0, images.shape[0], batch_size):
        x = images[first:first + batch_size].to(device)
        y = labels[first:first + batch_size].to(device)
        with modules_in_mode(model, False), torch.no_grad():
            clean += int((model(x).argmax(dim=1) == y).sum())
        if robust:
            if attack == "pgd":
                x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, restarts=restarts,
                            early_stop=early_stop, random_start=True, generator=generator, backend=backend)
            else:
                x_adv = apgd(model, x, y, eps=eps, norm=norm, steps=steps, loss="ce", restarts=restarts,
                             early_stop=early_stop, generator=generator, backend=backend)
            with modules_in_mode(model, False), torch.no_grad():
                fooled_free += int((model(x_adv).argmax(dim=1) == y).sum())
        if certify == "ibp":
            certified += int(ibp_certify(model, x, y, eps, backend=backend).sum())
        bar.update(x.shape[0])
        bar.set_postfix(clean=f"{clean / (first + x.shape[0]):.3f}", refresh=False,
                        **({"robust": f"{fooled_free / (first + x.shape[0]):.3f}"} if robust else {}))
    bar.close()
    n = images.shape[0]
    result: Dict[str, Any] = {"n": n, "clean_acc": clean / n if n else math.nan}
    if robust:
        result.update(robust_acc=fooled_free / n if n else math.nan, attack=attack, norm=norm, eps=eps,
                      steps=steps, restarts=restarts, early_stop=early_stop, seed=seed)
        if attack == "pgd":
            result["alpha"] = alpha
    if certify == "ibp":
        result.update(certified_acc=certified / n if n else math.nan, certifier="ibp", eps=eps)
    result.update(smoothed)
    result["time_s"] = time.perf_counter() - start
    return result


def _evaluate_auto(model, images, labels, *, eps, steps, batch_size, seed, norm, auto_attacks, version, backend,
                   certify, smoothing, progress) -> Dict[str, Any]:
    """evaluate(attack="auto"): batch b attacked with a generator seeded by (seed, b); under a
    process group each rank takes a contiguous share of the batches and every rank receives the
    per-image results (rank 0 reports them)."""
    device = next(iter(model.parameters())).device
    start = time.perf_counter()
    smoothed = {}
    if certify == "smoothing":  # first: under a process group every rank must reach it together
        smoothed = evaluate_smoothing(model, images, labels, smoothing, seed=seed, batch_size=batch_size,
                                      progress=progress)
    n = images.shape[0]
    n_batches = math.ceil(n / batch_size)
    mine = _shard(n_batches, dist_util.world_size(), dist_util.rank())
    outcomes: Dict[int, Dict[str, Any]] = {}
    # Rank 0's batches only: under a process group the others work alike.
    shown = progress if dist_util.rank() == 0 else False
    mine_images = sum(min(n, (b + 1) * batch_size) - b * batch_size for b in mine)
    bar = Stage(mine_images, f"evaluate: AutoAttack {version}", "image", shown, log_lines=len(mine))
    robust_so_far = 0
    for b in mine:
        x = images[b * batch_size:(b + 1) * batch_size].to(device)
        y = labels[b * batch_size:(b + 1) * batch_size].to(device)
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        outcome = auto_attack(model, x, y, eps=eps, norm=norm, version=version, steps=steps, generator=generator,
                              backend=backend, progress=shown,
                              **({"attacks": tuple(auto_attacks)} if auto_attacks else {}))
        robust_so_far += int((outcome.fooled_by == -1).sum())
        bar.update(x.shape[0], batch=f"{b + 1 - mine.start}/{len(mine)}",
                   robust=f"{robust_so_far / (bar.n + x.shape[0]):.3f}")
        row = {"fooled_by": outcome.fooled_by.cpu(), "version": outcome.version, "attacks": outcome.attacks,
               "settings": outcome.settings}
        if certify == "ibp":
            row["certified"] = ibp_certify(model, x, y, eps, backend=backend).cpu()
        outcomes[b] = row
    bar.close()
    for part in dist_util.all_gather_objects(outcomes):
        outcomes.update(part)
    rows = [outcomes[b] for b in range(n_batches)]
    fooled_by_sample = torch.cat([r["fooled_by"] for r in rows]) if rows else torch.zeros(0, dtype=torch.int64)
    names = ("misclassified_clean",) + (rows[0]["attacks"] if rows else ())
    counts = {name: int((fooled_by_sample == k).sum()) for k, name in enumerate(names)}
    counts["robust"] = int((fooled_by_sample == -1).sum())
    result: Dict[str, Any] = {
        "n": n, "clean_acc": (n - counts["misclassified_clean"]) / n if n else math.nan,
        "robust_acc": counts["robust"] / n if n else math.nan, "attack": "auto", "norm": norm, "eps": eps,
        "auto_version": rows[0]["version"] if rows else version, "auto_settings": rows[0]["settings"] if rows else {},
        "steps": rows[0]["settings"]["steps"] if rows else steps, "seed": seed, "fooled_by": counts,
        "fooled_by_sample": fooled_by_sample.tolist(), "processes": dist_util.world_size()}
    if certify == "ibp":
        certified = int(sum(int(r["certified"].sum()) for r in rows))
        result.update(certified_acc=certified / n if n else math.nan, certifier="ibp")
    result.update(smoothed)
    result["time_s"] = time.perf_counter() - start
    return result


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _attack_generator(generator: Optional[torch.Generator], device: torch.device) -> Optional[torch.Generator]:
    """A generator the random start can draw from on `device`: the given one when it lives
    there, else a new one on `device` seeded from it (so a seeded run stays reproducible)."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 512) -> float:
    """The fraction of images classified correctly (model in eval mode, mode restored)."""
    _check_batch_size(batch_size)
    if images.shape[0] == 0:
        return math.nan
    device = _device_of(model)
    correct = 0
    with modules_in_mode(model, False), torch.no_grad():
        for x, y in batches(images, labels, batch_size):
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
    return correct / images.shape[0]


def robust_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                    alpha: float, steps: int, early_stop: bool = True, batch_size: int = 512,
                    generator: Optional[torch.Generator] = None, norm: str = "linf",
                    restarts: int = 1, backend: Optional[str] = None) -> float:
    """Accuracy on PGD adversarial examples (random start): the fraction of images still
    classified correctly at the point the attack returns.

    early_stop: a sample stops moving once misclassified (robust_fast.attacks.pgd), which is
    faster and never weaker. generator: draws the random starts.
    """
    _check_batch_size(batch_size)
    if images.shape[0] == 0:
        return math.nan
    device = _device_of(model)
    x, y = images.to(device), labels.to(device)
    # One call over the whole set, batch_size samples through the model at a time; with
    # early stop the batches stay full as fooled samples leave.
    x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=True,
                restarts=restarts, early_stop=early_stop, batch_size=batch_size,
                generator=_attack_generator(generator, device), backend=backend)
    return accuracy(model, x_adv, y, batch_size=batch_size)
