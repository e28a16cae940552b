"""robust_fast.losses against the methods' formulas written out, gradients reach only the student,
and the feature extractor / projection."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_fast import losses
from conftest import backend_devices

PAIRS_AND_REFERENCE = backend_devices(include_reference=True)   # (backend, device), as pgd_step's tests


def randn(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)


def kl_rows(student, teacher, temperature):
    return temperature ** 2 * F.kl_div(F.log_softmax(student / temperature, 1),
                                       F.softmax(teacher / temperature, 1), reduction="none").sum(1)


@pytest.fixture
def batch(request):
    device = request.node.callspec.params.get("device", "cpu") if hasattr(request.node, "callspec") else "cpu"
    y = torch.tensor([0, 3, 1, 2, 4, 0], device=device)
    return dict(s_logits=randn(6, 5, seed=1, device=device).requires_grad_(), t_logits=randn(6, 5, seed=2, device=device),
                s_feat=randn(6, 8, seed=3, device=device).requires_grad_(),
                t_feat=randn(6, 8, seed=4, device=device).requires_grad_(), y=y)


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("kind", ["cosine", "l2_normalized"])
def test_rrm(backend, device, kind, batch):
    b = batch
    got = losses.RRMLoss(kind=kind, backend=backend)(b["s_logits"], b["s_feat"], b["t_feat"], b["y"])
    if kind == "cosine":
        match = -F.cosine_similarity(b["s_feat"], b["t_feat"], dim=1).mean()
    else:
        match = ((b["s_feat"] - b["t_feat"]).norm(dim=1) / b["t_feat"].norm(dim=1)).mean()
    torch.testing.assert_close(got, 0.005 * F.cross_entropy(b["s_logits"], b["y"]) + match)
    got.backward()
    assert b["s_feat"].grad is not None and b["t_feat"].grad is None  # the teacher is frozen


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_crt(backend, device, batch):
    b = batch
    l2 = (b["s_logits"] - b["t_logits"]).norm(dim=1).mean()
    torch.testing.assert_close(losses.CRTLoss(backend=backend)(b["s_logits"], b["t_logits"]), l2)
    got = losses.CRTLoss(alpha=0.3, backend=backend)(b["s_logits"], b["t_logits"], b["y"])
    torch.testing.assert_close(got, 0.3 * l2 + 0.7 * F.cross_entropy(b["s_logits"], b["y"]))


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_darht(backend, device, batch):
    b = batch
    count, classes = 3, 5
    student_map = randn(6, count * classes, seed=5, device=device).requires_grad_()
    teacher_logits = [randn(6, classes, seed=10 + k, device=device) for k in range(count)]
    loss_fn = losses.DARHTLoss(num_teachers=count, backend=backend)
    kd = 0
    for k, t in enumerate(teacher_logits):
        w = torch.exp(-F.cross_entropy(t, b["y"], reduction="none"))
        kd = kd + w * kl_rows(student_map[:, k * classes:(k + 1) * classes], t, 1.0)
    kd = kd.mean()
    ce = F.cross_entropy(b["s_logits"], b["y"])
    torch.testing.assert_close(loss_fn(b["s_logits"], student_map, teacher_logits, b["y"]), ce + kd)
    torch.testing.assert_close(loss_fn(b["s_logits"], student_map, teacher_logits, b["y"], epoch=10), ce)
    torch.testing.assert_close(loss_fn(b["s_logits"], student_map, teacher_logits, b["y"], epoch=60), ce + kd)
    got = loss_fn(b["s_logits"], student_map, torch.stack(teacher_logits), b["y"], epoch=200)
    torch.testing.assert_close(got, kd)
    got.backward()
    assert student_map.grad is not None


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_lwf(backend, device, batch):
    b = batch
    got = losses.LwFLoss(backend=backend)(b["s_logits"], b["s_feat"], b["t_feat"], b["y"])
    expected = F.cross_entropy(b["s_logits"], b["y"]) + 0.005 * (b["s_feat"] - b["t_feat"]).abs().sum(1).mean()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_kd_and_ard(backend, device, batch):
    b = batch
    got = losses.KDLoss(temperature=4.0, alpha=0.9, backend=backend)(b["s_logits"], b["t_logits"], b["y"])
    expected = 0.9 * kl_rows(b["s_logits"], b["t_logits"], 4.0).mean() + 0.1 * F.cross_entropy(b["s_logits"], b["y"])
    torch.testing.assert_close(got, expected)
    two = losses.KDLoss(alpha=1.0, backend=backend)(b["s_logits"], [b["t_logits"], -b["t_logits"]])
    torch.testing.assert_close(two, (kl_rows(b["s_logits"], b["t_logits"], 4.0)
                                     + kl_rows(b["s_logits"], -b["t_logits"], 4.0)).mean())
    s_clean = randn(6, 5, seed=9, device=device)
    got = losses.ARDLoss(backend=backend)(b["s_logits"], b["t_logits"])
    torch.testing.assert_close(got, kl_rows(b["s_logits"], b["t_logits"], 30.0).mean())
    got = losses.ARDLoss(temperature=2.0, alpha=0.5, backend=backend)(b["s_logits"], b["t_logits"], s_clean, b["y"])
    torch.testing.assert_close(got, 0.5 * kl_rows(b["s_logits"], b["t_logits"], 2.0).mean()
                               + 0.5 * F.cross_entropy(s_clean, b["y"]))


def test_feature_extractor_and_projection():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 3, 4)
    features, logits = losses.FeatureExtractor(model, layer="3")(x)
    assert torch.equal(logits, model(x))
    assert torch.equal(features, model[:3](x))

    class TwoHeads(nn.Module):
        def forward(self, x):
            return x.flatten(1), x.flatten(1)[:, :4]
    f, lg = losses.FeatureExtractor(TwoHeads())(x)
    assert f.shape == (5, 12) and lg.shape == (5, 4)
    with pytest.raises(ValueError, match="no module named 'fc'"):
        losses.FeatureExtractor(model, layer="fc")
    with pytest.raises(TypeError, match="must return"):
        losses.FeatureExtractor(model)(x)
    projection = losses.FeatureProjection(16, 8)
    loss = losses.RRMLoss()(logits, projection(features), torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 0]))
    loss.backward()
    assert projection.weight.grad is not None and model[1].weight.grad is not None


@pytest.mark.parametrize("make, words", [
    (lambda: losses.RRMLoss(lambda_ce=float("nan")), "RRMLoss: lambda_ce must be >= 0"),
    (lambda: losses.RRMLoss(lambda_ce=-1.0), "RRMLoss: lambda_ce must be >= 0"),
    (lambda: losses.KDLoss(alpha=2), r"KDLoss: alpha must be in \[0, 1\]"),
    (lambda: losses.KDLoss(temperature=0.0), "KDLoss: temperature must be > 0"),
    (lambda: losses.ARDLoss(alpha=-0.1), r"ARDLoss: alpha must be in \[0, 1\]"),
    (lambda: losses.CRTLoss(alpha=float("inf")), r"CRTLoss: alpha must be in \[0, 1\]"),
    (lambda: losses.DARHTLoss(num_teachers=0), "DARHTLoss: num_teachers must be an int >= 1"),
    (lambda: losses.DARHTLoss(2, kd_weight=float("nan")), "DARHTLoss: kd_weight must be >= 0"),
    (lambda: losses.DARHTLoss(2, temperature=-1.0), "DARHTLoss: temperature must be > 0"),
    (lambda: losses.LwFLoss(lambda_feat=float("nan")), "LwFLoss: lambda_feat must be >= 0"),
    (lambda: losses.LwFLoss(kind="l3"), "LwFLoss: kind must be one of"),
])
def test_bad_settings_name_the_argument(make, words):
    with pytest.raises(ValueError, match=words):
        make()
