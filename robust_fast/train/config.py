"""The settings of one training run: the loop's own (the recipe carries its own settings)."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "piecewise", "constant")


@dataclass
class TrainConfig:
    """epochs, the global batch (split evenly over data-parallel ranks), the optimiser (SGD with
    momentum or Adam) and its learning-rate schedule, stepped every batch: cosine from lr to 0,
    piecewise (lr, then lr/10 from half-way, lr/100 from three quarters), or constant; on top of
    it, lr × 0.1 from the first batch of each epoch listed in lr_decay_epochs (1-based).

    eval_samples / eval_steps / eval_eps: after each epoch, clean accuracy on the held-out slice
    (its first eval_samples examples) and, when eval_steps > 0, accuracy under PGD-eval_steps
    at eval_eps (step eval_eps/4, random start, early stop). seed: the model is the caller's,
    every other draw (shuffling, random starts, noise) follows from the seed.
    """

    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "adam"   # Adam 1e-3 with a cosine schedule trained every model here best in few epochs
    lr: float = 1e-3
    momentum: float = 0.9     # SGD only
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    eval_samples: int = 500
    eval_steps: int = 10
    eval_eps: float = 0.1
    progress: bool = True
    backend: Optional[str] = None
    lr_decay_epochs: Tuple[int, ...] = ()
    # clip the gradient's norm to this; None: the recipe's own (IBP: 10, for its first ramp steps)
    max_grad_norm: Optional[float] = None

    def __post_init__(self):
        for name in ("epochs", "batch_size", "seed", "eval_samples", "eval_steps"):
            value = getattr(self, name)
            minimum = 1 if name == "batch_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TrainConfig: {name} must be an int >= {minimum}, got {value!r}")
        for name in ("lr", "momentum", "weight_decay", "eval_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"TrainConfig: {name} must be a finite float "
                                 f"{'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        if self.max_grad_norm is not None and (
                isinstance(self.max_grad_norm, bool) or not isinstance(self.max_grad_norm, numbers.Real)
                or not self.max_grad_norm > 0 or not math.isfinite(self.max_grad_norm)):
            raise ValueError(f"TrainConfig: max_grad_norm must be None or a finite float > 0, "
                             f"got {self.max_grad_norm!r}")
        decays = self.lr_decay_epochs
        if not isinstance(decays, (tuple, list)) or any(
                isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in decays):
            raise ValueError(f"TrainConfig: lr_decay_epochs must be a sequence of ints >= 1, got {decays!r}")
        self.lr_decay_epochs = tuple(decays)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig: schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_factor(schedule: str, step: int, total_steps: int, decay_steps: Sequence[int] = ()) -> float:
    """The multiplier of the base learning rate before batch `step` (0-based) of total_steps,
    times 0.1 for each of decay_steps (0-based batches) reached."""
    progress = step / max(total_steps, 1)
    if schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "piecewise":
        factor = 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    else:
        factor = 1.0
    return factor * 0.1 ** sum(step >= s for s in decay_steps)
