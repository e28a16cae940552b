"""The training loop and its recipes: each learns, a resumed run equals the uninterrupted one,
the RRM teacher stays frozen, evaluation equals a hand loop over attacks.pgd, checkpoints."""
import json

import pytest
import torch

from robust_fast import attacks
from robust_fast.train import (ARD, KD, PGDAT, RRM, FastAT, Recipe, Standard, TrainConfig, evaluate, fit,
                               load_checkpoint, model_from_checkpoint, train_pgd_at, train_rrm)
from robust_fast.train.config import lr_factor

from toy_models import SIZE, student, teacher


def toy_data(n=128, seed=0):
    """Two classes a small CNN separates easily: bright versus dark images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = (0.3 + 0.4 * labels.view(-1, 1, 1, 1) + 0.15 * torch.randn(n, 1, SIZE, SIZE, generator=g)).clamp(0, 1)
    return images, labels


def config(**overrides):
    settings = dict(epochs=3, batch_size=32, optimizer="adam", lr=1e-2, weight_decay=0.0, progress=False,
                    eval_samples=0, eval_eps=0.05)
    settings.update(overrides)
    return TrainConfig(**settings)


def recipe(name, t=None):
    t = teacher() if t is None else t
    return {"standard": lambda: Standard(), "pgd_at": lambda: PGDAT(eps=0.05, steps=2),
            "fast_at": lambda: FastAT(eps=0.05), "rrm": lambda: RRM(t, lambda_ce=0.05, noise_std=0.05),
            "kd": lambda: KD(t), "ard": lambda: ARD(t, eps=0.05, steps=2, alpha=0.5)}[name]()


def params(model):
    return [p.detach().clone() for p in model.parameters()]


RECIPE_NAMES = ["standard", "pgd_at", "fast_at", "rrm", "kd", "ard"]


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_each_recipe_lowers_its_loss(name):
    data = toy_data()
    t = teacher()
    if name in ("kd", "ard"):  # distil from a teacher that knows the task
        fit(Standard(), t, data, config(epochs=2))
    result = fit(recipe(name, t), student(), data, config(epochs=4))
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", ["pgd_at", "rrm", "ard"])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, name):
    data = toy_data()
    cfg = config(epochs=3, schedule="cosine", eval_samples=16, eval_steps=2)
    whole = student()
    fit(recipe(name), whole, data, cfg, eval_data=data, out_dir=tmp_path / "whole")

    interrupted = student()
    fit(recipe(name), interrupted, data, cfg, eval_data=data, out_dir=tmp_path / "part", until_epoch=1)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["epoch"] == 1
    resumed = student(seed=123)  # other initial weights: everything must come from the checkpoint
    result = fit(recipe(name), resumed, data, cfg, eval_data=data, out_dir=tmp_path / "part",
                 resume=str(tmp_path / "part" / "checkpoint.pt"))
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    whole_log = [json.loads(line) for line in open(tmp_path / "whole" / "log.jsonl")]
    part_log = [json.loads(line) for line in open(tmp_path / "part" / "log.jsonl")]
    assert [r["loss"] for r in whole_log] == [r["loss"] for r in part_log] == [r["loss"] for r in result.history]


def test_a_seed_makes_a_run_repeatable_and_another_seed_differs():
    data = toy_data()
    a, b, c = student(), student(), student()
    for model, seed in ((a, 0), (b, 0), (c, 1)):
        fit(PGDAT(eps=0.05, steps=2), model, data, config(epochs=1, seed=seed))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert any(not torch.equal(x, z) for x, z in zip(a.parameters(), c.parameters()))


def test_rrm_teacher_never_changes_and_gets_no_gradient():
    data = toy_data()
    t = teacher()
    before = params(t)
    s = student()
    student_before = params(s)
    r = RRM(t, lambda_ce=0.05)
    result = fit(r, s, data, config(epochs=2))
    assert all(torch.equal(x, y) for x, y in zip(before, t.parameters()))
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert any(not torch.equal(x, y) for x, y in zip(student_before, s.parameters()))
    # widths differ (16 vs 24): a projection was trained alongside the student
    trainable = r.trainable(s)
    assert trainable.projection is not None and trainable.projection.in_features == 16
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_rrm_matches_features_by_cosine_on_clean_inputs():
    t, s = teacher(), student()
    r = RRM(t, lambda_ce=0.0)
    x, y = toy_data(8)
    net = r.trainable(s)
    from robust_fast.train.recipes import Batch
    loss, logits = r.batch_loss(Batch(net=net, model=s, x=x, y=y, epoch=0, generator=torch.Generator()))
    expected = -torch.nn.functional.cosine_similarity(net(x)[0], t.features(x), dim=1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, s(x))


def test_checkpoint_holds_the_whole_run(tmp_path):
    data = toy_data()
    model = student()
    train_pgd_at(model, data, config(epochs=2, eval_samples=32, eval_steps=3), eps=0.05, steps=2,
                 eval_data=data, out_dir=tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("recipe", "recipe_settings", "config", "model_spec", "model_state", "trainable_state",
                "optimizer_state", "scheduler_state", "epoch", "rng", "history", "train_time_s"):
        assert key in state, key
    assert state["recipe"] == "pgd_at" and state["epoch"] == 2 and state["config"]["epochs"] == 2
    assert state["recipe_settings"] == {"eps": 0.05, "steps": 2, "alpha": 0.0125}
    rebuilt = model_from_checkpoint(state)
    x = data[0][:8]
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["robust_acc"] <= r["clean_acc"] <= 1 and r["train_time_s"] > 0 and r["samples_per_s"] > 0
    assert records[1]["train_time_s"] > records[0]["train_time_s"]


def test_rrm_checkpoint_keeps_the_projection_and_the_bare_model(tmp_path):
    data, t, s = toy_data(64), teacher(), student()
    train_rrm(s, data, config(epochs=1), teacher=t, out_dir=tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert any(k.startswith("projection.") for k in state["trainable_state"])
    assert set(state["model_state"]) == set(s.state_dict())


@pytest.mark.parametrize("restarts", [1, 2])
def test_evaluate_equals_a_hand_loop_over_attacks_pgd(restarts):
    data = toy_data(70)
    model = student()
    fit(Standard(), model, data, config(epochs=2))
    images, labels = data
    numbers = evaluate(model, images, labels, eps=0.1, steps=5, restarts=restarts, batch_size=32, seed=7)
    generator = torch.Generator().manual_seed(7)
    clean = robust = 0
    for i in range(0, 70, 32):
        x, y = images[i:i + 32], labels[i:i + 32]
        clean += int((model(x).argmax(1) == y).sum())
        x_adv = attacks.pgd(model, x, y, eps=0.1, alpha=0.025, steps=5, restarts=restarts, early_stop=True,
                            generator=generator)
        robust += int((model(x_adv).argmax(1) == y).sum())
    assert numbers["clean_acc"] == clean / 70 and numbers["robust_acc"] == robust / 70
    assert numbers["robust_acc"] < numbers["clean_acc"]  # the attack does something


def test_schedules():
    assert lr_factor("cosine", 0, 100) == 1.0 and abs(lr_factor("cosine", 50, 100) - 0.5) < 1e-12
    assert lr_factor("cosine", 100, 100) < 1e-12
    assert [lr_factor("piecewise", s, 100) for s in (0, 49, 50, 74, 75, 99)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    assert lr_factor("constant", 77, 100) == 1.0
    # decays at given batches, on top of any schedule
    assert [lr_factor("constant", s, 100, (30, 60)) for s in (0, 29, 30, 59, 60)] == \
        [1, 1, pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.01)]
    assert lr_factor("cosine", 50, 100, (50,)) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="lr_decay_epochs"):
        TrainConfig(lr_decay_epochs=(0,))


def test_the_loop_decays_the_rate_from_the_listed_epochs():
    # the record's lr is the rate the next batch would use: that of the next epoch's first batch
    result = fit(Standard(), student(), toy_data(64), config(epochs=3, schedule="constant", lr_decay_epochs=(2, 3)))
    assert [r["lr"] for r in result.history] == [pytest.approx(1e-3), pytest.approx(1e-4), pytest.approx(1e-4)]


def test_the_loop_steps_the_schedule_every_batch():
    data = toy_data(64)
    result = fit(Standard(), student(), data, config(epochs=2, schedule="piecewise", optimizer="sgd", lr=0.1))
    assert [r["lr"] for r in result.history] == [pytest.approx(0.01), pytest.approx(0.001)]


class _Constant(Recipe):
    """A recipe from outside the package: the loop needs only batch_loss."""
    name = "constant_shift"

    def batch_loss(self, batch):
        logits = batch.net(batch.x)
        return (logits - 1.0).pow(2).mean(), logits


def test_a_new_recipe_plugs_in():
    model = student()
    result = fit(_Constant(), model, toy_data(64), config(epochs=3))
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_nothing_passed_in_is_modified():
    images, labels = toy_data(64)
    copies = images.clone(), labels.clone()
    fit(PGDAT(eps=0.05, steps=2), student(), (images, labels), config(epochs=1))
    assert torch.equal(images, copies[0]) and torch.equal(labels, copies[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="TrainConfig: epochs must be an int >= 0"):
        TrainConfig(epochs=-1)
    with pytest.raises(ValueError, match="TrainConfig: optimizer must be one of"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="TrainConfig: lr must be a finite float > 0"):
        TrainConfig(lr=0.0)
    with pytest.raises(TypeError, match="fit: recipe must be"):
        fit("standard", student(), toy_data(8))
    with pytest.raises(ValueError, match="fit: train_data images and labels differ"):
        fit(Standard(), student(), (toy_data(8)[0], toy_data(4)[1]))
    with pytest.raises(TypeError, match="fit: train_data labels must be int64"):
        fit(Standard(), student(), (toy_data(8)[0], toy_data(8)[1].int()))
    with pytest.raises(ValueError, match="PGDAT: eps must be a float > 0"):
        PGDAT(eps=0)
    with pytest.raises(TypeError, match="RRM: teacher must be an nn.Module"):
        RRM("teacher.pt")


def test_rrm_cached_teacher_features_equal_computed_ones():
    data = toy_data(40)
    t = teacher()
    cached, direct = RRM(t, lambda_ce=0.05), RRM(t, lambda_ce=0.05, cache_teacher=False)
    cached.prepare(data[0], torch.device("cpu"))
    direct.prepare(data[0], torch.device("cpu"))
    assert direct._cached is None
    torch.testing.assert_close(cached._cached, t.features(data[0]))
    a, b = student(), student()
    fit(cached, a, data, config(epochs=2))
    fit(direct, b, data, config(epochs=2))
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert not RRM(t, noise_std=0.1).cache_teacher  # noisy inputs are new every time
