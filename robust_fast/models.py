"""Models used by the recipes, the demo and the benchmarks."""
from __future__ import annotations

from torch import nn


def _conv_out(size: int, kernel: int = 4, stride: int = 2, padding: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


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
    `for layer in model` and meet only Conv2d, ReLU, Flatten and Linear.

    input_size: height = width of the input (28 for (Fashion-)MNIST, 32 for CIFAR-10).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("input_size", input_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SmallCNN: {name} must be a positive int, got {value!r}")
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
