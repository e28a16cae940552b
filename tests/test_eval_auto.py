"""robust-fast eval --attack auto: the version it reports, the per-batch generators (a hand loop), and
a 2-process gloo group that splits the batches and gathers every image's result on rank 0."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robust_fast import attacks, cli, data
from robust_fast.train import evaluate, model_from_checkpoint

pytestmark = pytest.mark.skipif(not data.available(), reason="Fashion-MNIST is not installed "
                                "(apt-get install dataset-fashion-mnist, or set ROBUST_FAST_DATA)")

IMAGES, BATCH, SEED = 6, 4, 2
AUTO = ["--attack", "auto", "--version", "standard", "--eps", "0.3", "--steps", "3", "--samples", str(IMAGES),
        "--batch-size", str(BATCH), "--seed", str(SEED)]
TIMES = ("time_s", "processes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "run"
    assert cli.main(["train", "standard", "--model", "small_cnn", "--limit", "512", "--epochs", "1",
                     "--eval-samples", "0", "--out", str(out), "--no-progress"]) == 0
    return str(out / "checkpoint.pt")


def test_evaluate_auto_is_a_loop_of_auto_attack_over_batches(checkpoint):
    model = model_from_checkpoint(checkpoint)
    images, labels = data.load_fashion_mnist("test", limit=IMAGES)
    numbers = evaluate(model, images, labels, eps=0.3, steps=3, attack="auto", auto_version="standard",
                       auto_attacks=("apgd-ce", "fab-t"), batch_size=BATCH, seed=SEED)
    fooled_by = []
    for b, i in enumerate(range(0, IMAGES, BATCH)):
        result = attacks.auto_attack(model, images[i:i + BATCH], labels[i:i + BATCH], eps=0.3, version="standard",
                                     steps=3, attacks=("apgd-ce", "fab-t"),
                                     generator=torch.Generator().manual_seed(SEED * 1_000_003 + b))
        fooled_by += result.fooled_by.tolist()
    assert numbers["fooled_by_sample"] == fooled_by
    assert numbers["robust_acc"] == sum(f == -1 for f in fooled_by) / IMAGES
    assert numbers["auto_version"] == "custom" and numbers["processes"] == 1
    assert set(numbers["fooled_by"]) == {"misclassified_clean", "apgd-ce", "fab-t", "robust"}


def test_eval_reports_the_version_that_ran(checkpoint, tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert cli.main(["eval", checkpoint, "--json", str(report)] + AUTO) == 0
    printed = capsys.readouterr()
    assert "AutoAttack custom acc (eps 0.3)" in printed.out  # --steps 3: not the standard's 100
    # stderr is no terminal here: one line per attack that ran and per batch, no carriage return
    assert "\r" not in printed.err
    batch_lines = [line for line in printed.err.splitlines() if line.startswith("evaluate: AutoAttack")]
    assert [line.split(", ")[1] for line in batch_lines] == ["batch 1/2", "batch 2/2"]
    assert sum(line.startswith("auto_attack ") for line in printed.err.splitlines()) == 2 * 4
    assert cli.main(["eval", checkpoint, "--no-progress"] + AUTO) == 0
    assert "auto_attack" not in capsys.readouterr().err
    numbers = json.loads(report.read_text())
    assert numbers["auto_settings"]["steps"] == 3 and numbers["auto_settings"]["n_queries"] == 5000
    assert set(numbers["fooled_by"]) == {"misclassified_clean", "apgd-ce", "apgd-t", "fab-t", "square", "robust"}
    assert cli.main(["eval", checkpoint, "--version", "standard"]) == 2
    assert "--version applies to --attack auto only" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, checkpoint, report):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # as torchrun's environment describes; eval joins it
    assert cli.main(["eval", checkpoint, "--json", report] + AUTO) == 0


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_attack_what_one_process_attacks(checkpoint, tmp_path):
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    mp.spawn(_worker, args=(2, _free_port(), checkpoint, str(double)), nprocs=2, join=True)
    assert cli.main(["eval", checkpoint, "--json", str(single)] + AUTO) == 0
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert one["processes"] == 1 and two["processes"] == 2
    assert len(two["fooled_by_sample"]) == IMAGES
    assert {k: v for k, v in one.items() if k not in TIMES} == {k: v for k, v in two.items() if k not in TIMES}
