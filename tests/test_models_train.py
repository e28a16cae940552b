"""SmallCNN and the PGD adversarial-training recipe."""
import pytest
import torch

from robust_fast.models import SmallCNN
from robust_fast.train import TrainConfig, accuracy, robust_accuracy, train_pgd_at


def pgd_at(model, images, labels, *, epochs, eps=0.1, steps=7, batch_size=128, lr=1e-3, seed=0):
    """PGD adversarial training through the loop: Adam at a constant rate, no evaluation."""
    config = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="adam", lr=lr, schedule="constant",
                         seed=seed, eval_samples=0, progress=False)
    return train_pgd_at(model, (images, labels), config, eps=eps, steps=steps)


@pytest.mark.parametrize("in_channels, size", [(1, 28), (3, 32), (2, 9)])
def test_small_cnn_shapes(in_channels, size):
    model = SmallCNN(in_channels=in_channels, input_size=size, num_classes=7)
    assert model(torch.rand(5, in_channels, size, size)).shape == (5, 7)
    assert model.features(torch.rand(2, in_channels, size, size)).shape == (2, 100)
    assert [type(layer).__name__ for layer in model] == [
        "Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten", "Linear", "ReLU", "Linear"]


@pytest.mark.parametrize("kwargs", [dict(in_channels=0), dict(input_size=3), dict(num_classes=True)])
def test_small_cnn_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="SmallCNN"):
        SmallCNN(**kwargs)


def toy_data(n=96, seed=0):
    """Two classes a small CNN separates easily: bright versus dark images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = (0.25 + 0.5 * labels.view(-1, 1, 1, 1) + 0.1 * torch.randn(n, 1, 12, 12, generator=g)).clamp(0, 1)
    return images, labels


def test_adversarial_training_learns_and_restores_modes():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, input_size=12, num_classes=2).eval()
    images, labels = toy_data()
    before = [p.detach().clone() for p in model.parameters()]
    result = pgd_at(model, images, labels, epochs=3, eps=0.05, steps=2, batch_size=32, lr=1e-2, seed=1)
    assert len(result.history) == 3 and result.history[-1]["epoch"] == 3
    assert not model.training  # the mode it came in with
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    clean = accuracy(model, images, labels)
    robust = robust_accuracy(model, images, labels, eps=0.05, alpha=0.02, steps=5,
                             generator=torch.Generator().manual_seed(2))
    assert clean > 0.9
    assert robust <= clean


def test_early_stop_evaluation_is_never_weaker():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, input_size=12, num_classes=2)
    images, labels = toy_data(seed=3)
    pgd_at(model, images, labels, epochs=2, eps=0.05, steps=2, lr=1e-2)
    settings = dict(eps=0.2, alpha=0.05, steps=10)
    with_stop = robust_accuracy(model, images, labels, early_stop=True,
                                generator=torch.Generator().manual_seed(4), **settings)
    without = robust_accuracy(model, images, labels, early_stop=False,
                              generator=torch.Generator().manual_seed(4), **settings)
    assert with_stop <= without


def test_bad_arguments():
    model, (images, labels) = SmallCNN(input_size=12, num_classes=2), toy_data(8)
    with pytest.raises(ValueError, match="epochs must be an int >= 0"):
        pgd_at(model, images, labels, epochs=-1)
    with pytest.raises(ValueError, match="differ in length"):
        pgd_at(model, images, labels[:4], epochs=1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        accuracy(model, images, labels, batch_size=0)
