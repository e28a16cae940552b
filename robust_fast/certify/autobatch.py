"""The batch size of randomized smoothing's forward passes, chosen by measurement.

Which batch runs a model fastest depends on the model, the device and the input: on a CPU a
batch whose activations stay in the caches can beat a larger one by 2x, on a GPU larger batches
win until the device is full. So `batch_size="auto"` (certify, predict) times a few candidate
sizes on the model itself, on noisy copies of the first image: one untimed forward each, then
ROUNDS rounds that time each candidate once (interleaved, so a burst of load on a shared
machine hits all alike), under inference_mode; by each candidate's fastest forward, the most
rows per second wins. With one CPU thread the forwards are timed in process CPU time (robust to
other processes on the machine), else in wall time. Only candidates the call can fill are timed
(those below its rows in all, and the first that holds them). The choice is cached per model
(weakly: it goes with the model) and per (device, dtype, input shape), so a process measures
once (again only for a call that needs a larger candidate than was timed). A candidate the
device has no memory for ends the search (the smaller ones stand).

Certification results do not depend on the batch size (the noise comes in fixed blocks, see
smoothing's module docstring), so an auto choice that differs between runs changes only speed.
"""
from __future__ import annotations

import time
import weakref
from typing import Dict, Optional, Tuple

import torch

from robust_fast.ops.noise import gaussian_copies

AUTO = "auto"
# Candidates per device type: CPUs run best in cache-sized batches, GPUs in large ones.
CPU_CANDIDATES = (100, 200, 400, 1000, 2000)
GPU_CANDIDATES = (1000, 2000, 4000, 8000, 16000)
ROUNDS = 3  # timed forwards per candidate, the fastest kept

# model -> {(device, dtype, input shape): Choice}
_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Choice:
    """One measurement: the batch size chosen, the rows per second of each candidate timed and
    the largest candidate tried (timed, or out of memory)."""
    __slots__ = ("batch_size", "rows_per_s", "tried")

    def __init__(self, batch_size: int, rows_per_s: Dict[int, float], tried: int):
        self.batch_size, self.rows_per_s, self.tried = batch_size, rows_per_s, tried

    def __repr__(self) -> str:
        return f"Choice(batch_size={self.batch_size}, rows_per_s={self.rows_per_s}, tried={self.tried})"


def candidates(device: torch.device) -> Tuple[int, ...]:
    return CPU_CANDIDATES if torch.device(device).type == "cpu" else GPU_CANDIDATES


def _key(device: torch.device, image: torch.Tensor) -> tuple:
    return (str(device), image.dtype, tuple(image.shape))


def cached_choice(model, device: torch.device, image: torch.Tensor) -> Optional[Choice]:
    """The measurement stored for this model, device and input (one image's shape), or None."""
    try:
        return _cache.get(model, {}).get(_key(device, image))
    except TypeError:  # not weakly referenceable: never cached
        return None


def clear_cache() -> None:
    """Forgets every measurement (the next auto choice measures again)."""
    _cache.clear()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device):
    """The clock the forwards are timed by. One CPU thread: the process's CPU time, which other
    processes on a shared machine do not move (under wall time, a forward shorter than the
    scheduler's time slice often runs uninterrupted while longer ones are always preempted, so the
    smallest candidate would win whatever its speed). Otherwise wall time."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def _measure(model, image: torch.Tensor, sigma: float, sizes: Tuple[int, ...], device: torch.device) -> Choice:
    generator = torch.Generator().manual_seed(0)  # its own: the caller's generators are not touched
    inputs = gaussian_copies(image.unsqueeze(0), max(sizes), sigma, generator=generator)
    fitting = []
    for size in sizes:  # one untimed forward each (allocations, lazy initialisation); memory ends the list
        try:
            model(inputs[:size])
        except torch.OutOfMemoryError:
            if not fitting:
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        fitting.append(size)
    best = {size: float("inf") for size in fitting}
    clock = _clock(device)
    for _ in range(ROUNDS):  # interleaved: a burst of load on a shared machine hits every candidate alike
        for size in fitting:
            _synchronize(device)
            start = clock()
            model(inputs[:size])
            _synchronize(device)
            best[size] = min(best[size], clock() - start)
    rates = {size: size / max(seconds, 1e-9) for size, seconds in best.items()}
    return Choice(max(rates, key=rates.get), rates, max(sizes))


def needed(device: torch.device, rows: int) -> Tuple[int, ...]:
    """The candidates worth timing for `rows` rows in all: those below it and the first one that
    holds them all (a larger batch would never be filled)."""
    sizes = candidates(device)
    below = tuple(s for s in sizes if s < rows)
    return below + tuple(s for s in sizes if s >= rows)[:1]


def choose_batch_size(model, image: torch.Tensor, sigma: float, rows: int, device: torch.device) -> int:
    """The batch size for `rows` noisy copies in all of images shaped like `image` (one image, on
    `device`) through `model`: all of them at once when they fit in the smallest candidate,
    else the measured fastest candidate (measured once per model, device, dtype and shape, and
    again only when a call needs larger candidates than were timed)."""
    sizes = needed(device, rows)
    if rows <= sizes[0]:
        return rows
    found = cached_choice(model, device, image)
    if found is not None and found.tried >= sizes[-1]:
        return found.batch_size
    choice = _measure(model, image, sigma, sizes, device)
    try:
        _cache.setdefault(model, {})[_key(device, image)] = choice
    except TypeError:
        pass
    return choice.batch_size
