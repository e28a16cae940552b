"""APGD-T's targeted DLR gradient in closed form: the same, to the bit, as autograd through
targeted_dlr_loss (ties included), and APGD-T's results the same as with autograd's gradient."""
import importlib

import pytest
import torch
from torch import nn

from robust_fast import attacks
from robust_fast.attacks.apgd import targeted_dlr_loss, targeted_dlr_loss_and_grad

apgd_module = importlib.import_module("robust_fast.attacks.apgd")


def autograd_loss_and_grad(logits, y, target):
    leaf = logits.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = targeted_dlr_loss(leaf, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("classes", [4, 5, 10])
@pytest.mark.parametrize("ties", [False, True])
def test_closed_form_gradient_is_autograds(dtype, classes, ties):
    g = torch.Generator().manual_seed(classes + 10 * ties)
    for _ in range(20):
        n = 64
        if ties:  # few distinct values: ties among the top four, y or t tied with the top, y == t
            logits = torch.randint(-2, 3, (n, classes), generator=g).to(dtype)
        else:
            logits = (torch.randn(n, classes, generator=g) * 5).to(dtype)
        y = torch.randint(0, classes, (n,), generator=g)
        target = torch.randint(0, classes, (n,), generator=g)
        loss, grad = targeted_dlr_loss_and_grad(logits, y, target)
        expected_loss, expected_grad = autograd_loss_and_grad(logits, y, target)
        assert loss.dtype == grad.dtype == dtype
        assert torch.equal(loss, expected_loss)
        assert torch.equal(grad, expected_grad)
        # Five entries per sample at most, and the logits passed in are left alone.
        assert int((grad != 0).sum(dim=1).max()) <= 5


def test_closed_form_gradient_of_a_known_case():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    y, target = torch.tensor([0]), torch.tensor([3])
    loss, grad = targeted_dlr_loss_and_grad(logits, y, target)
    # N = 4, D = 3 - (0 - 1) / 2 = 3.5: d/dz_y = -1/D + N/D^2 (y is pi1), d/dz_t = 1/D - N/(2 D^2)
    # (t is pi4), d/dz_pi3 = -N/(2 D^2), d/dz_pi2 = 0.
    d = 3.5
    torch.testing.assert_close(loss, torch.tensor([-4 / d]))
    torch.testing.assert_close(grad, torch.tensor([[-1 / d + 4 / d**2, 0.0, -2 / d**2, 1 / d - 2 / d**2]]))


def previous_loss_logits_grad(model, x, y, y_t, loss):
    """The gradient as APGD-T computed it before the closed form: autograd through the loss."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        logits = model(leaf)
        losses = (targeted_dlr_loss(logits, y, y_t[:, 1]) if y_t is not None
                  else apgd_module._per_sample_loss(loss, logits, y))
        (grad,) = torch.autograd.grad(losses.sum(), leaf)
    return losses.detach(), logits.detach(), grad


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("early_stop", [True, False])
def test_apgdt_results_are_those_of_autograds_gradient(monkeypatch, norm, eps, early_stop):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, 1, 16, 16, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)

    def run():
        return attacks.apgdt(model, x, y, eps=eps, norm=norm, steps=12, n_target_classes=3,
                             early_stop=early_stop, generator=torch.Generator().manual_seed(0))

    closed_form = run()
    monkeypatch.setattr(apgd_module, "_loss_logits_grad", previous_loss_logits_grad)
    previous = run()
    assert torch.equal(closed_form, previous)
    with torch.no_grad():
        assert bool((model(closed_form).argmax(1) != y).any())  # the attack did something
