"""RRM's head options (the teacher's classifier through the projection, frozen or fine-tuned,
folded into the student's own last layer; a robust head trained last) and its matching at the
teacher's own PGD points, cached once per run."""
import pytest
import torch

from robust_fast import attacks, cli
from robust_fast.models import build_model
from robust_fast.train import RRM, fit, load_checkpoint, model_from_checkpoint
from robust_fast.train.recipes import Batch

from test_train import config, params, toy_data
from toy_models import SIZE, student, teacher


def wide_student(seed=0):  # the teacher's architecture and width: no projection
    torch.manual_seed(seed)
    return build_model("wide_cnn", input_size=SIZE, num_classes=2, width=4, feature_dim=24)


def test_frozen_teacher_head_is_the_teachers_and_the_saved_student_uses_it(tmp_path):
    t = teacher()
    s = wide_student()
    r = RRM(t, lambda_ce=0.05, head="teacher")
    fit(r, s, toy_data(), config(epochs=1), out_dir=tmp_path)
    assert torch.equal(s.classifier.weight, t.classifier.weight) and torch.equal(s.classifier.bias, t.classifier.bias)
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "checkpoint.pt"))
    assert torch.equal(rebuilt.classifier.weight, t.classifier.weight)


def test_frozen_teacher_head_through_the_projection_is_folded_exactly():
    t, s = teacher(), student()
    teacher_before = params(t)
    r = RRM(t, lambda_ce=0.05, head="teacher")
    fit(r, s, toy_data(), config(epochs=2))
    wrapped = r._trainable
    assert torch.equal(wrapped.head.weight, t.classifier.weight) and torch.equal(wrapped.head.bias, t.classifier.bias)
    assert wrapped.head is not t.classifier and not wrapped.head.weight.requires_grad
    x = toy_data(16, seed=3)[0]
    features, logits = wrapped(x)
    torch.testing.assert_close(logits, t.classifier(wrapped.projection(s.features(x))))
    torch.testing.assert_close(s(x), logits, rtol=1e-5, atol=1e-5)  # the bare student gives the same logits
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, t.parameters()))


def test_finetuned_teacher_head_starts_from_the_teachers_and_moves():
    t, s = teacher(), wide_student()
    r = RRM(t, lambda_ce=1.0, head="teacher_finetune")
    trainable = r.trainable(s)
    assert torch.equal(trainable.head.weight, t.classifier.weight) and trainable.head.weight.requires_grad
    before = t.classifier.weight.clone()
    fit(r, s, toy_data(), config(epochs=2))
    assert not torch.equal(s.classifier.weight, t.classifier.weight)
    assert torch.equal(t.classifier.weight, before)
    torch.testing.assert_close(s.classifier.weight, r._trainable.head.weight)


def test_robust_head_trains_only_the_last_layer_on_pgd_examples():
    t, s = teacher(), student()
    data = toy_data()
    plain = student()
    fit(RRM(t, lambda_ce=0.05), plain, data, config(epochs=1))
    r = RRM(t, lambda_ce=0.05, robust_head_epochs=0.5, eps=0.05, head_steps=2)
    fit(r, s, data, config(epochs=1))
    # the same run up to the head: every layer but the last is equal
    for (name, a), b in zip(s.named_parameters(), plain.parameters()):
        assert torch.equal(a, b) == (not name.startswith("classifier")), name


def test_teacher_pgd_points_are_computed_once_and_never_change_the_teacher(monkeypatch):
    t, s = teacher(), student()
    before = params(t)
    data = toy_data()
    calls = []
    real = attacks.pgd

    def counted(*args, **kwargs):
        calls.append(args[1].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr("robust_fast.train.recipes.pgd", counted)
    r = RRM(t, lambda_ce=0.05, match_points="teacher_pgd", eps=0.05, match_steps=3)
    fit(r, s, data, config(epochs=3))
    assert sum(calls) == data[0].shape[0]  # one attack over the training set, none per epoch
    assert all(torch.equal(a, b) for a, b in zip(before, t.parameters()))
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    points = r._points
    assert (points - data[0]).abs().max() <= 0.05 + 1e-6 and not torch.equal(points, data[0])
    torch.testing.assert_close(r._points_features, t.features(points))
    # the batch loss matches on the clean images and their cached teacher points
    index = torch.arange(8)
    net = r.trainable(student())
    loss, logits = r.batch_loss(Batch(net=net, model=net.model, x=data[0][index], y=data[1][index], epoch=0,
                                      generator=torch.Generator(), index=index))
    both = torch.cat([data[0][index], points[index]])
    f, l = net(both)
    expected = 0.05 * torch.nn.functional.cross_entropy(l, torch.cat([data[1][index]] * 2)) - \
        torch.nn.functional.cosine_similarity(f, t.features(both), dim=1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert logits.shape[0] == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(head="mine"), "head must be one of"), (dict(robust_head_epochs=-1), "robust_head_epochs"),
    (dict(head_steps=0), "head_steps"), (dict(match_points="x"), "match_points must be one of"),
    (dict(match_points="teacher_pgd", noise_std=0.1), "needs cache_teacher"), (dict(eps=0), "eps")])
def test_bad_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RRM(teacher(), **kwargs)


def test_head_options_from_the_cli(tmp_path):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    assert cli.main(["train", "standard", "--model", "wide_cnn", "--width", "4", "--limit", "64", "--epochs", "1",
                     "--eval-samples", "0", "--out", str(teacher_dir), "--no-progress"]) == 0
    teacher_path = str(teacher_dir / "checkpoint.pt")
    assert cli.main(["train", "rrm", "--teacher", teacher_path, "--model", "wide_cnn", "--width", "4",
                     "--limit", "64", "--epochs", "1", "--eval-samples", "0", "--head", "teacher",
                     "--robust-head-epochs", "0.25", "--head-steps", "2", "--match-points", "teacher_pgd",
                     "--match-steps", "2", "--eps", "0.05", "--out", str(student_dir), "--no-progress"]) == 0
    settings = load_checkpoint(student_dir / "checkpoint.pt")["recipe_settings"]
    assert settings["head"] == "teacher" and settings["robust_head_epochs"] == 0.25 and settings["head_steps"] == 2
    assert settings["match_points"] == "teacher_pgd" and settings["match_steps"] == 2 and settings["eps"] == 0.05


def test_help_documents_the_head_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "rrm", "--help"])
    text = capsys.readouterr().out
    for option in ("--head", "teacher_finetune", "--robust-head-epochs", "--head-steps", "--match-points",
                   "teacher_pgd", "--match-steps"):
        assert option in text, option
