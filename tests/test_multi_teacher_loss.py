"""robust_fast.multi_teacher_loss: the reference against the formulas, every backend against the
reference (kinds, weight forms, layouts, dtypes, gradients), the numerics cases, gradcheck,
opcheck, torch.compile, autocast, and the errors for bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import robust_fast
from robust_fast.ops.multi_teacher_loss import _stack_teachers
from robust_fast.reference.multi_teacher_loss import KINDS, multi_teacher_loss_reference
from conftest import backend_devices, unavailable_reason, usable_backends

BACKENDS = usable_backends("cpu")
PAIRS = backend_devices()                                  # (backend, device) of every kernel
PAIRS_AND_REFERENCE = backend_devices(include_reference=True)
REDUCTIONS = ["mean", "sum", "none"]
cpp_reason = robust_fast._build.cpp_unavailable_reason("cpu")
cpp_only = pytest.mark.skipif(cpp_reason is not None, reason=str(cpp_reason))


def make(batch, count, dim, *, sliced=False, dtype=torch.float32, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, count, dim) if sliced else (batch, dim)
    student = torch.randn(shape, generator=g, dtype=torch.float64).mul(scale).to(device, dtype)
    teachers = torch.randn(count, batch, dim, generator=g, dtype=torch.float64).mul(scale).to(device, dtype)
    return student, teachers


def make_weights(form, batch, count, dtype=torch.float32, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if form == "none":
        return None
    if form == "per_teacher":
        return (torch.rand(count, generator=g, dtype=dtype) + 0.5).to(device)
    return torch.rand(batch, count, generator=g, dtype=dtype).to(device)


def run(backend, student, teachers, *, teacher_grad=False, upstream=None, **kwargs):
    """(loss, grad_student, grad_teachers or None) through autograd."""
    s = student.detach().clone().requires_grad_()
    if isinstance(teachers, torch.Tensor):
        t = teachers.detach().clone().requires_grad_(teacher_grad)
        t_arg = t
    else:
        t = None
        t_arg = teachers
    loss = robust_fast.multi_teacher_loss(s, t_arg, backend=backend, **kwargs)
    if upstream is None:
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7), dtype=loss.dtype).to(loss.device)
    if loss.numel():
        loss.backward(upstream)
    return loss.detach(), s.grad, (t.grad if t is not None else None)


def tolerances(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-11)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=2e-2, atol=2e-2)


def assert_same(actual, expected, dtype):
    for a, e in zip(actual, expected):
        if e is None or a is None:
            assert a is None and e is None or (e is None and a is None)
            continue
        torch.testing.assert_close(a, e, **tolerances(dtype))


# --- the reference is the formulas -----------------------------------------------------------

def direct_formula(kind, s, t, temperature=1.0):
    """One teacher: the loss per sample, written with the functional API the papers' code uses."""
    if kind == "cosine":
        return 1 - F.cosine_similarity(s, t, dim=1)
    if kind == "l2":
        return (s - t).norm(p=2, dim=1)
    if kind == "l2_normalized":
        return (s - t).norm(p=2, dim=1) / t.norm(p=2, dim=1)
    if kind == "l1":
        return F.l1_loss(s, t, reduction="none").sum(1)
    if kind == "mse":
        return F.mse_loss(s, t, reduction="none").mean(1)
    return temperature ** 2 * F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1),
                                       reduction="none").sum(1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sliced", [False, True])
def test_reference_matches_the_formulas(kind, sliced):
    student, teachers = make(6, 3, 11, sliced=sliced, dtype=torch.float64)
    weights = make_weights("per_sample", 6, 3, torch.float64)
    temperature = 2.5
    per_row = torch.stack([direct_formula(kind, student[:, k] if sliced else student, teachers[k], temperature)
                           for k in range(3)], dim=1)
    got = multi_teacher_loss_reference(student, teachers, weights=weights, kind=kind,
                                       temperature=temperature, reduction="none")
    torch.testing.assert_close(got, per_row * weights)
    mean = multi_teacher_loss_reference(student, teachers, weights=weights, kind=kind, temperature=temperature)
    torch.testing.assert_close(mean, (per_row * weights).sum(1).mean())
    total = multi_teacher_loss_reference(student, teachers, kind=kind, temperature=temperature, reduction="sum")
    torch.testing.assert_close(total, per_row.sum())


# --- every backend against the reference -----------------------------------------------------

@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("weights", ["none", "per_teacher", "per_sample"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(backend, device, kind, sliced, weights, reduction):
    batch, count, dim = 5, 3, 37
    student, teachers = make(batch, count, dim, sliced=sliced, device=device)
    kwargs = dict(kind=kind, weights=make_weights(weights, batch, count, device=device), reduction=reduction,
                  temperature=1.5 if kind == "kl" else 1.0)
    expected = run("reference", student, teachers, teacher_grad=True, **kwargs)
    actual = run(backend, student, teachers, teacher_grad=True, **kwargs)
    assert actual[0].dtype == torch.float32
    assert actual[0].shape == ((batch, count) if reduction == "none" else ())
    assert_same(actual, expected, torch.float32)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_shapes(backend, device, dtype):
    g = torch.Generator().manual_seed(1234)
    trials = 8 if backend == "triton" else 30
    for trial in range(trials):
        batch = int(torch.randint(0, 7, (1,), generator=g))
        count = int(torch.randint(1, 5, (1,), generator=g))
        dim = [1, 2, 15, 16, 17, 33, 100, 1100][int(torch.randint(0, 8, (1,), generator=g))]
        if backend == "triton":
            dim = min(dim, 100)
        kind = KINDS[trial % len(KINDS)]
        sliced = trial % 4 == 1
        student, teachers = make(batch, count, dim, sliced=sliced, dtype=dtype, seed=trial, device=device)
        form = ["none", "per_teacher", "per_sample"][trial % 3]
        kwargs = dict(kind=kind, weights=make_weights(form, batch, count, dtype, device=device), reduction=REDUCTIONS[trial % 3],
                      temperature=[1.0, 0.5, 4.0][trial % 3])
        teacher_grad = trial % 2 == 0
        expected = run("reference", student, teachers, teacher_grad=teacher_grad, **kwargs)
        actual = run(backend, student, teachers, teacher_grad=teacher_grad, **kwargs)
        if batch == 0 and kwargs["reduction"] == "mean":  # the mean over no samples
            assert math.isnan(float(actual[0])) and math.isnan(float(expected[0]))
            continue
        assert_same(actual, expected, dtype)


def layouts(batch=4, count=3, dim=21, device="cpu"):
    student, teachers = make(batch, count, dim, device=device)
    stacked_bk = teachers.transpose(0, 1).contiguous()              # (B, K, D)
    wide = stacked_bk.reshape(batch, count * dim)                    # DARHT's (B, K*D) map
    return student, teachers, {
        "transposed stack": stacked_bk.transpose(0, 1),              # (K, B, D), strides (D, K*D, 1)
        "list of views": [wide[:, k * dim:(k + 1) * dim] for k in range(count)],
        "list of tensors": [teachers[k].clone() for k in range(count)],
        "strided rows": torch.stack([teachers, -teachers], dim=-1).flatten(-2)[..., ::2],  # D stride 2
    }


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("layout", ["transposed stack", "list of views", "list of tensors", "strided rows"])
@pytest.mark.parametrize("kind", ["cosine", "kl"])
def test_teacher_layouts(backend, device, layout, kind):
    student, teachers, forms = layouts(device=device)
    expected = run("reference", student, teachers, kind=kind)
    actual = run(backend, student, forms[layout], kind=kind)
    assert_same(actual[:2], expected[:2], torch.float32)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_non_contiguous_student(backend, device):
    student, teachers = make(4, 2, 9, sliced=True, device=device)
    strided = torch.cat([student, student], dim=-1)[..., ::2]             # D stride 2
    permuted = student.permute(1, 0, 2).contiguous().permute(1, 0, 2)     # (B, K, D), K outermost
    for s in (strided, permuted, student[:, 0].t().contiguous().t()):
        t = teachers if s.dim() == 3 else teachers
        expected = run("reference", s, t, kind="l2")
        actual = run(backend, s, t, kind="l2")
        assert_same(actual[:2], expected[:2], torch.float32)


def test_a_list_of_views_of_one_stack_is_not_copied():
    _, _, forms = layouts()
    views = forms["list of views"]
    stacked = _stack_teachers(views, needs_grad=False)
    assert stacked.shape == (3, 4, 21)
    assert stacked.untyped_storage().data_ptr() == views[0].untyped_storage().data_ptr()
    for k, view in enumerate(views):
        assert torch.equal(stacked[k], view)
    separate = _stack_teachers(forms["list of tensors"], needs_grad=False)
    assert separate.untyped_storage().data_ptr() != forms["list of tensors"][0].untyped_storage().data_ptr()


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_reduced_precision(backend, device, dtype, kind):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    student, teachers = make(4, 3, 40, device=device)
    student, teachers = student.to(dtype), teachers.to(dtype)
    actual = run(backend, student, teachers, kind=kind)
    expected = run("reference", student.double(), teachers.double(), kind=kind)
    assert actual[0].dtype == dtype and actual[1].dtype == dtype
    torch.testing.assert_close(actual[0].double(), expected[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(actual[1].double(), expected[1], rtol=5e-2, atol=2e-3)


# --- gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_frozen_teachers_get_no_gradient(backend, device):
    student, teachers = make(3, 2, 8, device=device)
    s = student.clone().requires_grad_()
    loss = robust_fast.multi_teacher_loss(s, teachers, backend=backend)
    loss.backward()
    assert teachers.grad is None and s.grad is not None


@cpp_only
def test_the_op_computes_only_the_gradients_asked_for():
    student, teachers = make(3, 2, 8)
    op = torch.ops.robust_fast.multi_teacher_loss
    loss, rows, gs, gt = op(student, teachers, None, "cosine", 1.0, "mean", True, False)
    assert gs.shape == student.shape and gt.numel() == 0 and rows.shape == (3, 2)
    _, _, gs, gt = op(student, teachers, None, "cosine", 1.0, "mean", False, False)
    assert gs.numel() == 0 and gt.numel() == 0
    _, _, gs, gt = op(student, teachers, None, "cosine", 1.0, "none", True, True)
    assert gs.numel() == 0 and gt.numel() == 0  # known only with the upstream gradient


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("form", ["per_teacher", "per_sample"])
def test_weights_gradient(backend, device, form):
    student, teachers = make(4, 3, 10, device=device)
    for reduction in REDUCTIONS:
        grads = []
        for b in (backend, "reference"):
            w = make_weights(form, 4, 3, device=device).requires_grad_()
            loss = robust_fast.multi_teacher_loss(student, teachers, weights=w, kind="mse",
                                                  reduction=reduction, backend=b)
            loss.backward(torch.ones_like(loss))
            grads.append(w.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(backend, device, kind):
    student, teachers = make(3, 2, 5, dtype=torch.float64, seed=3, device=device)
    weights = make_weights("per_sample", 3, 2, torch.float64, device=device)
    for reduction in ("mean", "none"):
        def f(s, t, w):
            return robust_fast.multi_teacher_loss(s, t, weights=w, kind=kind, temperature=1.7,
                                                  reduction=reduction, backend=backend)
        inputs = (student.clone().requires_grad_(), teachers.clone().requires_grad_(),
                  weights.clone().requires_grad_())
        assert torch.autograd.gradcheck(f, inputs)
    sliced, _ = make(3, 2, 5, sliced=True, dtype=torch.float64, seed=4, device=device)
    assert torch.autograd.gradcheck(
        lambda s: robust_fast.multi_teacher_loss(s, teachers, kind=kind, backend=backend),
        (sliced.requires_grad_(),))


# --- numerics --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_cosine_zero_rows(backend, device):
    student, teachers = make(3, 2, 6, device=device)
    student[0] = 0.0
    teachers[1, 2] = 0.0
    actual = run(backend, student, teachers, teacher_grad=True, kind="cosine", reduction="none")
    expected = run("reference", student, teachers, teacher_grad=True, kind="cosine", reduction="none")
    assert all(torch.isfinite(x).all() for x in actual)
    assert actual[0][0, 0] == 1.0 and actual[0][2, 1] == 1.0
    assert_same(actual, expected, torch.float32)


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("kind", ["l2", "l2_normalized", "l1", "mse"])
def test_equal_rows_give_zero_gradient(backend, device, kind):
    student, teachers = make(3, 2, 6, device=device)
    teachers[:] = student  # s = t for every teacher
    loss, gs, gt = run(backend, student, teachers, teacher_grad=True, kind=kind)
    assert float(loss) == 0.0
    assert torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gt, torch.zeros_like(gt))


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_kl_large_logits_are_stable(backend, device):
    student, teachers = make(4, 2, 30, scale=1e4, device=device)
    actual = run(backend, student, teachers, teacher_grad=True, kind="kl", reduction="none")
    expected = run("reference", student.double(), teachers.double(), teacher_grad=True, kind="kl", reduction="none")
    assert all(torch.isfinite(x).all() for x in actual)
    # Logits of 1e4 in float32 carry absolute errors of ~1e-3 in each log-probability.
    torch.testing.assert_close(actual[0].double(), expected[0], rtol=1e-4, atol=1e-1)
    torch.testing.assert_close(actual[1].double(), expected[1], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("kind", KINDS)
def test_edge_sizes(backend, device, kind):
    for batch, count, dim in ((2, 1, 7), (0, 3, 5), (3, 2, 1)):
        student, teachers = make(batch, count, dim, device=device)
        for reduction in ("sum", "none"):
            actual = run(backend, student, teachers, teacher_grad=True, kind=kind, reduction=reduction)
            expected = run("reference", student, teachers, teacher_grad=True, kind=kind, reduction=reduction)
            if batch == 0:
                assert actual[0].shape == expected[0].shape
                continue
            assert_same(actual, expected, torch.float32)
    if kind in ("cosine", "kl", "l2_normalized"):  # D = 1: cos is the sign; KL is 0
        one = run(backend, *make(3, 2, 1, device=device), kind=kind, reduction="none")[0]
        assert torch.isfinite(one).all()


# --- torch.library tooling, compile, autocast ------------------------------------------------

@cpp_only
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    student, teachers = make(3, 2, 7, dtype=torch.float64)
    weights = make_weights("per_teacher", 3, 2, torch.float64)
    op = torch.ops.robust_fast.multi_teacher_loss.default
    for reduction in REDUCTIONS:
        torch.library.opcheck(op, (student.clone().requires_grad_(), teachers.clone().requires_grad_(), weights,
                                   kind, 1.5, reduction, True, True))
    sliced, _ = make(3, 2, 7, sliced=True)
    torch.library.opcheck(op, (sliced.requires_grad_(), teachers.float(), None, kind, 1.0, "mean", True, False))
    torch.library.opcheck(torch.ops.robust_fast._multi_teacher_loss_backward.default,
                          (torch.rand(3, 2, dtype=torch.float64), student, teachers, kind, 1.0, True, True))


@cpp_only
@pytest.mark.parametrize("backend", ["cpp", None, "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(backend, reduction):
    student, teachers = make(6, 3, 20)
    weights = make_weights("per_sample", 6, 3)

    def step(s, t):
        loss = robust_fast.multi_teacher_loss(s, t, weights=weights, kind="cosine", reduction=reduction,
                                              backend=backend)
        return loss.sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for fn in (step, compiled):
        s = student.clone().requires_grad_()
        t = teachers.clone().requires_grad_()
        loss = fn(s, t)
        loss.backward()
        if fn is step:
            expected = (loss.detach(), s.grad, t.grad)
        else:
            torch.testing.assert_close((loss.detach(), s.grad, t.grad), expected, rtol=1e-5, atol=1e-6)


@cpp_only
def test_torch_compile_list_of_teachers():
    student, teachers = make(4, 3, 10)
    views = [teachers[k] for k in range(3)]
    compiled = torch.compile(lambda s, ts: robust_fast.multi_teacher_loss(s, ts, kind="kl"), fullgraph=True)
    torch.testing.assert_close(compiled(student, views), robust_fast.multi_teacher_loss(student, teachers, kind="kl"))


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_autocast_training_step(backend, device):
    torch.manual_seed(0)
    x = torch.randn(16, 12).to(device)
    head = torch.nn.Linear(12, 8).to(device)
    teacher_features = [torch.randn(16, 8).to(device), torch.randn(16, 8).to(device)]  # precomputed, float32
    results = []
    for enabled in (False, True):
        head.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=enabled):
            features = head(x)
            loss = robust_fast.multi_teacher_loss(features, teacher_features, kind="cosine", backend=backend)
        loss.float().backward()
        results.append((float(loss), head.weight.grad.clone()))
    assert math.isfinite(results[1][0])
    assert abs(results[0][0] - results[1][0]) < 5e-2
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0.1, atol=2e-2)


def test_every_backend_agrees_with_auto():
    student, teachers = make(8, 3, 16)
    expected = robust_fast.multi_teacher_loss(student, teachers, backend="reference")
    for b in ["auto"] + [p.values[0] for p in BACKENDS if not p.marks[0].args[0]]:
        torch.testing.assert_close(robust_fast.multi_teacher_loss(student, teachers, backend=b), expected)


# --- bad input -------------------------------------------------------------------------------

def call(**overrides):
    student, teachers = make(3, 2, 4)
    kwargs = dict(student=student, teachers=teachers)
    kwargs.update(overrides)
    return robust_fast.multi_teacher_loss(kwargs.pop("student"), kwargs.pop("teachers"), **kwargs)


@pytest.mark.parametrize("overrides, error, words", [
    (dict(student=torch.zeros(4, 4)), ValueError, r"student has 4 samples \(B\), teachers 3"),
    (dict(student=torch.zeros(3, 5)), ValueError, "student rows have D=5, teachers D=4"),
    (dict(student=torch.zeros(3, 3, 4)), ValueError, "student .* has K=3 slices, teachers K=2"),
    (dict(student=torch.zeros(3)), ValueError, r"student must be \(B, D\) or \(B, K, D\)"),
    (dict(student=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "student must have a floating-point"),
    (dict(student=[[1.0]]), TypeError, "student must be a torch.Tensor"),
    (dict(teachers=torch.zeros(2, 3, 4, dtype=torch.int32)), TypeError, "teachers must have a floating-point"),
    (dict(teachers=torch.zeros(3, 4)), ValueError, r"teachers as a tensor must be \(K, B, D\)"),
    (dict(teachers=torch.zeros(0, 3, 4)), ValueError, "at least one teacher"),
    (dict(teachers=[]), TypeError, "non-empty list"),
    (dict(teachers="t"), TypeError, "teachers must be a"),
    (dict(teachers=[torch.zeros(3, 4), torch.zeros(3, 5)]), ValueError, r"teachers\[1\] has shape"),
    (dict(teachers=[torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64)]), TypeError, r"teachers\[1\] has dtype"),
    (dict(teachers=[torch.zeros(3, 4), torch.zeros(3, 4, device="meta")]), ValueError, r"teachers\[1\] is on meta"),
    (dict(teachers=torch.zeros(2, 3, 4, device="meta")), ValueError, "teachers must be on the student's device"),
    (dict(weights=torch.ones(3)), ValueError, r"weights must have shape \(2,\) .* or \(3, 2\)"),
    (dict(weights=torch.ones(2, 3)), ValueError, r"weights must have shape"),
    (dict(weights=torch.tensor([1.0, -1.0])), ValueError, "weights must be >= 0 and not NaN"),
    (dict(weights=torch.tensor([1.0, float("nan")])), ValueError, "weights must be >= 0 and not NaN"),
    (dict(weights=torch.ones(2, dtype=torch.int64)), TypeError, "weights must have a floating-point"),
    (dict(weights=[1.0, 1.0]), TypeError, "weights must be None or a tensor"),
    (dict(weights=torch.ones(2, device="meta")), ValueError, "weights must be on the student's device"),
    (dict(kind="cos"), ValueError, "kind must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be > 0"),
    (dict(temperature="1"), TypeError, "temperature must be a float"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_names_the_argument(overrides, error, words):
    with pytest.raises(error, match=words):
        call(**overrides)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("kind", KINDS)
def test_many_teachers(backend, device, kind):
    """More teachers than the CPU kernel takes at once (groups of 4): the groups' gradients add up."""
    count = 6 if backend == "triton" else 9
    for dim in (37, 300):
        student, teachers = make(3, count, dim, seed=dim, device=device)
        weights = make_weights("per_sample", 3, count, device=device)
        expected = run("reference", student, teachers, teacher_grad=True, kind=kind, weights=weights)
        actual = run(backend, student, teachers, teacher_grad=True, kind=kind, weights=weights)
        assert_same(actual, expected, torch.float32)


@cpp_only
@pytest.mark.parametrize("kind", KINDS)
def test_many_samples_across_threads(kind):
    """Enough samples and features that the CPU kernel splits the batch between threads, and
    within a thread's share takes each sample's sums in the sweep that writes the gradient of
    the sample before it (frozen teachers): every sample's loss and gradient still match."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for count, teacher_grad in ((1, False), (3, False), (4, False), (3, True), (6, False)):
            student, teachers = make(67, count, 517, seed=count)
            weights = make_weights("per_sample", 67, count)
            for reduction in ("mean", "none"):
                kwargs = dict(kind=kind, weights=weights, reduction=reduction)
                expected = run("reference", student, teachers, teacher_grad=teacher_grad, **kwargs)
                actual = run("cpp", student, teachers, teacher_grad=teacher_grad, **kwargs)
                assert_same(actual, expected, torch.float32)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend):
    student, teachers = make(3, 2, 5)
    s = student.requires_grad_()
    (g,) = torch.autograd.grad(robust_fast.multi_teacher_loss(s, teachers, backend=backend), s, create_graph=True)
    with pytest.raises(RuntimeError, match="multi_teacher_loss supports one backward only"):
        torch.autograd.grad(g.sum(), s)


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_input_gives_nan_not_a_number(backend, device, kind, where):
    """A NaN in one row gives NaN where the reference's autograd does (that row's loss and
    gradient), never a plausible finite number; other rows are untouched."""
    student, teachers = (t.to(device) for t in make(3, 2, 6))
    if where == "student":
        student[1, 2] = float("nan")
    else:
        teachers[0, 1, 4] = float("nan")
    for reduction in ("mean", "none"):
        expected = run("reference", student, teachers, teacher_grad=True, reduction=reduction,
                       kind=kind, upstream=torch.ones(3, 2, device=device) if reduction == "none" else None)
        actual = run(backend, student, teachers, teacher_grad=True, reduction=reduction, kind=kind,
                     upstream=torch.ones(3, 2, device=device) if reduction == "none" else None)
        for a, e in zip(actual, expected):
            assert torch.equal(a.isnan(), e.isnan()), (reduction, a, e)
            torch.testing.assert_close(a.nan_to_num(), e.nan_to_num(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(unavailable_reason("triton", "cpu") is not None, reason=str(unavailable_reason("triton", "cpu")))
def test_the_triton_kernel_takes_the_temperature_as_a_scalar(monkeypatch):
    """No tensor is built for the temperature (a host-to-device copy per call on a GPU, and a
    break in CUDA graph capture): it reaches the kernel as scalar arguments, exact enough for
    float64 (KL at T = 3.7 in float64 against the reference to 1e-12)."""
    from robust_fast import _backend
    kernels = _backend.triton_kernels("multi_teacher_loss")
    assert not any("temp_ptr" in name for name in kernels._multi_teacher_loss_kernel.arg_names)
    built = []
    real_tensor = torch.tensor
    monkeypatch.setattr(kernels.torch, "tensor", lambda *a, **k: (built.append(a), real_tensor(*a, **k))[1])
    student, teachers = make(4, 2, 9, dtype=torch.float64)
    got = run("triton", student, teachers, kind="kl", temperature=3.7)
    monkeypatch.undo()
    expected = run("reference", student, teachers, kind="kl", temperature=3.7)
    assert built == []
    for a, e in zip(got, expected):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-13)


def _gpu_memory_gib() -> float:
    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0


@pytest.mark.skipif(_gpu_memory_gib() < 24, reason="needs a CUDA device with 24 GiB: the teachers pass 2**31 elements")
@pytest.mark.parametrize("backend", usable_backends("cuda"))
def test_teachers_over_two_to_the_31_elements(backend):
    """Offsets k * stride past 2**31 (int64 in every kernel): the last samples' losses of the
    last teacher, whose rows start beyond 2**31 elements, equal the reference on a slice."""
    count, batch, dim = 3, 8192, 2**17 + 256            # teacher 2's rows start at 2.15e9 elements
    g = torch.Generator(device="cuda").manual_seed(0)
    teachers = torch.randn((count, batch, dim), generator=g, device="cuda", dtype=torch.float16)
    student = torch.randn((batch, dim), generator=g, device="cuda", dtype=torch.float16)
    assert teachers.stride(0) * (count - 1) >= 2**31
    with torch.no_grad():
        rows = robust_fast.multi_teacher_loss(student, teachers, kind="cosine", reduction="none", backend=backend)
        expected = multi_teacher_loss_reference(student[-4:], teachers[:, -4:], kind="cosine", reduction="none")
    torch.testing.assert_close(rows[-4:].float(), expected.float(), rtol=2e-2, atol=2e-3)
    del teachers, student
    torch.cuda.empty_cache()
