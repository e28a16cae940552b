"""Tiny models the training tests share: a two-class problem on SIZE x SIZE images, a student and
a teacher of different families, each from its own seed."""
import torch

from robust_fast.models import build_model

SIZE = 12


def student(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet_small", input_size=SIZE, num_classes=2, width=4, feature_dim=16)


def teacher(seed=1):
    torch.manual_seed(seed)
    return build_model("wide_cnn", input_size=SIZE, num_classes=2, width=4, feature_dim=24)
