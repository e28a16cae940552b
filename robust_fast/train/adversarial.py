"""PGD adversarial training (Madry et al. 2018) and the accuracies that judge it.

Each batch: the inner maximisation is robust_fast.attacks.pgd (uniform random start in the
L-inf ball, `steps` steps of size alpha, the model in eval mode as torchattacks attacks it),
then one optimiser step on the cross-entropy of the adversarial batch, the model in train mode.

adversarial_train is the compact form the PGD benchmark uses (Adam, no schedule, no files);
the same method with schedules, logs, checkpoints, resume and torchrun is the `pgd_at` recipe
of robust_fast.train.fit (`robust-fast train pgd_at`).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from robust_fast._modes import modules_in_mode
from robust_fast.attacks import pgd
from robust_fast.data import batches


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


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def adversarial_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                      eps: float = 0.1, alpha: Optional[float] = None, steps: int = 7,
                      batch_size: int = 128, lr: float = 1e-3,
                      generator: Optional[torch.Generator] = None,
                      log: Optional[Callable[[str], None]] = print,
                      backend: Optional[str] = None) -> nn.Module:
    """Trains `model` in place with L-inf PGD adversarial training and returns it.

    images (N, ...) in [0, 1], labels int64 (N,); batches move to the model's device.
    alpha: the PGD step, eps/4 by default. Adam with learning rate lr.
    generator: shuffles the data and draws the random starts (a seeded one makes the run
    reproducible). log: called with one line per epoch; None for silence.
    backend: passed on to robust_fast.pgd_step.
    """
    _check_positive_int("epochs", epochs, minimum=0)
    _check_positive_int("steps", steps, minimum=0)
    _check_positive_int("batch_size", batch_size)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels differ in length: {images.shape[0]} != {labels.shape[0]}")
    if alpha is None:
        alpha = eps / 4
    device = _device_of(model)
    attack_generator = _attack_generator(generator, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with modules_in_mode(model, True):
        for epoch in range(epochs):
            start = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in batches(images, labels, batch_size, shuffle=True, generator=generator):
                x, y = x.to(device), y.to(device)
                x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm="linf",
                            random_start=True, generator=attack_generator,
                            model_training=False, backend=backend)
                logits = model(x_adv)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * y.shape[0]
                correct += int((logits.detach().argmax(dim=1) == y).sum())
                seen += y.shape[0]
            if log is not None and seen:
                log(f"epoch {epoch + 1}/{epochs}: adversarial loss {loss_sum / seen:.4f}, "
                    f"accuracy on PGD-{steps} examples {correct / seen:.2%} "
                    f"({time.perf_counter() - start:.1f} s)")
    return model


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 512) -> float:
    """The fraction of images classified correctly (model in eval mode, mode restored)."""
    _check_positive_int("batch_size", batch_size)
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
    _check_positive_int("batch_size", batch_size)
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
