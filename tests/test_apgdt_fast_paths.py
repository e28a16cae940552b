"""APGD-T's fast paths give its results: the targeted DLR gradient in closed form is autograd's
to the bit (ties included), and the (target, restart) runs side by side give what one run after
the other gives, rows leaving once an earlier run fooled their sample."""
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


def small_cnn_and_its_labels(n, seed):
    """A small random CNN, n random 16x16 images and the model's own labels for them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("early_stop", [True, False])
def test_apgdt_results_are_those_of_autograds_gradient(monkeypatch, norm, eps, early_stop):
    model, x, y = small_cnn_and_its_labels(24, seed=1)

    def run():
        return attacks.apgdt(model, x, y, eps=eps, norm=norm, steps=12, n_target_classes=3,
                             early_stop=early_stop, generator=torch.Generator().manual_seed(0))

    closed_form = run()
    monkeypatch.setattr(apgd_module, "_loss_logits_grad", previous_loss_logits_grad)
    previous = run()
    assert torch.equal(closed_form, previous)
    with torch.no_grad():
        assert bool((model(closed_form).argmax(1) != y).any())  # the attack did something


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("early_stop, restarts", [(True, 1), (True, 2), (False, 2)])
def test_apgdt_runs_side_by_side_give_the_results_of_one_run_after_the_other(monkeypatch, norm, eps,
                                                                               early_stop, restarts):
    model, x, y = small_cnn_and_its_labels(20, seed=2)
    y[:3] = (y[:3] + 1) % 10  # three misclassified already: returned as they are

    def run(batch_size=None):
        return attacks.apgdt(model, x, y, eps=eps, norm=norm, steps=10, n_target_classes=4,
                             restarts=restarts, early_stop=early_stop, batch_size=batch_size,
                             generator=torch.Generator().manual_seed(0))

    side_by_side = run()                      # every (target, restart) run at once
    monkeypatch.setitem(apgd_module.TARGET_ROWS, "cpu", 45)
    in_twos = run()                           # two or three runs at a time
    one_by_one = run(batch_size=20)           # 20 rows at most: one run after the other
    for other in (in_twos, one_by_one):
        if norm == "linf":  # signs do not see the batch's last bits
            assert torch.equal(other, side_by_side)
        else:  # the model's outputs differ in their last bits from one batch size to another
            torch.testing.assert_close(other, side_by_side, rtol=0, atol=1e-5)
    with torch.no_grad():
        fooled = model(side_by_side).argmax(1) != y
    assert 3 < int(fooled.sum()) < len(y)  # both kinds of sample
    assert torch.equal(side_by_side[:3], x[:3])


def test_a_row_leaves_once_an_earlier_run_fooled_its_sample():
    """apgd_run with sample and rank: rows under a later run stop once an earlier run's row of
    their sample is fooled; the earlier rows' results are those of a run without them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 1, 8, 8, generator=g)
    with torch.no_grad():
        logits = model(x)
    y, ranked = logits.argmax(1), logits.argsort(1, descending=True)
    start = apgd_module.random_start(x, 0.05, "linf", (0.0, 1.0), torch.Generator().manual_seed(0))
    rows = []
    counted = lambda z: (rows.append(z.shape[0]), model(z))[1]
    kwargs = dict(eps=0.05, norm="linf", steps=20, loss="dlr", rho=0.75, early_stop=True, clip=(0.0, 1.0))
    # Run 0 against the second class (fools easily), run 1 against the last (hardly ever).
    both = dict(x_nat=x.repeat(2, 1, 1, 1), y=y.repeat(2), x_start=start.repeat(2, 1, 1, 1),
                target=torch.cat([ranked[:, 1], ranked[:, -1]]))
    with torch.no_grad():
        ranked_run = apgd_module.apgd_run(counted, **both, **kwargs, sample=torch.arange(16).repeat(2),
                                          rank=torch.arange(2).repeat_interleave(16))
        with_ranks = sum(rows)
        rows.clear()
        plain_run = apgd_module.apgd_run(counted, **both, **kwargs)
        without = sum(rows)
    first = slice(0, 16)
    assert 0 < int(ranked_run.fooled[first].sum()) < 16
    assert torch.equal(ranked_run.x[first], plain_run.x[first])
    assert torch.equal(ranked_run.fooled[first], plain_run.fooled[first])
    assert with_ranks < without  # the rows of run 1 whose sample run 0 fooled stopped early
