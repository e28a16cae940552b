"""The models' shared interface: logits, penultimate features, (features, logits) in one pass."""
import pytest
import torch
from torch import nn

from robust_fast.losses import FeatureExtractor
from robust_fast.models import MODELS, Normalize, ResNetSmall, SmallCNN, WideCNN, WithFeatures, build_model

SMALL = {"small_cnn": {}, "wide_cnn": {"width": 8, "feature_dim": 32}, "resnet_small": {"width": 4, "feature_dim": 24}}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("size", [28, 12])
def test_features_then_classifier_is_the_forward(name, size):
    torch.manual_seed(0)
    model = build_model(name, input_size=size, num_classes=7, **SMALL[name])
    x = torch.rand(5, 1, size, size)
    logits = model(x)
    features = model.features(x)
    assert logits.shape == (5, 7) and features.shape == (5, model.feature_dim)
    both = model(x, return_features=True)
    torch.testing.assert_close(both[0], features, rtol=0, atol=0)
    torch.testing.assert_close(both[1], logits, rtol=0, atol=0)
    torch.testing.assert_close(model.classifier(features), logits, rtol=0, atol=0)
    assert model.spec == {"name": name, "kwargs": dict(input_size=size, num_classes=7, **SMALL[name])}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_batch_norm_or_dropout_so_train_and_eval_agree(name):
    model = build_model(name, **SMALL[name])
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) for m in model.modules())
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(model.train()(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [WideCNN, ResNetSmall])
def test_normalisation_is_inside_the_model(cls):
    model = cls()
    assert isinstance(model.normalize, Normalize)
    x = torch.rand(3, 1, 28, 28)
    manual = model.body((x - 0.2860) / 0.3530)
    torch.testing.assert_close(model.features(x), manual)


def test_residual_student_starts_with_identity_blocks():
    model = ResNetSmall(width=4)
    block = model.body[4]
    h = torch.rand(2, 8, 7, 7)
    torch.testing.assert_close(block(h), torch.relu(h))


def test_small_cnn_keeps_its_sequential_layout_and_takes_raw_pixels():
    model = SmallCNN()
    assert isinstance(model, nn.Sequential) and len(model) == 8
    x = torch.rand(2, 1, 28, 28)
    h = x
    for layer in model:  # what interval-bound code does
        h = layer(h)
    torch.testing.assert_close(h, model(x), rtol=0, atol=0)


def test_with_features_serves_feature_extractor_and_projects():
    student, projection = ResNetSmall(width=4, feature_dim=24), nn.Linear(24, 40)
    x = torch.rand(3, 1, 28, 28)
    features, logits = FeatureExtractor(WithFeatures(student, projection))(x)
    assert features.shape == (3, 40)
    torch.testing.assert_close(features, projection(student.features(x)))
    torch.testing.assert_close(logits, student(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vit")
    with pytest.raises(ValueError, match="WideCNN: width must be a positive int"):
        WideCNN(width=0)
    with pytest.raises(ValueError, match="ResNetSmall: input_size must be >= 4"):
        ResNetSmall(input_size=3)
    with pytest.raises(ValueError, match="Normalize: mean and std"):
        Normalize((0.5,), (0.0,))
