"""Tasks from a subset of the classes: the split, the relabelling, the per-class cap, and a
checkpoint that refuses a head of other classes."""
import pytest
import torch

from robust_fast import cli, data
from robust_fast.models import build_model, model_classes
from robust_fast.train import TrainConfig, fit, load_checkpoint, model_from_checkpoint
from robust_fast.train.checkpoint import check_classes, checkpoint_classes
from robust_fast.train.recipes import Standard


def toy(n_per_class=6, classes=10):
    labels = torch.arange(classes).repeat(n_per_class)            # 0..9, 0..9, ...
    images = torch.arange(labels.numel(), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    return images, labels


def test_subset_keeps_only_the_named_classes_relabelled_in_the_order_named():
    images, labels = toy()
    x, y = data.class_subset(images, labels, (7, 2, 5))
    original = labels[x[:, 0, 0, 0].long()]                       # each kept image's old label
    assert set(original.tolist()) == {7, 2, 5} and x.shape[0] == 18
    mapping = {7: 0, 2: 1, 5: 2}
    assert y.tolist() == [mapping[c] for c in original.tolist()]
    assert torch.equal(x[:, 0, 0, 0], x[:, 0, 0, 0].sort().values)  # the original order
    assert y.dtype == torch.int64


def test_subset_cap_per_class_is_seeded_and_leaves_the_inputs_alone():
    images, labels = toy(n_per_class=20)
    before = images.clone(), labels.clone()
    a = data.class_subset(images, labels, "5-9", per_class=3, seed=1)
    b = data.class_subset(images, labels, "5-9", per_class=3, seed=1)
    c = data.class_subset(images, labels, "5-9", per_class=3, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.bincount(a[1]).tolist() == [3] * 5
    assert torch.equal(images, before[0]) and torch.equal(labels, before[1])
    # a cap above a class's size keeps the whole class
    assert data.class_subset(images, labels, [0], per_class=100)[0].shape[0] == 20


def test_the_default_pair_splits_fashion_mnist_in_halves():
    assert data.SOURCE_CLASSES == (0, 1, 2, 3, 4) and data.TARGET_CLASSES == (5, 6, 7, 8, 9)
    assert not set(data.SOURCE_CLASSES) & set(data.TARGET_CLASSES)


@pytest.mark.parametrize("text,expected", [("0-4", (0, 1, 2, 3, 4)), ("5,7,9", (5, 7, 9)), ("0-1, 8", (0, 1, 8)),
                                           ("9,3", (9, 3))])
def test_parse_classes(text, expected):
    assert data.parse_classes(text) == expected


@pytest.mark.parametrize("bad,match", [("", "classes must"), ("3-1", "cannot read"), ("a", "cannot read"),
                                       ("0,0", "distinct"), ("10", r"\[0, 10\)"), ("1-2-3", "cannot read")])
def test_parse_classes_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        data.parse_classes(bad)


def test_subset_rejects_bad_arguments():
    images, labels = toy()
    with pytest.raises(ValueError, match="per_class"):
        data.class_subset(images, labels, (1, 2), per_class=0)
    with pytest.raises(ValueError, match="differ in length"):
        data.class_subset(images, labels[:-1], (1, 2))


def test_build_model_records_its_classes_and_checks_their_number():
    model = build_model("small_cnn", classes=(5, 6, 7))
    assert model.classifier.out_features == 3 and model.spec["classes"] == [5, 6, 7]
    assert model_classes(model) == (5, 6, 7) and model_classes(build_model("small_cnn")) == tuple(range(10))
    with pytest.raises(ValueError, match="num_classes=4 but 3 classes"):
        build_model("small_cnn", classes=(5, 6, 7), num_classes=4)


def test_a_checkpoint_records_its_classes_and_refuses_a_mismatched_head(tmp_path):
    images, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 2, (16,))
    model = build_model("small_cnn", classes=(8, 9))
    fit(Standard(), model, (images, labels), TrainConfig(epochs=1, batch_size=8, progress=False, eval_samples=0),
        out_dir=str(tmp_path))
    path = tmp_path / "checkpoint.pt"
    assert checkpoint_classes(path) == (8, 9)
    assert model_from_checkpoint(path, classes=(8, 9)).spec["classes"] == [8, 9]
    check_classes(path, [8, 9])
    with pytest.raises(ValueError, match=r"2 outputs for classes \(8, 9\), but 5 classes \(5, 6, 7, 8, 9\)"):
        model_from_checkpoint(path, classes=range(5, 10))
    with pytest.raises(ValueError, match="head has 2 outputs"):
        check_classes(path, (9, 8))   # the order is the labels' meaning


needs_data = pytest.mark.skipif(not data.available(), reason="Fashion-MNIST is not installed")


@needs_data
def test_load_task_of_fashion_mnist():
    x, y = data.load_task("test", data.TARGET_CLASSES, per_class=10, seed=0)
    assert x.shape == (50, 1, 28, 28) and torch.bincount(y).tolist() == [10] * 5
    full_x, full_y = data.load_fashion_mnist("test")
    for image, label in zip(x[:10], y[:10]):    # each image's original label is TARGET_CLASSES[new label]
        same = (full_x == image).flatten(1).all(1)
        assert (full_y[same] == data.TARGET_CLASSES[label]).all() and same.any()
    everything = data.load_task("test", data.TARGET_CLASSES)
    assert torch.equal(everything[0], full_x[full_y >= 5]) and torch.equal(everything[1], full_y[full_y >= 5] - 5)


@needs_data
def test_cli_trains_on_classes_and_eval_refuses_other_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "standard", "--model", "small_cnn", "--classes", "5-9", "--limit", "128",
                     "--epochs", "1", "--eval-samples", "32", "--eval-steps", "0", "--out", str(out),
                     "--no-progress"]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["model_spec"]["classes"] == [5, 6, 7, 8, 9] and state["model_spec"]["kwargs"]["num_classes"] == 5
    assert cli.main(["eval", str(out / "checkpoint.pt"), "--samples", "20", "--steps", "2"]) == 0
    assert cli.main(["eval", str(out / "checkpoint.pt"), "--classes", "0-4", "--samples", "20"]) == 2
    assert "head has 5 outputs for classes (5, 6, 7, 8, 9)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="head has 5 outputs"):
        cli.main(["train", "standard", "--model", "small_cnn", "--limit", "64", "--epochs", "2",
                  "--resume", str(out / "checkpoint.pt"), "--out", str(out), "--no-progress", "--debug"])
    with pytest.raises(ValueError, match="--num-classes 3 does not match"):
        cli.main(["train", "standard", "--classes", "0-4", "--num-classes", "3", "--out", str(out), "--debug"])
