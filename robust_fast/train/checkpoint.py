"""Checkpoints: one file holding everything a run needs to continue or be evaluated.

Keys: format, recipe, recipe_settings, config (TrainConfig as a dict), model_spec (the
registered model name and its arguments, when the model came from models.build_model),
model_state (the bare model; model_spec["classes"] the classes its outputs stand for, when
the model was built for a subset), trainable_state (the model with the recipe's extra parts),
optimizer_state, scheduler_state, epoch (epochs completed), rng (the global torch state and
each rank's generator state), history (the per-epoch records), train_time_s.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from robust_fast.models import build_model, model_classes

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


def checkpoint_classes(checkpoint: Union[PathLike, Dict[str, Any]]) -> Tuple[int, ...]:
    """The classes the checkpoint's model outputs stand for (output i is class classes[i])."""
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    spec = state.get("model_spec")
    if not spec:
        raise ValueError("the checkpoint has no model_spec, so its classes are unknown")
    return model_classes(spec)


def check_classes(checkpoint: Union[PathLike, Dict[str, Any]], classes: Sequence[int], what: str = "checkpoint") -> None:
    """A ValueError unless the checkpoint's head stands for exactly `classes`, in that order."""
    have, want = checkpoint_classes(checkpoint), tuple(int(c) for c in classes)
    if have != want:
        raise ValueError(f"the {what}'s head has {len(have)} outputs for classes {_show(have)}, but "
                         f"{len(want)} classes {_show(want)} were asked for: evaluate it on its own classes "
                         f"(--classes {','.join(map(str, have))}), or give it a new head (robust-fast train "
                         f"transfer --source CHECKPOINT)")


def _show(classes: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, classes)) + ")"


def model_from_checkpoint(checkpoint: Union[PathLike, Dict[str, Any]],
                          map_location: Union[str, torch.device] = "cpu",
                          classes: Optional[Sequence[int]] = None) -> nn.Module:
    """The trained model, rebuilt from the stored model_spec, in eval mode. classes: refuse a
    checkpoint whose head stands for other classes (a clear ValueError, not a wrong accuracy)."""
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location)
    spec: Optional[Dict[str, Any]] = state.get("model_spec")
    if not spec:
        raise ValueError("the checkpoint has no model_spec (its model was not made by "
                         "robust_fast.models.build_model): build the model and load model_state")
    if classes is not None:
        check_classes(state, classes)
    model = build_model(spec["name"], **spec["kwargs"])
    if spec.get("classes") is not None:
        model.spec["classes"] = list(spec["classes"])
    model.load_state_dict(state["model_state"])
    return model.to(map_location).eval()
