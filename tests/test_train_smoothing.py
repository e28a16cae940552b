"""The randomized-smoothing recipes in the training loop: Gaussian (Cohen et al.), SmoothAdv
(Salman et al.) and CRT (Vaishnavi et al.). Each learns; its noise comes from the run's
generator (a seed repeats a run, a resume equals the uninterrupted run); the losses equal a hand
computation on the same noise; the CRT teacher stays frozen; SmoothAdv's point stays in its
L2 ball and the [0, 1] box."""
import json

import pytest
import torch
import torch.nn.functional as F

from robust_fast.train import (CRT, Gaussian, SmoothAdv, Standard, TrainConfig, fit, load_checkpoint,
                               train_crt, train_gaussian, train_smoothadv)
from robust_fast.train.recipes import Batch, SoftSmoothed, gaussian_noise

from toy_models import SIZE, student, teacher


def toy_data(n=96, seed=0):
    """Two classes a small CNN separates easily under noise: bright versus dark images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = (0.25 + 0.5 * labels.view(-1, 1, 1, 1) + 0.1 * torch.randn(n, 1, SIZE, SIZE, generator=g)).clamp(0, 1)
    return images, labels


def config(**overrides):
    settings = dict(epochs=3, batch_size=32, optimizer="adam", lr=1e-2, progress=False, eval_samples=0,
                    eval_eps=0.05)
    settings.update(overrides)
    return TrainConfig(**settings)


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def batch_of(model, x, y, seed):
    return Batch(net=model, model=model, x=x, y=y, epoch=0, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["gaussian", "smoothadv", "crt"])
def test_each_smoothing_recipe_lowers_its_loss(name):
    data = toy_data()
    if name == "crt":
        t = teacher()
        fit(Gaussian(sigma=0.25), t, data, config(epochs=2))
        recipe = CRT(t, sigma=0.25)
    else:
        recipe = Gaussian(sigma=0.25) if name == "gaussian" else SmoothAdv(sigma=0.25, eps=0.5, steps=2)
    result = fit(recipe, student(), data, config(epochs=3))
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses


def test_noise_comes_from_the_generator_a_seed_repeats_the_run():
    data = toy_data(64)
    a, b, c = student(), student(), student()
    for model, seed in ((a, 0), (b, 0), (c, 1)):
        train_gaussian(model, data, config(epochs=1, seed=seed), sigma=0.5, noise_samples=2)
    assert same(a, b) and not same(a, c)


def test_smoothadv_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = toy_data(64)
    cfg = config(epochs=2, eval_samples=16, eval_steps=1)
    whole = student()
    fit(SmoothAdv(steps=1), whole, data, cfg, eval_data=data, out_dir=tmp_path / "whole")
    part = student()
    fit(SmoothAdv(steps=1), part, data, cfg, eval_data=data, out_dir=tmp_path / "part", until_epoch=1)
    resumed = student(seed=123)  # everything must come from the checkpoint
    fit(SmoothAdv(steps=1), resumed, data, cfg, eval_data=data, out_dir=tmp_path / "part",
        resume=str(tmp_path / "part" / "checkpoint.pt"))
    assert same(whole, resumed)
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("whole", "part")]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert all(0 <= r["noisy_acc"] <= 1 for r in logs[0])  # the base model's accuracy under noise


def test_gaussian_loss_is_cross_entropy_on_unclamped_noisy_copies():
    x, y = toy_data(8)
    x[0] = 0.0  # a black image: its noisy copy goes below 0 and must stay there
    model, seen = student(), []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    loss, logits = Gaussian(sigma=0.5, noise_samples=3).batch_loss(batch_of(model, x, y, seed=5))
    noise = gaussian_noise(x, 3, 0.5, torch.Generator().manual_seed(5))  # the recipe's draws: x[b] + noise[b, j]
    assert noise.shape == (8, 3, 1, SIZE, SIZE) and abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 0.5) < 0.05
    noisy = (x.unsqueeze(1) + noise).flatten(0, 1)
    torch.testing.assert_close(seen[0], noisy)
    assert seen[0].min() < 0 and seen[0].max() > 1
    expected = model(noisy)
    torch.testing.assert_close(loss, F.cross_entropy(expected, y.repeat_interleave(3)))
    torch.testing.assert_close(logits, expected.view(8, 3, 2).mean(1))


@pytest.mark.parametrize("alpha,copies", [(1.0, 1), (0.3, 2)])
def test_crt_loss_equals_a_hand_computation_on_the_same_noise(alpha, copies):
    x, y = toy_data(8)
    s, t = student(), teacher()
    loss, _ = CRT(t, sigma=0.25, alpha=alpha, noise_samples=copies).batch_loss(batch_of(s, x, y, seed=3))
    noise = gaussian_noise(x, copies, 0.25, torch.Generator().manual_seed(3))
    assert noise.shape == (8, copies, 1, SIZE, SIZE) and abs(float(noise.std()) - 0.25) < 0.03
    noisy = (x.unsqueeze(1) + noise).flatten(0, 1)
    f_s, f_t = s(noisy), t(noisy)
    labels = y.repeat_interleave(copies)
    expected = alpha * (f_s - f_t).norm(dim=1).mean() + (1 - alpha) * F.cross_entropy(f_s, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_crt_teacher_never_changes_and_gets_no_gradient(tmp_path):
    data = toy_data(64)
    t = teacher()
    t.train()
    before = [p.detach().clone() for p in t.parameters()]
    buffers = [b.clone() for b in t.buffers()]
    s = student()
    train_crt(s, data, config(epochs=1), teacher=t, sigma=0.25, alpha=0.5, out_dir=tmp_path,
              teacher_path="teacher.pt")
    assert not t.training
    assert all(torch.equal(a, b) for a, b in zip(before, t.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, t.buffers()))  # batch norm statistics too
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["recipe"] == "crt"
    assert state["recipe_settings"] == {"sigma": 0.25, "noise_samples": 1, "alpha": 0.5, "teacher": "teacher.pt"}


def test_smoothadv_point_stays_in_its_l2_ball_and_the_box_and_raises_the_smoothed_loss():
    x, y = toy_data(16)
    x[:4] = 1.0  # saturated images: the box binds
    model = student()
    fit(Standard(), model, (x, y), config(epochs=1))
    recipe = SmoothAdv(sigma=0.25, eps=0.5, steps=4, noise_samples=3)
    noise = gaussian_noise(x, 3, 0.25, torch.Generator().manual_seed(0))
    x_adv = recipe.attack(model, x, y, noise)
    distance = (x_adv - x).flatten(1).norm(dim=1)
    assert float(distance.max()) <= 0.5 + 1e-5 and float(distance.min()) > 0
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    smoothed = SoftSmoothed(model, noise)
    with torch.no_grad():
        assert F.nll_loss(smoothed(x_adv), y) > F.nll_loss(smoothed(x), y)
    assert x.min() >= 0 and torch.equal(x[:4], torch.ones_like(x[:4]))  # x itself untouched


def test_smoothadv_trains_on_the_attack_noise_unclamped():
    x, y = toy_data(8)
    model, seen = student(), []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    recipe = SmoothAdv(sigma=0.5, eps=0.5, steps=2, noise_samples=2)
    loss, logits = recipe.batch_loss(batch_of(model, x, y, seed=9))
    trained_on = seen[-1]  # the last pass of the batch trains; the ones before attack
    noise = gaussian_noise(x, 2, 0.5, torch.Generator().manual_seed(9))
    x_adv = recipe.attack(model, x, y, noise)
    torch.testing.assert_close(trained_on, (x_adv.unsqueeze(1) + noise).flatten(0, 1))
    assert trained_on.min() < 0 or trained_on.max() > 1
    torch.testing.assert_close(loss, F.cross_entropy(model(trained_on), y.repeat_interleave(2)))
    assert logits.shape == (8, 2)
    assert recipe.settings() == {"sigma": 0.5, "noise_samples": 2, "eps": 0.5, "steps": 2, "alpha": 0.5}


def test_smoothadv_defaults_and_function():
    recipe = SmoothAdv()
    assert (recipe.sigma, recipe.eps, recipe.steps, recipe.noise_samples, recipe.alpha) == (0.25, 0.5, 2, 2, 0.5)
    assert (Gaussian().sigma, Gaussian().noise_samples) == (0.25, 1)
    result = train_smoothadv(student(), toy_data(32), config(epochs=1), steps=1, noise_samples=1)
    assert len(result.history) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="Gaussian: sigma must be a finite float > 0"):
        Gaussian(sigma=0)
    with pytest.raises(ValueError, match="SmoothAdv: noise_samples must be an int >= 1"):
        SmoothAdv(noise_samples=0)
    with pytest.raises(ValueError, match="SmoothAdv: eps must be a float > 0"):
        SmoothAdv(eps=-1.0)
    with pytest.raises(ValueError, match="SmoothAdv: steps must be an int >= 1"):
        SmoothAdv(steps=0)
    with pytest.raises(ValueError, match=r"CRT: alpha must be a number in \[0, 1\]"):
        CRT(teacher(), alpha=1.5)
    with pytest.raises(TypeError, match="CRT: teacher must be an nn.Module"):
        CRT("teacher.pt")


# --------------------------------------------------------------------------------------------
# robust-fast train gaussian | smoothadv | crt, on a slice of Fashion-MNIST

def _needs_data():
    from robust_fast import data
    return pytest.mark.skipif(not data.available(), reason="Fashion-MNIST is not installed "
                              "(apt-get install dataset-fashion-mnist, or set ROBUST_FAST_DATA)")


@_needs_data()
def test_train_smoothadv_teacher_then_crt_and_gaussian_students_from_the_cli(tmp_path):
    from robust_fast import cli

    tiny = ["--limit", "128", "--batch-size", "64", "--epochs", "1", "--eval-samples", "32", "--eval-steps", "1",
            "--width", "4", "--no-progress", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        teacher_dir = tmp_path / "teacher"
        assert cli.main(["train", "smoothadv", "--model", "wide_cnn", "--sigma", "0.5", "--l2-eps", "0.25",
                         "--steps", "1", "--noise-samples", "2", "--out", str(teacher_dir)] + tiny) == 0
        teacher_path = str(teacher_dir / "checkpoint.pt")
        state = load_checkpoint(teacher_path)
        assert state["recipe"] == "smoothadv" and state["recipe_settings"] == {
            "sigma": 0.5, "noise_samples": 2, "eps": 0.25, "steps": 1, "alpha": 0.5}
        record = json.loads((teacher_dir / "log.jsonl").read_text().splitlines()[-1])
        assert 0 <= record["noisy_acc"] <= 1

        before = state["model_state"]
        assert cli.main(["train", "crt", "--teacher", teacher_path, "--sigma", "0.5", "--alpha", "0.9",
                         "--out", str(tmp_path / "crt")] + tiny) == 0
        state = load_checkpoint(tmp_path / "crt" / "checkpoint.pt")
        assert state["recipe"] == "crt" and state["model_spec"]["name"] == "resnet_small"
        assert state["recipe_settings"] == {"sigma": 0.5, "noise_samples": 1, "alpha": 0.9, "teacher": teacher_path}
        after = load_checkpoint(teacher_path)["model_state"]
        assert all(torch.equal(before[k], after[k]) for k in before)

        assert cli.main(["train", "gaussian", "--noise-samples", "2", "--out", str(tmp_path / "gaussian")] + tiny) == 0
        state = load_checkpoint(tmp_path / "gaussian" / "checkpoint.pt")
        assert state["recipe"] == "gaussian" and state["recipe_settings"] == {"sigma": 0.25, "noise_samples": 2}
    finally:
        torch.set_num_threads(threads)


@_needs_data()
def test_train_crt_without_a_teacher_fails_clearly(tmp_path, capsys):
    from robust_fast import cli

    assert cli.main(["train", "crt", "--limit", "64", "--out", str(tmp_path)]) == 1
    assert "recipe 'crt' needs a teacher (--teacher CHECKPOINT)" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_train_command_defaults_are_the_recipes():
    import argparse

    from robust_fast.train import PGDAT
    from robust_fast.train.commands import add_train_parser, build_recipe

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    for name, expected in (("gaussian", Gaussian()), ("smoothadv", SmoothAdv()), ("crt", CRT(teacher())),
                           ("pgd_at", PGDAT())):
        args = parser.parse_args(["train", name])
        given = {k: getattr(args, k) for k in ("eps", "steps", "alpha", "sigma", "noise_samples", "l2_eps")
                 if hasattr(args, k)}  # each recipe's subcommand has its own options only
        recipe = build_recipe(name, teacher=teacher(), **given)
        assert recipe.settings() == expected.settings(), name
