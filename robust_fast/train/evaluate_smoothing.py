"""The randomized-smoothing part of evaluation: certify a test set with the smoothed classifier
(robust_fast.certify.smoothing), split across the processes of a torchrun group, and reduce the
per-image certificates to the numbers `robust-fast eval --certify smoothing` reports."""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from robust_fast.certify import smoothing
from robust_fast.certify.smoothing import ABSTAIN, DEFAULT_RADII, SmoothedCertificate
from robust_fast.train import distributed as dist_util


def _certify_default(name: str):
    """certify's default for a setting: one place holds each number."""
    return inspect.signature(smoothing.certify).parameters[name].default


@dataclass(frozen=True)
class SmoothingSettings:
    """Cohen et al.'s settings: noise level sigma, n0 selection samples, n estimation samples,
    failure probability alpha (defaults: certify's, the paper's), and the noisy copies per
    forward pass (certify's default "auto": measured on the model; the numbers do not depend on it)."""
    sigma: float
    n0: int = _certify_default("n0")
    n: int = _certify_default("n")
    alpha: float = _certify_default("alpha")
    batch_size: Union[int, str] = _certify_default("batch_size")


def _shard(count: int, ranks: int, rank: int) -> range:
    """This rank's contiguous slice of count items (the first ranks take one more when uneven)."""
    return range(rank * count // ranks, (rank + 1) * count // ranks)


def certify_sharded(model: nn.Module, images: torch.Tensor, settings: SmoothingSettings, *, seed: int = 0,
                    batch_size: Union[int, str, None] = None, progress: Optional[bool] = None) -> SmoothedCertificate:
    """smoothing.certify of every image, seeded by `seed`, the images numbered by their position
    in `images`; batch_size: None for settings.batch_size. Under a process group every rank passes the same images, certifies its slice with
    the slice's global indices and receives every rank's rows (in order): by the module's noise
    contract, the same certificate one process computes alone. progress: rank 0's bar only."""
    ranks, rank = dist_util.world_size(), dist_util.rank()
    mine = _shard(images.shape[0], ranks, rank)
    batch_size = settings.batch_size if batch_size is None else batch_size
    result = smoothing.certify(model, images[mine.start:mine.stop], settings.sigma, n0=settings.n0, n=settings.n,
                               alpha=settings.alpha, batch_size=batch_size,
                               generator=torch.Generator().manual_seed(seed), indices=list(mine),
                               progress=progress if rank == 0 else False)
    if ranks == 1:
        return result
    fields = ("prediction", "radius", "pa_lower", "counts", "selection_counts")
    parts = [p for p in dist_util.all_gather_objects({f: getattr(result, f) for f in fields})
             if p["prediction"].shape[0]]  # an empty slice's counts have no class dimension
    if not parts:
        return result
    return SmoothedCertificate(**{f: torch.cat([p[f] for p in parts]) for f in fields}, sigma=result.sigma,
                               n0=result.n0, n=result.n, alpha=result.alpha, batch_size=result.batch_size)


def smoothing_numbers(result: SmoothedCertificate, labels: torch.Tensor,
                      radii: Sequence[float] = DEFAULT_RADII) -> Dict[str, Any]:
    """The JSON fields of a certificate: smoothed_clean_acc (certify's prediction right, i.e.
    certified accuracy at radius 0), certified_acc_by_radius {"r": fraction}, acr, abstain_rate."""
    labels = labels.reshape(-1).cpu()
    count = labels.shape[0]
    accuracies = smoothing.certified_accuracy(result, labels, list(radii))
    return {
        "smoothed_clean_acc": (result.prediction == labels).double().mean().item() if count else math.nan,
        "certified_acc_by_radius": {f"{r:g}": a for r, a in zip(radii, accuracies)},
        "acr": smoothing.average_certified_radius(result, labels),
        "abstain_rate": (result.prediction == ABSTAIN).double().mean().item() if count else math.nan,
    }


def evaluate_smoothing(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: SmoothingSettings,
                       *, seed: int = 0, batch_size: Union[int, str, None] = None,
                       progress: Optional[bool] = None) -> Dict[str, Any]:
    """certify_sharded's certificate as evaluate's fields: the numbers of smoothing_numbers, the
    settings (sigma, smoothing_n0, smoothing_n, smoothing_alpha, smoothing_batch_size as asked,
    smoothing_batch_size_used: rank 0's, the choice where "auto", smoothing_seed), the processes
    that shared the work and certify_time_s (wall time, gathering included)."""
    batch_size = settings.batch_size if batch_size is None else batch_size
    start = time.perf_counter()
    result = certify_sharded(model, images, settings, seed=seed, batch_size=batch_size, progress=progress)
    elapsed = time.perf_counter() - start
    return {"certifier": "smoothing", "sigma": settings.sigma, "smoothing_n0": settings.n0,
            "smoothing_n": settings.n, "smoothing_alpha": settings.alpha, "smoothing_batch_size": batch_size,
            "smoothing_batch_size_used": result.batch_size,
            "smoothing_seed": seed, **smoothing_numbers(result, labels), "certify_processes": dist_util.world_size(),
            "certify_time_s": elapsed}
