"""FAB-T: the projection against a linear and a quadratic program (scipy), Newton against the
sort, the closed-form minimal perturbation of a linear model, the invariants of an attack (ball,
box, never weaker than no attack), reproducibility, the torchattacks-compatible class, bad input."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from robust_fast import attacks
from robust_fast.attacks.fab import project_to_hyperplane_in_box

scipy_optimize = pytest.importorskip("scipy.optimize")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sizes(d, norm):
    flat = d.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


# --- the projection ---------------------------------------------------------------------------

def _least_move(t, w, gap, norm):
    """min |d| with w . d = -gap, 0 <= t + d <= 1, by scipy (None when infeasible)."""
    n = t.shape[0]
    bounds = [(-float(v), 1 - float(v)) for v in t]
    if norm == "linf":  # variables (d, s): minimise s with -s <= d_i <= s
        c = np.r_[np.zeros(n), 1.0]
        rows = [np.r_[np.eye(n)[i], -1.0] for i in range(n)] + [np.r_[-np.eye(n)[i], -1.0] for i in range(n)]
        res = scipy_optimize.linprog(c, A_ub=np.array(rows), b_ub=np.zeros(2 * n),
                                     A_eq=np.r_[w, 0.0][None], b_eq=[-gap], bounds=bounds + [(0, None)])
        return res.fun if res.success else None
    res = scipy_optimize.minimize(lambda v: v @ v, np.zeros(n), jac=lambda v: 2 * v, bounds=bounds,
                                  constraints=[{"type": "eq", "fun": lambda v: w @ v + gap}], method="SLSQP",
                                  options={"ftol": 1e-14, "maxiter": 500})
    return math.sqrt(res.fun) if res.success and abs(w @ res.x + gap) < 1e-8 else None


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_is_the_least_move_to_the_hyperplane_inside_the_box(norm):
    g = gen(3)
    for _ in range(12):
        t = torch.rand(1, 10, generator=g, dtype=torch.float64)
        w = torch.randn(1, 10, generator=g, dtype=torch.float64)
        w[0, :2] = 0  # coordinates that do not count do not move
        gap = torch.randn(1, generator=g, dtype=torch.float64) * 0.5
        best = _least_move(t[0].numpy(), w[0].numpy(), float(gap), norm)
        for method in ("newton", "sort"):
            d = project_to_hyperplane_in_box(t, w, gap, norm, method=method)
            assert ((t + d) >= 0).all() and ((t + d) <= 1).all()
            assert (d[0, :2] == 0).all()
            if best is not None:
                torch.testing.assert_close((w * d).sum(), -gap[0])
                assert float(sizes(d, norm)) == pytest.approx(best, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("box", [(0.0, 1.0), (None, None), (0.0, None)])
def test_newton_agrees_with_the_sort_and_the_unreachable_case_is_the_corner(norm, box):
    g = gen(4)
    t = torch.rand(200, 40, generator=g, dtype=torch.float64)
    w = torch.randn(200, 40, generator=g, dtype=torch.float64)
    w[:, :3] = 0
    gap = torch.randn(200, generator=g, dtype=torch.float64) * torch.rand(200, generator=g, dtype=torch.float64) * 8
    newton = project_to_hyperplane_in_box(t, w, gap, norm, *box)
    torch.testing.assert_close(newton, project_to_hyperplane_in_box(t, w, gap, norm, *box, method="sort"))
    assert torch.isfinite(newton).all()
    if box == (0.0, 1.0):
        corner = torch.where(w * torch.sign(gap)[:, None] > 0, -t, 1 - t) * (w != 0)
        unreachable = (w * corner).sum(dim=1).abs() < gap.abs()
        assert unreachable.any() and (~unreachable).any()
        torch.testing.assert_close(newton[unreachable], corner[unreachable])


# --- a linear model: the distance to the decision boundary in closed form ----------------------

def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).double()


@pytest.mark.parametrize("norm, dual", [("linf", 1), ("l2", 2)])
@pytest.mark.parametrize("clip", [(0.0, 1.0), None])
def test_finds_the_minimal_perturbation_of_a_linear_model(norm, dual, clip):
    model = linear_model()
    x = 0.45 + 0.1 * torch.rand(40, 1, 4, 4, generator=gen(1), dtype=torch.float64)  # far from the box
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(dim=1)
    target = logits.argsort(dim=1, descending=True)[:, 1]  # FAB-T's first target
    weight = model[1].weight
    # |z_y - z_t| / ||w_y - w_t||_dual: the distance to the hyperplane z_y = z_t.
    expected = (logits.gather(1, y[:, None]) - logits.gather(1, target[:, None])).squeeze(1) \
        / (weight[y] - weight[target]).norm(p=dual, dim=1)
    x_adv = attacks.fab_t(model, x, y, eps=10.0, norm=norm, early_stop=False, clip=clip)
    with torch.no_grad():
        assert (model(x_adv).argmax(dim=1) != y).all()
    ratio = sizes(x_adv - x, norm) / expected
    assert (ratio >= 1 - 1e-9).all() and (ratio <= 1.01).all()


# --- the invariants on a small convolutional model ---------------------------------------------

def conv_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 10))


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_inside_ball_and_box_and_never_weaker_than_no_attack(norm, eps):
    model = conv_model()
    x = torch.rand(48, 1, 8, 8, generator=gen(2))
    y = torch.randint(0, 10, (48,), generator=gen(5))
    with torch.no_grad():
        y[:36] = model(x[:36]).argmax(dim=1)  # most samples correct, some already wrong
        wrong_clean = model(x).argmax(dim=1) != y
    before = x.clone()
    x_adv = attacks.fab_t(model, x, y, eps=eps, norm=norm, steps=20, n_target_classes=3, restarts=2,
                          generator=gen())
    assert torch.equal(x, before)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (sizes(x_adv - x, norm) <= eps + 1e-6).all()
    with torch.no_grad():
        wrong_adv = model(x_adv).argmax(dim=1) != y
    assert (wrong_adv | ~wrong_clean).all()                     # never weaker than no attack
    assert torch.equal(x_adv[wrong_clean], x[wrong_clean])      # misclassified: returned as they are
    moved = (x_adv != x).flatten(1).any(dim=1)
    assert (wrong_adv[moved]).all() and wrong_adv[~wrong_clean].any()  # a point is moved only to fool


def test_reproducible_with_a_seeded_generator_and_batch_size_changes_nothing():
    model = conv_model(1)
    x = torch.rand(20, 1, 8, 8, generator=gen(6))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    run = lambda **kw: attacks.fab_t(model, x, y, eps=0.03, steps=8, n_target_classes=2, restarts=3, **kw)
    a = run(generator=gen(7))
    assert torch.equal(a, run(generator=gen(7)))
    assert torch.equal(run(generator=gen(7), early_stop=False, batch_size=20),
                       run(generator=gen(7), early_stop=False, batch_size=20))


def test_fab_class_takes_torchattacks_arguments():
    model = conv_model(2)
    x = torch.rand(12, 1, 8, 8, generator=gen(8))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    a = attacks.FAB(model, norm="L2", eps=0.5, steps=6, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
                    verbose=False, seed=0, multi_targeted=True, n_classes=4)(x, y)
    assert torch.equal(a, attacks.fab_t(model, x, y, eps=0.5, norm="l2", steps=6, n_target_classes=3,
                                        early_stop=False, generator=gen(0)))
    with pytest.raises(ValueError, match="multi_targeted=True"):
        attacks.FAB(model)


@pytest.mark.parametrize("kwargs, words", [
    ({"n_target_classes": 0}, "n_target_classes must be"),
    ({"alpha_max": 1.5}, "alpha_max must be"),
    ({"eta": 0.0}, "eta must be"),
    ({"beta": -0.1}, "beta must be"),
    ({"norm": "l1"}, "norm must be 'linf' or 'l2'"),
    ({"steps": -1}, "steps must be >= 0"),
])
def test_bad_arguments(kwargs, words):
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=words):
        attacks.fab_t(conv_model(), x, torch.zeros(2, dtype=torch.int64), **kwargs)
