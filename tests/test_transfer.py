"""Robust transfer learning: the frozen extractor, the feature cache, LwF, train_transfer and the CLI."""
import copy

import pytest
import torch

from robust_fast import cli, data
from robust_fast.models import build_model
from robust_fast.train import (LwF, TrainConfig, TransferHead, fit, load_checkpoint, model_from_checkpoint,
                               train_transfer, transfer_model)
from robust_fast.train.transfer import TransferNet, feature_blocks


def config(epochs=2, **kw):
    return TrainConfig(epochs=epochs, batch_size=16, progress=False, eval_samples=0, **kw)


def task(n=48, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, classes, (n,), generator=g)


def source(name="wide_cnn", **kw):
    torch.manual_seed(1)
    kwargs = {"width": 4} if name != "small_cnn" else {}
    return build_model(name, classes=(0, 1, 2, 3, 4), **kwargs, **kw)


def states_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,count", [("small_cnn", 3), ("wide_cnn", 3), ("resnet_small", 4)])
def test_feature_blocks_compose_to_the_features(name, count):
    model = source(name)
    blocks = feature_blocks(model)
    assert len(blocks) == count
    x = torch.rand(4, 1, 28, 28)
    h = x
    for block in blocks:
        h = block(h)
    assert torch.equal(h, model.features(x))


def test_transfer_model_copies_the_source_with_a_fresh_head():
    src = source()
    before = copy.deepcopy(src.state_dict())
    model = transfer_model(src, classes=(5, 6, 7), seed=3)
    assert states_equal(before, src.state_dict())                       # the source is untouched
    assert model.classifier.out_features == 3 and model.spec["classes"] == [5, 6, 7]
    assert model.spec["kwargs"]["num_classes"] == 3 and src.spec["classes"] == [0, 1, 2, 3, 4]
    assert torch.equal(model.features(torch.ones(2, 1, 28, 28)), src.features(torch.ones(2, 1, 28, 28)))
    again = transfer_model(src, num_classes=3, seed=3)
    assert torch.equal(again.classifier.weight, model.classifier.weight)  # seeded
    rebuilt = build_model(model.spec["name"], **model.spec["kwargs"])
    rebuilt.load_state_dict(model.state_dict())                          # what a checkpoint does
    with pytest.raises(ValueError, match="num_classes"):
        transfer_model(src, classes=(1, 2), num_classes=3)


@pytest.mark.parametrize("cache", [True, False])
def test_head_mode_never_changes_the_frozen_extractor(cache):
    model = transfer_model(source(), num_classes=3)
    extractor = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    head = model.classifier.weight.detach().clone()
    recipe = TransferHead(cache=cache)
    fit(recipe, model, task(), config())
    after = model.state_dict()
    assert all(torch.equal(extractor[k], after[k]) for k in extractor)
    assert not torch.equal(head, model.classifier.weight)
    net = recipe._net
    assert net.frozen_parameters and all(p.grad is None and not p.requires_grad for p in net.frozen_parameters)
    net.train()
    assert all(not layer.training for layer in net._frozen) and net.model.classifier.training


@pytest.mark.parametrize("name,blocks", [("wide_cnn", 0), ("wide_cnn", 1), ("resnet_small", 2), ("small_cnn", 1)])
def test_the_cached_head_equals_the_head_trained_through_the_network(name, blocks):
    results = []
    for cache in (True, False):
        model = transfer_model(source(name), num_classes=3)
        fit(TransferHead(blocks=blocks, cache=cache), model, task(), config(epochs=3))
        results.append(model.state_dict())
    cached, naive = results
    for key in cached:
        torch.testing.assert_close(cached[key], naive[key], rtol=1e-5, atol=1e-6)


def test_blocks_retrains_only_the_last_blocks():
    model = transfer_model(source(), num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(TransferHead(blocks=1), model, task(), config())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"body.5.weight", "body.5.bias", "classifier.weight", "classifier.bias"}  # last Linear + head
    with pytest.raises(ValueError, match=r"blocks must be an int in \[0, 3\]"):
        TransferNet(model, 4)


def test_lwf_with_lambda_zero_equals_fine_tuning():
    src = source()
    a = train_transfer(src, task(), config(), mode="finetune", head_epochs=1)
    b = train_transfer(src, task(), config(), mode="lwf", head_epochs=1, lambda_feat=0.0)
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(value, b.model.state_dict()[key], rtol=1e-5, atol=1e-6)
    assert [r["phase"] for r in b.history] == ["head", "lwf", "lwf"]
    assert b.train_time_s >= sum(r["epoch_time_s"] for r in b.history) * 0.99


def test_lwf_scale_is_relative_to_the_source_features_and_the_cache_changes_nothing():
    src = source()
    images, labels = task()
    results = []
    for cache in (True, False):
        recipe = LwF(src, lambda_feat=2.0, cache=cache)
        model = transfer_model(src, num_classes=3)
        fit(recipe, model, (images, labels), config())
        results.append(model.state_dict())
        norm = src.features(images).abs().sum(1).mean().item()
        assert recipe.source_norm == pytest.approx(norm, rel=1e-5)
        assert recipe.epoch_record()["lambda_effective"] == pytest.approx(2.0 / norm, rel=1e-5)
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)
    absolute = LwF(src, lambda_feat=0.005, scale="absolute")
    absolute.trainable(transfer_model(src, num_classes=3))
    absolute.prepare(images, torch.device("cpu"))
    assert absolute.criterion.lambda_feat == 0.005
    assert all(p.requires_grad for p in src.parameters())                # the caller's source is left alone


def test_lwf_holds_the_features_closer_to_the_source_than_fine_tuning():
    src = source()
    images, labels = task(n=64)
    tuned = train_transfer(src, (images, labels), config(epochs=3, lr=3e-3), mode="finetune").model
    kept = train_transfer(src, (images, labels), config(epochs=3, lr=3e-3), mode="lwf", lambda_feat=20.0).model
    z0 = src.features(images)
    with torch.no_grad():
        assert (kept.features(images) - z0).abs().sum() < (tuned.features(images) - z0).abs().sum()


def test_train_transfer_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode must be one of"):
        train_transfer(source(), task(), config(), mode="full")
    with pytest.raises(ValueError, match="head_epochs is the warm start"):
        train_transfer(source(), task(), config(), mode="head", head_epochs=1)
    with pytest.raises(ValueError, match="scale must be one of"):
        LwF(source(), scale="per_feature")
    with pytest.raises(ValueError, match=r"labels must be 0..1"):
        train_transfer(source(), task(classes=3), config(), mode="head", classes=(5, 6))
    with pytest.raises(TypeError, match="robust_fast.models model"):
        transfer_model(torch.nn.Linear(3, 3), num_classes=2)


needs_data = pytest.mark.skipif(not data.available(), reason="Fashion-MNIST is not installed")


@needs_data
def test_cli_transfers_in_each_mode(tmp_path, capsys):
    src_dir = tmp_path / "source"
    small = ["--limit", "128", "--batch-size", "32", "--eval-samples", "32", "--eval-steps", "2", "--no-progress"]
    assert cli.main(["train", "standard", "--model", "wide_cnn", "--width", "4", "--classes", "0-4",
                     "--epochs", "1", "--out", str(src_dir)] + small) == 0
    ckpt = str(src_dir / "checkpoint.pt")
    before = load_checkpoint(ckpt)["model_state"]
    for mode in ("head", "finetune", "lwf"):
        out = tmp_path / mode
        assert cli.main(["train", "transfer", "--source", ckpt, "--mode", mode, "--epochs", "1",
                         "--out", str(out)] + small) == 0
        state = load_checkpoint(out / "checkpoint.pt")
        assert state["recipe"] == f"transfer_{mode}" and state["model_spec"]["classes"] == [5, 6, 7, 8, 9]
        assert cli.main(["eval", str(out / "checkpoint.pt"), "--samples", "20", "--steps", "2"]) == 0
    assert (tmp_path / "lwf" / "head" / "checkpoint.pt").is_file()            # the warm start
    assert load_checkpoint(tmp_path / "lwf" / "checkpoint.pt")["recipe_settings"]["source"] == ckpt
    assert states_equal(before, load_checkpoint(ckpt)["model_state"])
    head = model_from_checkpoint(tmp_path / "head" / "checkpoint.pt")
    src = model_from_checkpoint(ckpt)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(head.features(x), src.features(x))                      # the frozen extractor
    assert cli.main(["train", "transfer", "--source", ckpt, "--mode", "head", "--classes", "7,9", "--per-class", "10",
                     "--blocks", "1", "--epochs", "1", "--out", str(tmp_path / "few")] + small) == 0
    assert load_checkpoint(tmp_path / "few" / "checkpoint.pt")["model_spec"]["classes"] == [7, 9]
    with pytest.raises(ValueError, match="needs --source"):
        cli.main(["train", "transfer", "--out", str(tmp_path / "x"), "--debug"])
    with pytest.raises(SystemExit):  # another subcommand's option is refused by name
        cli.main(["train", "standard", "--lambda-feat", "1", "--out", str(tmp_path / "x")])
