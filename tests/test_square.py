"""The L2 Square attack: the paper's pattern and update against their formulas, the invariants
of an attack (ball, box, never weaker than the clean point or the start), reproducibility,
side effects, bad input, and auto_attack with norm="l2"."""

import pytest
import torch
from torch import nn

from robust_fast import attacks
from robust_fast.attacks.apgd import margin
from robust_fast.attacks.square import _l2_candidate, _l2_start, centred_pattern, update_pattern


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def conv_model(in_channels, height, width, seed=0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(in_channels, 6, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(6 * height * width, 10)]
    return nn.Sequential(*layers)


def images(n, shape, seed=1):
    return torch.rand(n, *shape, generator=gen(seed))


def predictions(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def l2_sizes(x_adv, x):
    return (x_adv - x).flatten(1).norm(dim=1)


# --- the pattern and the update -------------------------------------------------------------

@pytest.mark.parametrize("h1, h2", [(1, 1), (2, 1), (5, 2), (5, 5), (7, 3), (8, 4), (9, 9)])
def test_centred_pattern_is_the_papers_formula(h1, h2):
    n = h1 // 2
    expected = torch.zeros(h1, h2, dtype=torch.float64)
    for r in range(1, h1 + 1):
        for s in range(1, h2 + 1):
            m = n - max(abs(r - h1 // 2 - 1), abs(s - h2 // 2 - 1))
            expected[r - 1, s - 1] = sum(1 / (n + 1 - k) ** 2 for k in range(0, m + 1))
    torch.testing.assert_close(centred_pattern(h1, h2), expected)


@pytest.mark.parametrize("h", [1, 2, 3, 4, 7, 10])
def test_update_pattern_two_stripes_of_opposite_sign_unit_norm(h):
    patterns = update_pattern(h)
    eta = patterns[0]
    assert patterns.shape == (2, h, h)
    torch.testing.assert_close(patterns[1], eta.t())
    torch.testing.assert_close(eta.norm(), torch.tensor(1.0, dtype=torch.float64))
    k = h // 2
    assert (eta[:, :k] > 0).all() and (eta[:, k:] < 0).all()
    scale = eta[:, k:].abs().max() / centred_pattern(h, h - k).max()
    torch.testing.assert_close(eta[:, k:], -centred_pattern(h, h - k) * scale)


@pytest.mark.parametrize("shape", [(3, 8, 12), (1, 16, 16), (2, 12, 8), (1, 2, 2)])
def test_start_and_each_update_keep_the_norm_at_eps_without_a_box(shape):
    """Without a box, Algorithm 3 moves mass and adds the unused budget: the norm stays eps.
    Only the two windows change."""
    x = images(6, shape)
    eps = 0.7
    g = gen(3)
    current = _l2_start(x, eps, (None, None), g)
    torch.testing.assert_close(l2_sizes(current, x), torch.full((6,), eps), rtol=1e-5, atol=0)
    for side in (1, 2, min(shape[1:]) - 1, min(shape[1:])):
        if side < 1:
            continue
        for _ in range(5):
            candidate = _l2_candidate(x, current, eps, side, (None, None), g)
            torch.testing.assert_close(l2_sizes(candidate, x), torch.full((6,), eps), rtol=1e-5, atol=0)
            changed_pixels = ((candidate - current).abs() > 1e-5).any(dim=1).flatten(1).sum(dim=1)
            assert (changed_pixels <= 2 * side * side).all()
            current = candidate


def test_update_fills_a_clipped_perturbation_back_up_to_eps():
    """The budget the box took away (eps^2 - ||nu||^2) goes into the next update."""
    x = images(4, (1, 8, 8))
    eps = 1.0
    shrunk = x + 0.3 * (_l2_start(x, eps, (None, None), gen(0)) - x)  # norm 0.3
    candidate = _l2_candidate(x, shrunk, eps, 3, (None, None), gen(1))
    torch.testing.assert_close(l2_sizes(candidate, x), torch.full((4,), eps), rtol=1e-5, atol=0)


# --- the attack ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n, shape", [(1, (3, 8, 12)), (9, (3, 8, 12)), (12, (1, 16, 16)),
                                      (6, (2, 12, 8)), (5, (1, 2, 2))])
@pytest.mark.parametrize("eps", [0.3, 2.0])
def test_inside_ball_and_box_and_never_weaker_than_clean_or_start(n, shape, eps):
    model = conv_model(shape[0], shape[1], shape[2], seed=n)
    x = images(n, shape, seed=n + 1)
    y = predictions(model, x)
    y[::3] = (y[::3] + 1) % 10  # some samples already wrong
    x_before, y_before = x.clone(), y.clone()
    x_adv = attacks.square(model, x, y, eps=eps, norm="l2", n_queries=60, generator=gen(5))
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (l2_sizes(x_adv, x) <= eps * (1 + 1e-5)).all()
    with torch.no_grad():
        wrong_clean = model(x).argmax(1) != y
        wrong_adv = model(x_adv).argmax(1) != y
        assert (wrong_adv >= wrong_clean).all()  # a sample right before may only turn wrong
        assert torch.equal(x_adv[wrong_clean], x[wrong_clean])  # not attacked
        robust = ~wrong_clean
        if robust.any():  # the best point includes the start, the run's first draws
            start = _l2_start(x[robust], eps, (0.0, 1.0), gen(5))
            margin_start = margin(model(start), y[robust])
            margin_adv = margin(model(x_adv[robust]), y[robust])
            assert (margin_adv <= margin_start + 1e-6).all()
            # reported fooled (negative margin) exactly where misclassified
            assert torch.equal(margin_adv < 0, wrong_adv[robust])


def test_reproducible_with_a_seeded_generator():
    model, x = conv_model(3, 8, 12), images(8, (3, 8, 12))
    y = predictions(model, x)
    a = attacks.square(model, x, y, eps=0.5, norm="l2", n_queries=40, generator=gen(7))
    b = attacks.square(model, x, y, eps=0.5, norm="l2", n_queries=40, generator=gen(7))
    c = attacks.square(model, x, y, eps=0.5, norm="l2", n_queries=40, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_fools_a_linear_model_with_a_small_margin():
    """Two classes, z_0 - z_1 = w.(x - 1/2) + 0.05 with ||w|| = 1: any step of L2 size above
    0.05 against w fools; eps = 0.5 leaves a wide margin for a random search."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 12, 2))
    w = torch.randn(3 * 8 * 12)
    w = w / w.norm()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([w / 2, -w / 2]))
        model[1].bias.copy_(torch.tensor([0.025 - w.sum() / 4, -0.025 + w.sum() / 4]))
    x = torch.full((6, 3, 8, 12), 0.5)
    y = torch.zeros(6, dtype=torch.int64)
    torch.testing.assert_close(margin(model(x), y), torch.full((6,), 0.05), rtol=1e-4, atol=1e-5)
    x_adv = attacks.square(model, x, y, eps=0.5, norm="l2", n_queries=200, generator=gen())
    assert (predictions(model, x_adv) != y).all()
    assert (l2_sizes(x_adv, x) <= 0.5 * (1 + 1e-5)).all()


def test_restarts_and_batch_size_keep_the_invariants():
    model, x = conv_model(1, 16, 16, seed=2), images(10, (1, 16, 16), seed=3)
    y = predictions(model, x)
    x_adv = attacks.square(model, x, y, eps=0.4, norm="l2", n_queries=30, restarts=2, batch_size=4,
                           loss="ce", generator=gen())
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (l2_sizes(x_adv, x) <= 0.4 * (1 + 1e-5)).all()


def test_model_in_eval_mode_and_modes_and_grads_restored():
    model = conv_model(3, 8, 12, batchnorm=True)
    model.train()
    model[1].eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    x = images(5, (3, 8, 12))
    y = torch.zeros(5, dtype=torch.int64)
    x_before = x.clone()
    x_adv = attacks.square(model, x, y, eps=0.5, norm="l2", n_queries=10, generator=gen())
    assert seen and not any(seen)
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert torch.equal(x, x_before)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    assert model.training and not model[1].training and model[2].training


def test_square_class_takes_torchattacks_l2():
    model, x = conv_model(3, 8, 12), images(6, (3, 8, 12))
    y = predictions(model, x)
    a = attacks.Square(model, norm="L2", eps=0.5, n_queries=30, n_restarts=1, p_init=0.8,
                       loss="margin", resc_schedule=True, seed=4)(x, y)
    assert torch.equal(a, attacks.square(model, x, y, eps=0.5, norm="l2", n_queries=30, generator=gen(4)))


@pytest.mark.parametrize("kwargs, words", [
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=-1.0), "eps must be"),
    (dict(p_init=0.0), "p_init must be"),
    (dict(p_init=1.5), "p_init must be"),
    (dict(n_queries=0), "n_queries must be"),
])
def test_bad_arguments(kwargs, words):
    model, x = conv_model(1, 8, 8), images(3, (1, 8, 8))
    y = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=words):
        attacks.square(model, x, y, **dict(dict(eps=0.5, norm="l2"), **kwargs))


# --- auto_attack --------------------------------------------------------------------------------

def test_auto_attack_l2_runs_and_is_at_least_as_strong_as_apgd_alone():
    model, x = conv_model(1, 16, 16, seed=4), images(30, (1, 16, 16), seed=5)
    y = predictions(model, x)
    y[:5] = (y[:5] + 1) % 10
    eps = 0.3
    result = attacks.auto_attack(model, x, y, eps=eps, norm="l2", steps=5, n_target_classes=2,
                                 n_queries=40, generator=gen())
    assert result.attacks == ("apgd-ce", "apgd-t", "square")
    assert (l2_sizes(result.x_adv, x) <= eps * (1 + 1e-5)).all()
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    wrong_adv = predictions(model, result.x_adv) != y
    assert torch.equal(result.fooled_by != -1, wrong_adv)
    alone = attacks.apgd(model, x, y, eps=eps, norm="l2", steps=5, generator=gen())
    robust_alone = float((predictions(model, alone) == y).float().mean())
    assert result.robust_accuracy() <= robust_alone
    with pytest.raises(ValueError, match="eps must be > 0"):
        attacks.auto_attack(model, x, y, eps=0.0, norm="l2")


def test_skipping_unchanged_windows_changes_no_result(monkeypatch):
    """On CPU a candidate equal to the best point is not queried: querying every candidate (the
    accelerator's path, here with fooled samples leaving after every query as on CPU) gives the
    same points, with more rows through the model."""
    import sys
    square_module = sys.modules["robust_fast.attacks.square"]
    model = conv_model(1, 8, 8, seed=3)
    x = images(24, (1, 8, 8), seed=4)
    y = predictions(model, x)
    calls = []
    counting = lambda z: calls.append(z.shape[0]) or model(z)
    skipping = attacks.square(counting, x, y, eps=0.05, n_queries=300, generator=gen(5))
    seen_skipping = sum(calls)
    monkeypatch.setattr(square_module, "reads_back_for_free", lambda device: False)
    monkeypatch.setattr(square_module, "COMPACT_EVERY", 1)
    calls.clear()
    every = attacks.square(counting, x, y, eps=0.05, n_queries=300, generator=gen(5))
    assert sum(calls) > seen_skipping
    assert torch.equal(skipping, every)
