"""Gradient attacks on the fused PGD step: fgsm, pgd (L-inf and L2; random start, restarts,
targeted, early stop) and torchattacks-style classes FGSM, PGD and PGDL2. Also exported here:
apgd, apgdt (robust_fast.apgd, on the fused APGD step), square (robust_fast.square),
auto_attack (robust_fast.autoattack), and the classes APGD, APGDT and Square.

Gradients are taken with respect to the input only (torch.autograd.grad): parameters' .grad
stay as they were, and no graph outlives a step. The model runs in eval mode during the attack,
as in torchattacks, and every module's mode is restored afterwards.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from robust_fast._checks import check_clip
from robust_fast._modes import modules_in_mode
from robust_fast._profiling import op_range
from robust_fast.apgd import apgd, apgdt
from robust_fast.autoattack import AutoAttackResult, auto_attack
from robust_fast.square import square
from robust_fast.ops.pgd import apply_pgd_step, prepare_radius, split_radius

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Radius = Union[float, torch.Tensor]
Clip = Optional[Tuple[Optional[float], Optional[float]]]


def _check_attack_inputs(model, x, y, steps=1, restarts=1):
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
        raise TypeError(f"y must be an int64 tensor of class labels, got {getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y must be on x's device {x.device}, got {y.device}")
    for name, value in (("steps", steps), ("restarts", restarts)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")


def _per_sample_view(value: Radius, like: torch.Tensor) -> Union[float, torch.Tensor]:
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return float(value)


def _loss_and_logits(model, x: torch.Tensor, y: torch.Tensor, loss_fn: Optional[LossFn]):
    logits = model(x)
    loss = F.cross_entropy(logits, y) if loss_fn is None else loss_fn(logits, y)
    if loss.dim() != 0:  # a per-sample loss: its sum has the same per-sample gradients
        loss = loss.sum()
    return loss, logits


def input_gradient(model, x: torch.Tensor, y: torch.Tensor,
                   loss_fn: Optional[LossFn] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d x, logits), touching no parameter's .grad and keeping no graph."""
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_(True)
        loss, logits = _loss_and_logits(model, x_leaf, y, loss_fn)
        (grad,) = torch.autograd.grad(loss, x_leaf)
    return grad, logits.detach()


def _succeeded(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    prediction = logits.argmax(dim=1)
    return prediction == y if targeted else prediction != y


def _random_start(x: torch.Tensor, eps: Radius, norm: str, clip: Clip,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    # The same draws, in the same order, as torchattacks' PGD and PGDL2.
    low, high = (None, None) if clip is None else clip
    eps_b = _per_sample_view(eps, x)
    if norm == "linf":
        noise = torch.empty_like(x).uniform_(0.0, 1.0, generator=generator) if isinstance(eps_b, torch.Tensor) \
            else torch.empty_like(x).uniform_(-eps_b, eps_b, generator=generator)
        if isinstance(eps_b, torch.Tensor):
            noise = (noise * 2 - 1) * eps_b
        start = x + noise
    else:
        delta = torch.empty_like(x).normal_(generator=generator)
        norms = delta.reshape(x.shape[0], -1).norm(p=2, dim=1).view(-1, *([1] * (x.dim() - 1)))
        radius = torch.zeros_like(norms).uniform_(0, 1, generator=generator)
        delta *= radius / norms * eps_b
        start = x + delta
    if low is None and high is None:
        return start
    return torch.clamp(start, min=low, max=high)


def _per_sample_score(model, x_adv, y, loss_fn, targeted):
    """(succeeded, loss) per sample: higher is a stronger perturbation."""
    with torch.no_grad():
        logits = model(x_adv)
        if loss_fn is None:
            loss = F.cross_entropy(logits, y, reduction="none")
        else:
            loss = loss_fn(logits, y)
            if loss.dim() == 0:  # a scalar loss ranks nothing per sample: fall back to CE
                loss = F.cross_entropy(logits, y, reduction="none")
    if targeted:
        loss = -loss
    return _succeeded(logits, y, targeted), loss


def _rows(value: Radius, index) -> Radius:
    """The per-sample radii of some rows (a float stays a float)."""
    return value[index] if isinstance(value, torch.Tensor) and value.dim() == 1 else value


def _join(value: Radius, more: Radius) -> Radius:
    return torch.cat([value, more]) if isinstance(value, torch.Tensor) and value.dim() == 1 else value


def _step_in_place(x_act, grad, x_nat, eps: Radius, alpha: Radius, step_options) -> None:
    """One PGD step of the active rows, on radii prepared at the attack's entry: no checks,
    no host synchronisation."""
    eps_value, eps_per_sample = split_radius(eps)
    alpha_value, alpha_per_sample = split_radius(alpha)
    apply_pgd_step(x_act, grad, x_nat, eps_value, alpha_value, eps_per_sample, alpha_per_sample,
                   out=x_act, **step_options)


def _step_size(alpha: Radius, grad: torch.Tensor, eps_for_division: float) -> Radius:
    """torchattacks' PGDL2 moves alpha * g / (||g|| + eps_for_division); the fused L2 step moves
    alpha * g / ||g||. The same move, then: a per-sample alpha scaled by ||g|| / (||g|| + e)."""
    if not eps_for_division:
        return alpha
    norms = grad.reshape(grad.shape[0], -1).norm(p=2, dim=1)
    scale = norms / (norms + eps_for_division)
    scale = torch.where(torch.isfinite(scale), scale, 0.0)  # a NaN gradient makes no move anyway
    return alpha * scale.to(torch.float64)  # a per-sample radius, as apply_pgd_step takes it


def _attack_in_chunks(model, x, y, x_adv, *, eps, alpha, steps, loss_fn, pool, division, step_options):
    for begin in range(0, x.shape[0], pool):
        rows = slice(begin, begin + pool)
        x_chunk, x_nat, y_chunk = x_adv[rows], x[rows], y[rows]  # views: x_adv is updated in place
        eps_chunk, alpha_chunk = _rows(eps, rows), _rows(alpha, rows)
        for _ in range(steps):
            with op_range("attack_step"):
                grad, _ = input_gradient(model, x_chunk, y_chunk, loss_fn)
                _step_in_place(x_chunk, grad, x_nat, eps_chunk, _step_size(alpha_chunk, grad, division),
                               step_options)
    return x_adv


def _attack_with_early_stop(model, x, y, x_adv, *, eps, alpha, steps, loss_fn, pool, division,
                            step_options):
    """Samples move through a pool of at most `pool` rows: each takes up to `steps` steps and
    leaves as soon as it succeeds (its point is kept in x_adv); a waiting sample takes each
    freed place, so the model keeps seeing full batches. The active rows live compacted in
    their own tensors; every sample follows the trajectory it would follow alone."""
    n = x.shape[0]
    if steps == 0 or n == 0:
        return x_adv
    waiting = 0                                    # the next sample to enter
    rows = torch.arange(0, device=x.device)        # which sample each active row is
    taken = torch.zeros(0, dtype=torch.long, device=x.device)  # steps each has taken
    x_act, x_nat, y_act = x_adv[:0], x[:0], y[:0]
    eps_act, alpha_act = _rows(eps, rows), _rows(alpha, rows)

    def leave(gone):
        nonlocal rows, taken, x_act, x_nat, y_act, eps_act, alpha_act
        x_adv[rows[gone]] = x_act[gone]
        keep = ~gone
        rows, taken, x_act, x_nat, y_act = rows[keep], taken[keep], x_act[keep], x_nat[keep], y_act[keep]
        eps_act, alpha_act = _rows(eps_act, keep), _rows(alpha_act, keep)
        return keep

    while waiting < n or rows.numel() > 0:
        if rows.numel() < pool and waiting < n:
            new = torch.arange(waiting, min(n, waiting + pool - rows.numel()), device=x.device)
            waiting += new.numel()
            rows, taken = torch.cat([rows, new]), torch.cat([taken, torch.zeros_like(new)])
            x_act, x_nat, y_act = (torch.cat([x_act, x_adv[new]]), torch.cat([x_nat, x[new]]),
                                   torch.cat([y_act, y[new]]))
            eps_act, alpha_act = _join(eps_act, _rows(eps, new)), _join(alpha_act, _rows(alpha, new))
        with op_range("attack_step"):
            grad, logits = input_gradient(model, x_act, y_act, loss_fn)
            succeeded = _succeeded(logits, y_act, step_options["targeted"])
            if bool(succeeded.any()):
                grad = grad[leave(succeeded)]
                if rows.numel() == 0:
                    continue
            _step_in_place(x_act, grad, x_nat, eps_act, _step_size(alpha_act, grad, division),
                           step_options)
            taken += 1
            finished = taken >= steps
            if bool(finished.any()):
                leave(finished)
    return x_adv


def _attack_once(model, x, y, *, eps, alpha, steps, norm, clip, targeted, loss_fn,
                 early_stop, random_start, generator, batch_size, eps_for_division, backend):
    # Every start is drawn up front, in one call: the same draws however the batch is split.
    x_adv = _random_start(x, eps, norm, clip, generator) if random_start else x.clone()
    pool = x.shape[0] if batch_size is None else batch_size
    low, high = (None, None) if clip is None else clip
    step_options = dict(norm=norm, clip_min=low, clip_max=high, targeted=targeted, backend=backend)
    attack = _attack_with_early_stop if early_stop else _attack_in_chunks
    return attack(model, x, y, x_adv, eps=eps, alpha=alpha, steps=steps, loss_fn=loss_fn,
                  pool=max(pool, 1), division=eps_for_division, step_options=step_options)


def pgd(model, x: torch.Tensor, y: torch.Tensor, *, eps: Radius = 8 / 255, alpha: Radius = 2 / 255,
        steps: int = 10, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        targeted: bool = False, loss_fn: Optional[LossFn] = None, early_stop: bool = False,
        generator: Optional[torch.Generator] = None, clip: Clip = (0.0, 1.0),
        model_training: bool = False, batch_size: Optional[int] = None,
        eps_for_division: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """Projected gradient descent (Madry et al.): returns x_adv, a new tensor.

    y: the true labels, or the target labels when targeted=True (the step then descends the
    loss of the target). loss_fn(logits, y): a scalar or per-sample loss, cross-entropy by
    default. restarts: per sample, the perturbation that succeeds, else the one of highest
    loss, is kept. early_stop: a sample stops moving once it succeeds (for evaluation; never
    weaker than without it). generator: draws the random start. model_training: run the
    model in training mode during the attack (eval by default, as torchattacks does).
    batch_size: at most this many samples go through the model at once (all by default). With
    early_stop, each sample that leaves is replaced by the next waiting one, so the model keeps
    seeing full batches; evaluate a whole test set in one call this way. eps_for_division
    (L2 only): step alpha * g / (||g|| + eps_for_division) as torchattacks.PGDL2 does; 0 (the
    default) steps along g / ||g|| exactly and saves a norm per step.
    """
    _check_attack_inputs(model, x, y, steps, restarts)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    norm = norm.lower() if isinstance(norm, str) else norm
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    # Validated once here (the only reads back from the device); the loop never checks again.
    eps = prepare_radius("eps", eps, x.shape[0], x, caller="pgd")
    alpha = prepare_radius("alpha", alpha, x.shape[0], x, caller="pgd")
    clip = check_clip(clip, caller="pgd")
    if not isinstance(targeted, bool):
        raise TypeError(f"pgd: targeted must be a bool, got {type(targeted).__name__}")
    if isinstance(eps_for_division, bool) or not isinstance(eps_for_division, numbers.Real) \
            or not 0 <= eps_for_division < math.inf:
        raise ValueError(f"pgd: eps_for_division must be a finite float >= 0, got {eps_for_division!r}")
    if eps_for_division and norm != "l2":
        raise ValueError("pgd: eps_for_division applies to norm='l2' only (the L-inf step takes "
                         "the sign of the gradient)")
    x = x.detach()
    with modules_in_mode(model, model_training), op_range("pgd"), torch.no_grad():
        options = dict(eps=eps, alpha=alpha, steps=steps, norm=norm, clip=clip, targeted=targeted,
                       loss_fn=loss_fn, early_stop=early_stop, random_start=random_start,
                       generator=generator, batch_size=batch_size,
                       eps_for_division=float(eps_for_division), backend=backend)
        best = _attack_once(model, x, y, **options)
        if restarts == 1:
            return best
        best_success, best_loss = _per_sample_score(model, best, y, loss_fn, targeted)
        for _ in range(restarts - 1):
            candidate = _attack_once(model, x, y, **options)
            success, loss = _per_sample_score(model, candidate, y, loss_fn, targeted)
            better = (success & ~best_success) | ((success == best_success) & (loss > best_loss))
            best[better] = candidate[better]
            best_success = torch.where(better, success, best_success)
            best_loss = torch.where(better, loss, best_loss)
        return best


def fgsm(model, x: torch.Tensor, y: torch.Tensor, *, eps: Radius = 8 / 255, clip: Clip = (0.0, 1.0),
         targeted: bool = False, loss_fn: Optional[LossFn] = None, model_training: bool = False,
         backend: Optional[str] = None) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al.): one L-inf step of size eps from x."""
    _check_attack_inputs(model, x, y)
    eps_value, eps_per_sample = split_radius(prepare_radius("eps", eps, x.shape[0], x, caller="fgsm"))
    low, high = check_clip(clip, caller="fgsm")
    if not isinstance(targeted, bool):
        raise TypeError(f"fgsm: targeted must be a bool, got {type(targeted).__name__}")
    x = x.detach()
    with modules_in_mode(model, model_training), op_range("fgsm"), torch.no_grad():
        grad, _ = input_gradient(model, x, y, loss_fn)
        return apply_pgd_step(x, grad, x, eps_value, eps_value, eps_per_sample, eps_per_sample,
                              "linf", low, high, targeted, backend=backend)


# --------------------------------------------------------------------------------------------
# torchattacks-style classes: the calls torchattacks users make, on the functions above.

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


# APGD, APGD-T and Square with torchattacks' arguments and defaults. Differences: the random
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
