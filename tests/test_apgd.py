"""APGD, APGD-T, Square and auto_attack: the schedule and the halving rule against the paper's
formulas, per-sample trajectories, the invariants of an attack, side effects, bad input."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_fast import attacks
from robust_fast.attacks.apgd import (checkpoint_fractions, checkpoints, dlr_loss, halving_mask, margin,
                                      random_start, targeted_dlr_loss)
from robust_fast.attacks.square import p_selection, window_side

# The module itself: the package's attribute attacks.apgd is the function.
apgd_module = importlib.import_module("robust_fast.attacks.apgd")


def small_model(seed=0, in_channels=1, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(in_channels, 8, 4, stride=2, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
               nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10)]
    return nn.Sequential(*layers)


def batch(n=24, channels=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def correct_labels(model, x):
    with torch.no_grad():  # labels the model gets right, so that the attack has work to do
        return model(x).argmax(1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- the schedule and the rule ----------------------------------------------------------------

@pytest.mark.parametrize("steps", [5, 10, 20, 50, 100, 250, 1000])
def test_checkpoints_follow_the_papers_formula(steps):
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0 + 1e-12:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert checkpoint_fractions() == pytest.approx(p)
    expected = sorted({math.ceil(round(q * steps, 9)) for q in p[1:]} - {0})
    assert checkpoints(steps) == [w for w in expected if w < steps]


def test_checkpoints_of_100_steps():
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (then 1.05 > 1)
    assert checkpoint_fractions() == pytest.approx([0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99])
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_halving_rule():
    increases = torch.tensor([10, 16, 17, 20, 20, 20], dtype=torch.int32)
    halved_last = torch.tensor([False, False, False, False, True, False])
    loss_best = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    loss_best_last = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    # interval 22, rho 0.75: fewer than 16.5 increases halves; so does a stall without a halving.
    mask = halving_mask(increases, 22, 0.75, halved_last, loss_best, loss_best_last)
    assert mask.tolist() == [True, True, False, False, False, True]


def test_losses():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 4.0, 2.0, 1.0]])
    y = torch.tensor([0, 2])
    # Sample 0 is right: -(3 - 1) / (3 - 0); sample 1 is wrong: -(2 - 4) / (4 - 1).
    torch.testing.assert_close(dlr_loss(logits, y), torch.tensor([-2 / 3, 2 / 3]), rtol=1e-6, atol=1e-9)
    target = torch.tensor([3, 1])
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    torch.testing.assert_close(targeted_dlr_loss(logits, y, target),
                               torch.tensor([-4 / (3 - (-0.5)), 2 / (4 - 0.5)]), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(margin(logits, y), torch.tensor([2.0, -2.0]))


def test_square_schedule():
    assert p_selection(0.8, 0, 10000) == 0.8 and p_selection(0.8, 11, 10000) == 0.4
    assert p_selection(0.8, 5000, 10000) == 0.8 / 128 and p_selection(0.8, 9999, 10000) == 0.8 / 512
    assert p_selection(0.8, 500, 1000) == 0.8 / 128  # the budget is rescaled to 10000
    assert p_selection(0.8, 500, 1000, rescale=False) == 0.8 / 8
    assert window_side(0.8, 1, 28, 28) == 25 and window_side(1e-4, 3, 32, 32) == 1
    assert window_side(1.0, 1, 28, 28) == 27  # never the whole side


# --- APGD -------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm, eps", [("linf", 0.03), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_trajectory_is_the_same_alone_in_a_batch_and_with_early_stop(norm, eps, loss):
    model, (x, _) = small_model(seed=4), batch(20, seed=5)
    y = correct_labels(model, x)
    results = [attacks.apgd(model, x, y, eps=eps, norm=norm, steps=12, loss=loss, restarts=2,
                            early_stop=early_stop, batch_size=batch_size, generator=gen())
               for early_stop in (True, False) for batch_size in (None, 1, 7)]
    for other in results[1:]:
        if norm == "linf":  # signs do not see the batch's last bits
            assert torch.equal(other, results[0])
        else:  # the model's outputs differ in their last bits from one batch size to another
            torch.testing.assert_close(other, results[0], rtol=0, atol=1e-5)
    fooled = correct_labels(model, results[0]) != y
    assert 0 < fooled.sum() < len(y)  # the test sees both kinds of sample


@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-dlr", "apgd-t"])
@pytest.mark.parametrize("norm, eps", [("linf", 0.03), ("l2", 0.5)])
def test_inside_ball_and_box_and_never_weaker_than_the_start(attack, norm, eps):
    model, (x, y) = small_model(seed=2), batch(32, seed=3)
    y[:16] = correct_labels(model, x)[:16]  # some right, some already wrong
    x_before, y_before = x.clone(), y.clone()
    if attack == "apgd-t":
        x_adv = attacks.apgdt(model, x, y, eps=eps, norm=norm, steps=8, n_target_classes=3, generator=gen())
    else:
        x_adv = attacks.apgd(model, x, y, eps=eps, norm=norm, steps=8, loss=attack[5:], generator=gen())
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-6)).all()
    with torch.no_grad():
        wrong_clean = model(x).argmax(1) != y
        wrong_adv = model(x_adv).argmax(1) != y
        assert (wrong_adv >= wrong_clean).all()
        assert torch.equal(x_adv[wrong_clean], x[wrong_clean])  # not attacked, returned as is
        if attack == "apgd-ce":  # the highest-loss point includes the start
            start = random_start(x, eps, norm, (0.0, 1.0), gen())
            loss_start = F.cross_entropy(model(start), y, reduction="none")
            loss_adv = F.cross_entropy(model(x_adv), y, reduction="none")
            robust = ~wrong_clean & ~wrong_adv
            assert (loss_adv[robust] >= loss_start[robust] - 1e-6).all()


def test_apgd_is_stronger_than_its_start_and_than_a_few_pgd_steps():
    model, (x, _) = small_model(seed=4), batch(64, seed=5)
    y = correct_labels(model, x)
    eps = 0.02
    x_apgd = attacks.apgd(model, x, y, eps=eps, steps=20, generator=gen())
    x_pgd = attacks.pgd(model, x, y, eps=eps, alpha=eps / 4, steps=20, generator=gen())
    with torch.no_grad():
        robust_apgd = (model(x_apgd).argmax(1) == y).float().mean()
        robust_pgd = (model(x_pgd).argmax(1) == y).float().mean()
    assert robust_apgd <= robust_pgd
    assert robust_apgd < 1


def test_restarts_attack_only_the_survivors_and_keep_fooled_points():
    model, (x, _) = small_model(seed=4), batch(40, seed=5)
    y = correct_labels(model, x)
    one = attacks.apgd(model, x, y, eps=0.02, steps=6, generator=gen(1))
    three = attacks.apgd(model, x, y, eps=0.02, steps=6, restarts=3, generator=gen(1))
    fooled_one = correct_labels(model, one) != y
    fooled_three = correct_labels(model, three) != y
    assert (fooled_three >= fooled_one).all()
    assert torch.equal(three[fooled_one], one[fooled_one])  # the first restart is the same run


def test_apgdt_fools_at_least_what_each_of_its_targets_alone_would_not_miss():
    model, (x, _) = small_model(seed=6), batch(48, seed=7)
    y = correct_labels(model, x)
    one = attacks.apgdt(model, x, y, eps=0.03, steps=8, n_target_classes=1, generator=gen())
    three = attacks.apgdt(model, x, y, eps=0.03, steps=8, n_target_classes=3, generator=gen())
    fooled_one = correct_labels(model, one) != y
    fooled_three = correct_labels(model, three) != y
    # The first target's run draws the same start: every sample it fools stays fooled.
    assert (fooled_three >= fooled_one).all()


def test_attacks_leave_parameters_inputs_and_modes_alone():
    model, (x, y) = small_model(batchnorm=True), batch()
    model.train()
    model[1].eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    for attack in (lambda: attacks.apgd(model, x, y, eps=0.03, steps=4, restarts=2),
                   lambda: attacks.apgdt(model, x, y, eps=0.03, steps=4, n_target_classes=2),
                   lambda: attacks.square(model, x, y, eps=0.03, n_queries=20),
                   lambda: attacks.auto_attack(model, x, y, eps=0.03, steps=4, n_target_classes=2,
                                               n_queries=20).x_adv):
        x_adv = attack()
        assert not x_adv.requires_grad and x_adv.grad_fn is None
        assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
        assert model.training and not model[1].training and model[2].training


def test_reads_back_from_the_device_only_at_checkpoints(monkeypatch):
    """Each bool() of a tensor is a host synchronisation on a GPU: count them in the loop, under
    the policy of a device where reading back is not free."""
    monkeypatch.setattr(apgd_module, "reads_back_for_free", lambda device: False)
    model, (x, _) = small_model(seed=4), batch(16, seed=5)
    y = correct_labels(model, x)
    calls = []
    real_bool, real_item = torch.Tensor.__bool__, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: calls.append("bool") or real_bool(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append("item") or real_item(self))
    steps = 50
    attacks.apgd(model, x, y, eps=0.01, steps=steps, generator=gen())
    assert len(calls) <= len(checkpoints(steps))


# --- Square and auto_attack --------------------------------------------------------------------

def test_square_inside_ball_and_box_and_finds_adversarial_points():
    model, (x, _) = small_model(seed=4), batch(32, seed=5)
    y = correct_labels(model, x)
    x_adv = attacks.square(model, x, y, eps=0.1, n_queries=200, generator=gen())
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((x_adv - x).abs().amax(dim=(1, 2, 3)) <= 0.1 + 1e-6).all()
    with torch.no_grad():
        margin_clean = margin(model(x), y)
        margin_adv = margin(model(x_adv), y)
    assert (margin_adv < 0).sum() > 0  # some samples fooled without a gradient
    assert margin_adv.mean() < margin_clean.mean()


def test_auto_attack_runs_each_attack_on_the_survivors():
    model, (x, y) = small_model(seed=4), batch(40, seed=5)
    y[:30] = correct_labels(model, x)[:30]
    result = attacks.auto_attack(model, x, y, eps=0.02, steps=6, n_target_classes=2, n_queries=50,
                                 generator=gen())
    assert result.attacks == ("apgd-ce", "apgd-t", "square")
    assert set(result.seconds) == {"clean", "apgd-ce", "apgd-t", "square"}
    with torch.no_grad():
        wrong_clean = model(x).argmax(1) != y
        wrong_adv = model(result.x_adv).argmax(1) != y
    assert torch.equal(result.fooled_by == 0, wrong_clean)
    assert torch.equal(result.fooled_by != -1, wrong_adv)  # fooled exactly where it says
    assert torch.equal(result.x_adv[result.fooled_by <= 0], x[result.fooled_by <= 0])
    counts = result.breakdown()
    assert sum(counts.values()) == len(y) and counts["apgd-ce"] > 0
    assert result.robust_accuracy() == pytest.approx(counts["robust"] / len(y))
    # APGD-CE alone, from the same generator state, fools exactly the samples credited to it.
    alone = attacks.apgd(model, x, y, eps=0.02, steps=6, generator=gen())
    with torch.no_grad():
        fooled_alone = (model(alone).argmax(1) != y) & ~wrong_clean
    assert torch.equal(fooled_alone, result.fooled_by == 1)


def test_classes_take_torchattacks_arguments():
    model, (x, _) = small_model(seed=4), batch(16, seed=5)
    y = correct_labels(model, x)
    a = attacks.APGD(model, norm="Linf", eps=0.03, steps=5, n_restarts=1, seed=0, loss="ce",
                     eot_iter=1, rho=0.75, verbose=False)(x, y)
    assert torch.equal(a, attacks.apgd(model, x, y, eps=0.03, steps=5, generator=gen(0)))
    b = attacks.APGDT(model, norm="L2", eps=0.5, steps=5, n_restarts=1, seed=2, n_classes=4)(x, y)
    assert torch.equal(b, attacks.apgdt(model, x, y, eps=0.5, norm="l2", steps=5, n_target_classes=3,
                                        generator=gen(2)))
    c = attacks.Square(model, norm="Linf", eps=0.05, n_queries=30, n_restarts=1, p_init=0.8,
                       loss="margin", resc_schedule=True, seed=0, verbose=False)(x, y)
    assert torch.equal(c, attacks.square(model, x, y, eps=0.05, n_queries=30, generator=gen(0)))


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, words", [
    (lambda m, x, y: attacks.apgd(m, x, y, loss="cw"), ValueError, "loss must be one of"),
    (lambda m, x, y: attacks.apgd(m, x, y, norm="l1"), ValueError, "norm must be 'linf' or 'l2'"),
    (lambda m, x, y: attacks.apgd(m, x, y, eps=-1.0), ValueError, "eps must be a finite float"),
    (lambda m, x, y: attacks.apgd(m, x, y, steps=1.5), TypeError, "steps must be an int"),
    (lambda m, x, y: attacks.apgd(m, x, y, restarts=0), ValueError, "restarts must be >= 1"),
    (lambda m, x, y: attacks.apgd(m, x, y, rho=2.0), ValueError, r"rho must be a float in \[0, 1\]"),
    (lambda m, x, y: attacks.apgd(m, x, y, batch_size=0), ValueError, "batch_size must be None"),
    (lambda m, x, y: attacks.apgd(m, x, y.float()), TypeError, "y must be an int64 tensor"),
    (lambda m, x, y: attacks.apgd(m, x, y[:3]), ValueError, r"y must have shape \(4,\)"),
    (lambda m, x, y: attacks.apgdt(m, x, y, n_target_classes=0), ValueError, "n_target_classes"),
    (lambda m, x, y: attacks.square(m, x, y, norm="l2", eps=0.0), ValueError, "eps must be > 0"),
    (lambda m, x, y: attacks.square(m, x, y, n_queries=0), ValueError, "n_queries must be"),
    (lambda m, x, y: attacks.square(m, x, y, p_init=0.0), ValueError, "p_init must be"),
    (lambda m, x, y: attacks.square(m, x.flatten(1), y), ValueError, r"images \(B, C, H, W\)"),
    (lambda m, x, y: attacks.auto_attack(m, x, y, attacks=("fab",)), ValueError, "attacks must be"),
    (lambda m, x, y: attacks.auto_attack(m, x, y, version="plus"), ValueError, "version must be one of"),
    (lambda m, x, y: attacks.auto_attack(m, x, y, norm="l2", eps=0.0), ValueError, "eps must be > 0"),
    (lambda m, x, y: attacks.APGD(m, eot_iter=2), ValueError, "eot_iter must be 1"),
    (lambda m, x, y: attacks.APGD(m, norm="linf"), ValueError, "norm must be 'Linf' or 'L2'"),
])
def test_bad_arguments(call, error, words):
    x, y = batch(4)
    with pytest.raises(error, match=words):
        call(small_model(), x, y)


def test_dlr_losses_need_enough_classes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))
    x, _ = batch(4)
    y = torch.zeros(4, dtype=torch.int64)
    attacks.apgd(model, x, y, loss="dlr", steps=2)  # three classes suffice for DLR
    with pytest.raises(ValueError, match="needs at least 4 classes"):
        attacks.apgdt(model, x, y, steps=2)


@pytest.mark.parametrize("name", ["apgd", "apgdt", "pgd", "square"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_an_empty_batch_comes_back_empty(name, norm):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.int64)
    out = getattr(attacks, name)(model, x, y, eps=0.1, norm=norm)
    assert out.shape == x.shape and out is not x
