"""robust-fast train / eval / demo on a slice of Fashion-MNIST."""
import json

import pytest
import torch

from robust_fast import cli, data
from robust_fast.demo import DemoSettings, robust_teacher
from robust_fast.train import evaluate, load_checkpoint, model_from_checkpoint

pytestmark = pytest.mark.skipif(not data.available(), reason="Fashion-MNIST is not installed "
                                "(apt-get install dataset-fashion-mnist, or set ROBUST_FAST_DATA)")


def test_train_resume_and_eval_commands(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--model", "small_cnn", "--limit", "256", "--batch-size", "64", "--eval-samples", "64",
              "--eval-steps", "2", "--steps", "2", "--out", str(out), "--no-progress"]
    assert cli.main(["train", "pgd_at", "--epochs", "1"] + common) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert cli.main(["train", "pgd_at", "--epochs", "2", "--resume", str(out / "checkpoint.pt")] + common) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["model_spec"]["name"] == "small_cnn"
    assert len((out / "log.jsonl").read_text().splitlines()) == 2

    report = tmp_path / "eval.json"
    assert cli.main(["eval", str(out / "checkpoint.pt"), "--samples", "100", "--steps", "5", "--restarts", "2",
                     "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| pgd_at | small_cnn | 100 |" in printed and "PGD-5 acc (eps 0.1, 2 restarts)" in printed
    numbers = json.loads(report.read_text())
    images, labels = data.load_fashion_mnist("test", limit=100)
    expected = evaluate(model_from_checkpoint(out / "checkpoint.pt"), images, labels, eps=0.1, steps=5,
                        restarts=2)
    assert numbers["clean_acc"] == expected["clean_acc"] and numbers["robust_acc"] == expected["robust_acc"]

    # without --json nothing is written; an existing report is replaced, and the command says so
    assert cli.main(["eval", str(out / "checkpoint.pt"), "--samples", "10", "--no-attack"]) == 0
    assert not (out / "eval.json").exists() and "written" not in capsys.readouterr().out
    assert cli.main(["eval", str(out / "checkpoint.pt"), "--samples", "10", "--no-attack", "--out", str(report)]) == 0
    assert f"replaced: {report}" in capsys.readouterr().out


def test_train_needs_a_teacher_for_transfer_recipes(tmp_path, capsys):
    assert cli.main(["train", "rrm", "--limit", "64", "--out", str(tmp_path)]) == 1
    assert "needs a teacher (--teacher CHECKPOINT)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs a teacher"):  # --debug: the exception itself
        cli.main(["train", "rrm", "--limit", "64", "--out", str(tmp_path), "--debug"])


def test_train_rrm_from_a_teacher_checkpoint(tmp_path):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    assert cli.main(["train", "standard", "--model", "wide_cnn", "--width", "4", "--limit", "128", "--epochs", "1",
                     "--eval-samples", "0", "--out", str(teacher_dir), "--no-progress"]) == 0
    teacher_path = str(teacher_dir / "checkpoint.pt")
    before = load_checkpoint(teacher_path)["model_state"]
    assert cli.main(["train", "rrm", "--teacher", teacher_path, "--model", "resnet_small", "--width", "4",
                     "--limit", "128", "--epochs", "1", "--eval-samples", "32", "--eval-steps", "2",
                     "--out", str(student_dir), "--no-progress"]) == 0
    state = load_checkpoint(student_dir / "checkpoint.pt")
    assert state["recipe"] == "rrm" and state["recipe_settings"]["teacher"] == teacher_path
    assert any(k.startswith("projection.") for k in state["trainable_state"])  # 32 -> 256 features
    after = load_checkpoint(teacher_path)["model_state"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_demo_teacher_is_trained_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUST_FAST_CACHE", str(tmp_path))
    settings = DemoSettings(train_samples=64, teacher_epochs=1, teacher_steps=1, curve_samples=0,
                            teacher_model={"name": "wide_cnn", "kwargs": {"width": 4}})
    train = data.load_fashion_mnist("train", limit=64)
    first, info = robust_teacher(settings, train, None, log=lambda line: None)
    again, cached = robust_teacher(settings, train, None, log=lambda line: None)
    assert not info["cached"] and cached["cached"] and info["path"] == cached["path"]
    assert info["path"].startswith(str(tmp_path / "models"))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    other = DemoSettings(**{**settings.__dict__, "teacher_epochs": 2})
    assert robust_teacher(other, train, None, log=lambda line: None)[1]["path"] != info["path"]


def test_train_ibp_then_eval_by_apgd_with_ibp_certificates(tmp_path, capsys):
    out = tmp_path / "ibp"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["train", "ibp", "--limit", "256", "--batch-size", "64", "--epochs", "2",
                         "--warmup-epochs", "0.5", "--ramp-epochs", "1", "--eval-samples", "32", "--eval-steps", "1",
                         "--schedule", "constant", "--lr-decay-epochs", "2", "--threads", "1", "--out", str(out),
                         "--no-progress"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["model_spec"]["name"] == "small_cnn" and state["config"]["max_grad_norm"] == 10.0
    assert tuple(state["config"]["lr_decay_epochs"]) == (2,)
    assert [r["lr"] for r in state["history"]] == [pytest.approx(1e-4), pytest.approx(1e-4)]
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert "certified_acc" in last and last["train_eps"] == pytest.approx(0.11) and last["kappa"] == 0.5
    report = tmp_path / "eval.json"
    assert cli.main(["eval", str(out / "checkpoint.pt"), "--samples", "50", "--steps", "5", "--attack", "apgd",
                     "--certify", "ibp", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "APGD-CE-5 acc (eps 0.1, 1 restart)" in printed and "IBP-certified acc (eps 0.1)" in printed
    numbers = json.loads(report.read_text())
    images, labels = data.load_fashion_mnist("test", limit=50)
    expected = evaluate(model_from_checkpoint(out / "checkpoint.pt"), images, labels, eps=0.1, steps=5,
                        attack="apgd", certify="ibp")
    assert numbers["robust_acc"] == expected["robust_acc"] and numbers["certified_acc"] == expected["certified_acc"]


def test_train_ibp_defaults_are_the_recipes():
    import argparse

    from robust_fast.train import IBP
    from robust_fast.train.commands import add_train_parser, build_recipe

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "ibp"])
    recipe = build_recipe("ibp", eps=args.eps, warmup_epochs=args.warmup_epochs, ramp_epochs=args.ramp_epochs,
                          kappa_end=args.kappa_end, ramp=args.ramp)
    assert recipe.settings() == IBP().settings()
    assert args.lr_decay_epochs == [] and args.threads is None
    assert args.max_grad_norm == 10.0 and args.model == "small_cnn"


@pytest.mark.parametrize("recipe, own, foreign", [("rrm", "--lambda-ce", "--warmup-epochs"),
                                                  ("ibp", "--ramp-epochs", "--teacher"),
                                                  ("smoothadv", "--l2-eps", "--lambda-ce")])
def test_each_recipe_has_its_own_help_with_every_default(recipe, own, foreign, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", recipe, "--help"])
    shown = capsys.readouterr().out
    assert own in shown and foreign not in shown
    assert "(default: 5)" in shown and "--epochs" in shown  # the common options, with their defaults
    with pytest.raises(SystemExit) as stop:  # another recipe's option is refused by name
        cli.main(["train", recipe, foreign, "1"])
    assert stop.value.code == 2 and foreign in capsys.readouterr().err


def test_eval_certify_refuses_a_model_bounds_cannot_go_through(tmp_path, capsys):
    out = tmp_path / "resnet"
    assert cli.main(["train", "standard", "--model", "resnet_small", "--width", "4", "--limit", "64", "--epochs", "1",
                     "--eval-samples", "0", "--out", str(out), "--no-progress"]) == 0
    assert cli.main(["eval", str(out / "checkpoint.pt"), "--samples", "10", "--certify", "ibp"]) == 2
    assert "not supported" in capsys.readouterr().err
