"""robust_fast.apgd_step: every backend against the reference, the invariants of the step, the
in-place update, opcheck, torch.compile, and the errors for bad input."""

import pytest
import torch

import robust_fast
from robust_fast.reference.apgd import apgd_step_reference
from robust_fast.reference.pgd import pgd_step_reference
from conftest import backend_devices

PAIRS = backend_devices()
PAIRS_AND_REFERENCE = backend_devices(include_reference=True)
NORMS = ["linf", "l2"]
SHAPES = [(1, 5), (3, 1, 7, 9), (4, 3, 8, 8), (2, 3, 33, 17), (7, 2, 5, 5, 3)]


def make_inputs(shape, dtype=torch.float32, eps=0.05, layout="contiguous", seed=0, device="cpu"):
    """x_nat in [0, 1]; x and x_prev feasible points of its ball; grad of mixed scales; eta (B,)."""
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=g, dtype=dtype)
    x = (x_nat + (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * eps).clamp(0, 1)
    x_prev = (x_nat + (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * eps).clamp(0, 1)
    grad = torch.randn(shape, generator=g, dtype=dtype) * 10 ** torch.randint(-3, 2, (1,), generator=g).item()
    eta = (torch.rand(shape[0], generator=g, dtype=torch.float64) * 2 * eps).to(device)
    tensors = [t.to(device) for t in (x, x_prev, grad, x_nat)]
    if layout == "channels_last":
        tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    elif layout == "transposed":
        tensors = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in tensors]
    elif layout == "sliced":
        tensors = [torch.cat([t, t], dim=-1)[..., ::2] for t in tensors]
    elif layout == "mixed":
        tensors = [tensors[0], tensors[1].transpose(-1, -2).contiguous().transpose(-1, -2)] + tensors[2:]
    return tensors + [eta]


def reference(x, x_prev, grad, x_nat, eta, eps, norm, momentum=0.75, clip=(0.0, 1.0)):
    low, high = (None, None) if clip is None else clip
    return apgd_step_reference(x, x_prev, grad, x_nat, eta=eta, eps=eps, momentum=momentum,
                               norm=norm, clip_min=low, clip_max=high)


def assert_matches(actual, expected, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)
    elif dtype == torch.float32:
        # The kernels may fuse a multiply and an add; the projection bounds the difference.
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=2e-7)
    else:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, device, norm, dtype, shape):
    x, x_prev, grad, x_nat, eta = make_inputs(shape, dtype, device=device)
    expected = reference(x, x_prev, grad, x_nat, eta, 0.05, norm)
    actual = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=0.05, norm=norm, backend=backend)
    assert actual.dtype == dtype and actual.shape == x.shape
    assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "mixed"])
def test_layouts(backend, device, norm, layout):
    x, x_prev, grad, x_nat, eta = make_inputs((3, 4, 6, 5), layout=layout, device=device)
    expected = reference(*(t.contiguous() for t in (x, x_prev, grad, x_nat)), eta, 0.05, norm)
    actual = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=0.05, norm=norm, backend=backend)
    assert_matches(actual, expected, torch.float32)
    if layout == "channels_last":
        assert actual.is_contiguous(memory_format=torch.channels_last)
    # In place, whatever the layout: x takes the result, x_prev the old x.
    x_work, prev_work = x.clone(), x_prev.clone()
    returned = robust_fast.apgd_step(x_work, prev_work, grad, x_nat, eta=eta, eps=0.05, norm=norm,
                                     in_place=True, backend=backend)
    assert returned is x_work
    assert_matches(x_work, expected, torch.float32)
    assert torch.equal(prev_work, x)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("norm", NORMS)
def test_random_shapes_and_options(backend, device, norm):
    g = torch.Generator().manual_seed(4321)
    for trial in range(10):
        ndim = int(torch.randint(1, 5, (1,), generator=g))
        shape = tuple(int(s) for s in torch.randint(1, 9, (ndim,), generator=g))
        dtype = (torch.float32, torch.float64)[trial % 2]
        x, x_prev, grad, x_nat, eta = make_inputs(shape, dtype, eps=0.1, seed=trial, device=device)
        eps = (torch.rand(shape[0], generator=g, dtype=torch.float64).to(device) * 0.2 if trial % 3 == 0
               else 0.02 * (trial + 1))
        momentum = [0.75, 1.0, 0.0, 0.3][trial % 4]
        clip = [(0.0, 1.0), None, (0.2, None), (None, 0.8)][trial % 4]
        expected = reference(x, x_prev, grad, x_nat, eta, eps, norm, momentum, clip)
        actual = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=eps, momentum=momentum,
                                       norm=norm, clip=clip, backend=backend)
        assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("norm", NORMS)
def test_first_step_is_the_pgd_step(backend, device, norm):
    """momentum 1 (the first step): x_new = z = pgd_step(x, grad, x_nat) with alpha = eta."""
    x, x_prev, grad, x_nat, eta = make_inputs((5, 3, 6, 6), torch.float64, device=device)
    z = pgd_step_reference(x, grad, x_nat, eps=0.05, alpha=eta, norm=norm, clip_min=0.0, clip_max=1.0)
    actual = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=0.05, momentum=1.0, norm=norm,
                                   backend=backend)
    torch.testing.assert_close(actual, z, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("norm", NORMS)
def test_result_stays_in_ball_and_box(backend, device, norm):
    eps = 0.1 if norm == "linf" else 0.5
    for seed in range(4):
        x, x_prev, grad, x_nat, eta = make_inputs((6, 3, 9, 9), torch.float64, eps=eps, seed=seed, device=device)
        eta = eta * 10  # steps far outside the ball
        for _ in range(4):
            robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=eps, norm=norm, in_place=True,
                                  backend=backend)
            assert x.min() >= 0 and x.max() <= 1
            delta = (x - x_nat).flatten(1)
            if norm == "linf":
                assert delta.abs().max() <= eps
            else:
                assert (delta.norm(dim=1) <= eps * (1 + 1e-12)).all()
            grad = torch.randn_like(grad)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_momentum_combines_step_and_last_move(backend, device):
    """Away from every bound: x_new = x + a*eta*sign(g) + (1 - a)*(x - x_prev)."""
    x_nat = torch.full((2, 6), 0.5, dtype=torch.float64, device=device)
    x = x_nat + 0.01
    x_prev = x_nat - 0.02
    grad = torch.tensor([[1.0, -1.0, 2.0, -3.0, 0.0, 5.0]] * 2, dtype=torch.float64, device=device)
    eta = torch.tensor([0.04, 0.08], dtype=torch.float64, device=device)
    out = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=1.0, momentum=0.75, backend=backend)
    expected = x + 0.75 * eta[:, None] * torch.sign(grad) + 0.25 * (x - x_prev)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("norm", NORMS)
def test_in_place_and_inputs_stay(backend, device, norm):
    x, x_prev, grad, x_nat, eta = make_inputs((5, 3, 6, 6), device=device)
    copies = [t.clone() for t in (x, x_prev, grad, x_nat, eta)]
    fresh = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=0.05, norm=norm, backend=backend)
    for before, after in zip(copies, (x, x_prev, grad, x_nat, eta)):
        assert torch.equal(before, after)  # nothing passed in was modified
    returned = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=0.05, norm=norm,
                                     in_place=True, backend=backend)
    assert returned is x
    assert torch.equal(x, fresh) and torch.equal(x_prev, copies[0])
    assert torch.equal(grad, copies[2]) and torch.equal(x_nat, copies[3]) and torch.equal(eta, copies[4])


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("norm", NORMS)
def test_in_place_on_strided_views_of_separate_memory(backend, device, norm):
    """x and x_prev are views that are not dense, each over its own memory: the step goes
    through temporaries and lands in them."""
    x, x_prev, grad, x_nat, eta = make_inputs((3, 4, 6, 5), device=device)
    expected = reference(x, x_prev, grad, x_nat, eta, 0.05, norm)
    x_work, prev_work = (torch.stack([t, t], dim=-1)[..., 0] for t in (x, x_prev))
    returned = robust_fast.apgd_step(x_work, prev_work, grad, x_nat, eta=eta, eps=0.05, norm=norm,
                                     in_place=True, backend=backend)
    assert returned is x_work
    assert_matches(x_work, expected, torch.float32)
    assert torch.equal(prev_work, x)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_in_place_refuses_x_and_x_prev_overlapping_in_part(backend, device):
    buffer = torch.rand(4, 6, device=device)
    x, x_prev = buffer[:3], buffer[1:]
    grad, x_nat = torch.randn(3, 6, device=device), torch.rand(3, 6, device=device)
    with pytest.raises(ValueError, match="separate memory"):
        robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=0.01, eps=0.1, in_place=True, backend=backend)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("norm", NORMS)
def test_empty_batch_and_float_eta(backend, device, norm):
    empty = torch.empty(0, 3, 4, 4, device=device)
    out = robust_fast.apgd_step(empty, empty.clone(), empty, empty, eta=0.1, eps=0.1, norm=norm, backend=backend)
    assert out.shape == (0, 3, 4, 4)
    x, x_prev, grad, x_nat, _ = make_inputs((3, 2, 4), device=device)
    as_float = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=0.02, eps=0.05, norm=norm, backend=backend)
    as_tensor = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=torch.full((3,), 0.02, dtype=torch.float64),
                                      eps=0.05, norm=norm, backend=backend)
    assert torch.equal(as_float, as_tensor)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("norm", NORMS)
def test_zero_and_nan_gradients_make_no_step(backend, device, norm):
    """z = x where the gradient says nothing; the momentum term still moves the point."""
    x, x_prev, grad, x_nat, eta = make_inputs((3, 2, 5, 5), torch.float64, device=device)
    grad[0] = 0.0
    grad[1] = float("nan")
    out = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=1.0, momentum=1.0, norm=norm,
                                backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:2], x[:2])
    expected = reference(x, x_prev, grad, x_nat, eta, 1.0, norm)
    actual = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=1.0, norm=norm, backend=backend)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(backend, device, norm, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    x, x_prev, grad, x_nat, eta = make_inputs((4, 3, 8, 8), device=device)
    x, x_prev, grad, x_nat = (t.to(dtype) for t in (x, x_prev, grad, x_nat))
    expected = reference(x.double(), x_prev.double(), grad.double(), x_nat.double(), eta, 0.05, norm)
    actual = robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=0.05, norm=norm, backend=backend)
    assert actual.dtype == dtype
    assert_matches(actual, expected.to(dtype), dtype)


# --- the C++ op under torch.library tooling ---------------------------------------------------

cpp_only = pytest.mark.skipif(robust_fast._build.cpp_unavailable_reason("cpu") is not None,
                              reason=str(robust_fast._build.cpp_unavailable_reason("cpu")))


@cpp_only
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_opcheck(norm, layout):
    x, x_prev, grad, x_nat, eta = make_inputs((3, 2, 5, 4), layout=layout)
    args = (x, x_prev, grad, x_nat, 0.0, 0.05, eta, None, 0.75, norm, 0.0, 1.0)
    torch.library.opcheck(torch.ops.robust_fast.apgd_step.default, args)
    per_sample = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    torch.library.opcheck(torch.ops.robust_fast.apgd_step.default,
                          (x, x_prev, grad, x_nat, 0.0, 0.0, eta, per_sample, 1.0, norm, None, None))
    torch.library.opcheck(torch.ops.robust_fast.apgd_step_.default, (x.clone(), x_prev.clone()) + args[2:])


@cpp_only
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_torch_compile_fullgraph(norm, backend):
    x, x_prev, grad, x_nat, eta = make_inputs((4, 3, 8, 8))

    def step(x, x_prev, grad, x_nat, eta):
        return robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=0.05, norm=norm, backend=backend)

    expected = step(x, x_prev, grad, x_nat, eta)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, x_prev, grad, x_nat, eta), expected, rtol=1e-6, atol=2e-7)

    def in_place(x, x_prev, grad, x_nat, eta):
        robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=0.05, norm=norm, in_place=True,
                              backend=backend)
        return x, x_prev

    x_work, prev_work = x.clone(), x_prev.clone()
    torch.compile(in_place, fullgraph=True, backend="aot_eager")(x_work, prev_work, grad, x_nat, eta)
    torch.testing.assert_close(x_work, expected, rtol=1e-6, atol=2e-7)
    assert torch.equal(prev_work, x)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_not_differentiable(backend, device):
    x, x_prev, grad, x_nat, eta = make_inputs((2, 3), device=device)
    with pytest.raises(RuntimeError, match="not differentiable"):
        robust_fast.apgd_step(x.requires_grad_(), x_prev, grad, x_nat, eta=eta, eps=0.1, backend=backend)


@cpp_only
def test_direct_op_call_refuses_backward():
    x, x_prev, grad, x_nat, eta = make_inputs((2, 3))
    out = torch.ops.robust_fast.apgd_step(x.requires_grad_(), x_prev, grad, x_nat, 0.0, 0.1, eta, None,
                                          0.75, "linf", 0.0, 1.0)
    with pytest.raises(RuntimeError, match="not differentiable"):
        out.sum().backward()


def test_profiler_range():
    x, x_prev, grad, x_nat, eta = make_inputs((2, 3))
    with torch.profiler.profile() as prof:
        robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=0.1)
    assert any(e.name == "robust_fast::apgd_step" for e in prof.events())


# --- bad input ------------------------------------------------------------------------------

def call(**overrides):
    x, x_prev, grad, x_nat, eta = make_inputs((3, 2, 4))
    kwargs = dict(x=x, x_prev=x_prev, grad=grad, x_nat=x_nat, eta=eta, eps=0.1)
    kwargs.update(overrides)
    args = [kwargs.pop(k) for k in ("x", "x_prev", "grad", "x_nat")]
    return robust_fast.apgd_step(*args, **kwargs)


@pytest.mark.parametrize("overrides, error, words", [
    (dict(grad=torch.zeros(3, 2, 5)), ValueError, "grad must have the shape of x"),
    (dict(x_prev=torch.zeros(2, 2, 4)), ValueError, "x_prev must have the shape"),
    (dict(x_nat=torch.zeros(3, 2, 4, dtype=torch.float64)), TypeError, "x_nat must have x's dtype"),
    (dict(x=torch.zeros(3, 2, 4, dtype=torch.int64)), TypeError, "x must have a floating-point"),
    (dict(x_prev=[1.0]), TypeError, "x_prev must be a torch.Tensor"),
    (dict(x=torch.tensor(1.0), x_prev=torch.tensor(1.0), grad=torch.tensor(1.0), x_nat=torch.tensor(1.0)),
     ValueError, "batch dimension"),
    (dict(eta=torch.ones(4)), ValueError, r"eta as a tensor must have shape \(3,\)"),
    (dict(eta=torch.tensor([0.1, -0.1, 0.1])), ValueError, "eta must be >= 0"),
    (dict(eta=float("inf")), ValueError, "eta must be finite"),
    (dict(eta="big"), TypeError, "eta must be a float"),
    (dict(eps=-0.1), ValueError, "eps must be >= 0"),
    (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
    (dict(momentum=None), TypeError, "momentum must be a float"),
    (dict(norm="l1"), ValueError, "norm must be one of"),
    (dict(clip=(1.0, 0.0)), ValueError, "clip low must be <= high"),
    (dict(in_place=1), TypeError, "in_place must be a bool"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_input_names_the_argument(overrides, error, words):
    with pytest.raises(error, match=words):
        call(**overrides)


@cpp_only
def test_op_in_place_refuses_written_tensors_that_share_memory():
    buffer = torch.rand(4, 6)
    grad, x_nat = torch.randn(3, 6), torch.rand(3, 6)
    args = (grad, x_nat, 0.01, 0.1, None, None, 0.75, "linf", 0.0, 1.0)
    with pytest.raises(RuntimeError, match="x and x_prev are both written"):
        torch.ops.robust_fast.apgd_step_(buffer[:3], buffer[:3], *args)
    with pytest.raises(RuntimeError, match="x partially overlaps x_prev"):
        torch.ops.robust_fast.apgd_step_(buffer[:3], buffer[1:], *args)
    with pytest.raises(RuntimeError, match="x partially overlaps grad"):
        torch.ops.robust_fast.apgd_step_(buffer[:3], torch.rand(3, 6), buffer[1:], x_nat, *args[2:])


def test_in_place_needs_separate_x_and_x_prev():
    x, _, grad, x_nat, eta = make_inputs((3, 2, 4))
    with pytest.raises(ValueError, match="separate memory"):
        robust_fast.apgd_step(x, x, grad, x_nat, eta=eta, eps=0.1, in_place=True)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("shape", [(2, 3, 33, 17), (1, 70000), (3, 2, 40, 40)])
@pytest.mark.parametrize("per_sample_eps", [False, True])
def test_l2_split_path_matches_the_reference(monkeypatch, backend, device, shape, per_sample_eps):
    """Few samples larger than a block: the L2 step splits each sample among programs (as
    pgd_step's), in a new tensor and in place, and agrees with the reference. Under the Triton
    interpreter the device is 8 programs wide, so these small batches take the split path."""
    split_calls = []
    if backend == "triton":
        kernels = robust_fast._backend.triton_kernels("apgd")
        real = kernels._apgd_step_l2_split
        monkeypatch.setattr(kernels, "_apgd_step_l2_split",
                            lambda *args: (split_calls.append(args[0].shape), real(*args))[1])
    x, x_prev, grad, x_nat, eta = make_inputs(shape, device=device)
    eps = (torch.rand(shape[0], dtype=torch.float64) * 0.05 + 0.01).to(device) if per_sample_eps else 0.03
    expected = reference(x, x_prev, grad, x_nat, eta, eps, "l2")
    assert_matches(robust_fast.apgd_step(x, x_prev, grad, x_nat, eta=eta, eps=eps, norm="l2", backend=backend),
                   expected, torch.float32)
    x_work, prev_work = x.clone(), x_prev.clone()
    robust_fast.apgd_step(x_work, prev_work, grad, x_nat, eta=eta, eps=eps, norm="l2", in_place=True,
                          backend=backend)
    assert_matches(x_work, expected, torch.float32)
    assert torch.equal(prev_work, x)
    if backend == "triton" and device == "cpu":
        assert len(split_calls) == 2
