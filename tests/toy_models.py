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


def write_checkpoint(path, model, recipe: str = "standard") -> str:
    """A complete checkpoint of `model` as fit would write it after no training (every key the
    loader requires), for tests that need a teacher or source file without training one."""
    from robust_fast.train.checkpoint import save_checkpoint
    from robust_fast.train.config import TrainConfig
    save_checkpoint(str(path), {"recipe": recipe, "recipe_settings": {}, "config": TrainConfig().to_dict(),
                                "model_spec": model.spec, "model_state": model.state_dict(),
                                "trainable_state": model.state_dict(), "optimizer_state": {}, "scheduler_state": {},
                                "epoch": 0, "rng": {}, "history": [], "train_time_s": 0.0})
    return str(path)
