"""Models for 28x28 inputs used by the recipes, the demo and the benchmarks.

Every model here exposes its penultimate features the same way:

    model(x)                          logits (B, num_classes)
    model.features(x)                 penultimate features (B, model.feature_dim)
    model.classifier                  the last Linear: logits = classifier(features)
    model(x, return_features=True)    (features, logits) from one forward pass

so a feature-matching loss (RRM) can take a student and a teacher of different families, and
losses.FeatureExtractor(model) works on a model called with return_features=True (see
WithFeatures). Inputs are images in [0, 1]: the models that normalise do it in their first
layer, so attacks clip to [0, 1] whatever the model. None has batch norm or dropout, so the
same function runs in train and eval mode and data-parallel ranks need no statistics synced.

build_model(name, **kwargs) makes one from its registered name (checkpoints store the name).
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

# Fashion-MNIST's pixel mean and standard deviation (training split).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def _conv_out(size: int, kernel: int = 4, stride: int = 2, padding: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_sizes(caller: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{caller}: {name} must be a positive int, got {value!r}")


class Normalize(nn.Module):
    """(x - mean) / std per channel: the model takes images in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"Normalize: mean and std need one value per channel and std > 0, "
                             f"got mean={tuple(mean)}, std={tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class SmallCNN(nn.Sequential):
    """The "small" CNN of the certified-robustness literature.

    Conv(in, 16, 4, stride 2, pad 1) → ReLU → Conv(16, 32, 4, stride 2, pad 1) → ReLU → Flatten
    → Linear(32·(input_size/4)², 100) → ReLU → Linear(100, num_classes).

    Why this model: it is the network Wong & Kolter (2018, "Provable defenses via the convex outer
    adversarial polytope") certify on MNIST and Fashion-MNIST, and the "small" model of Gowal et
    al.'s IBP and Zhang et al.'s CROWN-IBP tables, so adversarial-training and certified numbers
    on it can be set next to published ones. It trains in minutes on a CPU, has no batch norm or
    dropout (the same function in train and eval mode; bounds are propagated through plain affine
    and ReLU layers), and is an nn.Sequential of plain layers, so IBP code can walk
    `for layer in model` and meet only Conv2d, ReLU, Flatten and Linear. For that reason it has
    no normalisation layer: it takes the [0, 1] images as they are.

    input_size: height = width of the input (28 for (Fashion-)MNIST, 32 for CIFAR-10).
    """

    feature_dim = 100

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        _check_sizes("SmallCNN", in_channels=in_channels, num_classes=num_classes, input_size=input_size)
        if input_size < 4:
            raise ValueError(f"SmallCNN: input_size must be >= 4 (two stride-2 convolutions), got {input_size}")
        side = _conv_out(_conv_out(input_size))  # input_size // 4 when divisible by 4
        super().__init__(
            nn.Conv2d(in_channels, 16, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * side * side, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )
        self.in_channels, self.num_classes, self.input_size = in_channels, num_classes, input_size

    def __getitem__(self, index):
        if isinstance(index, slice):  # nn.Sequential would rebuild a SmallCNN from the slice
            return nn.Sequential(*list(self._modules.values())[index])
        return super().__getitem__(index)

    @property
    def features(self) -> nn.Sequential:
        """Everything but the last Linear (sharing its modules): the 100-wide penultimate features."""
        return self[:-1]

    @property
    def classifier(self) -> nn.Linear:
        return self[-1]

    # forward(x) runs the layers in order, as nn.Sequential's does: interval bound propagation
    # (robust_fast.certify) walks them.
    forward_is_sequential = True

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = x
        for layer in list(self)[:-1]:
            features = layer(features)
        logits = self[-1](features)
        return (features, logits) if return_features else logits


class _FeaturesThenClassifier(nn.Module):
    """Normalize → two stride-2 convolutions (w, then 2w channels) → `middle` (layers at a
    quarter of the resolution, 2w channels) → Flatten → Linear → ReLU (the penultimate
    features) → one Linear: the shape WideCNN and ResNetSmall share."""

    def __init__(self, name: str, in_channels: int, num_classes: int, width: int, feature_dim: int,
                 input_size: int, mean: Sequence[float], std: Sequence[float],
                 middle: Callable[[int], List[nn.Module]] = lambda channels: []):
        super().__init__()
        _check_sizes(name, in_channels=in_channels, num_classes=num_classes, width=width,
                     feature_dim=feature_dim, input_size=input_size)
        if input_size < 4:
            raise ValueError(f"{name}: input_size must be >= 4 (two stride-2 convolutions), got {input_size}")
        side = _conv_out(_conv_out(input_size))
        self.normalize = Normalize(_per_channel(mean, in_channels), _per_channel(std, in_channels))
        # (modules are made in the order of the layers: the same seed gives the same weights)
        stem = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU()]
        stem += middle(2 * width)
        self.body = nn.Sequential(*stem, nn.Flatten(),
                                  nn.Linear(2 * width * side * side, feature_dim), nn.ReLU())
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.in_channels, self.num_classes, self.input_size = in_channels, num_classes, input_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.features(x)
        logits = self.classifier(features)
        return (features, logits) if return_features else logits


class WideCNN(_FeaturesThenClassifier):
    """A wider CNN for teachers (about 0.87 M parameters at width=32, 4x SmallCNN's compute):

    Normalize → Conv(in, w, 4, stride 2, pad 1) → ReLU → Conv(w, 2w, 4, stride 2, pad 1) → ReLU
    → Flatten → Linear(2w·(input_size/4)², 256) → ReLU (the features, 256 wide) → Linear(256, classes).

    Stride-2 convolutions as in SmallCNN (not 3x3 convolutions at full resolution, which cost
    ten times more on a CPU), twice the channels and a wider feature layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
                 feature_dim: int = 256, input_size: int = 28,
                 mean: Sequence[float] = FASHION_MNIST_MEAN, std: Sequence[float] = FASHION_MNIST_STD):
        super().__init__("WideCNN", in_channels, num_classes, width, feature_dim, input_size, mean, std)


class _ResidualBlock(nn.Module):
    """ReLU(x + Conv3x3(ReLU(Conv3x3(x)))). No batch norm: the residual branch's last
    convolution starts at zero, so the block starts as the identity and trains without
    normalisation layers."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class ResNetSmall(_FeaturesThenClassifier):
    """A small residual CNN, another family than the plain CNNs (a student for transfer):

    Normalize → Conv(in, w, 4, stride 2, pad 1) → ReLU → Conv(w, 2w, 4, stride 2, pad 1) → ReLU
    → residual block (two 3x3 convolutions, 2w channels, at input_size/4) → Flatten
    → Linear(2w·(input_size/4)², feature_dim) → ReLU (the features) → Linear(feature_dim, classes).

    The residual block works at a quarter of the resolution, where 3x3 convolutions are cheap:
    about 2.5x SmallCNN's compute at width=16.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, feature_dim: int = 128,
                 input_size: int = 28,
                 mean: Sequence[float] = FASHION_MNIST_MEAN, std: Sequence[float] = FASHION_MNIST_STD):
        super().__init__("ResNetSmall", in_channels, num_classes, width, feature_dim, input_size, mean, std,
                         middle=lambda channels: [_ResidualBlock(channels)])


def _per_channel(values: Sequence[float], channels: int) -> Tuple[float, ...]:
    values = tuple(float(v) for v in values)
    return values * channels if len(values) == 1 else values


class WithFeatures(nn.Module):
    """model(x) → (features, logits), as losses.FeatureExtractor(layer=None) expects; with a
    projection, the features are mapped first (a student matched to a wider teacher). With a
    head, the logits are head(features) (the mapped ones) instead of the model's own."""

    def __init__(self, model: nn.Module, projection: nn.Module = None, head: nn.Module = None):
        super().__init__()
        self.model = model
        self.projection = projection
        self.head = head

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.model(x, return_features=True)
        if self.projection is not None:
            features = self.projection(features)
        if self.head is not None:
            logits = self.head(features)
        return features, logits


PREDICTIONS = ("head", "mean")


class TeacherMapStudent(nn.Module):
    """A student with DARHT's student-teacher map (Deng et al. 2024), around any model here:

        backbone.features(x) (feature_dim) → Linear → the map (K·C; slice k, map[:, k], imitates
        teacher k's logits) → Linear → the student's C logits.

    The backbone's own classifier is not on the path: it stays in the module, frozen
    (requires_grad off on the backbone given). The map is
    returned by forward(x, return_map=True) as (B, K, C) (a view of the (B, K·C) output), so
    slice k is map[:, k, :], which multi_teacher_loss compares with teacher k's row.

    prediction: what model(x) returns as logits. "head" (the method's, and its public code's):
    the last Linear, K·C → C. "mean": the mean of the map's slices (no head): when training ends
    with the distillation term alone the head gets no gradient, and the slices are what keeps
    learning. The head is trained either way while cross-entropy is on; the choice can change
    after training (set .prediction).

    backbone: a model with features(x), feature_dim and num_classes (SmallCNN, WideCNN,
    ResNetSmall), or a model spec {"name": ..., "kwargs": {...}} to build it (build_model
    stores the spec, so checkpoints rebuild the whole student).
    """

    def __init__(self, backbone, num_teachers: int, prediction: str = "head"):
        super().__init__()
        if isinstance(backbone, dict):
            if set(backbone) != {"name", "kwargs"}:
                raise ValueError(f"TeacherMapStudent: backbone as a spec must be {{'name': ..., 'kwargs': {{...}}}}, "
                                 f"got keys {sorted(backbone)}")
            backbone = build_model(backbone["name"], **backbone["kwargs"])
        if not isinstance(backbone, nn.Module) or not hasattr(backbone, "features") \
                or not hasattr(backbone, "feature_dim"):
            raise TypeError(f"TeacherMapStudent: backbone must be a model with features(x) and feature_dim "
                            f"(robust_fast.models), got {type(backbone).__name__}")
        if isinstance(backbone, TeacherMapStudent):
            raise TypeError("TeacherMapStudent: backbone is already a TeacherMapStudent")
        _check_sizes("TeacherMapStudent", num_teachers=num_teachers)
        if prediction not in PREDICTIONS:
            raise ValueError(f"TeacherMapStudent: prediction must be one of {PREDICTIONS}, got {prediction!r}")
        classes = backbone.num_classes if hasattr(backbone, "num_classes") else backbone.classifier.out_features
        self.backbone, self.num_teachers, self.num_classes = backbone, num_teachers, classes
        self.in_channels, self.input_size = backbone.in_channels, backbone.input_size
        self.feature_dim = backbone.feature_dim
        # the backbone's own classifier is not on the path: frozen, so no optimiser or
        # DistributedDataParallel waits for its gradient
        backbone.classifier.requires_grad_(False)
        self.prediction = prediction
        self.teacher_map = nn.Linear(backbone.feature_dim, num_teachers * classes)
        self.classifier = nn.Linear(num_teachers * classes, classes)
        if getattr(backbone, "spec", None):  # a checkpoint can rebuild it (build_model overwrites it alike)
            self.spec = {"name": "teacher_map", "kwargs": {"backbone": backbone.spec, "num_teachers": num_teachers,
                                                           "prediction": prediction}}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(x)

    def logits_from_map(self, teacher_map: torch.Tensor) -> torch.Tensor:
        """The logits `prediction` reads off a (B, K, C) map."""
        if self.prediction == "mean":
            return teacher_map.mean(1)
        return self.classifier(teacher_map.flatten(1))

    def forward(self, x: torch.Tensor, return_features: bool = False, return_map: bool = False):
        """logits; with return_map (map (B, K, C), logits); with return_features (features,
        logits); both: (features, map, logits). One pass."""
        features = self.backbone.features(x)
        teacher_map = self.teacher_map(features).view(features.shape[0], self.num_teachers, self.num_classes)
        logits = self.logits_from_map(teacher_map)
        if return_features and return_map:
            return features, teacher_map, logits
        if return_map:
            return teacher_map, logits
        return (features, logits) if return_features else logits


MODELS: Dict[str, Type[nn.Module]] = {"small_cnn": SmallCNN, "wide_cnn": WideCNN, "resnet_small": ResNetSmall}
# models around one of MODELS (built by name too, so checkpoints rebuild them)
WRAPPERS: Dict[str, Type[nn.Module]] = {"teacher_map": TeacherMapStudent}


def input_shape(model: nn.Module) -> Tuple[int, int, int]:
    """(channels, height, width) of the images a model here takes."""
    if not all(hasattr(model, a) for a in ("in_channels", "input_size")):
        raise TypeError(f"input_shape: {type(model).__name__} does not say its input shape "
                        f"(in_channels, input_size: the models of robust_fast.models do)")
    return (model.in_channels, model.input_size, model.input_size)


def build_model(name: str, classes: Optional[Sequence[int]] = None, **kwargs) -> nn.Module:
    """A model by its registered name (see MODELS), with its constructor's keyword arguments.

    classes: the data set's classes the model's outputs stand for (output i is class
    classes[i]; robust_fast.data.class_subset relabels a task that way); num_classes defaults to
    their number. Checkpoints record them (model.spec["classes"]), so a model is never evaluated
    on, or resumed with, another set of classes by mistake. None: outputs 0..num_classes-1 are
    classes 0..num_classes-1.
    teacher_map (WRAPPERS) takes its backbone as a spec: build_model("teacher_map",
    backbone={"name": "resnet_small", "kwargs": {"width": 8}}, num_teachers=3).
    """
    if name not in MODELS and name not in WRAPPERS:
        raise ValueError(f"model must be one of {tuple(MODELS) + tuple(WRAPPERS)}, got {name!r}")
    if classes is not None:
        classes = [int(c) for c in classes]
        if kwargs.setdefault("num_classes", len(classes)) != len(classes):
            raise ValueError(f"build_model: num_classes={kwargs['num_classes']} but {len(classes)} classes "
                             f"{tuple(classes)} were named")
    model = (MODELS.get(name) or WRAPPERS[name])(**kwargs)
    model.spec = {"name": name, "kwargs": dict(kwargs)}  # checkpoints store it to rebuild the model
    if classes is not None:
        model.spec["classes"] = classes
    return model


def model_classes(model_or_spec) -> Tuple[int, ...]:
    """The classes a model's outputs stand for: its spec's "classes", else 0..num_classes-1
    (num_classes: the classifier's outputs, or the spec's, or its constructor's default)."""
    spec = model_or_spec if isinstance(model_or_spec, dict) else getattr(model_or_spec, "spec", None) or {}
    if spec.get("classes") is not None:
        return tuple(int(c) for c in spec["classes"])
    if isinstance(model_or_spec, nn.Module):
        return tuple(range(model_or_spec.classifier.out_features))
    count = spec.get("kwargs", {}).get("num_classes")
    if count is None:
        count = inspect.signature(MODELS[spec["name"]]).parameters["num_classes"].default
    return tuple(range(int(count)))


__all__ = ["FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "MODELS", "Normalize", "ResNetSmall", "SmallCNN",
           "TeacherMapStudent", "WRAPPERS", "WideCNN", "WithFeatures", "build_model", "input_shape", "model_classes"]
