"""robust_fast.ibp_linear / ibp_conv2d / ibp_relu: the reference against interval arithmetic
written with lower and upper bounds, every backend against the reference (shapes, leading E
dimensions, dtypes, layouts, the fused ReLU, gradients), soundness of sampled points, gradcheck,
opcheck, torch.compile, the |W| cache and the errors for bad input."""
import pytest
import torch
import torch.nn.functional as F

import robust_fast
from robust_fast import _abs_weight
from robust_fast.certify import certify, margin_bounds
from robust_fast.reference.ibp import ibp_conv2d_reference, ibp_linear_reference, ibp_relu_reference
from conftest import backend_devices, unavailable_reason

PAIRS = backend_devices()                                  # (backend, device) of every kernel
PAIRS_AND_REFERENCE = backend_devices(include_reference=True)
cpp_reason = robust_fast._build.cpp_unavailable_reason("cpu")
cpp_only = pytest.mark.skipif(cpp_reason is not None, reason=str(cpp_reason))


def box(shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    radius = torch.rand(shape, generator=g, dtype=torch.float64).mul(0.5).to(device, dtype)
    return center, radius


def params(shape, bias=True, dtype=torch.float32, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).mul(0.3).to(device, dtype)
    b = torch.randn(shape[0], generator=g, dtype=torch.float64).to(device, dtype) if bias else None
    return w, b


def tolerances(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def through(fn, inputs, upstream_seed=7):
    """Outputs and the gradients of every input that requires grad, for a random upstream."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    outputs = fn(*leaves)
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outputs]
    wanting = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(outputs, wanting, upstream, allow_unused=True) if wanting else ()
    return [o.detach() for o in outputs], list(grads)


def assert_all_close(actual, expected, dtype):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tolerances(dtype))


# --- the reference is interval arithmetic ----------------------------------------------------

def test_reference_is_interval_arithmetic():
    """Lower/upper form with W = W+ + W-: l' = W+ l + W- u + b, u' = W+ u + W- l + b."""
    center, radius = box((6, 9), torch.float64)
    w, b = params((4, 9), dtype=torch.float64)
    lower, upper = center - radius, center + radius
    pos, neg = w.clamp(min=0), w.clamp(max=0)
    expected_l = lower @ pos.T + upper @ neg.T + b
    expected_u = upper @ pos.T + lower @ neg.T + b
    c, r = ibp_linear_reference(center, radius, w, b)
    torch.testing.assert_close(c - r, expected_l)
    torch.testing.assert_close(c + r, expected_u)
    c, r = ibp_relu_reference(center, radius)
    torch.testing.assert_close(c - r, lower.relu())
    torch.testing.assert_close(c + r, upper.relu())
    images_c, images_r = box((2, 3, 7, 7), torch.float64)
    wc, bc = params((5, 3, 3, 3), dtype=torch.float64)
    c, r = ibp_conv2d_reference(images_c, images_r, wc, bc, (1, 1), (1, 1), (1, 1), 1)
    lo, hi = images_c - images_r, images_c + images_r
    expected_l = F.conv2d(lo, wc.clamp(min=0), bc, padding=1) + F.conv2d(hi, wc.clamp(max=0), padding=1)
    torch.testing.assert_close(c - r, expected_l)


# --- every backend against the reference -----------------------------------------------------

@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("leading", [(5,), (3, 4), (0,)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_linear_matches_reference(backend, device, dtype, leading, bias, relu):
    center, radius = box(leading + (37,), dtype, device=device)
    w, b = params((19, 37), bias, dtype, device=device)
    for t in (center, radius, w) + ((b,) if bias else ()):
        t.requires_grad_(True)
    expected = through(lambda c, r, w_, b_: ibp_linear_reference(c, r, w_, b_, relu), (center, radius, w, b))
    actual = through(lambda c, r, w_, b_: robust_fast.ibp_linear(c, r, w_, b_, relu=relu, backend=backend),
                     (center, radius, w, b))
    assert_all_close(actual[0], expected[0], dtype)
    assert_all_close(actual[1], expected[1], dtype)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_linear_no_grad_fused_relu_and_random_shapes(backend, device):
    g = torch.Generator().manual_seed(3)
    for trial in range(6):
        batch, n_in, n_out = (int(v) for v in torch.randint(1, 70, (3,), generator=g))
        center, radius = box((batch, n_in), seed=trial, device=device)
        w, b = params((n_out, n_in), seed=trial + 10, device=device)
        with torch.no_grad():
            actual = robust_fast.ibp_linear(center, radius, w, b, relu=True, backend=backend)
        assert_all_close(actual, ibp_linear_reference(center, radius, w, b, relu=True), torch.float32)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_linear_non_contiguous_inputs(backend, device):
    center, radius = box((23, 8), device=device)
    w, b = params((6, 23), device=device)
    c_t, r_t = center.T, radius.T                   # (8, 23), transposed views
    w_t = w.T.contiguous().T                        # a weight with column-major strides
    expected = ibp_linear_reference(c_t, r_t, w, b)
    assert_all_close(robust_fast.ibp_linear(c_t, r_t, w_t, b, backend=backend), expected, torch.float32)
    center3, radius3 = box((4, 23, 3), device=device)
    c3, r3 = center3.transpose(1, 2), radius3.transpose(1, 2)   # (4, 3, 23), not viewable as 2-D
    assert_all_close(robust_fast.ibp_linear(c3, r3, w, b, backend=backend),
                     ibp_linear_reference(c3, r3, w, b), torch.float32)


CONV_CASES = [
    # (leading, channels, size, out_channels, kernel, stride, padding, dilation, groups)
    ((2,), 3, 8, 4, 3, 1, 1, 1, 1),
    ((3, 2), 1, 9, 5, 4, 2, 1, 1, 1),
    ((2,), 4, 7, 6, 3, 2, 0, 2, 2),
    ((0,), 2, 5, 3, 3, 1, 1, 1, 1),
]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_conv2d_matches_reference(backend, device, dtype, case, relu):
    leading, channels, size, out_channels, kernel, stride, padding, dilation, groups = case
    center, radius = box(leading + (channels, size, size), dtype, device=device)
    w, b = params((out_channels, channels // groups, kernel, kernel), dtype=dtype, device=device)
    for t in (center, radius, w, b):
        t.requires_grad_(True)
    settings = ((stride, stride), (padding, padding), (dilation, dilation), groups)
    expected = through(lambda c, r, w_, b_: ibp_conv2d_reference(c, r, w_, b_, *settings, relu),
                       (center, radius, w, b))
    actual = through(lambda c, r, w_, b_: robust_fast.ibp_conv2d(c, r, w_, b_, stride, padding, dilation, groups,
                                                                 relu=relu, backend=backend),
                     (center, radius, w, b))
    assert actual[0][0].shape == expected[0][0].shape
    assert_all_close(actual[0], expected[0], dtype)
    assert_all_close(actual[1], expected[1], dtype)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "mixed"])
def test_conv2d_layouts(backend, device, layout):
    center, radius = box((3, 4, 10, 10), device=device)
    w, b = params((5, 4, 3, 3), device=device)
    if layout == "channels_last":
        c, r = center.to(memory_format=torch.channels_last), radius.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        c, r = center[:, :, ::2, 1:], radius[:, :, ::2, 1:]
    else:
        c, r = center.to(memory_format=torch.channels_last), radius
    with torch.no_grad():
        for relu in (False, True):
            got = robust_fast.ibp_conv2d(c, r, w, b, padding=1, relu=relu, backend=backend)
            assert_all_close(got, ibp_conv2d_reference(c, r, w, b, (1, 1), (1, 1), (1, 1), 1, relu), torch.float32)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last_and_not", "empty"])
def test_relu_matches_reference(backend, device, dtype, layout):
    center, radius = box((4, 3, 5, 6) if layout != "empty" else (0, 3), dtype, device=device)
    if layout == "transposed":
        center, radius = center.transpose(0, 3), radius.transpose(0, 3)
    elif layout == "channels_last_and_not":
        center = center.to(memory_format=torch.channels_last)
    center.requires_grad_(True)
    radius.requires_grad_(True)
    expected = through(ibp_relu_reference, (center, radius))
    actual = through(lambda c, r: robust_fast.ibp_relu(c, r, backend=backend), (center, radius))
    assert_all_close(actual[0], expected[0], dtype)
    assert_all_close(actual[1], expected[1], dtype)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_relu_at_the_kinks(backend, device):
    """Boxes that touch 0 from either side, or straddle it, or are points on it."""
    center = torch.tensor([1.0, -1.0, 0.5, 0.0, 0.0, 2.0, -0.25], device=device)
    radius = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 0.0, 0.0], device=device)
    c, r = robust_fast.ibp_relu(center, radius, backend=backend)
    torch.testing.assert_close(c - r, (center - radius).relu(), rtol=0, atol=0)
    torch.testing.assert_close(c + r, (center + radius).relu(), rtol=0, atol=0)
    expected = through(ibp_relu_reference, (center.requires_grad_(), radius.requires_grad_()))
    actual = through(lambda a, b: robust_fast.ibp_relu(a, b, backend=backend), (center, radius))
    assert_all_close(actual[1], expected[1], torch.float32)


# --- strided parameters, NaN, full fp32 ---------------------------------------------------------

@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_strided_and_expanded_bias(backend, device):
    """A bias that is a strided slice or an expanded scalar gives the reference's bounds."""
    center, radius = (t.to(device) for t in box((5, 7)))
    w, _ = params((3, 7))
    w = w.to(device)
    wide = torch.randn(6, device=device)
    images_c, images_r = (t.to(device) for t in box((2, 4, 5, 5)))
    wc, _ = params((3, 4, 3, 3))
    wc = wc.to(device)
    for bias in (wide[::2], torch.tensor([0.7], device=device).expand(3)):
        with torch.no_grad():
            got = robust_fast.ibp_linear(center, radius, w, bias, relu=False, backend=backend)
            assert_all_close(got, ibp_linear_reference(center, radius, w, bias), torch.float32)
            got = robust_fast.ibp_conv2d(images_c, images_r, wc, bias, padding=1, backend=backend)
            assert_all_close(got, ibp_conv2d_reference(images_c, images_r, wc, bias, (1, 1), (1, 1), (1, 1), 1),
                             torch.float32)


def _same_nan_and_values(actual, expected):
    for a, e in zip(actual, expected):
        assert torch.equal(a.isnan(), e.isnan()), (a, e)
        torch.testing.assert_close(a.nan_to_num(), e.nan_to_num())


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_nan_propagates_through_relu(backend, device):
    """A NaN bound stays NaN through ReLU (as torch.relu), alone or fused after a product: a
    NaN box never turns into a finite one."""
    nan = float("nan")
    center = torch.tensor([nan, 1.0, -1.0, nan, 0.5, -3.0], device=device)
    radius = torch.tensor([0.1, nan, 0.5, nan, 0.2, 1.0], device=device)
    _same_nan_and_values(robust_fast.ibp_relu(center, radius, backend=backend), ibp_relu_reference(center, radius))
    w = torch.randn(4, 6, device=device)
    with torch.no_grad():
        got = robust_fast.ibp_linear(center.view(1, 6), radius.view(1, 6), w, None, relu=True, backend=backend)
    assert bool(got[0].isnan().all()) and bool(got[1].isnan().all())


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_certify_never_certifies_nan_bounds(backend, device):
    """NaN in the input, in a weight, or an infinite radius: certify says False, never True."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 3)).to(device)
    x = torch.rand(4, 2, 4, device=device)
    with torch.no_grad():
        y = model(x).argmax(1)
    assert bool(certify(model, x, y, 0.0, backend=backend).all())  # certified at eps 0
    x_nan = x.clone()
    x_nan[1, 0, 0] = float("nan")
    ok = certify(model, x_nan, y, 0.0, clip=None, backend=backend)
    assert ok.tolist() == [True, False, True, True]
    with torch.no_grad():
        model[1].weight[2, 3] = float("nan")
    assert not bool(certify(model, x, y, 0.0, backend=backend).any())
    # A NaN only in the hidden layer's bias (the ReLU's input), with no NaN in the head's input.
    with torch.no_grad():
        model[1].weight[2, 3] = 0.0
        model[1].bias[0] = float("nan")
    assert not bool(certify(model, x, y, 0.0, backend=backend).any())


@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_linear_with_no_inputs(backend, device):
    """in_features = 0: the bias alone and a zero radius, with gradients, on every backend."""
    center = torch.zeros(4, 0, device=device, requires_grad=True)
    radius = torch.zeros(4, 0, device=device)
    w = torch.zeros(3, 0, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    c, r = robust_fast.ibp_linear(center, radius, w, b, backend=backend)
    assert torch.equal(c, b.detach().expand(4, 3)) and torch.equal(r, torch.zeros(4, 3, device=device))
    c.sum().backward()
    assert torch.equal(b.grad, torch.full((3,), 4.0, device=device)) and center.grad.shape == (4, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible: TF32 exists only on CUDA")
@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_bounds_are_full_fp32_whatever_the_tf32_flags(backend):
    """With TF32 allowed globally, fp32 bounds on CUDA still carry fp32 rounding (~1e-6), not
    TF32's ~1e-3; the global flags are as the caller left them afterwards."""
    if unavailable_reason(backend, "cuda") is not None:
        pytest.skip(str(unavailable_reason(backend, "cuda")))
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    try:
        center, radius = (t.cuda() for t in box((64, 1024)))
        w, b = (t.cuda() for t in params((256, 1024)))
        images_c, images_r = (t.cuda() for t in box((8, 64, 12, 12)))
        wc, bc = (t.cuda() for t in params((64, 64, 3, 3)))
        with torch.no_grad():
            got = robust_fast.ibp_linear(center, radius, w, b, backend=backend)
            exact = ibp_linear_reference(*(t.double() for t in (center, radius, w, b)))
            for g, e in zip(got, exact):
                torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5)
            got = robust_fast.ibp_conv2d(images_c, images_r, wc, bc, padding=1, backend=backend)
            exact = ibp_conv2d_reference(*(t.double() for t in (images_c, images_r, wc, bc)), (1, 1), (1, 1), (1, 1), 1)
            for g, e in zip(got, exact):
                torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5)
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 512), torch.nn.ReLU(),
                                        torch.nn.Linear(512, 10)).cuda()
            x = torch.rand(32, 1024, device="cuda")
            y = torch.randint(0, 10, (32,), device="cuda")
            got = margin_bounds(model, x, y, 0.01, backend=backend).double()
            exact = margin_bounds(model.double(), x.double(), y, 0.01, backend=backend)
            torch.testing.assert_close(got, exact, rtol=2e-5, atol=2e-5)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# --- the math: sampled points stay inside the output box --------------------------------------

@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_sampled_points_stay_inside(backend, device):
    g = torch.Generator().manual_seed(5)
    center, radius = box((2, 3, 6, 6), device=device)
    w, b = params((4, 3, 3, 3), device=device)
    wl, bl = params((7, 4 * 4 * 4), device=device)
    with torch.no_grad():
        c1, r1 = robust_fast.ibp_conv2d(center, radius, w, b, relu=True, backend=backend)
        c2, r2 = robust_fast.ibp_linear(c1.flatten(1), r1.flatten(1), wl, bl, backend=backend)
        points = center + radius * (2 * torch.rand((2000,) + center.shape, generator=g).to(device) - 1)
        points[:4] = center + radius * torch.tensor([-1.0, 1.0, -1.0, 1.0], device=device).view(4, 1, 1, 1, 1)
        out = F.linear(F.conv2d(points.flatten(0, 1), w, b).relu().flatten(1), wl, bl).view(2000, 2, 7)
    slack = 1e-5 * (1 + out.abs())
    assert bool((out >= c2 - r2 - slack).all()) and bool((out <= c2 + r2 + slack).all())


# --- gradcheck, opcheck, torch.compile ---------------------------------------------------------

@pytest.mark.parametrize("backend,device", PAIRS_AND_REFERENCE)
def test_gradcheck_float64(backend, device):
    # gradcheck perturbs the weight through .data, which the version counter does not see.
    with _abs_weight.disabled():
        gradcheck_all(backend, device)


def gradcheck_all(backend, device="cpu"):
    center, radius = box((3, 5), torch.float64, device=device)
    w, b = params((4, 5), dtype=torch.float64, device=device)
    # Boxes away from relu's kink, where the gradient is defined.
    center = center + 0.3 * torch.sign(center)
    args = [t.clone().requires_grad_() for t in (center, radius, w, b)]
    assert torch.autograd.gradcheck(lambda c, r, w_, b_: robust_fast.ibp_linear(c, r, w_, b_, backend=backend), args)
    assert torch.autograd.gradcheck(lambda c, r: robust_fast.ibp_relu(c, r, backend=backend), args[:2])
    ic, ir = box((2, 2, 5, 5), torch.float64, seed=3, device=device)
    wc, bc = params((3, 2, 3, 3), dtype=torch.float64, device=device)
    cargs = [t.clone().requires_grad_() for t in (ic, ir, wc, bc)]
    assert torch.autograd.gradcheck(
        lambda c, r, w_, b_: robust_fast.ibp_conv2d(c, r, w_, b_, stride=2, padding=1, backend=backend), cargs)


@cpp_only
def test_gradcheck_of_the_fused_op():
    """A direct call of the op with relu=True differentiates too (the backward recomputes the
    pre-activation)."""
    center, radius = box((3, 5), torch.float64)
    w, b = params((4, 5), dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (center, radius, w, b)]
    op = torch.ops.robust_fast.ibp_linear
    assert torch.autograd.gradcheck(lambda c, r, w_, b_: op(c, r, w_, b_, None, True), args)
    ic, ir = box((2, 2, 5, 5), torch.float64, seed=3)
    wc, bc = params((3, 2, 3, 3), dtype=torch.float64)
    cargs = [t.clone().requires_grad_() for t in (ic, ir, wc, bc)]
    conv = torch.ops.robust_fast.ibp_conv2d
    assert torch.autograd.gradcheck(lambda c, r, w_, b_: conv(c, r, w_, b_, None, [1, 1], [1, 1], [1, 1], 1, True),
                                    cargs)


@cpp_only
def test_opcheck():
    center, radius = box((3, 5), torch.float64)
    w, b = params((4, 5), dtype=torch.float64)
    grad = lambda *ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    ops = torch.ops.robust_fast
    for relu in (False, True):
        torch.library.opcheck(ops.ibp_linear.default, (*grad(center, radius, w, b), w.abs(), relu))
        torch.library.opcheck(ops.ibp_linear.default, (center.view(1, 3, 5), radius.view(1, 3, 5), w, None, None, relu))
    torch.library.opcheck(ops.ibp_relu.default, tuple(grad(center, radius)))
    torch.library.opcheck(ops._ibp_relu_backward.default, (center, radius, center, radius))
    torch.library.opcheck(ops._ibp_linear_backward.default, (center[:, :4], radius[:, :4], center, radius, w, None,
                                                            [True, True, True]))
    ic, ir = box((2, 2, 5, 5), torch.float64)
    wc, bc = params((4, 1, 3, 3), dtype=torch.float64)   # groups=2
    for relu in (False, True):
        torch.library.opcheck(ops.ibp_conv2d.default, (*grad(ic, ir, wc, bc), None, [2, 2], [1, 1], [1, 1], 2, relu))
    cl = ic.to(memory_format=torch.channels_last)
    torch.library.opcheck(ops.ibp_conv2d.default, (cl, ir, wc, bc, None, [1, 1], [0, 0], [1, 1], 2, False))
    gc, gr = box((2, 4, 3, 3), torch.float64)
    torch.library.opcheck(ops._ibp_conv2d_backward.default,
                          (gc, gr, ic, ir, wc, None, [2, 2], [1, 1], [1, 1], 2, [True, True, False]))


@cpp_only
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_torch_compile_fullgraph(backend):
    center, radius = box((4, 2, 6, 6))
    w, b = params((3, 2, 3, 3))
    wl, bl = params((5, 3 * 6 * 6))

    def bounds(c, r, w_, b_):
        c, r = robust_fast.ibp_conv2d(c, r, w_, b_, padding=1, relu=True, backend=backend)
        c, r = robust_fast.ibp_linear(c.flatten(1), r.flatten(1), wl, bl, backend=backend)
        return (c - r).sum() + (c + r).square().sum()

    compiled = torch.compile(bounds, fullgraph=True)
    results = []
    for fn in (bounds, compiled):
        w_leaf = w.clone().requires_grad_()
        value = fn(center, radius, w_leaf, b)
        value.backward()
        results.append((value.detach(), w_leaf.grad))
    assert_all_close(results[1], results[0], torch.float32)


# --- the |W| cache ----------------------------------------------------------------------------

def test_abs_weight_cache_follows_the_weight():
    w = torch.nn.Parameter(torch.randn(4, 3))
    first = _abs_weight.cached_abs_weight(w)
    assert first is _abs_weight.cached_abs_weight(w)          # unchanged: the same tensor
    torch.testing.assert_close(first, w.detach().abs())
    with torch.no_grad():
        w.mul_(-2.0)                                          # an optimizer step, in place
    second = _abs_weight.cached_abs_weight(w)
    assert second is not first
    torch.testing.assert_close(second, w.detach().abs())
    w.data = torch.randn(4, 3)                                # storage swapped
    torch.testing.assert_close(_abs_weight.cached_abs_weight(w), w.detach().abs())
    with _abs_weight.disabled():
        assert _abs_weight.cached_abs_weight(w) is None
    key = id(w)
    del w
    assert key not in _abs_weight._cache                      # dropped with the weight


@cpp_only
def test_bounds_follow_an_updated_weight():
    center, radius = box((3, 5))
    w, b = params((4, 5))
    robust_fast.ibp_linear(center, radius, w, b, backend="cpp")
    with torch.no_grad():
        w.neg_()
    assert_all_close(robust_fast.ibp_linear(center, radius, w, b, backend="cpp"),
                     ibp_linear_reference(center, radius, w, b), torch.float32)


def test_inputs_are_not_modified():
    center, radius = box((3, 5))
    w, b = params((4, 5))
    images_c, images_r = box((2, 4, 3, 3))
    saved = [t.clone() for t in (center, radius, w, b, images_c, images_r)]
    for backend in ("cpp", "triton", "reference"):
        if unavailable_reason(backend, "cpu") is None:
            robust_fast.ibp_linear(center, radius, w, b, relu=True, backend=backend)
            robust_fast.ibp_relu(center, radius, backend=backend)
            robust_fast.ibp_conv2d(images_c, images_r, w.view(4, 5, 1, 1)[:, :4], b, relu=True, backend=backend)
    for before, after in zip(saved, (center, radius, w, b, images_c, images_r)):
        assert torch.equal(before, after)


# --- errors ------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    center, radius = box((3, 5))
    w, b = params((4, 5))
    with pytest.raises(ValueError, match="radius must have center's shape"):
        robust_fast.ibp_linear(center, radius[:, :4], w, b)
    with pytest.raises(TypeError, match="radius must have center's dtype"):
        robust_fast.ibp_linear(center, radius.double(), w, b)
    with pytest.raises(TypeError, match="center must be a torch.Tensor"):
        robust_fast.ibp_relu([1.0], radius)
    with pytest.raises(TypeError, match="center must have a floating-point dtype"):
        robust_fast.ibp_relu(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"center must be \(\.\.\., 6\)"):
        robust_fast.ibp_linear(center, radius, torch.randn(4, 6))
    with pytest.raises(ValueError, match="weight must be"):
        robust_fast.ibp_linear(center, radius, torch.randn(4, 5, 1))
    with pytest.raises(ValueError, match="bias must have shape"):
        robust_fast.ibp_linear(center, radius, w, torch.randn(3))
    with pytest.raises(TypeError, match="weight must have center's dtype"):
        robust_fast.ibp_linear(center, radius, w.double(), None)
    images_c, images_r = box((2, 3, 6, 6))
    wc, _ = params((4, 3, 3, 3))
    with pytest.raises(ValueError, match="stride must be"):
        robust_fast.ibp_conv2d(images_c, images_r, wc, stride=0)
    with pytest.raises(ValueError, match="padding must be"):
        robust_fast.ibp_conv2d(images_c, images_r, wc, padding=(1, 2, 3))
    with pytest.raises(ValueError, match="groups"):
        robust_fast.ibp_conv2d(images_c, images_r, wc, groups=0)
    with pytest.raises(ValueError, match=r"center must be \(\.\.\., 3, H, W\)"):
        robust_fast.ibp_conv2d(images_c[:, :2], images_r[:, :2], wc)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        robust_fast.ibp_conv2d(images_c[..., :2, :2], images_r[..., :2, :2], wc)
