"""Checkpoints: one file holding everything a run needs to continue or be evaluated.

Keys: format, recipe, recipe_settings, config (TrainConfig as a dict), model_spec (the
registered model name and its arguments, when the model came from models.build_model),
model_state (the bare model), trainable_state (the model with the recipe's extra parts),
optimizer_state, scheduler_state, epoch (epochs completed), rng (the global torch state and
each rank's generator state), history (the per-epoch records), train_time_s.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from robust_fast.models import build_model

FORMAT = "robust_fast.train/1"
PathLike = Union[str, "os.PathLike[str]"]


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> None:
    """Writes state to path through a temporary file, so a crash never leaves half a file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    torch.save({"format": FORMAT, **state}, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # weights_only: tensors, dicts, lists and numbers only (RNG states are uint8 tensors).
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a robust_fast training checkpoint (format {FORMAT})")
    return state


def model_from_checkpoint(checkpoint: Union[PathLike, Dict[str, Any]],
                          map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """The trained model, rebuilt from the stored model_spec, in eval mode."""
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location)
    spec: Optional[Dict[str, Any]] = state.get("model_spec")
    if not spec:
        raise ValueError("the checkpoint has no model_spec (its model was not made by "
                         "robust_fast.models.build_model): build the model and load model_state")
    model = build_model(spec["name"], **spec["kwargs"])
    model.load_state_dict(state["model_state"])
    return model.to(map_location).eval()
