"""The DARHT recipe (Deng et al. 2024): a student distilled from several heterogeneous teachers
through its student-teacher map (robust_fast.models.TeacherMapStudent).

Per batch: with probability adversarial_fraction (1/2) the batch is replaced by PGD examples
against the student (attack_steps = 10 steps of eps/10 from the clean image, as the public
code's 10 steps of 0.003 at eps 0.031), else kept clean. Every frozen teacher sees the same
inputs as the student (one forward each, in eval mode, under no_grad). Three phases over the
run, the method's 0-49, 50-117 and 118-349 of 350 epochs scaled to the run's length (per batch):

    CE(head(map), y)                                          before kd_from
    CE(head(map), y) + sum_k w_k KL(p_Tk || softmax(map_k))   until ce_until
    sum_k w_k KL(p_Tk || softmax(map_k))                      after

with w_k = exp(-CE(T_k(x), y)), one weight per teacher per batch (weights="batch": the public
code, which takes the batch mean of the cross-entropy) or per sample (weights="sample": the
paper's formula read per sample), or 1 (weights="none"). Under torchrun a per-batch weight is
the mean over each rank's shard (one process and N processes then differ slightly; per-sample
weights give the same step). The KL term is one call of the fused
multi_teacher_loss on the (B, K, C) map, kind "kl", temperature 1, averaged over samples
(KLDivLoss(reduction="batchmean") in the public code).

The head (K·C → C) in the last phase: in the public code it gets no gradient once only the
distillation term remains, so it stays as it was while the map under it keeps moving; on a few
epochs that cost robust accuracy. head="follow" (default) trains it there on the cross-entropy
of the detached map, so the backbone and the map still see the distillation term alone and the
head keeps reading them; head="frozen" is the public code's (not under torchrun, where
DistributedDataParallel needs a gradient for every trained parameter).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from robust_fast.attacks import pgd
from robust_fast.models import TeacherMapStudent, input_shape
from robust_fast.ops.multi_teacher_loss import multi_teacher_loss
from robust_fast.train import distributed as dist_util
from robust_fast.train.recipes import RECIPES, Recipe, _check_eps, _frozen

WEIGHTS = ("batch", "sample", "none")
HEADS = ("follow", "frozen")
PHASES = ("ce", "ce+kd", "kd")
# the method's schedule: KD from epoch 50, CE until epoch 118, of 350
METHOD_SCHEDULE = (50 / 350, 118 / 350)


def _fraction(name: str, value) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)) or not 0 <= value <= 1:
        raise ValueError(f"DARHT: {name} must be a number in [0, 1], got {value!r}")
    return Fraction(value).limit_denominator(1_000_000)


def _num_classes(model: nn.Module) -> Optional[int]:
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    classifier = getattr(model, "classifier", None)
    return int(classifier.out_features) if isinstance(classifier, nn.Linear) else None


class _MapAndHead(nn.Module):
    """The student's training pass: (map (B, K, C), head logits), the head reading the map, or
    the detached map (so the head's cross-entropy trains the head alone)."""

    def __init__(self, model: TeacherMapStudent):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, detach_head: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        features = m.backbone.features(x)
        teacher_map = m.teacher_map(features).view(features.shape[0], m.num_teachers, m.num_classes)
        head_input = teacher_map.detach() if detach_head else teacher_map
        return teacher_map, m.classifier(head_input.flatten(1))


class DARHT(Recipe):
    """DARHT: distilling adversarial robustness from heterogeneous teachers (see the module's
    docstring). teachers: K frozen models (any architecture) taking the student's input shape
    and giving its number of classes; the student is a TeacherMapStudent with num_teachers=K.

    schedule: (kd_from, ce_until) as fractions of the run (default the method's 50/350 and
    118/350); the phase of a batch is that of its position step / (epochs · steps_per_epoch),
    so with 350 epochs the phases change at epochs 50 and 118 exactly.
    """
    name = "darht"

    def __init__(self, teachers: Sequence[nn.Module], eps: float = 0.1, attack_steps: int = 10,
                 attack_step_size: Optional[float] = None, adversarial_fraction: float = 0.5,
                 weights: str = "batch", head: str = "follow",
                 schedule: Tuple[float, float] = METHOD_SCHEDULE,
                 teacher_paths: Optional[Sequence[Optional[str]]] = None):
        if isinstance(teachers, nn.Module) or not isinstance(teachers, (list, tuple)) or not teachers:
            raise TypeError(f"DARHT: teachers must be a non-empty list of models, got {type(teachers).__name__}")
        self.teachers = [_frozen(t, f"DARHT (teachers[{k}])") for k, t in enumerate(teachers)]
        self._check_teachers_agree()
        self.eps = _check_eps("DARHT", eps)
        if isinstance(attack_steps, bool) or not isinstance(attack_steps, int) or attack_steps < 1:
            raise ValueError(f"DARHT: attack_steps must be an int >= 1, got {attack_steps!r}")
        self.attack_steps = attack_steps
        self.attack_step_size = float(attack_step_size) if attack_step_size is not None else self.eps / 10
        self.adversarial_fraction = float(_fraction("adversarial_fraction", adversarial_fraction))
        if weights not in WEIGHTS:
            raise ValueError(f"DARHT: weights must be one of {WEIGHTS}, got {weights!r}")
        if head not in HEADS:
            raise ValueError(f"DARHT: head must be one of {HEADS}, got {head!r}")
        self.weights, self.head = weights, head
        if not (isinstance(schedule, (tuple, list)) and len(schedule) == 2):
            raise ValueError(f"DARHT: schedule must be a pair (kd_from, ce_until), got {schedule!r}")
        self.kd_from, self.ce_until = _fraction("schedule[0]", schedule[0]), _fraction("schedule[1]", schedule[1])
        if self.kd_from > self.ce_until:
            raise ValueError(f"DARHT: schedule's kd_from ({schedule[0]}) must not come after ce_until ({schedule[1]})")
        paths = list(teacher_paths) if teacher_paths is not None else [None] * len(self.teachers)
        if len(paths) != len(self.teachers):
            raise ValueError(f"DARHT: teacher_paths has {len(paths)} entries for {len(self.teachers)} teachers")
        self.teacher_paths = paths
        self._phase = PHASES[0]

    @property
    def num_teachers(self) -> int:
        return len(self.teachers)

    def _check_teachers_agree(self) -> None:
        classes = [_num_classes(t) for t in self.teachers]
        shapes = [input_shape(t) if hasattr(t, "in_channels") and hasattr(t, "input_size") else None
                  for t in self.teachers]
        for k in range(1, len(self.teachers)):
            if None not in (classes[0], classes[k]) and classes[k] != classes[0]:
                raise ValueError(f"DARHT: teachers[{k}] has {classes[k]} classes, teachers[0] {classes[0]}: "
                                 f"every teacher must predict the same classes")
            if None not in (shapes[0], shapes[k]) and shapes[k] != shapes[0]:
                raise ValueError(f"DARHT: teachers[{k}] takes inputs of shape {shapes[k]}, teachers[0] "
                                 f"{shapes[0]}: every teacher must take the same images")

    def settings(self):
        return {"eps": self.eps, "attack_steps": self.attack_steps, "attack_step_size": self.attack_step_size,
                "adversarial_fraction": self.adversarial_fraction, "weights": self.weights, "head": self.head,
                "schedule": [float(self.kd_from), float(self.ce_until)], "teachers": self.teacher_paths}

    def check_student(self, model: nn.Module) -> None:
        """A clear error when the student cannot learn from these teachers."""
        if not isinstance(model, TeacherMapStudent):
            raise TypeError(f"DARHT: the student must be a robust_fast.models.TeacherMapStudent (the model with "
                            f"the student-teacher map), got {type(model).__name__}")
        if model.num_teachers != self.num_teachers:
            raise ValueError(f"DARHT: the student's map has {model.num_teachers} slices for "
                             f"{self.num_teachers} teachers (TeacherMapStudent(num_teachers={self.num_teachers}))")
        shape, classes = input_shape(model), model.num_classes
        probe = torch.zeros((2,) + shape, device=next(model.parameters()).device)
        for k, teacher in enumerate(self.teachers):
            have = _num_classes(teacher)
            if have is not None and have != classes:
                raise ValueError(f"DARHT: teachers[{k}] has {have} classes, the student {classes}")
            if hasattr(teacher, "in_channels") and hasattr(teacher, "input_size") and input_shape(teacher) != shape:
                raise ValueError(f"DARHT: teachers[{k}] takes inputs of shape {input_shape(teacher)}, "
                                 f"the student {shape}")
            try:
                with torch.no_grad():
                    out = self._teacher_on(k, probe.device)(probe)
            except RuntimeError as error:
                raise ValueError(f"DARHT: teachers[{k}] cannot take the student's inputs of shape {shape}: "
                                 f"{error}") from None
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"DARHT: teachers[{k}] gives {got} for 2 images, the student (2, {classes}): "
                                 f"the teachers must give logits of the student's classes")

    def trainable(self, model):
        self.check_student(model)
        if self.head == "frozen" and dist_util.is_distributed():
            raise ValueError("DARHT: head='frozen' leaves the head without a gradient in the last phase, which "
                             "DistributedDataParallel does not allow: use head='follow' under torchrun")
        return _MapAndHead(model)

    def _teacher_on(self, k: int, device: torch.device) -> nn.Module:
        teacher = self.teachers[k]
        first = next(teacher.parameters(), None)
        if first is not None and first.device != device:
            teacher.to(device)
        return teacher

    def phase(self, step: int, steps_per_epoch: int, epochs: int) -> str:
        """ce, ce+kd or kd: the phase of batch `step` (0-based) of epochs · steps_per_epoch."""
        position = Fraction(step, max(epochs * steps_per_epoch, 1))
        if position < self.kd_from:
            return "ce"
        return "ce+kd" if position < self.ce_until else "kd"

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, C): every teacher on x, in eval mode, without gradient."""
        with torch.no_grad():
            return torch.stack([self._teacher_on(k, x.device)(x) for k in range(self.num_teachers)])

    def teacher_weights(self, teacher_logits: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        """w = exp(-CE(T_k(x), y)): (K,) per batch, (B, K) per sample, None (all 1)."""
        if self.weights == "none":
            return None
        count, batch, classes = teacher_logits.shape
        with torch.no_grad():
            ce = F.cross_entropy(teacher_logits.reshape(count * batch, classes).float(), y.repeat(count),
                                 reduction="none").view(count, batch)
            if self.weights == "batch":
                return torch.exp(-ce.mean(1))
            return torch.exp(-ce).t().contiguous()

    def distillation(self, teacher_map: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
                     backend: Optional[str] = None) -> torch.Tensor:
        """mean_b sum_k w_k KL(p_Tk || softmax(map_k)): the fused op on the (B, K, C) map."""
        return multi_teacher_loss(teacher_map, teacher_logits, weights=self.teacher_weights(teacher_logits, y),
                                  kind="kl", temperature=1.0, backend=backend)

    def inputs(self, batch) -> torch.Tensor:
        """The batch, or with probability adversarial_fraction its PGD examples against the student."""
        x = batch.x
        if self.adversarial_fraction <= 0:
            return x
        draw = torch.rand((), generator=batch.generator, device=batch.generator.device)
        if float(draw) >= self.adversarial_fraction:
            return x
        return pgd(batch.model, x, batch.y, eps=self.eps, alpha=self.attack_step_size, steps=self.attack_steps,
                   random_start=False, generator=batch.generator, backend=batch.backend)

    def batch_loss(self, batch):
        phase = self._phase = self.phase(batch.step, batch.steps_per_epoch, batch.epochs)
        x = self.inputs(batch)
        last = phase == "kd"
        # in the last phase the head reads the detached map: trained alone (follow) or not at all (frozen)
        teacher_map, head_logits = batch.net(x, detach_head=last)
        loss = F.cross_entropy(head_logits, batch.y) if phase != "kd" or self.head == "follow" else None
        if phase != "ce":
            kd = self.distillation(teacher_map, self.teacher_logits(x), batch.y, batch.backend)
            loss = kd if loss is None else loss + kd
        shown = batch.model.logits_from_map(teacher_map.detach()) if batch.model.prediction != "head" else head_logits
        return loss, shown.detach()

    def epoch_record(self):
        return {"phase": self._phase}


RECIPES[DARHT.name] = DARHT  # registered here: recipes.py cannot import this module (it imports recipes)

__all__ = ["DARHT", "HEADS", "METHOD_SCHEDULE", "PHASES", "WEIGHTS"]
