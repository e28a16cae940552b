"""Data parallelism: 2 gloo processes on one global batch give the parameters 1 process gives."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robust_fast.models import build_model
from robust_fast.train import RRM, LwF, Standard, TrainConfig, TransferHead, fit, transfer_model

SIZE = 12


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = (0.2 + 0.3 * labels.view(-1, 1, 1, 1) + 0.1 * torch.randn(n, 1, SIZE, SIZE, generator=g)).clamp(0, 1)
    return images, labels


def _student():
    torch.manual_seed(0)
    return build_model("resnet_small", input_size=SIZE, num_classes=3, width=4, feature_dim=16)


def _recipe(name):
    if name == "standard":
        return Standard()
    if name == "transfer_head":
        return TransferHead()
    if name == "transfer_lwf":
        return LwF(_student(), lambda_feat=1.0)
    torch.manual_seed(1)
    teacher = build_model("wide_cnn", input_size=SIZE, num_classes=3, width=4, feature_dim=24)
    return RRM(teacher, lambda_ce=0.1)


def _config(epochs=1):
    return TrainConfig(epochs=epochs, batch_size=32, optimizer="sgd", lr=0.5, momentum=0.9, weight_decay=0.0,
                       schedule="constant", progress=False, eval_samples=0)


def _train(name, max_steps, out_dir=None):
    model = transfer_model(_student(), num_classes=3, seed=2) if name.startswith("transfer") else _student()
    fit(_recipe(name), model, _data(), _config(), max_steps=max_steps, out_dir=out_dir)
    return model


def _worker(rank, world, port, name, max_steps, result_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _train(name, max_steps, out_dir)
        if rank == 0:
            torch.save(model.state_dict(), result_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(name, max_steps, tmp_path, out_dir=None):
    path = str(tmp_path / f"{name}.pt")
    mp.spawn(_worker, args=(2, _free_port(), name, max_steps, path, out_dir), nprocs=2, join=True)
    return torch.load(path, weights_only=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("name", ["standard", "rrm", "transfer_head", "transfer_lwf"])
def test_two_processes_take_the_step_one_process_takes(tmp_path, name):
    single = _train(name, max_steps=1).state_dict()
    untrained = (transfer_model(_student(), num_classes=3, seed=2) if name.startswith("transfer")
                 else _student()).state_dict()
    double = _two_processes(name, 1, tmp_path)
    for key, value in single.items():
        torch.testing.assert_close(double[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # the step moved the weights by far more than the tolerance
    assert max(float((single[k] - untrained[k]).abs().max()) for k in single) > 1e-2


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_only_rank_zero_writes(tmp_path):
    out = tmp_path / "run"
    _two_processes("standard", None, tmp_path, out_dir=str(out))
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1  # one epoch, one record: not one per rank
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl"]
