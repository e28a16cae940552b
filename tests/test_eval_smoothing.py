"""robust-fast eval --certify smoothing (one process and a 2-process gloo group) and --norm l2."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robust_fast import cli, data
from robust_fast.attacks import pgd
from robust_fast.certify import smoothing
from robust_fast.train import evaluate, model_from_checkpoint
from robust_fast.train.evaluate_smoothing import SmoothingSettings, certify_sharded

pytestmark = pytest.mark.skipif(not data.available(), reason="Fashion-MNIST is not installed "
                                "(apt-get install dataset-fashion-mnist, or set ROBUST_FAST_DATA)")

SIGMA, N0, N, SEED, BATCH, IMAGES = 0.25, 30, 300, 3, 64, 12
SMOOTHING = ["--certify", "smoothing", "--sigma", str(SIGMA), "--n0", str(N0), "--n", str(N),
             "--smoothing-batch-size", str(BATCH), "--seed", str(SEED), "--samples", str(IMAGES)]
TIMES = ("time_s", "certify_time_s", "certify_processes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoothing") / "run"
    assert cli.main(["train", "standard", "--model", "small_cnn", "--limit", "1024", "--epochs", "2",
                     "--eval-samples", "0", "--out", str(out), "--no-progress"]) == 0
    return str(out / "checkpoint.pt")


def _hand_loop(model, images):
    """Cohen et al.'s loop: one image at a time, each numbered by its place in the test set."""
    rows = [smoothing.certify(model, images[i:i + 1], SIGMA, n0=N0, n=N, batch_size=BATCH,
                              generator=torch.Generator().manual_seed(SEED), indices=[i], progress=False)
            for i in range(images.shape[0])]
    return torch.cat([r.prediction for r in rows]), torch.cat([r.radius for r in rows])


def test_eval_certify_smoothing_equals_a_hand_loop(checkpoint, tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert cli.main(["eval", checkpoint, "--no-attack", "--json", str(report)] + SMOOTHING) == 0
    printed = capsys.readouterr().out
    assert "smoothed clean acc (sigma 0.25)" in printed and "| r = 0.25 |" in printed and "| ACR |" in printed
    numbers = json.loads(report.read_text())
    model = model_from_checkpoint(checkpoint)
    images, labels = data.load_fashion_mnist("test", limit=IMAGES)
    prediction, radius = _hand_loop(model, images)
    right = prediction == labels
    assert right.any() and (radius > 0).any() and not right.all()  # not a degenerate model
    assert numbers["certifier"] == "smoothing" and numbers["n"] == IMAGES and numbers["certify_processes"] == 1
    assert (numbers["sigma"], numbers["smoothing_n0"], numbers["smoothing_n"], numbers["smoothing_alpha"],
            numbers["smoothing_batch_size"], numbers["smoothing_seed"]) == (SIGMA, N0, N, 0.001, BATCH, SEED)
    assert numbers["smoothing_batch_size_used"] == BATCH
    assert numbers["smoothed_clean_acc"] == right.double().mean().item()
    assert numbers["abstain_rate"] == (prediction == -1).double().mean().item()
    assert numbers["certified_acc_by_radius"] == {
        f"{r:g}": (right & (radius >= r)).double().mean().item() for r in (0.0, 0.25, 0.5, 0.75, 1.0)}
    assert numbers["acr"] == pytest.approx(torch.where(right, radius, 0.0).mean().item(), rel=1e-12, abs=0)
    assert "robust_acc" not in numbers and numbers["certify_time_s"] > 0
    # the certificate itself, image by image
    result = certify_sharded(model, images, SmoothingSettings(SIGMA, n0=N0, n=N), seed=SEED, batch_size=BATCH,
                             progress=False)
    assert torch.equal(result.prediction, prediction) and torch.equal(result.radius, radius)
    # the default batch size, "auto", measured on the model: the same numbers
    auto = tmp_path / "auto.json"
    default = [a for a in SMOOTHING if a not in ("--smoothing-batch-size", str(BATCH))]
    assert cli.main(["eval", checkpoint, "--no-attack", "--json", str(auto)] + default) == 0
    auto_numbers = json.loads(auto.read_text())
    assert auto_numbers["smoothing_batch_size"] == "auto" and auto_numbers["smoothing_batch_size_used"] >= 1
    skip = TIMES + ("smoothing_batch_size", "smoothing_batch_size_used")
    assert {k: v for k, v in auto_numbers.items() if k not in skip} == {k: v for k, v in numbers.items() if k not in skip}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, checkpoint, report, shard_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # as torchrun's environment describes; eval joins it
    model = model_from_checkpoint(checkpoint)
    images, _ = data.load_fashion_mnist("test", limit=IMAGES)
    result = certify_sharded(model, images, SmoothingSettings(SIGMA, n0=N0, n=N), seed=SEED, batch_size=BATCH,
                             progress=False)
    if rank == 0:
        torch.save({"prediction": result.prediction, "radius": result.radius, "counts": result.counts}, shard_path)
    # eval ends the process group it runs in
    assert cli.main(["eval", checkpoint, "--norm", "l2", "--eps", "0.5", "--steps", "2", "--json", report]
                    + SMOOTHING) == 0


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_certify_what_one_process_certifies(checkpoint, tmp_path):
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    shard_path = tmp_path / "sharded.pt"
    mp.spawn(_worker, args=(2, _free_port(), checkpoint, str(double), str(shard_path)), nprocs=2, join=True)
    assert cli.main(["eval", checkpoint, "--norm", "l2", "--eps", "0.5", "--steps", "2", "--json", str(single)]
                    + SMOOTHING) == 0
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert one["certify_processes"] == 1 and two["certify_processes"] == 2
    assert {k: v for k, v in one.items() if k not in TIMES} == {k: v for k, v in two.items() if k not in TIMES}
    model = model_from_checkpoint(checkpoint)
    images, _ = data.load_fashion_mnist("test", limit=IMAGES)
    alone = smoothing.certify(model, images, SIGMA, n0=N0, n=N, batch_size=BATCH,
                              generator=torch.Generator().manual_seed(SEED), progress=False)
    sharded = torch.load(shard_path, weights_only=True)
    assert torch.equal(sharded["prediction"], alone.prediction) and torch.equal(sharded["radius"], alone.radius)
    assert torch.equal(sharded["counts"], alone.counts)


def test_eval_norm_l2_is_pgd_in_the_l2_ball(checkpoint, tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert cli.main(["eval", checkpoint, "--norm", "l2", "--eps", "1.5", "--steps", "3", "--samples", "40",
                     "--json", str(report)]) == 0
    assert "PGD-3 acc (L2 eps 1.5, 1 restart)" in capsys.readouterr().out
    numbers = json.loads(report.read_text())
    model = model_from_checkpoint(checkpoint)
    x, y = data.load_fashion_mnist("test", limit=40)
    x_adv = pgd(model, x, y, eps=1.5, alpha=1.5 / 4, steps=3, norm="l2", random_start=True, early_stop=True,
                generator=torch.Generator().manual_seed(0))
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= 1.5 + 1e-4
    with torch.no_grad():
        expected = (model(x_adv).argmax(1) == y).double().mean().item()
    assert numbers["norm"] == "l2" and numbers["eps"] == 1.5 and numbers["robust_acc"] == expected
    assert numbers["robust_acc"] < numbers["clean_acc"]  # the L2 ball of 1.5 holds adversarial examples
    linf = evaluate(model, x, y, eps=0.1, steps=3)
    assert linf["norm"] == "linf"


@pytest.mark.parametrize("options, message", [
    (["--certify", "smoothing", "--sigma", "0"], "argument --sigma: must be > 0"),
    (["--certify", "smoothing", "--sigma", "-1"], "argument --sigma: must be > 0"),
    (["--certify", "smoothing", "--sigma", "nan"], "argument --sigma: must be > 0"),
    (["--certify", "smoothing", "--sigma", "0.25", "--n", "0"], "argument --n: must be >= 1"),
    (["--certify", "smoothing", "--sigma", "0.25", "--n0", "-3"], "argument --n0: must be >= 1"),
    (["--certify", "smoothing", "--sigma", "0.25", "--n", "1.5"], "argument --n: must be an int"),
    (["--certify", "smoothing", "--sigma", "0.25", "--smoothing-alpha", "1"], "argument --smoothing-alpha: must be in (0, 1)"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["--certify", "smoothing", "--sigma", "0.25", "--smoothing-batch-size", "0"],
     "argument --smoothing-batch-size: must be >= 1"),
    (["--certify", "smoothing", "--sigma", "0.25", "--smoothing-batch-size", "big"],
     "argument --smoothing-batch-size: must be an int"),
    (["--norm", "l3"], "argument --norm: invalid choice"),
])
def test_eval_refuses_bad_values_naming_the_option(options, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "missing.pt"] + options)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--certify", "smoothing"], "--certify smoothing needs --sigma"),
    (["--sigma", "0.25", "--n", "100"], "--sigma, --n apply to --certify smoothing only"),
    (["--certify", "ibp", "--n0", "10"], "--n0 applies to --certify smoothing only"),
    (["--smoothing-batch-size", "auto"], "--smoothing-batch-size applies to --certify smoothing only"),
    (["--norm", "l2"], "--norm l2 needs --eps"),
    (["--norm", "l2", "--eps", "1", "--certify", "ibp"], "--certify ibp certifies L-inf balls"),
    (["--samples", "0"], "--samples must be >= 1"),
])
def test_eval_refuses_option_combinations_before_loading(options, message, capsys):
    assert cli.main(["eval", "missing.pt"] + options) == 2
    assert message in capsys.readouterr().err


def test_evaluate_refuses_mismatched_settings():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="norm must be one of"):
        evaluate(model, x, y, norm="l1")
    with pytest.raises(ValueError, match="certify='smoothing' goes with smoothing="):
        evaluate(model, x, y, certify="smoothing")
    with pytest.raises(ValueError, match="certify='smoothing' goes with smoothing="):
        evaluate(model, x, y, smoothing=SmoothingSettings(0.25))
    with pytest.raises(ValueError, match="needs norm='linf'"):
        evaluate(model, x, y, norm="l2", certify="ibp")
    with pytest.raises(ValueError, match="certify: sigma must be > 0"):
        evaluate(model, x, y, robust=False, certify="smoothing", smoothing=SmoothingSettings(-1.0))
