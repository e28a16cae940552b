"""Checkpoints under bad input and crashes: a truncated or foreign file gets one clear message
naming it; resume refuses a changed run and says what changed; the checkpoint is written (to a
unique temporary, flushed to disk) before the epoch's log line, so a crash never repeats an epoch."""
import json
import os
import sys

import pytest
import torch

from robust_fast.models import build_model
from robust_fast.train import PGDAT, Standard, fit, load_checkpoint, loop
from robust_fast.train.checkpoint import save_checkpoint

from test_train import config, toy_data
from toy_models import SIZE, student


def trained(tmp_path, **overrides):
    """A one-epoch run of three with its checkpoint; returns the checkpoint's path."""
    fit(Standard(), student(), toy_data(64), config(**overrides), out_dir=tmp_path, until_epoch=1)
    return str(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("content", ["empty", "half", "random", "foreign_torch", "missing_keys"])
def test_a_broken_file_is_named_as_not_a_complete_checkpoint(tmp_path, content):
    good = trained(tmp_path / "run")
    path = tmp_path / "broken.pt"
    whole = open(good, "rb").read()
    if content == "empty":
        path.write_bytes(b"")
    elif content == "half":
        path.write_bytes(whole[:len(whole) // 2])
    elif content == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif content == "foreign_torch":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        state = load_checkpoint(good)
        del state["optimizer_state"]
        torch.save(state, path)
    with pytest.raises(ValueError, match="is not a complete robust_fast checkpoint") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)
    with pytest.raises(ValueError, match="is not a complete robust_fast checkpoint"):
        fit(Standard(), student(), toy_data(64), config(), resume=str(path))


def test_resume_refuses_a_changed_run_and_says_what_changed(tmp_path):
    path = trained(tmp_path)
    data = toy_data(64)
    for overrides, words in ((dict(lr=0.5), "lr: checkpoint 0.01, this run 0.5"),
                             (dict(schedule="constant"), "schedule: checkpoint 'cosine'"),
                             (dict(epochs=2), "epochs: checkpoint 3, this run 2"),
                             (dict(batch_size=16), "batch_size"),
                             (dict(seed=4), "seed")):
        with pytest.raises(ValueError, match=words):
            fit(Standard(), student(), data, config(**overrides), resume=path)
    with pytest.raises(ValueError, match="holds a 'standard' run, not 'pgd_at'"):
        fit(PGDAT(eps=0.05, steps=2), student(), data, config(), resume=path)
    with pytest.raises(ValueError, match="trained with optimizer 'adam', this run asks for 'sgd'"):
        fit(Standard(), student(), data, config(optimizer="sgd"), resume=path)
    with pytest.raises(ValueError, match="holds another model's parameters"):
        fit(Standard(), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)), data, config(),
            resume=path)
    # More epochs and other evaluation settings: allowed, and said.
    with pytest.warns(UserWarning, match=r"epochs: checkpoint 3, this run 5.*|eval_samples"):
        result = fit(Standard(), student(), data, config(epochs=5, eval_samples=8), eval_data=data,
                     out_dir=tmp_path, resume=path)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_changed_recipe_setting_or_model(tmp_path):
    data = toy_data(64)
    fit(PGDAT(eps=0.05, steps=2), student(), data, config(), out_dir=tmp_path, until_epoch=1)
    path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="recipe setting eps: checkpoint 0.05, this run 0.1"):
        fit(PGDAT(eps=0.1, steps=2), student(), data, config(), resume=path)
    wider = build_model("resnet_small", input_size=SIZE, num_classes=2, width=8, feature_dim=16)
    with pytest.raises(ValueError, match="model: checkpoint .*'width': 4.*this run .*'width': 8"):
        fit(PGDAT(eps=0.05, steps=2), wider, data, config(), resume=path)


@pytest.mark.parametrize("crash_in", ["checkpoint", "log"])
def test_a_crash_between_checkpoint_and_log_never_repeats_an_epoch(tmp_path, monkeypatch, crash_in):
    data = toy_data(64)
    calls = {"n": 0}
    real = loop.save_checkpoint if crash_in == "checkpoint" else loop._append_log

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's write
            raise KeyboardInterrupt("the machine went down")
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, "save_checkpoint" if crash_in == "checkpoint" else "_append_log", crashing)
    with pytest.raises(KeyboardInterrupt):
        fit(Standard(), student(), data, config(), out_dir=tmp_path)
    monkeypatch.undo()
    fit(Standard(), student(), data, config(), out_dir=tmp_path, resume=str(tmp_path / "checkpoint.pt"))
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "log.jsonl")]
    assert epochs == [1, 2, 3]


def test_the_temporary_is_unique_and_flushed_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    os.makedirs(str(path) + ".tmp")  # what a fixed temporary name would collide with
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(a))),
                                                     real_replace(a, b))[1])
    save_checkpoint(path, {"epoch": 1})
    save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert events[0] == "fsync" and events[1][0] == "replace"
    names = [e[1] for e in events if isinstance(e, tuple)]
    assert len(set(names)) == 2 and all(n.startswith("checkpoint.pt.") for n in names)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.pt.tmp"]  # no temporary left behind


def test_the_loop_reads_its_running_sums_once_an_epoch(monkeypatch):
    """Loss and accuracy sums stay on the device during an epoch (a float() or .item() of a
    device tensor is a host sync per step on a GPU): with the bar off, they are read at the
    epoch's end only, and the record equals the per-batch sums."""
    reads = []

    def counting(real):
        def read(t):
            if sys._getframe(1).f_code.co_filename.endswith(os.path.join("train", "loop.py")):
                reads.append(real.__name__)  # a read by the loop itself (Adam reads its step count too)
            return real(t)
        return read
    for name in ("__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    data = toy_data(128)
    result = fit(Standard(), student(), data, config(epochs=1, batch_size=16))
    monkeypatch.undo()
    assert len(reads) <= 3, reads  # 8 steps: 16 reads before
    assert 0.0 < result.history[0]["loss"] < 10 and 0.0 <= result.history[0]["train_acc"] <= 1.0
