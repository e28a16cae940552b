"""Attacks: torchattacks equivalence, side effects, restarts, targeted, early stop."""
import pytest
import torch
from torch import nn

from robust_fast import attacks

torchattacks = pytest.importorskip("torchattacks")


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


@pytest.mark.parametrize("steps, eps, alpha", [(10, 8 / 255, 2 / 255), (5, 0.1, 0.03), (1, 0.3, 0.3)])
def test_pgd_linf_is_bit_identical_to_torchattacks(steps, eps, alpha):
    model, (x, y) = small_model(), batch()
    expected = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert torch.equal(attacks.pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=False), expected)
    ours = attacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert torch.equal(ours, expected)


def test_pgd_linf_random_start_draws_like_torchattacks():
    model, (x, y) = small_model(), batch()
    torch.manual_seed(7)
    expected = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=4)(x, y)
    torch.manual_seed(7)
    assert torch.equal(attacks.PGD(model, eps=0.1, alpha=0.02, steps=4)(x, y), expected)


def test_pgd_l2_matches_torchattacks():
    model, (x, y) = small_model(), batch(channels=3)
    model = small_model(in_channels=3)
    expected = torchattacks.PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=False)(x, y)
    ours = attacks.PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=False)(x, y)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    expected = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=3)(x, y)
    torch.manual_seed(3)
    torch.testing.assert_close(attacks.PGDL2(model, eps=0.5, alpha=0.1, steps=3)(x, y), expected,
                               rtol=1e-6, atol=1e-6)


def test_targeted_matches_torchattacks():
    model, (x, y) = small_model(), batch()
    target = (y + 3) % 10
    reference_attack = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=False)
    reference_attack.set_mode_targeted_by_label(quiet=True)
    expected = reference_attack(x, target)
    ours = attacks.PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=False)
    ours.set_mode_targeted_by_label()
    assert torch.equal(ours(x, target), expected)


def test_fgsm_matches_torchattacks():
    model, (x, y) = small_model(), batch()
    expected = torchattacks.FGSM(model, eps=8 / 255)(x, y)
    torch.testing.assert_close(attacks.FGSM(model, eps=8 / 255)(x, y), expected, rtol=0, atol=1e-7)
    assert ((attacks.fgsm(model, x, y, eps=8 / 255) - x).abs() <= 8 / 255 + 1e-7).all()


def test_attacks_leave_parameters_inputs_and_modes_alone():
    model, (x, y) = small_model(batchnorm=True), batch()
    model.train()
    model[1].eval()  # a module whose own mode differs from its parent's must keep it
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    x_before, y_before = x.clone(), y.clone()
    for attack in (lambda: attacks.pgd(model, x, y, eps=0.1, alpha=0.02, steps=3, restarts=2),
                   lambda: attacks.fgsm(model, x, y, eps=0.1),
                   lambda: attacks.pgd(model, x, y, norm="l2", eps=1.0, alpha=0.3, steps=3, early_stop=True)):
        x_adv = attack()
        assert not x_adv.requires_grad and x_adv.grad_fn is None  # no graph outlives the attack
        assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
        assert torch.equal(x, x_before) and torch.equal(y, y_before)
        assert model.training and not model[1].training and model[2].training


def test_attack_runs_the_model_in_eval_mode_unless_asked():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = nn.Sequential(Probe(), nn.Flatten(), nn.Linear(256, 10)).train()
    x, y = batch(4)
    attacks.pgd(model, x, y, steps=1)
    assert seen == [False]
    attacks.pgd(model, x, y, steps=1, model_training=True)
    assert seen == [False, True]
    assert model.training


def test_result_stays_in_ball_and_box():
    model, (x, y) = small_model(), batch()
    for norm, eps in (("linf", 0.1), ("l2", 0.8)):
        for early_stop in (False, True):
            x_adv = attacks.pgd(model, x, y, eps=eps, alpha=eps / 3, steps=5, norm=norm,
                                restarts=2, early_stop=early_stop)
            assert x_adv.min() >= 0 and x_adv.max() <= 1
            delta = (x_adv - x).flatten(1)
            size = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
            assert (size <= eps * (1 + 1e-6)).all()


def robust_mask(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def test_early_stop_is_never_weaker():
    model, (x, _) = small_model(seed=4), batch(64, seed=5)
    with torch.no_grad():  # labels the model gets right, so that some resist the attack
        y = model(x).argmax(1)
    for norm, eps, alpha in (("linf", 0.01, 0.003), ("l2", 0.1, 0.03)):
        full = attacks.pgd(model, x, y, eps=eps, alpha=alpha, steps=10, norm=norm,
                           generator=torch.Generator().manual_seed(0))
        early = attacks.pgd(model, x, y, eps=eps, alpha=alpha, steps=10, norm=norm, early_stop=True,
                            generator=torch.Generator().manual_seed(0))
        still_robust_full, still_robust_early = robust_mask(model, full, y), robust_mask(model, early, y)
        # Every sample the full run fools, the early-stop run fools too.
        assert not (still_robust_early & ~still_robust_full).any()
        # Samples never fooled follow the same trajectory.
        both = still_robust_full & still_robust_early
        torch.testing.assert_close(early[both], full[both])
        assert 0 < still_robust_early.sum() < len(y)  # the test exercises both kinds of sample


def test_early_stop_stops_fooled_samples_where_they_are():
    model, (x, y) = small_model(seed=4), batch(32, seed=5)
    with torch.no_grad():
        clean_wrong = model(x).argmax(1) != y
    assert clean_wrong.any()
    x_adv = attacks.pgd(model, x, y, eps=0.1, alpha=0.02, steps=5, random_start=False, early_stop=True)
    assert torch.equal(x_adv[clean_wrong], x[clean_wrong])  # already fooled: never moved


def test_restarts_keep_the_strongest_perturbation():
    model, (x, y) = small_model(seed=2), batch(48, seed=3)
    loss = torch.nn.functional.cross_entropy
    singles = [attacks.pgd(model, x, y, eps=0.03, alpha=0.01, steps=3, generator=torch.Generator().manual_seed(s))
               for s in range(3)]
    best = attacks.pgd(model, x, y, eps=0.03, alpha=0.01, steps=3, restarts=3,
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fooled = torch.stack([model(s).argmax(1) != y for s in singles])
        losses = torch.stack([loss(model(s), y, reduction="none") for s in singles])
        best_fooled = model(best).argmax(1) != y
        best_loss = loss(model(best), y, reduction="none")
    # The restarts draw one after another from one generator: the first equals singles[0].
    assert (best_fooled >= fooled[0]).all()
    assert (best_fooled | (best_loss >= losses[0] - 1e-6)).all()
    assert best_fooled.sum() >= fooled[0].sum()


def test_targeted_reaches_targets():
    model, (x, y) = small_model(seed=6), batch(32)
    target = (y + 1) % 10
    x_adv = attacks.pgd(model, x, target, eps=0.5, alpha=0.05, steps=20, targeted=True)
    with torch.no_grad():
        hit = (model(x_adv).argmax(1) == target).float().mean()
        before = (model(x).argmax(1) == target).float().mean()
    assert hit > before


def test_custom_per_sample_loss():
    model, (x, y) = small_model(), batch()
    per_sample = lambda logits, labels: torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    a = attacks.pgd(model, x, y, eps=0.1, alpha=0.02, steps=3, random_start=False, loss_fn=per_sample)
    b = attacks.pgd(model, x, y, eps=0.1, alpha=0.02, steps=3, random_start=False)
    assert torch.equal(a, b)  # the sum's per-sample gradients have the mean's signs


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(x=torch.zeros(4, 1, 16, 16, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    (dict(y=torch.zeros(4)), TypeError, "y must be an int64 tensor"),
    (dict(y=torch.zeros(5, dtype=torch.int64)), ValueError, r"y must have shape \(4,\)"),
    (dict(steps=-1), ValueError, "steps must be >= 0"),
    (dict(steps=2.5), TypeError, "steps must be an int"),
    (dict(restarts=0), ValueError, "restarts must be >= 1"),
    (dict(norm="l1"), ValueError, "norm must be 'linf' or 'l2'"),
    (dict(eps=-1.0), ValueError, "eps must be >= 0"),
])
def test_bad_attack_arguments(kwargs, error, words):
    args = dict(x=torch.rand(4, 1, 16, 16), y=torch.zeros(4, dtype=torch.int64))
    args.update(kwargs)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(error, match=words):
        attacks.pgd(small_model(), x, y, **args)


def test_early_stop_when_no_sample_succeeds():
    model, (x, _) = small_model(seed=4), batch(16, seed=5)
    with torch.no_grad():
        y = model(x).argmax(1)
    full = attacks.pgd(model, x, y, eps=1e-4, alpha=1e-5, steps=3, random_start=False)
    early = attacks.pgd(model, x, y, eps=1e-4, alpha=1e-5, steps=3, random_start=False, early_stop=True)
    assert torch.equal(early, full)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_batch_size_does_not_change_the_result(batch_size):
    model, (x, _) = small_model(seed=4), batch(40, seed=5)
    with torch.no_grad():
        y = model(x).argmax(1)
    for norm, eps, alpha in (("linf", 0.03, 0.01), ("l2", 0.3, 0.1)):
        for early_stop in (False, True):
            options = dict(eps=eps, alpha=alpha, steps=6, norm=norm, early_stop=early_stop)
            whole = attacks.pgd(model, x, y, generator=torch.Generator().manual_seed(0), **options)
            pooled = attacks.pgd(model, x, y, batch_size=batch_size,
                                 generator=torch.Generator().manual_seed(0), **options)
            if norm == "linf":  # each sample's trajectory is its own: the signs do not see the batch
                assert torch.equal(pooled, whole)
            else:
                torch.testing.assert_close(pooled, whole, rtol=1e-5, atol=1e-6)


def test_early_stop_pool_keeps_the_model_fed():
    batch_sizes = []
    model = small_model(seed=4)
    model[0].register_forward_hook(lambda module, inputs, output: batch_sizes.append(inputs[0].shape[0]))
    x, _ = batch(50, seed=5)
    with torch.no_grad():
        y = model(x).argmax(1)
    batch_sizes.clear()
    attacks.pgd(model, x, y, eps=0.05, alpha=0.01, steps=5, early_stop=True, batch_size=16)
    # Full batches until the waiting samples run out, then the pool drains.
    refills = batch_sizes[: next(i for i, b in enumerate(batch_sizes) if b < 16)]
    assert len(refills) >= 3 and all(b == 16 for b in refills)
    assert sum(batch_sizes) <= 50 * 5


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size must be None or an int >= 1"):
        attacks.pgd(small_model(), *batch(4), batch_size=0)


def test_pgdl2_eps_for_division_matches_torchattacks():
    model, (x, _) = small_model(in_channels=3), batch(channels=3)
    y = torch.randint(0, 10, (x.shape[0],))
    for division in (0.0, 0.5, 5.0):  # large enough to shorten the step visibly
        expected = torchattacks.PGDL2(model, 1.0, 0.2, 3, False, eps_for_division=division)(x, y)
        ours = attacks.PGDL2(model, 1.0, 0.2, 3, False, eps_for_division=division)(x, y)
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_training_mode_keeps_batchnorm_in_eval_and_restores_every_mode():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((self.training, model[1].training))
            return x

    model = nn.Sequential(Probe(), nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(256, 10)).eval()
    x, y = batch(4)
    attack = attacks.PGD(model, steps=1)
    attack.set_model_training_mode(model_training=True)
    attack(x, y)
    attack.set_model_training_mode(model_training=True, batchnorm_training=True)
    attack(x, y)
    assert seen == [(True, False), (True, True)]
    assert not any(m.training for m in model.modules())  # torchattacks would leave it training


def test_normalization_round_trip():
    model, (x, y) = small_model(in_channels=3), batch(channels=3)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    attack = attacks.PGD(model, eps=0.1, alpha=0.02, steps=3)
    attack.set_normalization_used(mean, std)
    x_norm = attack.normalize(x)
    x_adv = attack(x_norm, y)
    pixels = attack.inverse_normalize(x_adv)
    assert ((pixels - x).abs() <= 0.1 + 1e-5).all() and pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert torch.equal(attack.get_logits(x_adv), model(x_adv))  # outside the attack: as given


@pytest.mark.parametrize("call, words", [
    (lambda a: a.set_normalization_used([0.5, 0.5], [0.2]), "same length"),
    (lambda a: a.set_normalization_used([[0.5]], [[0.2]]), "one number per channel"),
    (lambda a: a.set_normalization_used([0.5], [0.0]), "std must not contain 0"),
    (lambda a: a.set_mode_targeted_least_likely(kth_min=0), "kth_min"),
    (lambda a: a.set_mode_targeted_by_function(3), "target_map_function"),
])
def test_bad_mode_arguments(call, words):
    with pytest.raises((ValueError, TypeError), match=words):
        call(attacks.PGD(small_model()))


def test_bad_eps_for_division_and_channels():
    model, (x, y) = small_model(), batch()
    with pytest.raises(ValueError, match="eps_for_division must be"):
        attacks.pgd(model, x, y, norm="l2", eps_for_division=-1.0)
    with pytest.raises(ValueError, match="norm='l2' only"):
        attacks.pgd(model, x, y, eps_for_division=1e-10)
    attack = attacks.PGD(model)
    attack.set_normalization_used([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match="3 channels"):
        attack(x, y)
    attack.set_normalization_used([0.5], [0.2])
    attack.set_mode_targeted_least_likely(kth_min=10)
    with pytest.raises(ValueError, match="kth_min=10"):
        attack(x, y)
