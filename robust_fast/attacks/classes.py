"""The torchattacks-compatible classes: `from robust_fast import attacks as torchattacks` and
torchattacks users' calls (FGSM, PGD, PGDL2, APGD, APGDT, FAB (targeted), Square; the targeted modes, the
normalization the model expects, the model's mode during the attack, the device) run on
robust_fast's attacks.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import nn

from robust_fast._modes import modules_in_mode
from robust_fast.attacks.apgd import apgd, apgdt
from robust_fast.attacks.fab import fab_t
from robust_fast.attacks.pgd import fgsm, pgd
from robust_fast.attacks.square import square


def _parameter_device(model) -> Optional[torch.device]:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):  # a function, or a model without parameters
        return None


class _Attack:
    """attack(x, y) -> x_adv, with torchattacks' switches: targeted modes, the normalization the
    model expects, the model's mode during the attack, and the device."""

    def __init__(self, model):
        if not isinstance(model, nn.Module) and not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        self.model = model
        self.device = _parameter_device(model)  # inputs are moved here, as torchattacks does
        self.attack_mode = "default"
        self.targeted = False
        self._target_map_function = None  # (x, y) -> target labels; None: y are the targets
        self.normalization_used = None     # {"mean", "std"}: each of shape (1, C, 1, 1)
        self._in_pixel_space = False       # inside __call__: get_logits normalizes
        self.model_training = False
        self._keep_in_eval: Tuple[str, ...] = ("BatchNorm", "Dropout")

    # -- the model and its inputs

    def set_device(self, device):
        """Inputs are moved to `device` before the attack (by default the model's device)."""
        self.device = None if device is None else torch.device(device)

    def set_normalization_used(self, mean, std):
        """The model takes images normalized with (x - mean) / std, one value per channel.

        As in torchattacks, the attack is then given normalized images and returns normalized
        adversarial images; eps, alpha and the [0, 1] box apply to the pixels underneath, and
        get_logits normalizes while the attack runs.
        """
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        for name, value in (("mean", mean), ("std", std)):
            if value.dim() != 1 or value.numel() == 0:
                raise ValueError(f"set_normalization_used: {name} must hold one number per channel, "
                                 f"got shape {tuple(value.shape)}")
        if mean.shape != std.shape:
            raise ValueError(f"set_normalization_used: mean and std must have the same length, "
                             f"got {mean.numel()} and {std.numel()}")
        if not bool((std != 0).all()):
            raise ValueError("set_normalization_used: std must not contain 0")
        channels = mean.numel()
        self.normalization_used = {"mean": mean.view(1, channels, 1, 1), "std": std.view(1, channels, 1, 1)}

    def _statistics(self, x: torch.Tensor):
        mean, std = self.normalization_used["mean"], self.normalization_used["std"]
        if x.dim() < 2 or x.shape[1] != mean.shape[1]:
            raise ValueError(f"x must have {mean.shape[1]} channels in dimension 1 (the normalization's "
                             f"mean and std), got shape {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return mean.to(x.device, x.dtype).view(shape), std.to(x.device, x.dtype).view(shape)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._statistics(x)
        return (x - mean) / std

    def inverse_normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._statistics(x)
        return x * std + mean

    def get_logits(self, inputs, labels=None, *args, **kwargs):
        """The model's logits for `inputs` (normalized first while the attack works on pixels)."""
        if self._in_pixel_space:
            inputs = self.normalize(inputs)
        return self.model(inputs)

    # -- modes

    def get_mode(self) -> str:
        return self.attack_mode

    def set_mode_default(self):
        """y passed to the attack holds the true labels: the attack moves away from them."""
        self.attack_mode, self.targeted, self._target_map_function = "default", False, None

    def _set_targeted(self, mode: str, target_map_function):
        self.attack_mode, self.targeted, self._target_map_function = mode, True, target_map_function

    def set_mode_targeted_by_label(self, quiet: bool = False):
        """From now on, y passed to the attack holds the target labels."""
        self._set_targeted("targeted(label)", None)

    def set_mode_targeted_by_function(self, target_map_function, quiet: bool = False):
        """Targets are target_map_function(x, y), e.g. lambda x, y: (y + 1) % 10."""
        if not callable(target_map_function):
            raise TypeError("set_mode_targeted_by_function: target_map_function must be callable, "
                            f"got {type(target_map_function).__name__}")
        self._set_targeted("targeted(custom)", target_map_function)

    def set_mode_targeted_random(self, quiet: bool = False):
        """Each sample's target is drawn uniformly from the classes other than its label."""
        self._set_targeted("targeted(random)", self.get_random_target_label)

    def set_mode_targeted_least_likely(self, kth_min: int = 1, quiet: bool = False):
        """Each sample's target is the class of its kth_min-th smallest logit, its label aside."""
        if isinstance(kth_min, bool) or not isinstance(kth_min, numbers.Integral) or kth_min < 1:
            raise ValueError(f"set_mode_targeted_least_likely: kth_min must be an int >= 1, got {kth_min!r}")
        self._kth_min = int(kth_min)
        self._set_targeted("targeted(least-likely)", self.get_least_likely_label)

    def set_model_training_mode(self, model_training: bool = False, batchnorm_training: bool = False,
                                dropout_training: bool = False):
        """Run the model in training mode during the attack; batch norms and dropouts stay in
        eval mode unless their flag is set (torchattacks' rule). Every module's mode is
        restored afterwards."""
        self.model_training = bool(model_training)
        self._keep_in_eval = tuple(word for word, training in (("BatchNorm", batchnorm_training),
                                                               ("Dropout", dropout_training))
                                   if not training)

    # -- targets

    def get_target_label(self, inputs, labels=None):
        if not self.targeted:
            raise ValueError("get_target_label: the attack is not in a targeted mode")
        if self._target_map_function is None:
            return labels
        return self._target_map_function(inputs, labels)

    def _eval_logits(self, inputs) -> torch.Tensor:
        with torch.no_grad(), modules_in_mode(self.model, False):
            return self.get_logits(inputs)

    def get_random_target_label(self, inputs, labels=None):
        logits = self._eval_logits(inputs)
        labels = logits.argmax(dim=1) if labels is None else labels
        # One draw per sample from torch's default CPU generator, as torchattacks makes them.
        draw = (torch.rand(labels.shape[0]) * (logits.shape[-1] - 1)).long().to(labels.device)
        return draw + (draw >= labels).long()  # skip the label itself

    def get_least_likely_label(self, inputs, labels=None):
        logits = self._eval_logits(inputs)
        labels = logits.argmax(dim=1) if labels is None else labels
        kth = getattr(self, "_kth_min", 1)
        if kth > logits.shape[-1] - 1:
            raise ValueError(f"set_mode_targeted_least_likely: kth_min={kth} but there are only "
                             f"{logits.shape[-1] - 1} classes besides the label")
        others = logits.scatter(1, labels.view(-1, 1), math.inf)  # the label ranks last
        return others.kthvalue(kth, dim=1).indices

    # -- the call

    def forward(self, x, y):
        """The attack on pixels: x in [0, 1], y the labels (already the targets if targeted)."""
        raise NotImplementedError

    def __call__(self, x, y):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"the attack takes tensors x and y, got {type(x).__name__} and {type(y).__name__}")
        if self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        with modules_in_mode(self.model, self.model_training, self._keep_in_eval):
            if self.normalization_used is None:
                return self._run(x, y)
            self._in_pixel_space = True
            try:
                x_adv = self._run(self.inverse_normalize(x), y)
            finally:
                self._in_pixel_space = False
            return self.normalize(x_adv)

    def _run(self, x, y):
        if self.targeted:  # drawn before the random start, as torchattacks does
            y = self.get_target_label(x, y)
        return self.forward(x, y)

    def __repr__(self):
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items()
                           if k not in ("model", "normalization_used") and not k.startswith("_"))
        return f"{type(self).__name__}({fields}, normalization_used={self.normalization_used is not None})"


# The classes hand the functions self.get_logits, a plain function: the modes were set by
# __call__ (with torchattacks' batch-norm and dropout rule), and a subclass's get_logits is used.

class FGSM(_Attack):
    """FGSM with torchattacks.FGSM's arguments and defaults."""

    def __init__(self, model, eps: float = 8 / 255):
        super().__init__(model)
        self.eps = eps

    def forward(self, x, y):
        return fgsm(self.get_logits, x, y, eps=self.eps, targeted=self.targeted)


class PGD(_Attack):
    """L-inf PGD with torchattacks.PGD's arguments and defaults (plus restarts, early_stop)."""

    norm = "linf"

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, *, restarts: int = 1, early_stop: bool = False):
        super().__init__(model)
        self.eps, self.alpha, self.steps = eps, alpha, steps
        self.random_start, self.restarts, self.early_stop = random_start, restarts, early_stop

    def _options(self):
        return dict(eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                    random_start=self.random_start, restarts=self.restarts,
                    targeted=self.targeted, early_stop=self.early_stop)

    def forward(self, x, y):
        return pgd(self.get_logits, x, y, **self._options())


class PGDL2(PGD):
    """L2 PGD with torchattacks.PGDL2's arguments and defaults (plus restarts, early_stop)."""

    norm = "l2"

    def __init__(self, model, eps: float = 1.0, alpha: float = 0.2, steps: int = 10,
                 random_start: bool = True, eps_for_division: float = 1e-10, *, restarts: int = 1,
                 early_stop: bool = False):
        super().__init__(model, eps, alpha, steps, random_start, restarts=restarts, early_stop=early_stop)
        self.eps_for_division = eps_for_division

    def _options(self):
        return dict(super()._options(), eps_for_division=self.eps_for_division)


# APGD, APGD-T, FAB-T and Square with torchattacks' arguments and defaults. Differences: the random
# draws come from a generator seeded with `seed` on every call (torchattacks seeds torch's
# global generator); eot_iter must be 1; verbose prints nothing.

def _torchattacks_norm(norm) -> str:
    if norm not in ("Linf", "L2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    return norm.lower()


def _check_eot(eot_iter) -> None:
    if eot_iter != 1:
        raise ValueError(f"eot_iter must be 1 (expectation over transformation is not implemented), got {eot_iter!r}")


class _SeededAttack(_Attack):
    def _generator(self, x: torch.Tensor) -> torch.Generator:
        return torch.Generator(device=x.device).manual_seed(int(self.seed))

    def _untargeted(self):
        if self.targeted:
            raise ValueError(f"{type(self).__name__} supports the default (untargeted) mode only")


class APGD(_SeededAttack):
    """APGD with torchattacks.APGD's arguments and defaults (plus early_stop, batch_size)."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, seed: int = 0, loss: str = "ce", eot_iter: int = 1,
                 rho: float = 0.75, verbose: bool = False, *, early_stop: bool = True,
                 batch_size: Optional[int] = None):
        super().__init__(model)
        _check_eot(eot_iter)
        self.norm, self.eps, self.steps, self.n_restarts, self.seed = norm, eps, steps, n_restarts, seed
        self.loss, self.eot_iter, self.rho, self.verbose = loss, eot_iter, rho, verbose
        self.early_stop, self.batch_size = early_stop, batch_size
        _torchattacks_norm(norm)

    def forward(self, x, y):
        self._untargeted()
        return apgd(self.get_logits, x, y, eps=self.eps, norm=_torchattacks_norm(self.norm),
                    steps=self.steps, loss=self.loss, restarts=self.n_restarts, rho=self.rho,
                    early_stop=self.early_stop, generator=self._generator(x),
                    batch_size=self.batch_size)


class APGDT(_SeededAttack):
    """APGD-T with torchattacks.APGDT's arguments and defaults (n_classes - 1 target classes)."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, seed: int = 0, eot_iter: int = 1, rho: float = 0.75,
                 verbose: bool = False, n_classes: int = 10, *, early_stop: bool = True,
                 batch_size: Optional[int] = None):
        super().__init__(model)
        _check_eot(eot_iter)
        self.norm, self.eps, self.steps, self.n_restarts, self.seed = norm, eps, steps, n_restarts, seed
        self.eot_iter, self.rho, self.verbose, self.n_classes = eot_iter, rho, verbose, n_classes
        self.early_stop, self.batch_size = early_stop, batch_size
        _torchattacks_norm(norm)

    def forward(self, x, y):
        self._untargeted()
        return apgdt(self.get_logits, x, y, eps=self.eps, norm=_torchattacks_norm(self.norm),
                     steps=self.steps, n_target_classes=self.n_classes - 1,
                     restarts=self.n_restarts, rho=self.rho, early_stop=self.early_stop,
                     generator=self._generator(x), batch_size=self.batch_size)


class FAB(_SeededAttack):
    """FAB-T with torchattacks.FAB's arguments and defaults, for multi_targeted=True (the
    targeted version AutoAttack runs: n_classes - 1 target classes); the untargeted FAB is not
    implemented. early_stop=False by default: as in torchattacks, every run takes every step and
    the nearest misclassified point within eps is returned."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 10,
                 n_restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 verbose: bool = False, seed: int = 0, multi_targeted: bool = False, n_classes: int = 10,
                 *, early_stop: bool = False, batch_size: Optional[int] = None):
        super().__init__(model)
        _torchattacks_norm(norm)
        if not multi_targeted:
            raise ValueError("FAB: only the targeted version is implemented: pass multi_targeted=True")
        self.norm, self.eps, self.steps, self.n_restarts = norm, eps, steps, n_restarts
        self.alpha_max, self.eta, self.beta, self.verbose, self.seed = alpha_max, eta, beta, verbose, seed
        self.multi_targeted, self.n_classes = multi_targeted, n_classes
        self.early_stop, self.batch_size = early_stop, batch_size

    def forward(self, x, y):
        self._untargeted()
        return fab_t(self.get_logits, x, y, eps=self.eps, norm=_torchattacks_norm(self.norm),
                     steps=self.steps, n_target_classes=self.n_classes - 1, restarts=self.n_restarts,
                     alpha_max=self.alpha_max, eta=self.eta, beta=self.beta, early_stop=self.early_stop,
                     generator=self._generator(x), batch_size=self.batch_size)


class Square(_SeededAttack):
    """Square (L-inf or L2) with torchattacks.Square's arguments and defaults."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, n_queries: int = 5000,
                 n_restarts: int = 1, p_init: float = 0.8, loss: str = "margin",
                 resc_schedule: bool = True, seed: int = 0, verbose: bool = False, *,
                 batch_size: Optional[int] = None):
        super().__init__(model)
        _torchattacks_norm(norm)
        self.norm, self.eps, self.n_queries, self.n_restarts = norm, eps, n_queries, n_restarts
        self.p_init, self.loss, self.resc_schedule, self.seed = p_init, loss, resc_schedule, seed
        self.verbose, self.batch_size = verbose, batch_size

    def forward(self, x, y):
        self._untargeted()
        return square(self.get_logits, x, y, eps=self.eps, norm=_torchattacks_norm(self.norm),
                      n_queries=self.n_queries,
                      p_init=self.p_init, loss=self.loss, restarts=self.n_restarts,
                      rescale_schedule=self.resc_schedule, generator=self._generator(x),
                      batch_size=self.batch_size)
