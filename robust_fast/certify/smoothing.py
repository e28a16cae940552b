"""Gaussian randomized smoothing (Cohen, Rosenfeld and Kolter 2019): the smoothed classifier
g(x) = argmax_c P(f(x + d) = c), d ~ N(0, sigma^2 I), its Monte Carlo prediction with abstention
(`predict`), its L2 certificate (`certify`), certified accuracy, the average certified radius
(ACR) and a table and figure of certified accuracy against radius.

Batches. The noisy copies go through the model batch_size rows at a time, the rows of several
images in one batch where they fit (small n) and one image's over several batches where they do
not, so the model runs on full batches. batch_size="auto" (the default) measures the fastest
on the model itself, once per model, device, dtype and input shape (robust_fast.certify.autobatch).
Counts stay on the model's device and are read back once, at the end of a call.

Random draws (the contract). Every image has its own noise stream, a torch.Generator on the
model's device seeded from (the seed, the image's index, the stage: certify's selection, certify's
estimation or predict); within a stream the noise comes in blocks of min(noise_block_rows,
samples left) rows, in order, each block one call of robust_fast.gaussian_copies (which draws
one seed from the stream). noise_block_rows is NOISE_BLOCK_ROWS (1000), fewer for images of more
than NOISE_BLOCK_ELEMENTS / 1000 elements: it depends on the image's size only, never on the
batch size. The seed is `generator.initial_seed()` (the generator's state is neither read nor
advanced), or one draw from torch's global generator when generator is None. An image's index
is its position in x unless `indices` says otherwise (its position in the whole data set, say,
when a shard is certified alone). So an image's noise depends only on the seed, its index,
n0 / n, its size and the device (and the noise op's backend): never on the batch size, nor on
the other images in the call or their order. Certifying images one at a time with indices=[i],
or with any batch size, gives the same counts (the model's own outputs may differ in the last
bit between batch compositions; an argmax flips only at an exact tie). Different devices or
backends draw different numbers. (Before the blocks, a stream came in pieces of batch_size rows:
certifications made then at batch_size=1000, the old default, of images of at most
NOISE_BLOCK_ELEMENTS / 1000 elements draw the same numbers now.)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from robust_fast._progress import check_progress, progress_bar
from robust_fast._checks import check_positive_finite
from robust_fast._modes import modules_in_mode
from robust_fast.certify.autobatch import AUTO, choose_batch_size
from robust_fast.ops.noise import gaussian_copies

ABSTAIN = -1
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)

# Noise streams: one per image and stage, so no two stages share numbers.
_SELECTION, _ESTIMATION, _PREDICTION = 0, 1, 2
_MASK64 = (1 << 64) - 1
# A stream's noise comes in blocks of this many rows (fewer for large images: a block holds at
# most NOISE_BLOCK_ELEMENTS elements), whatever the batch size.
NOISE_BLOCK_ROWS = 1000
NOISE_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class SmoothedCertificate:
    """certify's answer for B images: prediction (B,) int64 (ABSTAIN = -1 where pa_lower <= 1/2),
    radius (B,) float64 (the certified L2 radius sigma * Phi^-1(pa_lower); 0 when abstained),
    pa_lower (B,) float64 (the one-sided Clopper-Pearson lower bound on the chosen class's
    probability), counts (B, C) int64 (the class counts of the n estimation samples) and
    selection_counts (B, C) int64 (those of the n0 selection samples), with the settings used."""
    prediction: torch.Tensor
    radius: torch.Tensor
    pa_lower: torch.Tensor
    counts: torch.Tensor
    selection_counts: torch.Tensor
    sigma: float
    n0: int
    n: int
    alpha: float
    batch_size: Optional[int] = None  # the noisy copies per forward pass (batch_size="auto": the choice)


@dataclass(frozen=True)
class SmoothedPrediction:
    """predict's answer for B images: prediction (B,) int64 (ABSTAIN = -1 unless the top class
    wins the two-sided binomial test), p_value (B,) float64 of that test, counts (B, C) int64."""
    prediction: torch.Tensor
    p_value: torch.Tensor
    counts: torch.Tensor
    sigma: float
    n: int
    alpha: float
    batch_size: Optional[int] = None  # the noisy copies per forward pass (batch_size="auto": the choice)


def noisy_copies(image: torch.Tensor, copies: int, sigma: float, *, generator: torch.Generator,
                 out: torch.Tensor) -> torch.Tensor:
    """out (copies, *image.shape) <- image + sigma * N(0, I) in one pass (robust_fast.gaussian_copies,
    on the current backend), one seed drawn from generator. The one place noise is made."""
    return gaussian_copies(image.unsqueeze(0), copies, sigma, generator=generator, out=out)


# --------------------------------------------------------------------------------------------
# argument checks: each error names the function and the argument

def _check_count(caller: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{caller}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{caller}: {name} must be >= 1, got {value}")
    return int(value)


def _check_alpha(caller: str, alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{caller}: alpha must be a float, got {type(alpha).__name__}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"{caller}: alpha must be in (0, 1), got {alpha}")
    return float(alpha)


def _check_x(caller: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{caller}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{caller}: x must have a floating-point dtype, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{caller}: x must be a batch (B, ...) with at least 2 dimensions, got shape "
                         f"{tuple(x.shape)}")
    return x


def _check_indices(caller: str, indices, batch: int) -> List[int]:
    if indices is None:
        return list(range(batch))
    if isinstance(indices, torch.Tensor):
        if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"{caller}: indices must be a 1-D integer tensor or a sequence of ints")
        indices = indices.tolist()
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
        raise TypeError(f"{caller}: indices must be a sequence of ints, got {type(indices).__name__}")
    if len(indices) != batch:
        raise ValueError(f"{caller}: indices must have one entry per image ({batch}), got {len(indices)}")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
            raise ValueError(f"{caller}: indices must be ints >= 0, got {i!r}")
    return [int(i) for i in indices]


def _check_common(caller: str, model, x, sigma, alpha, batch_size, generator, progress):
    if not callable(model):
        raise TypeError(f"{caller}: model must be callable, got {type(model).__name__}")
    x = _check_x(caller, x)
    sigma = check_positive_finite("sigma", sigma, caller)
    alpha = _check_alpha(caller, alpha)
    if isinstance(batch_size, str):
        if batch_size != AUTO:
            raise ValueError(f"{caller}: batch_size must be an int >= 1 or 'auto', got {batch_size!r}")
    else:
        batch_size = _check_count(caller, "batch_size", batch_size)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{caller}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    check_progress(progress, caller)
    return x, sigma, alpha, batch_size


# --------------------------------------------------------------------------------------------
# the sampling engine

def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_seed(seed: int, index: int, stage: int) -> int:
    """The seed of image `index`'s noise stream for one stage (a 63-bit int)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ index) ^ stage) >> 1


def _base_seed(generator: Optional[torch.Generator]) -> int:
    if generator is not None:
        return generator.initial_seed()
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())


def noise_block_rows(image_numel: int) -> int:
    """Rows per noise block for images of image_numel elements: NOISE_BLOCK_ROWS, fewer where a
    block would pass NOISE_BLOCK_ELEMENTS elements (large images), at least 1."""
    return max(1, min(NOISE_BLOCK_ROWS, NOISE_BLOCK_ELEMENTS // max(1, image_numel)))


def _blocks(images: int, stages: Sequence[int], block_rows: int) -> Iterator[Tuple[int, int, int]]:
    """The noise blocks in the order they are drawn and counted: (image slot, stage position,
    rows); per stage, per image, pieces of block_rows (the last shorter)."""
    for position, samples in enumerate(stages):
        for slot in range(images):
            for start in range(0, samples, block_rows):
                yield slot, position, min(block_rows, samples - start)


def _take(segments: List[List[int]], rows: int) -> List[Tuple[int, int, int]]:
    """Removes the first `rows` rows from segments ([slot, position, rows] in order) and returns
    them as pieces (slot, position, rows)."""
    pieces = []
    while rows:
        slot, position, size = segments[0]
        used = min(size, rows)
        pieces.append((slot, position, used))
        if used == size:
            segments.pop(0)
        else:
            segments[0][2] -= used
        rows -= used
    return pieces


def _device_of(model, x: torch.Tensor) -> torch.device:
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
    return x.device


def _class_counts(caller: str, model, x: torch.Tensor, stages: Sequence[Tuple[int, int]], sigma: float,
                  batch_size: Union[int, str], seed: int, indices: List[int],
                  progress: Optional[bool]) -> Tuple[torch.Tensor, int]:
    """((len(stages), B, C) int64 on the CPU, the batch size used): per stage (samples, stream id)
    and image, how often the model's argmax fell on each class over that many noisy copies.

    The noise blocks are written one after another into a buffer; every batch_size rows go
    through the model together (so a batch may hold several images' blocks, or part of one),
    and the rows left over move to the buffer's front for the next blocks."""
    batch = x.shape[0]
    if batch == 0:
        return torch.zeros((len(stages), 0, 0), dtype=torch.int64), 0
    device = _device_of(model, x)
    images = x.to(device)
    sizes = [samples for samples, _ in stages]
    total = batch * sum(sizes)
    if batch_size == AUTO:
        batch_size = choose_batch_size(model, images[0], sigma, total, device)
    block = noise_block_rows(images[0].numel())
    buffer = torch.empty((min(total, batch_size + block - 1),) + tuple(x.shape[1:]), dtype=x.dtype, device=device)
    ones = torch.ones(min(total, batch_size), dtype=torch.int64, device=device)
    state = {"counts": None}
    # In a log: up to 10 lines over the run, each with the image reached and the time left.
    bar = progress_bar(total, f"{caller} ({batch} images)", "sample", progress, unit_scale=True,
                       log_lines=min(batch, 10))

    def forward(rows: torch.Tensor, pieces: List[Tuple[int, int, int]]) -> None:
        logits = model(rows)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != rows.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"{caller}: model must return logits of shape (N, C) for N inputs, got {got}")
        if state["counts"] is None:
            if logits.shape[1] < 2:
                raise ValueError(f"{caller}: model must return at least 2 classes, got {logits.shape[1]}")
            state["counts"] = torch.zeros((len(stages), batch, logits.shape[1]), dtype=torch.int64, device=device)
        top = logits.argmax(1)
        offset = 0
        for slot, position, size in pieces:
            state["counts"][position, slot].scatter_add_(0, top[offset:offset + size], ones[:size])
            offset += size
        if bar.active:  # the display's fields cost a little each batch: only when shown
            bar.update(offset, image=f"{pieces[-1][0] + 1}/{batch}")

    segments: List[List[int]] = []  # what rows [0, filled) of the buffer hold, in order
    filled = 0
    current, generator = None, None  # the (image slot, stage) being drawn and its stream
    try:
        for slot, position, size in _blocks(batch, sizes, block):
            if current != (slot, position):  # an image's blocks for a stage come one after another
                current, generator = (slot, position), torch.Generator(device=device)
                generator.manual_seed(stream_seed(seed, indices[slot], stages[position][1]))
            noisy_copies(images[slot], size, sigma, generator=generator, out=buffer[filled:filled + size])
            if segments and segments[-1][:2] == [slot, position]:
                segments[-1][2] += size
            else:
                segments.append([slot, position, size])
            filled += size
            start = 0
            while filled - start >= batch_size:
                forward(buffer[start:start + batch_size], _take(segments, batch_size))
                start += batch_size
            if start and filled > start:  # the rest (fewer than batch_size rows, so no overlap) to the front
                buffer[:filled - start].copy_(buffer[start:filled])
            filled -= start
        if filled:
            forward(buffer[:filled], _take(segments, filled))
    finally:
        bar.close()
    return state["counts"].cpu(), batch_size


# --------------------------------------------------------------------------------------------
# predict and certify

def _two_sided_p_value(top: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The two-sided binomial test of top ~ Binomial(top + second, 1/2): 2 P(X >= top), at most 1
    (top >= second; the null distribution is symmetric)."""
    from scipy.stats import binom
    trials = (top + second).numpy()
    p = 2.0 * binom.sf(top.numpy() - 1, trials, 0.5)
    return torch.from_numpy(p).clamp(max=1.0).to(torch.float64)


def clopper_pearson_lower(successes: torch.Tensor, trials: int, alpha: float) -> torch.Tensor:
    """The one-sided (1 - alpha) Clopper-Pearson lower bound on a binomial probability:
    the alpha quantile of Beta(successes, trials - successes + 1); 0 for no successes."""
    import numpy as np
    from scipy.stats import beta
    k = successes.numpy().astype(np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, k, trials - k + 1)
    return torch.from_numpy(np.where(k > 0, bound, 0.0)).to(torch.float64)


@torch.inference_mode()
def predict(model, x: torch.Tensor, sigma: float, *, n: int = 100_000, alpha: float = 0.001,
            batch_size: Union[int, str] = AUTO, generator: Optional[torch.Generator] = None,
            indices: Optional[Sequence[int]] = None, progress: Optional[bool] = None) -> SmoothedPrediction:
    """The smoothed classifier's prediction for each image of the batch x (B, ...): the top class
    of n noisy copies, or ABSTAIN (-1) unless its count beats the runner-up's in a two-sided
    binomial test at level alpha (an answer differs from g(x) with probability at most alpha).
    The model runs in eval mode (each module's flag restored afterwards) on its own device; x is
    never modified. batch_size: noisy copies per forward pass, or "auto" (measured once per
    model, device and input shape: robust_fast.certify.autobatch); the answer does not depend on
    it. progress: a tqdm bar (default: when stderr is a terminal; "log": a few plain lines). The random draws follow the
    module's contract (indices, generator)."""
    x, sigma, alpha, batch_size = _check_common("predict", model, x, sigma, alpha, batch_size, generator, progress)
    n = _check_count("predict", "n", n)
    indices = _check_indices("predict", indices, x.shape[0])
    with modules_in_mode(model, False):
        counts, used = _class_counts("predict", model, x, [(n, _PREDICTION)], sigma, batch_size,
                                     _base_seed(generator), indices, progress)
    counts = counts[0]
    if counts.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return SmoothedPrediction(empty, empty.double(), counts, sigma, n, alpha)
    top2 = counts.topk(2, dim=1)
    p_value = _two_sided_p_value(top2.values[:, 0], top2.values[:, 1])
    prediction = torch.where(p_value <= alpha, top2.indices[:, 0], torch.full_like(top2.indices[:, 0], ABSTAIN))
    return SmoothedPrediction(prediction, p_value, counts, sigma, n, alpha, used)


@torch.inference_mode()
def certify(model, x: torch.Tensor, sigma: float, *, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
            batch_size: Union[int, str] = AUTO, generator: Optional[torch.Generator] = None,
            indices: Optional[Sequence[int]] = None, progress: Optional[bool] = None) -> SmoothedCertificate:
    """Cohen et al.'s CERTIFY for each image of the batch x (B, ...): n0 noisy copies choose the
    class cA (their most frequent class), n fresh copies count it (nA); pa_lower is the one-sided
    Clopper-Pearson lower bound on P(f(x + d) = cA) at confidence 1 - alpha, and when it is above
    1/2 the smoothed classifier predicts cA everywhere within the L2 radius sigma * Phi^-1(pa_lower)
    (with probability >= 1 - alpha over the draws); otherwise ABSTAIN (-1) with radius 0.
    The model runs in eval mode (each module's flag restored afterwards) on its own device; x is
    never modified. batch_size: noisy copies per forward pass, or "auto" (measured once per
    model, device and input shape: robust_fast.certify.autobatch); the certificate does not
    depend on it. progress: a tqdm bar (default: when stderr is a terminal; "log": a few plain lines). The random draws
    follow the module's contract (indices, generator)."""
    x, sigma, alpha, batch_size = _check_common("certify", model, x, sigma, alpha, batch_size, generator, progress)
    n0 = _check_count("certify", "n0", n0)
    n = _check_count("certify", "n", n)
    indices = _check_indices("certify", indices, x.shape[0])
    with modules_in_mode(model, False):
        (selection, counts), used = _class_counts("certify", model, x, [(n0, _SELECTION), (n, _ESTIMATION)],
                                                  sigma, batch_size, _base_seed(generator), indices, progress)
    if counts.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return SmoothedCertificate(empty, empty.double(), empty.double(), counts, selection, sigma, n0, n, alpha)
    chosen = selection.argmax(1)  # ties: the lowest class
    pa_lower = clopper_pearson_lower(counts.gather(1, chosen[:, None])[:, 0], n, alpha)
    certified = pa_lower > 0.5
    from scipy.stats import norm
    radius = torch.from_numpy(sigma * norm.ppf(pa_lower.numpy())).to(torch.float64)
    radius = torch.where(certified, radius, torch.zeros_like(radius))
    prediction = torch.where(certified, chosen, torch.full_like(chosen, ABSTAIN))
    return SmoothedCertificate(prediction, radius, pa_lower, counts, selection, sigma, n0, n, alpha, used)


# --------------------------------------------------------------------------------------------
# what the papers report

def _correct(caller: str, result, labels) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    labels = labels.reshape(-1).cpu()
    if labels.shape[0] != result.prediction.shape[0]:
        raise ValueError(f"{caller}: labels must have one entry per image ({result.prediction.shape[0]}), "
                         f"got {labels.shape[0]}")
    return result.prediction.cpu() == labels, result.radius.cpu().double()


def certified_accuracy(result: SmoothedCertificate, labels, radii: Union[float, Sequence[float]]
                       ) -> Union[float, List[float]]:
    """The fraction of images certified with the right class and a radius >= r: a float for one r,
    a list (one per radius) for a sequence. NaN for no images."""
    correct, radius = _correct("certified_accuracy", result, labels)
    single = isinstance(radii, numbers.Real)
    values = [float(radii)] if single else [float(r) for r in radii]
    if correct.shape[0] == 0:
        fractions = [math.nan] * len(values)
    else:
        fractions = [(correct & (radius >= r)).double().mean().item() for r in values]
    return fractions[0] if single else fractions


def per_image_radius(result: SmoothedCertificate, labels) -> torch.Tensor:
    """(B,) float64: each image's certified radius where the class is right, 0 elsewhere (what a
    paired comparison of two models on the same images resamples)."""
    correct, radius = _correct("per_image_radius", result, labels)
    return torch.where(correct, radius, torch.zeros_like(radius))


def average_certified_radius(result: SmoothedCertificate, labels) -> float:
    """ACR: the mean over images of per_image_radius. NaN for no images."""
    radius = per_image_radius(result, labels)
    return radius.mean().item() if radius.shape[0] else math.nan


def _named(results, labels) -> Dict[str, Tuple[SmoothedCertificate, object]]:
    if isinstance(results, SmoothedCertificate):
        results = {"smoothed": results}
    if isinstance(labels, Mapping):
        return {name: (result, labels[name]) for name, result in results.items()}
    return {name: (result, labels) for name, result in results.items()}


def certified_accuracy_table(results: Union[SmoothedCertificate, Mapping[str, SmoothedCertificate]], labels, *,
                             radii: Sequence[float] = DEFAULT_RADII) -> str:
    """A Markdown table: one row per named result, certified accuracy (%) at each radius, ACR and
    the abstention rate. labels: one tensor for all results, or a mapping by name."""
    head = ["result"] + [f"r = {r:g}" for r in radii] + ["ACR", "abstained"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, (result, y) in _named(results, labels).items():
        accuracy = certified_accuracy(result, y, list(radii))
        abstained = (result.prediction == ABSTAIN).double().mean().item() if result.prediction.numel() else math.nan
        cells = [name] + [f"{100 * a:.1f}" for a in accuracy] + [f"{average_certified_radius(result, y):.3f}",
                                                                  f"{100 * abstained:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_certified_accuracy(results: Union[SmoothedCertificate, Mapping[str, SmoothedCertificate]], labels,
                            path: str, *, max_radius: Optional[float] = None, title: Optional[str] = None) -> None:
    """Writes a PNG of certified accuracy against L2 radius, one curve per named result (as the
    papers plot it: a step down at each certified radius). labels: one tensor, or a mapping by name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = _named(results, labels)
    top = max_radius
    if top is None:
        top = max([r.radius.max().item() for r, _ in named.values() if r.radius.numel()] + [0.0]) * 1.05 or 1.0
    grid = torch.linspace(0.0, top, 400).tolist()
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, (result, y) in named.items():
        axes.plot(grid, [100 * a for a in certified_accuracy(result, y, grid)],
                  label=f"{name} (ACR {average_certified_radius(result, y):.3f})")
    axes.set_xlabel("L2 radius")
    axes.set_ylabel("certified accuracy (%)")
    axes.set_xlim(0.0, top)
    axes.set_ylim(bottom=0.0)
    if title is not None:
        axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
