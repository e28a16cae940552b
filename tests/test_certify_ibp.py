"""robust_fast.certify: bounds of whole networks (every supported layer kind, nested), their
soundness against 10,000 sampled points per box and against PGD on each output, radius 0 against
the forward pass, E radii and per-sample radii, margins with elision, certificates, certified
accuracy, the IBP loss and schedules, and the errors for bad input (IBP training through the
loop: test_train_ibp.py)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_fast
from robust_fast import certify as cert
from robust_fast.certify import ibp as ibp_module
from robust_fast.layers import Normalize
from robust_fast.models import SmallCNN
from conftest import unavailable_reason


def random_network(seed: int, channels: int = 2, size: int = 8, classes: int = 5) -> nn.Sequential:
    """A nested nn.Sequential with every supported layer kind, random weights and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    width = 3 + seed % 3
    net = nn.Sequential(
        Normalize([0.4] * channels, [0.3 + 0.1 * i for i in range(channels)]),
        nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
        nn.AvgPool2d(2),
        nn.Conv2d(width, 4, 3, stride=1, padding=1, dilation=1, groups=1, bias=seed % 2 == 0),
        nn.ReLU(),
        nn.Identity(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Sequential(nn.Linear(4 * (size // 2) ** 2, 12), nn.BatchNorm1d(12), nn.ReLU()),
        nn.Linear(12, classes),
    )
    for module in net.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            module.weight.data.copy_(torch.randn(n, generator=g))   # negative scales too
            module.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return net.eval()


def samples_in_box(x, eps, count, clip=(0.0, 1.0), seed=0):
    """count points per sample: uniform in the box, the first ones at random vertices."""
    g = torch.Generator().manual_seed(seed)
    lower = (x - eps).clamp(*clip)
    upper = (x + eps).clamp(*clip)
    u = torch.rand((count,) + tuple(x.shape), generator=g, dtype=x.dtype)
    u[: count // 10] = torch.randint(0, 2, u[: count // 10].shape, generator=g).to(x.dtype)
    return lower + (upper - lower) * u


def inside(values, lower, upper):
    slack = 1e-5 * (1 + values.abs())
    return bool((values >= lower - slack).all()) and bool((values <= upper + slack).all())


# --- soundness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_points_lie_inside_the_bounds(seed):
    net = random_network(seed)
    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(seed + 100))
    eps = [0.02, 0.1][seed % 2]
    lower, upper = cert.interval_bounds(net, x, eps)
    assert lower.shape == upper.shape == (3, 5)
    assert bool((lower <= upper).all())
    points = samples_in_box(x, eps, 10_000, seed=seed)
    with torch.no_grad():
        out = torch.cat([net(chunk.flatten(0, 1)) for chunk in points.split(2000)]).view(10_000, 3, 5)
    assert inside(out, lower, upper)


def pgd_extremes(net, x, eps, output, sign, steps=30):
    """PGD for the largest (sign=+1) or smallest (-1) value of one output over the box."""
    g = torch.Generator().manual_seed(7)
    x_adv = ((x + eps * (2 * torch.rand(x.shape, generator=g) - 1))).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        value = net(x_adv)[:, output]
        (grad,) = torch.autograd.grad(sign * value.sum(), x_adv)
        x_adv = robust_fast.pgd_step(x_adv.detach(), grad, x, eps=eps, alpha=eps / 8)
    with torch.no_grad():
        return net(x_adv)[:, output]


@pytest.mark.parametrize("seed", [3, 4])
def test_pgd_points_lie_inside_the_bounds(seed):
    net = random_network(seed)
    x = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
    eps = 0.05
    lower, upper = cert.interval_bounds(net, x, eps)
    for output in range(5):
        highest = pgd_extremes(net, x, eps, output, +1)
        lowest = pgd_extremes(net, x, eps, output, -1)
        assert inside(highest, lower[:, output], upper[:, output])
        assert inside(lowest, lower[:, output], upper[:, output])
        assert bool((lowest <= highest + 1e-6).all())


@pytest.mark.parametrize("net_kind", ["random", "small_cnn"])
def test_radius_zero_is_the_forward_pass(net_kind):
    net = random_network(5) if net_kind == "random" else SmallCNN(in_channels=2, input_size=8, num_classes=5).eval()
    x = torch.rand(6, 2, 8, 8)
    lower, upper = cert.interval_bounds(net, x, 0.0)
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(lower, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(upper, lower, rtol=0, atol=0)


def test_clip_shrinks_the_box_and_none_opens_it():
    net = random_network(6)
    x = torch.rand(3, 2, 8, 8)
    clipped = cert.interval_bounds(net, x, 0.3)
    open_box = cert.interval_bounds(net, x, 0.3, clip=None)
    assert bool((open_box[0] <= clipped[0] + 1e-6).all()) and bool((open_box[1] >= clipped[1] - 1e-6).all())
    points = samples_in_box(x, 0.3, 2000, clip=(-math.inf, math.inf))
    with torch.no_grad():
        out = net(points.flatten(0, 1)).view(2000, 3, 5)
    assert inside(out, *open_box)


# --- radii: E at once, per sample --------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_several_radii_at_once_equal_separate_calls(backend):
    if unavailable_reason(backend, "cpu"):
        pytest.skip(unavailable_reason(backend, "cpu"))
    net = random_network(7)
    x = torch.rand(4, 2, 8, 8)
    radii = [0.0, 0.01, 0.05, 0.2]
    lower, upper = cert.interval_bounds(net, x, radii, backend=backend)
    assert lower.shape == (4, 4, 5)
    for e, eps in enumerate(radii):
        lo, hi = cert.interval_bounds(net, x, eps, backend=backend)
        torch.testing.assert_close(lower[e], lo, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(upper[e], hi, rtol=1e-5, atol=1e-5)
    margins = cert.margin_bounds(net, x, torch.tensor([0, 1, 2, 3]), radii, backend=backend)
    assert margins.shape == (4, 4, 5)
    torch.testing.assert_close(margins[2], cert.margin_bounds(net, x, torch.tensor([0, 1, 2, 3]), 0.05),
                               rtol=1e-5, atol=1e-5)


def test_blocks_of_boxes_give_the_same_bounds(monkeypatch):
    """Without autograd on CPU the E x B boxes go through the network in blocks."""
    net = random_network(13)
    x = torch.rand(5, 2, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4])
    radii = [0.01, 0.05, 0.1]
    with torch.no_grad():
        whole = cert.interval_bounds(net, x, radii), cert.margin_bounds(net, x, y, radii)
        monkeypatch.setattr(ibp_module, "CPU_BLOCK_BOXES", 4)         # 15 boxes: blocks of 4, 4, 4, 3
        blocked = cert.interval_bounds(net, x, radii), cert.margin_bounds(net, x, y, radii)
        single = cert.interval_bounds(net, x, 0.05)
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(single, (whole[0][0][1], whole[0][1][1]), rtol=1e-5, atol=1e-5)


def test_per_sample_radii():
    net = random_network(8)
    x = torch.rand(3, 2, 8, 8)
    radii = torch.tensor([0.0, 0.02, 0.1])
    lower, upper = cert.interval_bounds(net, x, radii)
    for b in range(3):
        lo, hi = cert.interval_bounds(net, x[b:b + 1], float(radii[b]))
        torch.testing.assert_close(lower[b:b + 1], lo, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(upper[b:b + 1], hi, rtol=1e-5, atol=1e-5)


def test_backends_agree_on_a_network():
    net = SmallCNN(in_channels=1, input_size=8, num_classes=4).eval()
    x = torch.rand(2, 1, 8, 8)
    expected = cert.interval_bounds(net, x, [0.01, 0.1], backend="reference")
    for backend in ("cpp", "triton"):
        if unavailable_reason(backend, "cpu") is None:
            got = cert.interval_bounds(net, x, [0.01, 0.1], backend=backend)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- margins, certificates, certified accuracy -------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_margins_are_sound_and_never_looser_than_interval_subtraction(seed):
    net = random_network(seed)
    x = torch.rand(5, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
    y = torch.tensor([0, 1, 2, 3, 4])
    eps = 0.03
    margins = cert.margin_bounds(net, x, y, eps)
    lower, upper = cert.interval_bounds(net, x, eps)
    subtracted = lower.gather(1, y[:, None]) - upper
    own = F.one_hot(y, 5).bool()
    assert bool((margins[own] == 0).all())
    assert bool((margins[~own] >= subtracted[~own] - 1e-5).all())
    assert bool((margins[~own] > subtracted[~own] + 1e-4).any())   # elision does tighten
    points = samples_in_box(x, eps, 3000, seed=seed)
    with torch.no_grad():
        out = net(points.flatten(0, 1)).view(3000, 5, 5)
    true_margins = out.gather(2, y.view(1, 5, 1).expand(3000, 5, 1)) - out
    assert bool((true_margins >= margins - 1e-5).all())


def test_margins_without_a_final_linear_layer_subtract_intervals():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.ReLU()).eval()
    x = torch.rand(4, 1, 4, 4)
    y = torch.tensor([0, 2, 1, 0])
    margins = cert.margin_bounds(net, x, y, 0.05)
    lower, upper = cert.interval_bounds(net, x, 0.05)
    expected = (lower.gather(1, y[:, None]) - upper).scatter(1, y[:, None], 0.0)
    torch.testing.assert_close(margins, expected)


def test_certify_agrees_with_predictions_at_radius_zero_and_shrinks_with_eps():
    net = random_network(9)
    x = torch.rand(16, 2, 8, 8)
    with torch.no_grad():
        predicted = net(x).argmax(1)
    assert bool(cert.certify(net, x, predicted, 0.0).all())
    wrong = (predicted + 1) % 5
    assert not bool(cert.certify(net, x, wrong, 0.0).any())
    at_radii = cert.certify(net, x, predicted, [0.0, 0.001, 0.01, 0.1])
    assert at_radii.shape == (4, 16)
    assert bool((at_radii[1:].int() <= at_radii[:-1].int()).all())   # a larger box certifies less


def test_certified_accuracy():
    net = random_network(10)
    net.train()
    images = torch.rand(50, 2, 8, 8)
    with torch.no_grad():
        labels = net.eval()(images).argmax(1)
    net.train()
    full = cert.certified_accuracy(net, (images, labels), 0.0, batch_size=16)
    assert full == 1.0
    assert net.training and all(m.training for m in net.modules())   # modes restored
    radii = cert.certified_accuracy(net, (images, labels), [0.0, 0.01, 1.0], batch_size=7)
    assert radii[0] == 1.0 and radii[0] >= radii[1] >= radii[2]
    loader = [(images[i:i + 20], labels[i:i + 20]) for i in range(0, 50, 20)]
    assert cert.certified_accuracy(net, loader, 0.01) == radii[1]
    assert math.isnan(cert.certified_accuracy(net, (images[:0], labels[:0]), 0.1))


# --- the IBP loss, schedules, training ---------------------------------------------------------

def test_ibp_loss_is_the_formula():
    net = random_network(11)
    x = torch.rand(6, 2, 8, 8)
    y = torch.randint(0, 5, (6,))
    margins = cert.margin_bounds(net, x, y, 0.05)
    natural = F.cross_entropy(net(x), y)
    robust = F.cross_entropy(-margins, y)
    torch.testing.assert_close(cert.ibp_loss(net, x, y, 0.05, 0.3), 0.3 * natural + 0.7 * robust)
    torch.testing.assert_close(cert.ibp_loss(net, x, y, 0.05, 1.0), natural)
    torch.testing.assert_close(cert.ibp_loss(net, x, y, 0.05, 0.0), robust)
    for kappa in (0.0, 0.3, 1.0):  # a training loop's accuracy: the clean logits beside the loss
        loss, logits = cert.ibp_loss(net, x, y, 0.05, kappa, return_logits=True)
        torch.testing.assert_close(loss, cert.ibp_loss(net, x, y, 0.05, kappa))
        torch.testing.assert_close(logits, net(x))
    loss = cert.ibp_loss(net, x, y, torch.full((6,), 0.05), 0.5)
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())


def test_schedules():
    ramp = dict(warmup_steps=10, ramp_steps=100)
    assert cert.eps_schedule(0, eps_train=0.11, **ramp) == 0.0
    assert cert.eps_schedule(10, eps_train=0.11, **ramp) == 0.0
    assert cert.eps_schedule(110, eps_train=0.11, **ramp) == pytest.approx(0.11)
    assert cert.eps_schedule(500, eps_train=0.11, **ramp) == pytest.approx(0.11)
    assert cert.eps_schedule(60, eps_train=0.11, kind="linear", **ramp) == pytest.approx(0.055)
    values = [cert.ramp_fraction(s, 10, 100, "smoothed") for s in range(0, 120)]
    assert all(b >= a for a, b in zip(values, values[1:]))                 # monotone
    assert values[20] < 0.1 * 10 / 100 * 2                                 # a gentle start (s**4)
    steps = [b - a for a, b in zip(values[36:], values[37:110])]           # after the knee, linear
    assert max(steps) - min(steps) < 1e-9
    knee = 10 + 25
    slope_before = values[knee] - values[knee - 1]
    slope_after = values[knee + 1] - values[knee]
    assert slope_after == pytest.approx(slope_before, rel=0.15)            # slope continuous at the knee
    assert cert.kappa_schedule(0, **ramp) == 1.0
    assert cert.kappa_schedule(60, **ramp) == pytest.approx(0.75)
    assert cert.kappa_schedule(200, **ramp) == pytest.approx(0.5)
    assert cert.training_eps(0.1) == pytest.approx(0.11) and cert.TRAIN_EPS_FACTOR == 1.1
    with pytest.raises(ValueError, match="kind"):
        cert.ramp_fraction(1, 0, 10, "cosine")
    with pytest.raises(ValueError, match="step"):
        cert.ramp_fraction(-1, 0, 10)


# --- extending, the Normalize layer, errors ----------------------------------------------------

def test_a_new_layer_kind_is_one_function():
    class Shift(nn.Module):
        def forward(self, x):
            return x + 1.0

    net = nn.Sequential(nn.Flatten(), Shift(), nn.Linear(4, 2)).eval()
    x = torch.rand(3, 1, 2, 2)
    with pytest.raises(TypeError, match="Shift"):
        cert.interval_bounds(net, x, 0.1)

    @cert.layer_rule(Shift)
    def _shift(layer, center, radius, relu_follows, backend):
        return center + 1.0, radius, False

    try:
        lower, upper = cert.interval_bounds(net, x, 0.0)
        torch.testing.assert_close(lower, net(x).detach())
    finally:
        del ibp_module.LAYER_RULES[Shift]


def test_normalize_layer():
    layer = Normalize([0.5, 0.25], [0.5, 2.0])
    x = torch.rand(3, 2, 4, 4)
    expected = (x - torch.tensor([0.5, 0.25]).view(2, 1, 1)) / torch.tensor([0.5, 2.0]).view(2, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="std"):
        Normalize([0.5], [0.0])


def test_errors():
    net = random_network(12)
    x = torch.rand(2, 2, 8, 8)
    y = torch.tensor([0, 1])
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            cert.interval_bounds(net, x, bad)
    with pytest.raises(ValueError, match=r"eps\[1\]"):
        cert.interval_bounds(net, x, [0.1, -1.0])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cert.interval_bounds(net, x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="every sample"):
        cert.interval_bounds(net, x, torch.tensor([0.1, float("nan")]))
    with pytest.raises(TypeError, match="eps"):
        cert.interval_bounds(net, x, "0.1")
    with pytest.raises(ValueError, match="clip low must be <= high"):
        cert.interval_bounds(net, x, 0.1, clip=(1.0, 0.0))
    with pytest.raises(TypeError, match=r"Tanh .*supported: .*Conv2d.*Linear"):
        cert.interval_bounds(nn.Sequential(nn.Flatten(), nn.Tanh()), x, 0.1)
    net[1][1].train()
    with pytest.raises(ValueError, match=r"BatchNorm2d is in training mode.*model.eval\(\)"):
        cert.interval_bounds(net, x, 0.1)
    net.eval()
    net[6].train()
    with pytest.raises(ValueError, match=r"Dropout is in training mode.*model.eval\(\)"):
        cert.interval_bounds(net, x, 0.1)
    net.eval()
    with pytest.raises(ValueError, match="Normalize has 2 channels"):
        cert.interval_bounds(net, torch.rand(2, 3, 8, 8), 0.1)
    with pytest.raises(ValueError, match="center must be"):
        cert.interval_bounds(net[1:], torch.rand(2, 3, 8, 8), 0.1)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(12\) does not fit"):
        cert.interval_bounds(net[8][1:], torch.rand(2, 7), 0.1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        cert.margin_bounds(net, x, torch.tensor([0, 5]), 0.1)
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        cert.certify(net, x, torch.tensor([0]), 0.1)
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        cert.interval_bounds(net, x.to(torch.uint8), 0.1)
    with pytest.raises(ValueError, match="kappa"):
        cert.ibp_loss(net, x, y, 0.1, 1.5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        cert.interval_bounds(lambda t: t, x, 0.1)
