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
import pickle
import tempfile
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from robust_fast.models import build_model, model_classes

FORMAT = "robust_fast.train/1"
PathLike = Union[str, "os.PathLike[str]"]
# What every checkpoint fit writes holds; a file without one of them is not complete.
REQUIRED_KEYS = ("recipe", "recipe_settings", "config", "model_state", "trainable_state", "optimizer_state",
                 "scheduler_state", "epoch", "rng", "history", "train_time_s")


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> None:
    """Writes state to path through a temporary file of a unique name in the same folder,
    flushed to disk before it is renamed over path: a crash leaves the old file or the new one,
    never half a file, and two writers never share a temporary."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_folder(folder)  # the rename itself reaches the disk


def _fsync_folder(folder: str) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _not_a_checkpoint(path: str, why: str) -> ValueError:
    return ValueError(f"{path} is not a complete robust_fast checkpoint ({why}): it may be truncated by a "
                      f"crash or full disk, or be another program's file; use the checkpoint.pt that "
                      f"robust-fast train / robust_fast.train.fit wrote")


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """The checkpoint at path; a ValueError naming the file when it is empty, truncated, not a
    torch file or not one that robust_fast.train wrote."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise _not_a_checkpoint(path, "the file is empty")
    try:
        # weights_only: tensors, dicts, lists and numbers only (RNG states are uint8 tensors).
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            UnicodeDecodeError, KeyError, IndexError, AttributeError, TypeError) as error:
        raise _not_a_checkpoint(path, f"torch.load failed: {type(error).__name__}: "
                                      f"{str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _not_a_checkpoint(path, f"no format {FORMAT!r} in it")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise _not_a_checkpoint(path, f"missing {', '.join(missing)}")
    return state


# TrainConfig fields a resumed run may change: they shape only the per-epoch record. epochs may
# grow (the run goes on); every other field decides the trained parameters and must match.
RECORD_ONLY_FIELDS = ("eval_samples", "eval_steps", "eval_eps", "progress", "backend")


def _comparable(value):
    if isinstance(value, (tuple, list)):
        return [_comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    return value


def resume_changes(state: Dict[str, Any], path: str, recipe_name: str, recipe_settings: Dict[str, Any],
                   config: Dict[str, Any], model_spec: Optional[Dict[str, Any]]) -> List[str]:
    """What a resumed run changes against the checkpoint it continues, as lines to show; a
    ValueError naming every change that would make it another run (the recipe or its settings,
    the model, the optimiser, the learning rate and its schedule, fewer epochs, ...)."""
    refused: List[str] = []
    if state["recipe"] != recipe_name:
        raise ValueError(f"fit: resume={path} holds a {state['recipe']!r} run, not {recipe_name!r}")
    saved_optimizer, optimizer = state["config"].get("optimizer"), config.get("optimizer")
    if saved_optimizer != optimizer:
        raise ValueError(f"fit: resume={path} was trained with optimizer {saved_optimizer!r}, this run asks for "
                         f"{optimizer!r}: an optimiser's state does not carry over to another type; resume with "
                         f"optimizer={saved_optimizer!r}, or start a new run from the checkpoint's model")
    saved_spec = state.get("model_spec")
    if saved_spec and model_spec and _comparable(saved_spec) != _comparable(model_spec):
        refused.append(f"model: checkpoint {saved_spec}, this run {model_spec}")
    saved_settings = _comparable(state["recipe_settings"])
    for key in sorted(set(saved_settings) | set(recipe_settings)):
        old, new = saved_settings.get(key), _comparable(recipe_settings.get(key))
        if old != new:
            refused.append(f"recipe setting {key}: checkpoint {old!r}, this run {new!r}")
    allowed: List[str] = []
    saved_config = _comparable(state["config"])
    for key in sorted(set(saved_config) | set(config)):
        old, new = saved_config.get(key), _comparable(config.get(key))
        if old == new:
            continue
        change = f"{key}: checkpoint {old!r}, this run {new!r}"
        if key in RECORD_ONLY_FIELDS:
            allowed.append(change)
        elif key == "epochs" and isinstance(old, int) and isinstance(new, int) and new > old:
            allowed.append(change + f" (the schedule now spans {new} epochs)")
        else:
            refused.append(change)
    if refused:
        raise ValueError(f"fit: resume={path} continues another run; changed: " + "; ".join(refused)
                         + ". Resume with the checkpoint's settings (only more epochs and the evaluation "
                           "settings may change), or start a new run")
    return allowed


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
