"""Recipes: how one batch's loss is computed. The loop (robust_fast.train.loop.fit) does the
rest — data, optimiser, schedule, logging, evaluation, checkpoints, resume, data parallelism.

A recipe is an object with
    name                      the command's name (robust-fast train <name>)
    settings() -> dict        its own settings, stored in checkpoints (JSON-able)
    prepare(images, device)   optional: called once before training (and again on resume) with
                              the whole training set; its time counts as training time
    trainable(model) -> nn.Module
                              the module the optimiser trains and DistributedDataParallel wraps:
                              the model itself, or the model with extra trained parts (RRM's
                              projection); its state_dict holds the model's under "model."
                              when it is not the model
    batch_loss(batch) -> (loss, logits)
                              a scalar loss to minimise and the logits whose accuracy the
                              progress bar shows; batch is a Batch (below)
    held_out_metrics(model, images, labels, eps, backend) -> dict
                              optional: extra numbers of the per-epoch record on the held-out
                              slice (IBP's certified accuracy; the smoothing recipes' accuracy
                              under noise)
    epoch_record() -> dict    optional: the recipe's own numbers of the per-epoch record (IBP:
                              the eps and kappa its last batch trained at)
    end_epoch(model, images, labels, device, last)
                              optional: called after each epoch's batches, before its evaluation
                              (last: the run's final epoch); its time counts as training time
                              (RRM folds its head into the model, and trains a robust head last)
    max_grad_norm             optional: the gradient clip the method needs when the
                              TrainConfig sets none (IBP: 10); None: no clip

Forward passes that train go through batch.net (DDP's wrapper under torchrun, so gradients
are averaged); attacks and frozen teachers use batch.model / their own module directly (no
gradient sync for an input gradient). Random draws come from batch.generator, whose state
checkpoints keep, so a resumed run draws what the uninterrupted one would have.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from robust_fast._modes import modules_in_mode
from robust_fast.attacks import pgd
from robust_fast.certify import certified_accuracy, ibp_loss
from robust_fast.certify.ibp import layers_of
from robust_fast.certify.schedules import eps_schedule, kappa_schedule, training_eps
from robust_fast.losses import ARDLoss, CRTLoss, FeatureProjection, KDLoss, RRMLoss
from robust_fast.models import WithFeatures
from robust_fast.ops.noise import gaussian_copies


@dataclass
class Batch:
    net: nn.Module                      # the trainable, possibly wrapped by DDP: train through it
    model: nn.Module                    # the bare model: attack it
    x: torch.Tensor                     # this rank's images in [0, 1]
    y: torch.Tensor                     # their labels
    epoch: int                          # 0-based
    generator: torch.Generator          # for random starts and noise, on x's device
    backend: Optional[str] = None       # robust_fast backend for the fused ops
    index: Optional[torch.Tensor] = None  # the rows of the training set x and y come from
    step: int = 0                       # 0-based count of batches since the run began (schedules)
    steps_per_epoch: int = 1
    epochs: int = 1                     # the run's epochs (schedules scaled to the run)


class Recipe:
    name = "recipe"
    max_grad_norm: Optional[float] = None

    def settings(self) -> Dict[str, Any]:
        return {}

    def prepare(self, images: torch.Tensor, device: torch.device) -> None:
        pass

    def trainable(self, model: nn.Module) -> nn.Module:
        return model

    def batch_loss(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def held_out_metrics(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         eps: float, backend: Optional[str]) -> Dict[str, Any]:
        return {}

    def epoch_record(self) -> Dict[str, Any]:
        return {}

    def end_epoch(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                  last: bool) -> None:
        pass


def _check_eps(caller: str, eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{caller}: eps must be a float > 0, got {eps!r}")
    return float(eps)


class Standard(Recipe):
    """Cross-entropy on clean inputs."""
    name = "standard"

    def batch_loss(self, batch):
        logits = batch.net(batch.x)
        return F.cross_entropy(logits, batch.y), logits


class PGDAT(Recipe):
    """PGD adversarial training (Madry et al.): cross-entropy on L-inf PGD examples (uniform
    random start, `steps` steps of size alpha = eps/4 unless given, the model in eval mode)."""
    name = "pgd_at"

    def __init__(self, eps: float = 0.1, steps: int = 7, alpha: Optional[float] = None):
        self.eps = _check_eps("PGDAT", eps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"PGDAT: steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        self.alpha = float(alpha) if alpha is not None else self.eps / 4

    def settings(self):
        return {"eps": self.eps, "steps": self.steps, "alpha": self.alpha}

    def batch_loss(self, batch):
        x_adv = pgd(batch.model, batch.x, batch.y, eps=self.eps, alpha=self.alpha, steps=self.steps,
                    random_start=True, generator=batch.generator, backend=batch.backend)
        logits = batch.net(x_adv)
        return F.cross_entropy(logits, batch.y), logits


class FastAT(PGDAT):
    """Fast adversarial training (Wong et al. 2020): one FGSM step of size 1.25·eps from a
    uniform random start in the ball, projected back to it."""
    name = "fast_at"

    def __init__(self, eps: float = 0.1, alpha: Optional[float] = None):
        eps = _check_eps("FastAT", eps)
        super().__init__(eps=eps, steps=1, alpha=1.25 * eps if alpha is None else alpha)

    def settings(self):
        return {"eps": self.eps, "alpha": self.alpha}


def _frozen(teacher: nn.Module, caller: str) -> nn.Module:
    """The teacher in eval mode with requires_grad off: it never changes and gets no gradient."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"{caller}: teacher must be an nn.Module, got {type(teacher).__name__}")
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


class _WithTeacher(Recipe):
    def __init__(self, teacher: nn.Module, teacher_path: Optional[str] = None):
        self.teacher = _frozen(teacher, type(self).__name__)
        self.teacher_path = teacher_path

    def _teacher_on(self, device: torch.device) -> nn.Module:
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        return self.teacher


HEADS = ("own", "teacher", "teacher_finetune")
MATCH_POINTS = ("clean", "teacher_pgd")
NOISE_SCALES = ("fixed", "uniform")


def _fold_head(classifier: nn.Linear, projection: Optional[nn.Linear], head: nn.Linear) -> None:
    """classifier := head ∘ projection, exactly (two linear maps compose to one), so the bare
    model's own forward gives the logits the recipe trained."""
    with torch.no_grad():
        if projection is None:
            classifier.weight.copy_(head.weight)
            classifier.bias.copy_(head.bias)
        else:
            classifier.weight.copy_(head.weight @ projection.weight)
            bias = head.bias.clone()
            if projection.bias is not None:
                bias += head.weight @ projection.bias
            classifier.bias.copy_(bias)


class RRM(_WithTeacher):
    """Robust representation matching (Vaishnavi et al. 2022): the student on clean inputs,
    lambda_ce·CE(student logits, y) − mean cos(student features, teacher features) (or the
    normalised L2 distance, kind="l2_normalized"), the teacher frozen. When the widths differ
    a trained linear projection maps the student's features to the teacher's width.

    noise_std > 0: both match on x + N(0, noise_std²) (clipped to [0, 1]) instead of x.
    noise_scales="uniform": each image's std is drawn anew, uniform in [0, noise_std] (one per
    image and batch), so the student matches the teacher from clean images out to noise_std
    instead of at one distance; "fixed" (default): every image's std is noise_std.
    cache_teacher: on clean inputs the frozen teacher's features of an image never change, so
    prepare() computes them once for the whole training set (in fixed chunks, the same values
    on every run and resume) and each batch looks its rows up: an epoch then costs one student
    pass, like standard training. Not with noise (every draw is new).

    head: the student's classifier.
      "own"               the student's own (trained only by the small CE term);
      "teacher"           the teacher's classifier, frozen, on the student's projected features:
                          logits = teacher.classifier(projection(g_S));
      "teacher_finetune"  the same, starting from the teacher's and trained by the CE term.
    After every epoch the head (and the projection) is folded into the student's own last
    Linear, so the saved model is the bare student architecture and gives the same logits.
    robust_head_epochs > 0: at the end, the student's last Linear alone is trained that many
    passes (fractions allowed: the first part of a seeded shuffle) by Adam (head_lr) on the
    PGD examples of the whole student (eps, head_steps steps of eps/4, random start), the
    features frozen: a cheap robust head on robust-ish features.

    match_points="teacher_pgd": the frozen teacher's own PGD points (eps, match_steps steps of
    eps/4 from a seeded random start, against the teacher's own prediction, so no labels are
    needed) are computed once in prepare() with the teacher's features there, and the student
    matches there too (each batch: its clean images and their teacher PGD points, one student
    pass over both, the CE term on both). Needs cache_teacher and no noise.
    """
    name = "rrm"
    _CHUNK = 512
    _HEAD_BATCH = 128

    def __init__(self, teacher: nn.Module, lambda_ce: float = 0.005, kind: str = "cosine",
                 noise_std: float = 0.0, teacher_path: Optional[str] = None, cache_teacher: bool = True,
                 head: str = "own", robust_head_epochs: float = 0.0, eps: float = 0.1, head_steps: int = 7,
                 head_lr: float = 1e-3, match_points: str = "clean", match_steps: int = 10, seed: int = 0,
                 noise_scales: str = "fixed"):
        super().__init__(teacher, teacher_path)
        self.cache_teacher = bool(cache_teacher) and not noise_std
        self._cached: Optional[torch.Tensor] = None
        self._points: Optional[torch.Tensor] = None
        self._points_features: Optional[torch.Tensor] = None
        if not hasattr(teacher, "features") or not hasattr(teacher, "feature_dim"):
            raise TypeError("RRM: teacher must expose features(x) and feature_dim (robust_fast.models)")
        if not noise_std >= 0:
            raise ValueError(f"RRM: noise_std must be >= 0, got {noise_std!r}")
        if noise_scales not in NOISE_SCALES:
            raise ValueError(f"RRM: noise_scales must be one of {NOISE_SCALES}, got {noise_scales!r}")
        if noise_scales != "fixed" and not noise_std:
            raise ValueError(f"RRM: noise_scales={noise_scales!r} needs noise_std > 0 (its largest std)")
        if head not in HEADS:
            raise ValueError(f"RRM: head must be one of {HEADS}, got {head!r}")
        if head != "own" and not isinstance(getattr(teacher, "classifier", None), nn.Linear):
            raise TypeError(f"RRM: head={head!r} needs a teacher whose classifier is an nn.Linear")
        if isinstance(robust_head_epochs, bool) or not isinstance(robust_head_epochs, (int, float)) \
                or not robust_head_epochs >= 0:
            raise ValueError(f"RRM: robust_head_epochs must be a number >= 0, got {robust_head_epochs!r}")
        for name, value in (("head_steps", head_steps), ("match_steps", match_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RRM: {name} must be an int >= 1, got {value!r}")
        if not head_lr > 0:
            raise ValueError(f"RRM: head_lr must be > 0, got {head_lr!r}")
        if match_points not in MATCH_POINTS:
            raise ValueError(f"RRM: match_points must be one of {MATCH_POINTS}, got {match_points!r}")
        if match_points != "clean" and not self.cache_teacher:
            raise ValueError("RRM: match_points='teacher_pgd' needs cache_teacher=True and noise_std=0")
        self.eps = _check_eps("RRM", eps)
        self.loss = RRMLoss(lambda_ce=lambda_ce, kind=kind)
        self.lambda_ce, self.kind, self.noise_std = lambda_ce, kind, float(noise_std)
        self.noise_scales = noise_scales
        self.head, self.robust_head_epochs, self.head_steps = head, float(robust_head_epochs), head_steps
        self.head_lr, self.match_points, self.match_steps, self.seed = float(head_lr), match_points, match_steps, seed
        self._trainable: Optional[WithFeatures] = None

    def settings(self):
        return {"lambda_ce": self.lambda_ce, "kind": self.kind, "noise_std": self.noise_std,
                "noise_scales": self.noise_scales,
                "cache_teacher": self.cache_teacher, "teacher": self.teacher_path,
                "teacher_dim": self.teacher.feature_dim, "head": self.head,
                "robust_head_epochs": self.robust_head_epochs, "eps": self.eps, "head_steps": self.head_steps,
                "head_lr": self.head_lr, "match_points": self.match_points, "match_steps": self.match_steps,
                "seed": self.seed}

    def prepare(self, images, device):
        if not self.cache_teacher:
            return
        teacher = self._teacher_on(device)
        chunks = images.split(self._CHUNK)
        with torch.no_grad():
            self._cached = torch.cat([teacher.features(chunk.to(device)) for chunk in chunks]) \
                if images.shape[0] else None
        if self.match_points == "teacher_pgd" and images.shape[0]:
            generator = torch.Generator(device=device).manual_seed(self.seed)
            points = []
            for chunk in chunks:
                chunk = chunk.to(device)
                with torch.no_grad():
                    own = teacher(chunk).argmax(dim=1)
                points.append(pgd(teacher, chunk, own, eps=self.eps, alpha=self.eps / 4, steps=self.match_steps,
                                  random_start=True, generator=generator).detach())
            self._points = torch.cat(points)
            with torch.no_grad():
                self._points_features = torch.cat([teacher.features(c) for c in self._points.split(self._CHUNK)])

    def trainable(self, model):
        student_dim = getattr(model, "feature_dim", None)
        if student_dim is None:
            raise TypeError("RRM: the student must expose feature_dim and return_features= (robust_fast.models)")
        projection = head = None
        if student_dim != self.teacher.feature_dim:
            projection = FeatureProjection(student_dim, self.teacher.feature_dim)
        if self.head != "own":
            if not isinstance(getattr(model, "classifier", None), nn.Linear):
                raise TypeError(f"RRM: head={self.head!r} needs a student whose classifier is an nn.Linear")
            source = self.teacher.classifier
            head = nn.Linear(source.in_features, source.out_features, bias=source.bias is not None)
            head.load_state_dict(source.state_dict())  # a copy: the teacher's own never changes
            head.to(source.weight.device)
            head.requires_grad_(self.head == "teacher_finetune")
        self._trainable = WithFeatures(model, projection, head)
        return self._trainable

    def batch_loss(self, batch):
        x = batch.x
        if self.noise_std:
            noise = torch.randn(x.shape, generator=batch.generator, device=x.device, dtype=x.dtype)
            x = (x + self.noise_scale(x, batch.generator) * noise).clamp(0.0, 1.0)
        self.loss.backend = batch.backend
        y = batch.y
        if self._cached is not None and batch.index is not None and not self.noise_std:
            rows = batch.index.to(self._cached.device)
            teacher_features = self._cached[rows]
            if self._points is not None:
                x = torch.cat([x, self._points[rows].to(x.device)])
                teacher_features = torch.cat([teacher_features, self._points_features[rows]])
                y = torch.cat([y, y])
        else:
            with torch.no_grad():
                teacher_features = self._teacher_on(x.device).features(x)
        features, logits = batch.net(x)
        loss = self.loss(logits, features, teacher_features, y)
        return loss, logits[:batch.x.shape[0]]

    def noise_scale(self, x: torch.Tensor, generator: Optional[torch.Generator]):
        """The noise's std for the batch x: noise_std, or one draw per image (shaped to broadcast)."""
        if self.noise_scales == "fixed":
            return self.noise_std
        u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        return (self.noise_std * u).view(-1, *([1] * (x.dim() - 1)))

    def end_epoch(self, model, images, labels, device, last: bool):
        wrapped = self._trainable
        if wrapped is not None and wrapped.model is model and wrapped.head is not None:
            _fold_head(model.classifier, wrapped.projection, wrapped.head)
        if last and self.robust_head_epochs:
            self._train_robust_head(model, images, labels, device)

    def _train_robust_head(self, model, images, labels, device):
        """The student's last Linear alone on the whole student's PGD examples, features frozen."""
        classifier = model.classifier
        generator = torch.Generator(device=device).manual_seed(self.seed + 1)
        cpu = torch.Generator().manual_seed(self.seed + 1)
        order = torch.randperm(images.shape[0], generator=cpu)
        count = int(round(self.robust_head_epochs * images.shape[0]))
        order = torch.cat([order] * (count // images.shape[0] + 1))[:count]
        optimizer = torch.optim.Adam(classifier.parameters(), lr=self.head_lr)
        with modules_in_mode(model, False):
            for index in order.split(self._HEAD_BATCH):
                x, y = images[index].to(device), labels[index].to(device)
                x_adv = pgd(model, x, y, eps=self.eps, alpha=self.eps / 4, steps=self.head_steps,
                            random_start=True, generator=generator)
                with torch.no_grad():
                    features = model.features(x_adv)
                loss = F.cross_entropy(classifier(features), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


class KD(_WithTeacher):
    """Hinton distillation from a frozen teacher on clean inputs (losses.KDLoss)."""
    name = "kd"

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9,
                 teacher_path: Optional[str] = None):
        super().__init__(teacher, teacher_path)
        self.loss = KDLoss(temperature=temperature, alpha=alpha)

    def settings(self):
        return {"temperature": self.loss.temperature, "alpha": self.loss.alpha, "teacher": self.teacher_path}

    def batch_loss(self, batch):
        self.loss.backend = batch.backend
        with torch.no_grad():
            teacher_logits = self._teacher_on(batch.x.device)(batch.x)
        logits = batch.net(batch.x)
        return self.loss(logits, teacher_logits, batch.y), logits


class ARD(_WithTeacher):
    """Adversarially robust distillation (Goldblum et al. 2020): the student on its own PGD
    examples matches the frozen teacher on clean inputs (losses.ARDLoss), plus (1 − alpha) of
    the student's clean cross-entropy."""
    name = "ard"

    def __init__(self, teacher: nn.Module, eps: float = 0.1, steps: int = 7, step_size: Optional[float] = None,
                 temperature: float = 30.0, alpha: float = 1.0, teacher_path: Optional[str] = None):
        super().__init__(teacher, teacher_path)
        self.attack = PGDAT(eps=eps, steps=steps, alpha=step_size)
        self.loss = ARDLoss(temperature=temperature, alpha=alpha)

    def settings(self):
        return {**self.attack.settings(), "temperature": self.loss.temperature, "alpha": self.loss.alpha,
                "teacher": self.teacher_path}

    def batch_loss(self, batch):
        self.loss.backend = batch.backend
        a = self.attack
        x_adv = pgd(batch.model, batch.x, batch.y, eps=a.eps, alpha=a.alpha, steps=a.steps,
                    random_start=True, generator=batch.generator, backend=batch.backend)
        with torch.no_grad():
            teacher_logits = self._teacher_on(batch.x.device)(batch.x)
        if self.loss.alpha != 1.0:
            both = batch.net(torch.cat([x_adv, batch.x]))
            logits_adv, logits_clean = both.split(batch.x.shape[0])
            return self.loss(logits_adv, teacher_logits, logits_clean, batch.y), logits_adv
        logits_adv = batch.net(x_adv)
        return self.loss(logits_adv, teacher_logits), logits_adv


class _IBPObjective(nn.Module):
    """The IBP training loss as a module's forward, so that DistributedDataParallel averages its
    gradients like any other training pass: returns (loss, clean logits)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y, eps: float, kappa: float, backend: Optional[str] = None):
        return ibp_loss(self.model, x, y, eps, kappa, backend=backend, return_logits=True)


class IBP(Recipe):
    """IBP certified training (Gowal et al. 2018): kappa·CE(f(x), y) + (1 − kappa)·CE(−m, y),
    m the lower bounds of the margins f_y − f_j over the L-inf box of radius eps around x
    (robust_fast.certify.margin_bounds). Per batch: a warm-up of warmup_epochs on clean inputs
    (eps 0, kappa 1), then over ramp_epochs eps grows to train_eps_factor·eps (the smoothed
    or linear ramp) while kappa falls to kappa_end, and both stay there. The gradient's norm is
    clipped to max_grad_norm (None: not) unless the TrainConfig sets its own clip: it keeps the
    first steps of the ramp from diverging. The model must be one interval_bounds supports
    (SmallCNN, or an nn.Sequential of supported layers).

    The defaults fit the loop's default of 5 epochs: the ramp ends after 3.5 of them, so the
    model trains at the full radius for the rest."""
    name = "ibp"

    def __init__(self, eps: float = 0.1, warmup_epochs: float = 0.5, ramp_epochs: float = 3.0,
                 kappa_end: float = 0.5, ramp: str = "smoothed", train_eps_factor: float = 1.1,
                 max_grad_norm: Optional[float] = 10.0):
        self.eps = _check_eps("IBP", eps)
        for name, value in (("warmup_epochs", warmup_epochs), ("ramp_epochs", ramp_epochs)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"IBP: {name} must be a number >= 0, got {value!r}")
        if isinstance(kappa_end, bool) or not isinstance(kappa_end, (int, float)) or not 0 <= kappa_end <= 1:
            raise ValueError(f"IBP: kappa_end must be a number in [0, 1], got {kappa_end!r}")
        if ramp not in ("smoothed", "linear"):
            raise ValueError(f"IBP: ramp must be 'smoothed' or 'linear', got {ramp!r}")
        self.warmup_epochs, self.ramp_epochs = float(warmup_epochs), float(ramp_epochs)
        self.kappa_end, self.ramp = float(kappa_end), ramp
        self.train_eps = training_eps(self.eps, train_eps_factor)
        self.train_eps_factor = float(train_eps_factor)
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                          or not 0 < max_grad_norm < float("inf")):
            raise ValueError(f"IBP: max_grad_norm must be None or a finite number > 0, got {max_grad_norm!r}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._last = (0.0, 1.0)  # the eps and kappa of the latest batch

    def settings(self):
        return {"eps": self.eps, "warmup_epochs": self.warmup_epochs, "ramp_epochs": self.ramp_epochs,
                "kappa_end": self.kappa_end, "ramp": self.ramp, "train_eps_factor": self.train_eps_factor,
                "max_grad_norm": self.max_grad_norm}

    def trainable(self, model):
        layers_of(model)  # a layer bounds cannot go through fails here, before any training
        return _IBPObjective(model)

    def eps_and_kappa(self, step: int, steps_per_epoch: int) -> Tuple[float, float]:
        warmup = int(self.warmup_epochs * steps_per_epoch)
        ramp = int(self.ramp_epochs * steps_per_epoch)
        eps = eps_schedule(step, eps_train=self.train_eps, warmup_steps=warmup, ramp_steps=ramp, kind=self.ramp)
        kappa = kappa_schedule(step, warmup_steps=warmup, ramp_steps=ramp, kappa_end=self.kappa_end)
        return eps, kappa

    def batch_loss(self, batch):
        eps, kappa = self._last = self.eps_and_kappa(batch.step, batch.steps_per_epoch)
        return batch.net(batch.x, batch.y, eps, kappa, batch.backend)

    def epoch_record(self):
        eps, kappa = self._last
        return {"train_eps": eps, "kappa": kappa}

    def held_out_metrics(self, model, images, labels, eps, backend):
        # at the record's radius, beside the PGD accuracy at the same eps
        return {"certified_acc": certified_accuracy(model, (images, labels), eps, backend=backend)}


# --------------------------------------------------------------------------------------------
# randomized smoothing: training on Gaussian noise

def _check_sigma(caller: str, sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < float("inf"):
        raise ValueError(f"{caller}: sigma must be a finite float > 0, got {sigma!r}")
    return float(sigma)


def _check_copies(caller: str, noise_samples) -> int:
    if isinstance(noise_samples, bool) or not isinstance(noise_samples, int) or noise_samples < 1:
        raise ValueError(f"{caller}: noise_samples must be an int >= 1, got {noise_samples!r}")
    return noise_samples


def noisy_copies(x: torch.Tensor, copies: int, sigma: float, generator: torch.Generator,
                 backend: Optional[str] = None) -> torch.Tensor:
    """(B * copies, ...) noisy inputs in one pass (robust_fast.gaussian_copies): rows
    b*copies ... b*copies + copies - 1 are x[b] + sigma * N(0, I), one seed drawn from generator.
    The one place the training recipes make noise. Never clamped: smoothing certifies the
    unclamped input."""
    return gaussian_copies(x, copies, sigma, generator=generator, backend=backend)


def gaussian_noise(x: torch.Tensor, copies: int, sigma: float, generator: torch.Generator,
                   backend: Optional[str] = None) -> torch.Tensor:
    """sigma * N(0, I) of shape (B, copies, *x.shape[1:]), drawn as noisy_copies draws it (the
    noisy copies of zeros): for SmoothAdv, which keeps the noise fixed while x moves."""
    zeros = x.new_zeros((x.shape[0],) + tuple(x.shape[1:]))
    noise = noisy_copies(zeros, copies, sigma, generator, backend)
    return noise.view((x.shape[0], copies) + tuple(x.shape[1:]))


def _copies(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(B * copies, ...) noisy inputs: rows b*copies ... b*copies + copies - 1 are x[b] + noise[b, j]."""
    return (x.unsqueeze(1) + noise).flatten(0, 1)


def _per_image(logits: torch.Tensor, copies: int) -> torch.Tensor:
    """The mean logits of each image's copies (B, C): what the progress bar's accuracy reads."""
    return logits.detach().view(-1, copies, logits.shape[-1]).mean(1)


class _Noisy(Recipe):
    """Shared by the smoothing recipes: sigma, noise_samples, and the per-epoch accuracy of the
    base model on one noisy copy of each held-out image (its own fixed seed, so the training
    generator and a resumed run are untouched)."""

    def __init__(self, sigma: float, noise_samples: int):
        caller = type(self).__name__
        self.sigma, self.noise_samples = _check_sigma(caller, sigma), _check_copies(caller, noise_samples)

    def settings(self):
        return {"sigma": self.sigma, "noise_samples": self.noise_samples}

    def held_out_metrics(self, model, images, labels, eps, backend):
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(0)
        correct = 0
        with modules_in_mode(model, False), torch.no_grad():
            for x, y in zip(images.split(500), labels.split(500)):
                x, y = x.to(device), y.to(device)
                logits = model(noisy_copies(x, 1, self.sigma, generator, backend))
                correct += int((logits.argmax(1) == y).sum())
        return {"noisy_acc": correct / max(images.shape[0], 1)}


class Gaussian(_Noisy):
    """Gaussian data augmentation (Cohen et al. 2019), the base classifier of randomized
    smoothing: cross-entropy on x + N(0, sigma^2 I), unclamped, averaged over noise_samples
    draws per image (1 in the paper)."""
    name = "gaussian"

    def __init__(self, sigma: float = 0.25, noise_samples: int = 1):
        super().__init__(sigma, noise_samples)

    def batch_loss(self, batch):
        m = self.noise_samples
        noisy = noisy_copies(batch.x, m, self.sigma, batch.generator, batch.backend)
        logits = batch.net(noisy)
        return F.cross_entropy(logits, batch.y.repeat_interleave(m)), _per_image(logits, m)


class SoftSmoothed(nn.Module):
    """The soft smoothed classifier on fixed noise, as log-probabilities:
    log mean_j softmax(f(x + noise[:, j])), noise (B, m, ...) from gaussian_noise. Its NLL is
    the loss SmoothAdv's attack maximises (Salman et al.'s SmoothAdv_PGD; probabilities clamped
    at 1e-20 as there)."""

    def __init__(self, model: nn.Module, noise: torch.Tensor):
        super().__init__()
        self.model, self.noise = model, noise

    def forward(self, x):
        b, m = self.noise.shape[:2]
        logits = self.model(_copies(x, self.noise))
        return logits.softmax(-1).view(b, m, -1).mean(1).clamp_min(1e-20).log()


class SmoothAdv(_Noisy):
    """SmoothAdv (Salman et al. 2019), adversarial training of the smoothed classifier: draw
    noise_samples noise vectors per image and keep them; attack the soft smoothed classifier
    on them by L2 PGD from x (no random start, step 2*eps/steps, the model in eval mode, the
    point kept in the eps-ball and in [0, 1]); train on cross-entropy of f(x_adv + noise_j)
    averaged over the draws (the noisy copies are not clamped).

    The defaults are a light version (eps 0.5, 2 steps, 2 draws): the paper's CIFAR-10 models
    use eps 0.25-2, 1-10 steps and 1-8 draws, at a cost growing with steps x draws."""
    name = "smoothadv"

    def __init__(self, sigma: float = 0.25, eps: float = 0.5, steps: int = 2, noise_samples: int = 2,
                 alpha: Optional[float] = None):
        super().__init__(sigma, noise_samples)
        self.eps = _check_eps("SmoothAdv", eps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"SmoothAdv: steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        self.alpha = float(alpha) if alpha is not None else 2 * self.eps / steps

    def settings(self):
        return {**super().settings(), "eps": self.eps, "steps": self.steps, "alpha": self.alpha}

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor,
               backend: Optional[str] = None) -> torch.Tensor:
        """x_adv: the L2 PGD point against the soft smoothed classifier on these noise draws."""
        return pgd(SoftSmoothed(model, noise), x, y, eps=self.eps, alpha=self.alpha, steps=self.steps,
                   norm="l2", random_start=False, loss_fn=lambda log_p, y: F.nll_loss(log_p, y, reduction="sum"),
                   backend=backend)

    def batch_loss(self, batch):
        m = self.noise_samples
        noise = gaussian_noise(batch.x, m, self.sigma, batch.generator, batch.backend)
        x_adv = self.attack(batch.model, batch.x, batch.y, noise, batch.backend)
        logits = batch.net(_copies(x_adv, noise))
        return F.cross_entropy(logits, batch.y.repeat_interleave(m)), _per_image(logits, m)


class CRT(_WithTeacher, _Noisy):
    """Certified robustness transfer (Vaishnavi et al. 2022): the student on noisy inputs
    x~ = x + N(0, sigma^2 I) (unclamped) matches a frozen teacher's logits on the same x~,
    alpha * mean_b ||f_S(x~) - f_T(x~)||_2 + (1 - alpha) * CE(f_S(x~), y) (losses.CRTLoss,
    through multi_teacher_loss kind "l2"); alpha = 1 as in the paper. The teacher is meant to
    be a smoothed classifier's base model trained by a certified method (SmoothAdv, ...)."""
    name = "crt"

    def __init__(self, teacher: nn.Module, sigma: float = 0.25, alpha: float = 1.0, noise_samples: int = 1,
                 teacher_path: Optional[str] = None):
        _WithTeacher.__init__(self, teacher, teacher_path)
        _Noisy.__init__(self, sigma, noise_samples)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"CRT: alpha must be a number in [0, 1], got {alpha!r}")
        self.loss = CRTLoss(alpha=float(alpha))

    def settings(self):
        return {**_Noisy.settings(self), "alpha": self.loss.alpha, "teacher": self.teacher_path}

    def batch_loss(self, batch):
        m = self.noise_samples
        noisy = noisy_copies(batch.x, m, self.sigma, batch.generator, batch.backend)
        with torch.no_grad():
            teacher_logits = self._teacher_on(noisy.device)(noisy)
        logits = batch.net(noisy)
        self.loss.backend = batch.backend
        return self.loss(logits, teacher_logits, batch.y.repeat_interleave(m)), _per_image(logits, m)


RECIPES = {cls.name: cls for cls in (Standard, PGDAT, FastAT, RRM, KD, ARD, IBP, Gaussian, SmoothAdv, CRT)}
TEACHER_RECIPES = ("rrm", "kd", "ard", "crt")
