"""robust_fast.pgd_step: every backend against the reference, the invariants of the step,
opcheck, torch.compile, and the errors for bad input."""

import pytest
import torch

import robust_fast
from robust_fast.reference.pgd import pgd_step_reference
from conftest import backend_devices, unavailable_reason

PAIRS = backend_devices()                                  # (backend, device) of every kernel
PAIRS_AND_REFERENCE = backend_devices(include_reference=True)
NORMS = ["linf", "l2"]
SHAPES = [(1, 5), (3, 1, 7, 9), (4, 3, 8, 8), (2, 3, 33, 17), (7, 2, 5, 5, 3)]


def make_inputs(shape, dtype=torch.float32, eps=0.05, layout="contiguous", seed=0, device="cpu"):
    """x_nat in [0, 1], x_adv a feasible point of its ball, grad of mixed scales."""
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=g, dtype=dtype)
    x_adv = (x_nat + (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * eps).clamp(0, 1)
    grad = torch.randn(shape, generator=g, dtype=dtype) * 10 ** torch.randint(-3, 2, (1,), generator=g).item()
    tensors = [t.to(device) for t in (x_adv, grad, x_nat)]
    if layout == "channels_last":
        tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    elif layout == "transposed":  # non-contiguous: the same values, strides of a transpose
        tensors = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in tensors]
    elif layout == "sliced":
        tensors = [torch.cat([t, t], dim=-1)[..., ::2] for t in tensors]
    elif layout == "mixed":  # each operand in its own layout
        tensors = [tensors[0], tensors[1].transpose(-1, -2).contiguous().transpose(-1, -2), tensors[2]]
    return tensors


def reference(x_adv, grad, x_nat, eps, alpha, norm, clip=(0.0, 1.0), targeted=False):
    low, high = (None, None) if clip is None else clip
    return pgd_step_reference(x_adv, grad, x_nat, eps=eps, alpha=alpha, norm=norm,
                              clip_min=low, clip_max=high, targeted=targeted)


def assert_matches_reference(actual, expected, norm, dtype):
    if norm == "linf" and dtype in (torch.float32, torch.float64):
        # Same expression, same order, same rounding: bit-identical.
        assert torch.equal(actual, expected), (actual - expected).abs().max()
    elif dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    else:  # reduced precision: the kernels round once, the reference after every op
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, device, norm, dtype, shape):
    x_adv, grad, x_nat = make_inputs(shape, dtype, device=device)
    expected = reference(x_adv, grad, x_nat, 0.05, 0.01, norm)
    actual = robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.05, alpha=0.01, norm=norm, backend=backend)
    assert actual.dtype == dtype and actual.shape == x_adv.shape
    assert_matches_reference(actual, expected, norm, dtype)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "mixed"])
def test_layouts(backend, device, norm, layout):
    x_adv, grad, x_nat = make_inputs((3, 4, 6, 5), torch.float32, layout=layout, device=device)
    expected = reference(x_adv.contiguous(), grad.contiguous(), x_nat.contiguous(), 0.05, 0.02, norm)
    actual = robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.05, alpha=0.02, norm=norm, backend=backend)
    assert_matches_reference(actual, expected, norm, torch.float32)
    if layout == "channels_last":  # a channels_last attack stays channels_last
        assert actual.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("norm", NORMS)
def test_random_shapes_and_options(backend, device, norm):
    g = torch.Generator().manual_seed(1234)
    for trial in range(12):
        ndim = int(torch.randint(1, 5, (1,), generator=g))
        shape = tuple(int(s) for s in torch.randint(1, 9, (ndim,), generator=g))
        dtype = (torch.float32, torch.float64)[trial % 2]
        x_adv, grad, x_nat = make_inputs(shape, dtype, seed=trial, device=device)
        batch = shape[0]
        per_sample = trial % 3 == 0
        eps = (torch.rand(batch, generator=g, dtype=torch.float64).to(device) * 0.1 if per_sample
               else 0.03 * (trial + 1))
        alpha = (torch.rand(batch, generator=g, dtype=torch.float64).to(device) * 0.05 if per_sample
                 else 0.007 * (trial + 1))
        clip = [(0.0, 1.0), None, (0.2, None), (None, 0.8)][trial % 4]
        targeted = trial % 2 == 1
        expected = reference(x_adv, grad, x_nat, eps, alpha, norm, clip, targeted)
        actual = robust_fast.pgd_step(x_adv, grad, x_nat, eps=eps, alpha=alpha, norm=norm, clip=clip,
                                      targeted=targeted, backend=backend)
        assert_matches_reference(actual, expected, norm, dtype)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("norm", NORMS)
def test_result_stays_in_ball_and_box(backend, device, norm):
    eps = 0.1 if norm == "linf" else 0.5
    for seed in range(5):
        x_adv, grad, x_nat = make_inputs((6, 3, 9, 9), torch.float64, eps=eps, seed=seed, device=device)
        x = x_adv
        for _ in range(4):  # a few steps from anywhere in the box, large steps included
            x = robust_fast.pgd_step(x, grad, x_nat, eps=eps, alpha=0.3, norm=norm, backend=backend)
            assert x.min() >= 0 and x.max() <= 1
            delta = (x - x_nat).flatten(1)
            if norm == "linf":
                assert delta.abs().max() <= eps
            else:
                assert (delta.norm(dim=1) <= eps * (1 + 1e-12)).all()
            grad = torch.randn_like(grad)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_linf_moves_by_alpha_along_the_sign(backend, device):
    x_nat = torch.full((2, 8), 0.5, device=device)
    grad = torch.tensor([[1.0, -2.0, 0.0, 3.0, -1e-30, 5.0, -5.0, 0.5]] * 2, device=device)
    out = robust_fast.pgd_step(x_nat, grad, x_nat, eps=1.0, alpha=0.25, backend=backend)
    assert torch.equal(out - 0.5, 0.25 * torch.sign(grad))
    out_t = robust_fast.pgd_step(x_nat, grad, x_nat, eps=1.0, alpha=0.25, targeted=True, backend=backend)
    assert torch.equal(out_t - 0.5, -0.25 * torch.sign(grad))


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_l2_step_has_length_alpha_and_projects(backend, device):
    x_nat = torch.full((3, 50), 0.5, dtype=torch.float64, device=device)
    grad = torch.randn(3, 50, dtype=torch.float64, device=device)
    out = robust_fast.pgd_step(x_nat, grad, x_nat, eps=10.0, alpha=0.2, norm="l2", clip=None, backend=backend)
    torch.testing.assert_close((out - x_nat).norm(dim=1), torch.full((3,), 0.2, dtype=torch.float64, device=device))
    # The direction is the gradient's.
    cosine = torch.nn.functional.cosine_similarity(out - x_nat, grad, dim=1)
    torch.testing.assert_close(cosine, torch.ones(3, dtype=torch.float64))
    far = robust_fast.pgd_step(x_nat, grad, x_nat, eps=0.05, alpha=0.2, norm="l2", clip=None, backend=backend)
    torch.testing.assert_close((far - x_nat).norm(dim=1), torch.full((3,), 0.05, dtype=torch.float64, device=device))


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("norm", NORMS)
def test_zero_and_nan_gradients_make_no_move(backend, device, norm):
    x_adv, grad, x_nat = make_inputs((4, 3, 5, 5), torch.float32, eps=0.05, device=device)
    grad[0] = 0.0
    grad[1, 0, 0, 0] = float("nan")
    grad[2, 1, 2, 3] = float("inf") if norm == "l2" else float("nan")
    eps = 0.05 if norm == "linf" else 1.0  # x_adv lies inside the ball: "no move" is no change
    out = robust_fast.pgd_step(x_adv, grad, x_nat, eps=eps, alpha=0.01, norm=norm, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], x_adv[0])
    if norm == "l2":
        # The whole sample stays where it was; the other samples move.
        assert torch.equal(out[1], x_adv[1]) and torch.equal(out[2], x_adv[2])
        assert not torch.equal(out[3], x_adv[3])
    else:
        assert out[1, 0, 0, 0] == x_adv[1, 0, 0, 0]
    expected = reference(x_adv, grad, x_nat, eps, 0.01, norm)
    assert_matches_reference(out, expected, norm, torch.float32)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("norm", NORMS)
def test_empty_batch(backend, device, norm):
    empty = torch.empty(0, 3, 4, 4, device=device)
    out = robust_fast.pgd_step(empty, empty, empty, eps=0.1, alpha=0.1, norm=norm, backend=backend)
    assert out.shape == (0, 3, 4, 4)
    per_sample = torch.empty(0, dtype=torch.float64, device=device)
    out = robust_fast.pgd_step(empty, empty, empty, eps=per_sample, alpha=per_sample, norm=norm, backend=backend)
    assert out.shape == (0, 3, 4, 4)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_out_updates_in_place_and_inputs_stay(backend, device, norm, layout):
    x_adv, grad, x_nat = make_inputs((5, 3, 6, 6), torch.float32, layout=layout, device=device)
    copies = [t.clone() for t in (x_adv, grad, x_nat)]
    fresh = robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.05, alpha=0.01, norm=norm, backend=backend)
    for before, after in zip(copies, (x_adv, grad, x_nat)):
        assert torch.equal(before, after)  # nothing passed in was modified
    returned = robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.05, alpha=0.01, norm=norm,
                                    out=x_adv, backend=backend)
    assert returned is x_adv
    assert torch.equal(x_adv, fresh)
    assert torch.equal(grad, copies[1]) and torch.equal(x_nat, copies[2])
    other = torch.empty_like(fresh).contiguous()
    robust_fast.pgd_step(copies[0], grad, x_nat, eps=0.05, alpha=0.01, norm=norm, out=other, backend=backend)
    assert torch.equal(other, fresh)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(backend, device, norm, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    x_adv, grad, x_nat = make_inputs((4, 3, 8, 8), torch.float32, device=device)
    x_adv, grad, x_nat = (t.to(dtype) for t in (x_adv, grad, x_nat))
    expected = reference(x_adv.double(), grad.double(), x_nat.double(), 0.05, 0.01, norm)
    actual = robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.05, alpha=0.01, norm=norm, backend=backend)
    assert actual.dtype == dtype
    assert_matches_reference(actual, expected.to(dtype), norm, dtype)


def test_every_backend_agrees_with_auto():
    x_adv, grad, x_nat = make_inputs((8, 3, 4, 4))
    results = [robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.03, alpha=0.01, backend=b)
               for b in ["auto", "reference"] + [b for b in ("cpp", "triton") if unavailable_reason(b, "cpu") is None]]
    for result in results[1:]:
        assert torch.equal(results[0], result)


# --- the C++ op under torch.library tooling ---------------------------------------------------

cpp_only = pytest.mark.skipif(robust_fast._build.cpp_unavailable_reason("cpu") is not None,
                              reason=str(robust_fast._build.cpp_unavailable_reason("cpu")))


@cpp_only
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_opcheck(norm, layout):
    x_adv, grad, x_nat = make_inputs((3, 2, 5, 4), layout=layout)
    args = (x_adv, grad, x_nat, 0.05, 0.01, None, None, norm, 0.0, 1.0, False)
    torch.library.opcheck(torch.ops.robust_fast.pgd_step.default, args)
    per_sample = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    torch.library.opcheck(torch.ops.robust_fast.pgd_step.default,
                          (x_adv, grad, x_nat, 0.0, 0.0, per_sample, per_sample, norm, None, None, True))
    torch.library.opcheck(torch.ops.robust_fast.pgd_step_out.default, args + (torch.empty_like(x_adv),))


@cpp_only
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", ["cpp", None, "reference"])
def test_torch_compile_fullgraph(norm, backend):
    x_adv, grad, x_nat = make_inputs((4, 3, 8, 8))

    def attack_step(x_adv, grad, x_nat):
        return robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.05, alpha=0.01, norm=norm, backend=backend)

    compiled = torch.compile(attack_step, fullgraph=True, backend="inductor")
    expected = attack_step(x_adv, grad, x_nat)
    if backend == "reference" and norm == "l2":  # inductor may fuse the reference's reductions
        torch.testing.assert_close(compiled(x_adv, grad, x_nat), expected, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(compiled(x_adv, grad, x_nat), expected)

    def in_place(x_adv, grad, x_nat):
        robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.05, alpha=0.01, norm=norm, out=x_adv, backend=backend)
        return x_adv

    x_work = x_adv.clone()
    torch.compile(in_place, fullgraph=True, backend="aot_eager")(x_work, grad, x_nat)
    assert torch.equal(x_work, expected)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_not_differentiable(backend, device):
    x_adv, grad, x_nat = make_inputs((2, 3), device=device)
    with pytest.raises(RuntimeError, match="not differentiable"):
        robust_fast.pgd_step(x_adv.requires_grad_(), grad, x_nat, eps=0.1, alpha=0.1, backend=backend)
    with torch.no_grad():  # without a gradient to flow, the same call is fine
        robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.1, alpha=0.1, backend=backend)


@cpp_only
def test_direct_op_call_refuses_backward():
    x_adv, grad, x_nat = make_inputs((2, 3))
    out = torch.ops.robust_fast.pgd_step(x_adv.requires_grad_(), grad, x_nat, 0.1, 0.1, None, None,
                                         "linf", 0.0, 1.0, False)
    with pytest.raises(RuntimeError, match="not differentiable"):
        out.sum().backward()


# --- bad input ------------------------------------------------------------------------------

def call(**overrides):
    x_adv, grad, x_nat = make_inputs((3, 2, 4))
    kwargs = dict(x_adv=x_adv, grad=grad, x_nat=x_nat, eps=0.1, alpha=0.01)
    kwargs.update(overrides)
    args = [kwargs.pop(k) for k in ("x_adv", "grad", "x_nat")]
    return robust_fast.pgd_step(*args, **kwargs)


@pytest.mark.parametrize("overrides, error, words", [
    (dict(grad=torch.zeros(3, 2, 5)), ValueError, "grad must have the shape"),
    (dict(x_nat=torch.zeros(2, 2, 4)), ValueError, "x_nat must have the shape"),
    (dict(grad=torch.zeros(3, 2, 4, dtype=torch.float64)), TypeError, "grad must have x_adv's dtype"),
    (dict(x_adv=torch.zeros(3, 2, 4, dtype=torch.int64)), TypeError, "x_adv must have a floating-point"),
    (dict(x_nat=[1.0]), TypeError, "x_nat must be a torch.Tensor"),
    (dict(x_adv=torch.tensor(1.0), grad=torch.tensor(1.0), x_nat=torch.tensor(1.0)), ValueError, "batch dimension"),
    (dict(eps=-0.1), ValueError, "eps must be >= 0"),
    (dict(eps=float("nan")), ValueError, "eps must be >= 0 and not NaN"),
    (dict(alpha=-1), ValueError, "alpha must be >= 0"),
    (dict(alpha=float("nan")), ValueError, "alpha must be >= 0 and not NaN"),
    (dict(alpha=float("inf")), ValueError, "alpha must be finite"),
    (dict(eps="0.1"), TypeError, "eps must be a float"),
    (dict(eps=torch.ones(4)), ValueError, r"eps as a tensor must have shape \(3,\)"),
    (dict(alpha=torch.ones(3, 1)), ValueError, r"alpha as a tensor must have shape \(3,\)"),
    (dict(eps=torch.tensor([0.1, -0.1, 0.1])), ValueError, "eps must be >= 0 and not NaN in every sample"),
    (dict(alpha=torch.tensor([0.1, float("nan"), 0.1])), ValueError, "alpha must be >= 0 and not NaN"),
    (dict(norm="l1"), ValueError, "norm must be one of"),
    (dict(clip=(1.0, 0.0)), ValueError, "clip low must be <= high"),
    (dict(clip=(0.0,)), TypeError, "clip must be None or a pair"),
    (dict(clip=(0.0, float("nan"))), ValueError, "clip high must be a number"),
    (dict(targeted=1), TypeError, "targeted must be a bool"),
    (dict(out=torch.zeros(3, 2)), ValueError, "out must match x_adv"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_names_the_argument(overrides, error, words):
    with pytest.raises(error, match=words):
        call(**overrides)


def test_per_sample_radii_match_scalar_radii():
    x_adv, grad, x_nat = make_inputs((4, 3, 5))
    for norm in NORMS:
        scalar = robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.05, alpha=0.02, norm=norm)
        per_sample = robust_fast.pgd_step(x_adv, grad, x_nat, eps=torch.full((4,), 0.05, dtype=torch.float64),
                                          alpha=torch.full((4,), 0.02, dtype=torch.float64), norm=norm)
        assert torch.equal(scalar, per_sample)
        zero_dim = robust_fast.pgd_step(x_adv, grad, x_nat, eps=torch.tensor(0.05, dtype=torch.float64), alpha=0.02,
                                        norm=norm)
        assert torch.equal(scalar, zero_dim)


def test_eps_zero_returns_the_clean_point():
    x_adv, grad, x_nat = make_inputs((4, 3, 5))
    for norm in NORMS:
        out = robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.0, alpha=0.02, norm=norm)
        assert torch.equal(out, x_nat)


@cpp_only
def test_out_that_overlaps_an_input_partially_is_refused():
    buffer = torch.rand(5, 4)
    x_adv, shifted = buffer[:4], buffer[1:]
    with pytest.raises(RuntimeError, match="out partially overlaps x_adv"):
        robust_fast.pgd_step(x_adv, torch.randn(4, 4), torch.rand(4, 4), eps=0.1, alpha=0.1,
                             out=shifted, backend="cpp")
    with pytest.raises(RuntimeError, match="out has elements that share memory"):
        robust_fast.pgd_step(torch.rand(4, 4), torch.randn(4, 4), torch.rand(4, 4), eps=0.1,
                             alpha=0.1, out=torch.rand(1, 4).expand(4, 4), backend="cpp")
