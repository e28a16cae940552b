"""Robustness-transfer losses as nn.Modules over the fused robust_fast.multi_teacher_loss.

Teachers are frozen: their outputs are detached here, so no teacher gradient is computed or kept.
Defaults are those of the methods' own code (see each class). Every loss takes backend= (None:
the current default backend) and passes it to the op.

    FeatureExtractor(model, layer="fc")      (features, logits) of any model, by a forward hook
    FeatureProjection(2048, 512)             student width -> teacher width (RRM)
    RRMLoss, CRTLoss, DARHTLoss, LwFLoss, KDLoss, ARDLoss
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from robust_fast._checks import check_positive_finite, check_real_in
from robust_fast.ops.multi_teacher_loss import multi_teacher_loss
from robust_fast.reference.multi_teacher_loss import KINDS

TeacherOutputs = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------------------
# features

class FeatureExtractor(nn.Module):
    """Runs `model` and returns (features, logits).

    layer=None: the model itself returns (features, logits).
    layer="name": the input of the named module (e.g. "fc", the classifier of a ResNet, or
    "7" in an nn.Sequential), flattened to (B, -1), is the penultimate features; the model's
    output is the logits. The hook lives only for the call.
    """

    def __init__(self, model: nn.Module, layer: Optional[str] = None):
        super().__init__()
        self.model = model
        self.layer = layer
        if layer is not None:
            modules = dict(model.named_modules())
            if layer not in modules:
                raise ValueError(f"FeatureExtractor: no module named {layer!r} in the model "
                                 f"(known: {', '.join(n for n in modules if n) or 'none'})")
            self._module = modules[layer]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.layer is None:
            out = self.model(x)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError("FeatureExtractor: with layer=None the model must return "
                                "(features, logits); name the classifier layer instead")
            return out[0], out[1]
        captured = []

        def hook(module, inputs):
            captured.append(inputs[0])
        handle = self._module.register_forward_pre_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"FeatureExtractor: module {self.layer!r} did not run in the forward pass")
        return captured[-1].flatten(1), logits


class FeatureProjection(nn.Linear):
    """A linear map of the student's features to the teacher's width (RRM projects the
    student's penultimate layer, e.g. 2048 -> 512, so the two can be compared)."""

    def __init__(self, student_width: int, teacher_width: int, bias: bool = True):
        super().__init__(student_width, teacher_width, bias=bias)


def _frozen(teachers: TeacherOutputs):
    if isinstance(teachers, torch.Tensor):
        return teachers.detach()
    return [t.detach() for t in teachers]


def _single(teacher: torch.Tensor) -> torch.Tensor:
    return teacher.detach().unsqueeze(0)  # (1, B, D), a view


# --------------------------------------------------------------------------------------------
# the losses

class RRMLoss(nn.Module):
    """Robust representation matching (Vaishnavi et al. 2022), on clean inputs:
    kind="cosine": lambda_ce * CE(student logits, y) - mean_b cos(g_S, g_T);
    kind="l2_normalized": lambda_ce * CE + mean_b ||g_S - g_T|| / ||g_T|| (Restricted ImageNet).
    lambda_ce = 0.005 (L-inf CIFAR), 0.001 (L2)."""

    def __init__(self, lambda_ce: float = 0.005, kind: str = "cosine", backend: Optional[str] = None):
        super().__init__()
        if kind not in ("cosine", "l2_normalized"):
            raise ValueError(f"RRMLoss: kind must be 'cosine' or 'l2_normalized', got {kind!r}")
        lambda_ce = check_real_in("lambda_ce", lambda_ce, "RRMLoss")
        self.lambda_ce, self.kind, self.backend = lambda_ce, kind, backend

    def forward(self, student_logits, student_features, teacher_features, target):
        match = multi_teacher_loss(student_features, _single(teacher_features), kind=self.kind,
                                   backend=self.backend)
        if self.kind == "cosine":
            match = match - 1.0  # mean (1 - cos) - 1 = -mean cos
        return self.lambda_ce * F.cross_entropy(student_logits, target) + match


class CRTLoss(nn.Module):
    """Certified robustness transfer (Vaishnavi et al. 2022), on noisy inputs x + N(0, sigma^2):
    alpha * mean_b ||f_S(x~) - f_T(x~)||_2 + (1 - alpha) * CE(f_S(x~), y); alpha = 1."""

    def __init__(self, alpha: float = 1.0, backend: Optional[str] = None):
        super().__init__()
        self.alpha, self.backend = check_real_in("alpha", alpha, "CRTLoss", 0.0, 1.0), backend

    def forward(self, student_logits, teacher_logits, target=None):
        loss = self.alpha * multi_teacher_loss(student_logits, _single(teacher_logits), kind="l2",
                                               backend=self.backend)
        if self.alpha != 1.0:
            if target is None:
                raise ValueError("CRTLoss: target is needed when alpha < 1")
            loss = loss + (1.0 - self.alpha) * F.cross_entropy(student_logits, target)
        return loss


class DARHTLoss(nn.Module):
    """DARHT (Deng et al. 2024): the student-teacher map (B, K*C), viewed as (B, K, C), slice k
    against teacher k's logits by KL (T = 1), weighted per sample by w_k = exp(-CE(T_k(x), y)),
    plus CE of the student's logits:
        ce_weight * CE(student_logits, y) + kd_weight * mean_b sum_k w_bk KL(p_Tk || p_Sk).
    The weights follow the schedule when forward gets epoch= (CE only before kd_from, CE + KD
    until ce_until, KD only after: epochs 0-49, 50-117, 118+ of 350), else ce_weight, kd_weight."""

    def __init__(self, num_teachers: int, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 kd_from: int = 50, ce_until: int = 118, temperature: float = 1.0,
                 backend: Optional[str] = None):
        super().__init__()
        if isinstance(num_teachers, bool) or not isinstance(num_teachers, int) or num_teachers < 1:
            raise ValueError(f"DARHTLoss: num_teachers must be an int >= 1, got {num_teachers!r}")
        for name, value in (("kd_from", kd_from), ("ce_until", ce_until)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DARHTLoss: {name} must be an int >= 0, got {value!r}")
        ce_weight = check_real_in("ce_weight", ce_weight, "DARHTLoss")
        kd_weight = check_real_in("kd_weight", kd_weight, "DARHTLoss")
        temperature = check_positive_finite("temperature", temperature, "DARHTLoss")
        self.num_teachers, self.ce_weight, self.kd_weight = num_teachers, ce_weight, kd_weight
        self.kd_from, self.ce_until, self.temperature, self.backend = kd_from, ce_until, temperature, backend

    def weights_for_epoch(self, epoch: Optional[int]) -> Tuple[float, float]:
        if epoch is None:
            return self.ce_weight, self.kd_weight
        ce = self.ce_weight if epoch < self.ce_until else 0.0
        kd = self.kd_weight if epoch >= self.kd_from else 0.0
        return ce, kd

    def forward(self, student_logits, student_map, teacher_logits: TeacherOutputs, target,
                epoch: Optional[int] = None):
        ce_w, kd_w = self.weights_for_epoch(epoch)
        loss = student_logits.new_zeros(())
        if ce_w:
            loss = loss + ce_w * F.cross_entropy(student_logits, target)
        if kd_w:
            teachers = _frozen(teacher_logits)
            stacked = teachers if isinstance(teachers, torch.Tensor) else torch.stack(teachers)
            count, batch, classes = stacked.shape
            if count != self.num_teachers:
                raise ValueError(f"DARHTLoss: {count} teachers' logits for {self.num_teachers} teachers")
            with torch.no_grad():  # w_bk = exp(-CE(T_k(x), y)), (B, K)
                weights = torch.exp(-F.cross_entropy(stacked.reshape(count * batch, classes).float(),
                                                     target.repeat(count), reduction="none")
                                    ).view(count, batch).t().contiguous()
            student_slices = student_map.view(batch, count, classes)
            loss = loss + kd_w * multi_teacher_loss(student_slices, teachers, weights=weights, kind="kl",
                                                    temperature=self.temperature, backend=self.backend)
        return loss


class LwFLoss(nn.Module):
    """Robust transfer learning with learning without forgetting (Shafahi et al. 2020):
    CE(logits, y) + lambda_feat * mean_b d(z(x), z0(x)), z0 the frozen source model's features,
    d the L1 distance (kind="l1", the code's choice; "l2", "mse", "cosine" also work)."""

    def __init__(self, lambda_feat: float = 0.005, kind: str = "l1", backend: Optional[str] = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"LwFLoss: kind must be one of {KINDS}, got {kind!r}")
        lambda_feat = check_real_in("lambda_feat", lambda_feat, "LwFLoss")
        self.lambda_feat, self.kind, self.backend = lambda_feat, kind, backend

    def forward(self, logits, features, source_features, target):
        distance = multi_teacher_loss(features, _single(source_features), kind=self.kind, backend=self.backend)
        return F.cross_entropy(logits, target) + self.lambda_feat * distance


class KDLoss(nn.Module):
    """Hinton distillation: alpha * T^2 KL(softmax(t/T) || softmax(s/T)) (mean over samples)
    + (1 - alpha) * CE(s, y). Several teachers' logits (a list or (K, B, C)) are summed."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, backend: Optional[str] = None):
        super().__init__()
        temperature = check_positive_finite("temperature", temperature, "KDLoss")
        alpha = check_real_in("alpha", alpha, "KDLoss", 0.0, 1.0)
        self.temperature, self.alpha, self.backend = temperature, alpha, backend

    def forward(self, student_logits, teacher_logits: TeacherOutputs, target=None):
        teachers = _single(teacher_logits) if isinstance(teacher_logits, torch.Tensor) and \
            teacher_logits.dim() == 2 else _frozen(teacher_logits)
        loss = self.alpha * multi_teacher_loss(student_logits, teachers, kind="kl",
                                               temperature=self.temperature, backend=self.backend)
        if self.alpha != 1.0:
            if target is None:
                raise ValueError("KDLoss: target is needed when alpha < 1")
            loss = loss + (1.0 - self.alpha) * F.cross_entropy(student_logits, target)
        return loss


class ARDLoss(nn.Module):
    """Adversarially robust distillation (Goldblum et al. 2020): the student on adversarial
    inputs matches the teacher on clean ones,
        alpha * T^2 KL(softmax(T(x)/T) || softmax(S(x_adv)/T)) + (1 - alpha) * CE(S(x), y),
    T = 30, alpha = 1 (their CIFAR-10 settings). The KL is summed over classes and averaged over
    samples; the authors' nn.KLDivLoss() also averages over classes (a factor 1/C)."""

    def __init__(self, temperature: float = 30.0, alpha: float = 1.0, backend: Optional[str] = None):
        super().__init__()
        temperature = check_positive_finite("temperature", temperature, "ARDLoss")
        alpha = check_real_in("alpha", alpha, "ARDLoss", 0.0, 1.0)
        self.temperature, self.alpha, self.backend = temperature, alpha, backend

    def forward(self, student_logits_adv, teacher_logits_clean, student_logits_clean=None, target=None):
        loss = self.alpha * multi_teacher_loss(student_logits_adv, _single(teacher_logits_clean), kind="kl",
                                               temperature=self.temperature, backend=self.backend)
        if self.alpha != 1.0:
            if student_logits_clean is None or target is None:
                raise ValueError("ARDLoss: student_logits_clean and target are needed when alpha < 1")
            loss = loss + (1.0 - self.alpha) * F.cross_entropy(student_logits_clean, target)
        return loss


__all__ = ["FeatureExtractor", "FeatureProjection", "RRMLoss", "CRTLoss", "DARHTLoss", "LwFLoss",
           "KDLoss", "ARDLoss"]
