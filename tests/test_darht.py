"""DARHT: the student-teacher map (models.TeacherMapStudent), the recipe (train/darht.py), train_darht
and `robust-fast train darht`."""
import copy

import pytest
import torch
import torch.nn.functional as F

from robust_fast import cli
from robust_fast.losses import DARHTLoss
from robust_fast.models import MODELS, SmallCNN, TeacherMapStudent, WideCNN, build_model
from robust_fast.ops.multi_teacher_loss import multi_teacher_loss
from robust_fast.train import KD, Batch, TrainConfig, fit, train_darht
from robust_fast.train.checkpoint import model_from_checkpoint
from robust_fast.train.darht import DARHT, _MapAndHead
from robust_fast.train.recipes import RECIPES
from toy_models import write_checkpoint

BACKBONES = [("small_cnn", {}), ("wide_cnn", {"width": 4}), ("resnet_small", {"width": 4})]


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _teachers(k=2):
    torch.manual_seed(1)
    found = [build_model("wide_cnn", width=4), build_model("small_cnn"), build_model("resnet_small", width=4)]
    return [t.eval() for t in found[:k]]


# --------------------------------------------------------------------------------------------
# the map head

@pytest.mark.parametrize("name, kwargs", BACKBONES)
@pytest.mark.parametrize("k", [1, 3])
def test_map_head_shapes_on_every_model(name, kwargs, k):
    student = build_model("teacher_map", backbone={"name": name, "kwargs": kwargs}, num_teachers=k)
    x = torch.rand(5, 1, 28, 28)
    teacher_map, logits = student(x, return_map=True)
    assert teacher_map.shape == (5, k, 10) and logits.shape == (5, 10)
    assert torch.equal(student(x), logits)
    features, logits2 = student(x, return_features=True)
    assert features.shape == (5, student.feature_dim) and torch.equal(logits2, logits)
    # the map is the K*C-wide linear layer's output, viewed (B, K, C): slice k is columns kC..kC+C-1
    flat = student.teacher_map(student.features(x))
    assert torch.equal(teacher_map.flatten(1), flat)
    assert torch.equal(teacher_map[:, k - 1], flat[:, (k - 1) * 10:k * 10])
    assert torch.allclose(logits, student.classifier(flat))
    assert name in MODELS and "teacher_map" not in MODELS    # MODELS: the backbones; teacher_map wraps one


def test_every_registered_model_can_be_a_backbone():
    for name in MODELS:
        student = TeacherMapStudent(build_model(name), num_teachers=2)
        assert student(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_mean_prediction_reads_the_slices():
    student = build_model("teacher_map", backbone={"name": "small_cnn", "kwargs": {}}, num_teachers=3,
                          prediction="mean")
    x = torch.rand(4, 1, 28, 28)
    teacher_map, logits = student(x, return_map=True)
    assert torch.allclose(logits, teacher_map.mean(1))


def test_slice_k_is_what_the_loss_compares_with_teacher_k():
    torch.manual_seed(0)
    student = TeacherMapStudent(SmallCNN(), num_teachers=3)
    x, y = _data(6)
    teacher_map, _ = student(x, return_map=True)
    teachers = torch.randn(3, 6, 10)
    per = multi_teacher_loss(teacher_map, teachers, kind="kl", reduction="none")        # (B, K)
    for k in range(3):
        expected = F.kl_div(F.log_softmax(teacher_map[:, k], -1), F.log_softmax(teachers[k], -1),
                            reduction="none", log_target=True).sum(-1)
        assert torch.allclose(per[:, k], expected, atol=1e-5)
    # a map whose slice k equals teacher k has zero loss; moving slice 1 only changes column 1
    exact = teachers.transpose(0, 1).clone()
    assert multi_teacher_loss(exact, teachers, kind="kl", reduction="none").abs().max() < 1e-6
    exact[:, 1] += torch.randn(6, 10)
    moved = multi_teacher_loss(exact, teachers, kind="kl", reduction="none")
    assert moved[:, 1].min() > 0 and moved[:, [0, 2]].abs().max() < 1e-6


def test_map_head_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_teachers"):
        TeacherMapStudent(SmallCNN(), num_teachers=0)
    with pytest.raises(ValueError, match="prediction"):
        TeacherMapStudent(SmallCNN(), num_teachers=1, prediction="vote")
    with pytest.raises(TypeError, match="backbone"):
        TeacherMapStudent(torch.nn.Linear(3, 3), num_teachers=1)


def test_checkpoint_rebuilds_the_student(tmp_path):
    student = build_model("teacher_map", backbone={"name": "resnet_small", "kwargs": {"width": 4}}, num_teachers=2)
    x, y = _data(8)
    result = fit(DARHT(_teachers(2)), student, (x, y), TrainConfig(epochs=1, batch_size=8, eval_samples=0,
                                                                   progress=False), out_dir=str(tmp_path))
    again = model_from_checkpoint(result.checkpoint)
    assert isinstance(again, TeacherMapStudent) and torch.equal(again(x), student.eval()(x))


# --------------------------------------------------------------------------------------------
# the recipe

def test_registered_as_a_recipe():
    assert RECIPES["darht"] is DARHT


def test_phases_at_the_methods_epochs():
    recipe = DARHT(_teachers(1))
    phase = [recipe.phase(epoch * 3 + 1, steps_per_epoch=3, epochs=350) for epoch in range(350)]
    assert phase[:50] == ["ce"] * 50 and phase[50:118] == ["ce+kd"] * 68 and phase[118:] == ["kd"] * 232
    assert recipe.phase(50 * 3, 3, 350) == "ce+kd" and recipe.phase(50 * 3 - 1, 3, 350) == "ce"
    assert recipe.phase(118 * 3, 3, 350) == "kd" and recipe.phase(118 * 3 - 1, 3, 350) == "ce+kd"
    # scaled to 7 epochs of 10 batches: CE for the first 1/7 of the batches, then CE+KD until 118/350
    short = [recipe.phase(s, 10, 7) for s in range(70)]
    assert short.index("ce+kd") == 10 and short.index("kd") == 24   # 118/350 * 70 = 23.6


class _Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.modes = model, 0, []

    def forward(self, x):
        self.calls += 1
        self.modes.append(self.training or self.model.training)
        return self.model(x)


def test_teachers_never_change_get_no_gradient_and_run_once_per_batch():
    teachers = [_Counting(t) for t in _teachers(2)]
    before = [copy.deepcopy(t.state_dict()) for t in teachers]
    student = TeacherMapStudent(build_model("resnet_small", width=4), 2)
    x, y = _data(32)
    recipe = DARHT(teachers, schedule=(0.0, 0.5), attack_steps=2)
    for t in teachers:
        t.calls = 0
    fit(recipe, student, (x, y), TrainConfig(epochs=2, batch_size=8, eval_samples=0, progress=False))
    for t, state in zip(teachers, before):
        assert all(torch.equal(state[k], v) for k, v in t.state_dict().items())
        assert all(p.grad is None and not p.requires_grad for p in t.parameters())
        # 8 batches, one eval-mode forward each, and the check of the student's input shape at the start
        assert t.calls == 8 + 1 and not any(t.modes)


def test_k1_distillation_alone_equals_kd_at_temperature_1():
    teacher = _teachers(1)[0]
    x, y = _data(16)
    torch.manual_seed(3)
    student = TeacherMapStudent(build_model("small_cnn"), 1, prediction="mean")   # model(x) = the map's slice
    twin = copy.deepcopy(student)
    config = TrainConfig(epochs=1, batch_size=8, eval_samples=0, progress=False)
    darht = DARHT([teacher], schedule=(0.0, 0.0), adversarial_fraction=0.0, weights="none", head="frozen")
    a = fit(darht, student, (x, y), config)
    b = fit(KD(teacher, temperature=1.0, alpha=1.0), twin, (x, y), config)
    assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-5)
    for (name, p), q in zip(student.named_parameters(), twin.parameters()):
        if name.startswith("classifier"):    # the head: not on KD's path, not trained by DARHT's last phase
            assert torch.equal(p, q)
        else:
            assert torch.allclose(p, q, atol=1e-6), name


def _batch(model, x, y, step=0, steps_per_epoch=1, epochs=1, seed=0):
    net = _MapAndHead(model)
    return Batch(net=net, model=model, x=x, y=y, epoch=0, generator=torch.Generator().manual_seed(seed),
                 step=step, steps_per_epoch=steps_per_epoch, epochs=epochs)


def test_the_loss_is_ce_plus_the_weighted_kl_of_darhtloss_per_sample():
    teachers = _teachers(3)
    torch.manual_seed(0)
    student = TeacherMapStudent(build_model("small_cnn"), 3)
    x, y = _data(8)
    recipe = DARHT(teachers, schedule=(0.0, 1.0), adversarial_fraction=0.0, weights="sample")
    loss, _ = recipe.batch_loss(_batch(student, x, y))
    teacher_map, logits = student(x, return_map=True)
    with torch.no_grad():
        stacked = torch.stack([t(x) for t in teachers])
    expected = DARHTLoss(3)(logits, teacher_map.flatten(1), stacked, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_per_batch_weights_are_exp_of_the_mean_cross_entropy():
    teachers = _teachers(2)
    x, y = _data(8)
    logits = torch.stack([t(x) for t in teachers]).detach()
    batch_w = DARHT(teachers, weights="batch").teacher_weights(logits, y)
    sample_w = DARHT(teachers, weights="sample").teacher_weights(logits, y)
    for k in range(2):
        ce = F.cross_entropy(logits[k], y, reduction="none")
        assert batch_w[k].item() == pytest.approx(torch.exp(-ce.mean()).item(), rel=1e-5)
        assert torch.allclose(sample_w[:, k], torch.exp(-ce), rtol=1e-5)
    assert DARHT(teachers, weights="none").teacher_weights(logits, y) is None


def test_adversarial_batches_at_the_asked_fraction():
    teachers = _teachers(1)
    student = TeacherMapStudent(build_model("small_cnn"), 1)
    x, y = _data(4)
    recipe = DARHT(teachers, adversarial_fraction=0.5, attack_steps=1)
    generator = torch.Generator().manual_seed(0)
    changed = 0
    for _ in range(60):
        batch = _batch(student, x, y)
        batch.generator = generator
        x_in = recipe.inputs(batch)
        assert (x_in - x).abs().max() <= 0.1 + 1e-6
        changed += not torch.equal(x_in, x)
    assert 18 <= changed <= 42
    never = DARHT(teachers, adversarial_fraction=0.0)
    assert torch.equal(never.inputs(_batch(student, x, y)), x)


def test_the_head_follows_or_stays_frozen_in_the_last_phase():
    teachers = _teachers(2)
    x, y = _data(8)
    for head in ("follow", "frozen"):
        torch.manual_seed(0)
        student = TeacherMapStudent(build_model("small_cnn"), 2)
        recipe = DARHT(teachers, schedule=(0.0, 0.0), adversarial_fraction=0.0, head=head)
        loss, _ = recipe.batch_loss(_batch(student, x, y))
        loss.backward()
        head_grad = student.classifier.weight.grad
        assert student.teacher_map.weight.grad is not None
        if head == "frozen":
            assert head_grad is None
        else:
            assert head_grad is not None and head_grad.abs().sum() > 0
            # the backbone sees the distillation term alone: the same gradient as KD without the head's CE
            kd = recipe.distillation(student(x, return_map=True)[0], recipe.teacher_logits(x), y)
            grads = torch.autograd.grad(kd, student.teacher_map.weight)[0]
            assert torch.allclose(grads, student.teacher_map.weight.grad, atol=1e-6)


def test_the_loss_decreases():
    teachers = _teachers(2)
    torch.manual_seed(0)
    student = TeacherMapStudent(build_model("small_cnn"), 2)
    x, y = _data(32)
    recipe = DARHT(teachers, schedule=(0.0, 1.0), adversarial_fraction=0.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _ = recipe.batch_loss(_batch(student, x, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_teacher_lists_give_clear_errors():
    with pytest.raises(TypeError, match="non-empty list"):
        DARHT([])
    with pytest.raises(TypeError, match="non-empty list"):
        DARHT(SmallCNN())
    with pytest.raises(ValueError, match=r"teachers\[1\] has 7 classes"):
        DARHT([SmallCNN(), SmallCNN(num_classes=7)])
    with pytest.raises(ValueError, match=r"teachers\[1\] takes inputs of shape \(1, 32, 32\)"):
        DARHT([SmallCNN(), WideCNN(input_size=32)])
    recipe = DARHT([SmallCNN(num_classes=7)])
    with pytest.raises(ValueError, match=r"teachers\[0\] has 7 classes, the student 10"):
        recipe.trainable(TeacherMapStudent(SmallCNN(), 1))
    with pytest.raises(ValueError, match="2 slices for 1 teachers"):
        DARHT([SmallCNN()]).trainable(TeacherMapStudent(SmallCNN(), 2))
    with pytest.raises(TypeError, match="TeacherMapStudent"):
        DARHT([SmallCNN()]).trainable(SmallCNN())
    odd = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 28 * 28, 10))   # takes 3 channels
    with pytest.raises(ValueError, match=r"teachers\[0\] cannot take the student's inputs"):
        DARHT([odd]).trainable(TeacherMapStudent(SmallCNN(), 1))
    with pytest.raises(ValueError, match="weights"):
        DARHT([SmallCNN()], weights="mean")


def test_train_darht_wraps_a_plain_model():
    x, y = _data(16)
    result = train_darht(build_model("resnet_small", width=4), (x, y),
                         TrainConfig(epochs=1, batch_size=8, eval_samples=0, progress=False),
                         teachers=_teachers(2), attack_steps=1)
    assert isinstance(result.model, TeacherMapStudent) and result.model.num_teachers == 2
    assert result.model.spec["kwargs"]["backbone"]["name"] == "resnet_small"


# --------------------------------------------------------------------------------------------
# the command line

def _checkpoint(tmp_path, name, model):
    return write_checkpoint(tmp_path / f"{name}.pt", model)


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    import robust_fast.train.commands as commands
    x, y = _data(24)
    monkeypatch.setattr(commands, "load_fashion_mnist", lambda split, root=None, limit=None:
                        (x[:limit], y[:limit]) if limit else (x, y))
    return x, y


def test_cli_train_darht_with_two_teachers_of_two_families(tmp_path, fake_data):
    a = _checkpoint(tmp_path, "a", build_model("wide_cnn", width=4))
    b = _checkpoint(tmp_path, "b", build_model("small_cnn"))
    out = tmp_path / "run"
    code = cli.main(["train", "darht", "--teacher", a, "--teacher", b, "--model", "resnet_small", "--width", "4",
                     "--epochs", "1", "--batch-size", "8", "--eval-samples", "4", "--eval-steps", "1",
                     "--steps", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    student = model_from_checkpoint(str(out / "checkpoint.pt"))
    assert isinstance(student, TeacherMapStudent) and student.num_teachers == 2
    from robust_fast.train.checkpoint import load_checkpoint
    assert load_checkpoint(str(out / "checkpoint.pt"))["recipe_settings"]["teachers"] == [a, b]


def test_cli_refuses_a_teacher_of_other_classes(tmp_path, fake_data, capsys):
    a = _checkpoint(tmp_path, "a", build_model("small_cnn"))
    b = _checkpoint(tmp_path, "b", build_model("small_cnn", num_classes=5))
    code = cli.main(["train", "darht", "--teacher", a, "--teacher", b, "--epochs", "1", "--out", str(tmp_path / "r")])
    assert code == 2 and "teachers[1] has 5 classes" in capsys.readouterr().err


def test_cli_darht_needs_a_teacher(tmp_path, fake_data, capsys):
    assert cli.main(["train", "darht", "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--teacher" in capsys.readouterr().err
    one = _checkpoint(tmp_path, "one", build_model("small_cnn"))
    assert cli.main(["train", "kd", "--teacher", one, "--teacher", one, "--out", str(tmp_path / "k")]) == 2
    assert "kd takes one --teacher" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# under torchrun: 2 gloo processes on one global batch take the step 1 process takes

def _ddp_setup():
    size = 12
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (32,), generator=g)
    images = (0.2 + 0.3 * labels.view(-1, 1, 1, 1) + 0.1 * torch.randn(32, 1, size, size, generator=g)).clamp(0, 1)
    torch.manual_seed(1)
    teachers = [build_model("wide_cnn", input_size=size, num_classes=3, width=4, feature_dim=24),
                build_model("small_cnn", input_size=size, num_classes=3)]
    torch.manual_seed(0)
    student = TeacherMapStudent(build_model("resnet_small", input_size=size, num_classes=3, width=4, feature_dim=16),
                                2)
    # the last phase (the head on the detached map: every trained parameter gets a gradient);
    # per-sample weights (per-batch weights are each rank's shard mean); no adversarial draw
    recipe = DARHT(teachers, schedule=(0.0, 0.0), adversarial_fraction=0.0, weights="sample")
    config = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.5, momentum=0.9, schedule="constant",
                         progress=False, eval_samples=0)
    return recipe, student, (images, labels), config


def _ddp_worker(rank, world, port, result_path):
    import os

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        recipe, student, data, config = _ddp_setup()
        fit(recipe, student, data, config, max_steps=1)
        if rank == 0:
            torch.save(student.state_dict(), result_path)
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_step_one_process_takes(tmp_path):
    import socket

    import torch.multiprocessing as mp
    recipe, student, data, config = _ddp_setup()
    untrained = copy.deepcopy(student.state_dict())
    fit(recipe, student, data, config, max_steps=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "double.pt")
    mp.spawn(_ddp_worker, args=(2, port, path), nprocs=2, join=True)
    double = torch.load(path, weights_only=True)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(double[key], value, rtol=1e-5, atol=1e-6, msg=key)
    moved = max(float((student.state_dict()[k] - untrained[k]).abs().max()) for k in untrained)
    assert moved > 1e-2
