"""robust_fast.gaussian_copies: the distribution of every backend's noise (each draws its own
numbers), the row order, reproducibility under one seed, layouts, out=, the gradient, opcheck,
torch.compile, the profiler range and the errors for bad input."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import robust_fast
from robust_fast import _profiling
from conftest import backend_devices

PAIRS_AND_REFERENCE = backend_devices(include_reference=True)
SIGMA = 0.5

cpp_only = pytest.mark.skipif(robust_fast._build.cpp_unavailable_reason("cpu") is not None,
                              reason=str(robust_fast._build.cpp_unavailable_reason("cpu")))


def standardized(out, x, copies, sigma=SIGMA):
    """(out - x[b]) / sigma for every copy, in float64: what should be N(0, 1) draws."""
    return ((out.double() - x.double().repeat_interleave(copies, 0)) / sigma)


def seeded(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distribution_is_standard_normal(backend, device, dtype):
    x = torch.rand(4, 3, 8, 8, dtype=dtype, device=device)
    copies = 250
    out = robust_fast.gaussian_copies(x, copies, SIGMA, generator=seeded(1, device), backend=backend)
    assert out.shape == (4 * copies, 3, 8, 8) and out.dtype == dtype
    z = standardized(out, x, copies).flatten().cpu()
    n = z.numel()  # 192,000: the bounds below are ~5 standard errors
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((z ** 3).mean())) < 5 * math.sqrt(15 / n)  # skewness of N(0, 1): 0
    assert abs(float((z ** 4).mean()) - 3) < 5 * math.sqrt(96 / n)  # kurtosis: 3
    ks = stats.kstest(z.numpy(), "norm")
    assert ks.pvalue > 1e-3, ks


def correlation(a, b):
    a, b = a.flatten().double().cpu(), b.flatten().double().cpu()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1]), a.numel()


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_independent_across_copies_elements_and_calls(backend, device):
    x = torch.rand(2, 1, 16, 16, device=device)
    copies = 200
    generator = seeded(2, device)
    first = standardized(robust_fast.gaussian_copies(x, copies, SIGMA, generator=generator, backend=backend), x, copies)
    second = standardized(robust_fast.gaussian_copies(x, copies, SIGMA, generator=generator, backend=backend), x, copies)
    rows = first.view(2, copies, -1)
    pairs = [(rows[:, :-1], rows[:, 1:]),               # neighbouring copies of an image
             (rows[:, :, :-1], rows[:, :, 1:]),         # neighbouring elements of a copy
             (rows[:, :, :-4], rows[:, :, 4:]),         # elements one Philox group apart
             (rows[0], rows[1]),                        # the copies of two images
             (first, second)]                           # two calls on one generator
    for a, b in pairs:
        r, n = correlation(a, b)
        assert abs(r) < 5 / math.sqrt(n), (r, n)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_rows_are_the_copies_in_order(backend, device):
    """Row b * copies + j is x[b] plus noise: with a tiny sigma the rows are x.repeat_interleave."""
    x = torch.arange(3 * 2 * 5, dtype=torch.float64, device=device).view(3, 2, 5)
    out = robust_fast.gaussian_copies(x, 4, 1e-9, generator=seeded(3, device), backend=backend)
    torch.testing.assert_close(out, x.repeat_interleave(4, 0), rtol=0, atol=1e-7)
    assert not torch.equal(out, x.repeat_interleave(4, 0))  # but noise was added


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_reproducible_under_one_seed(backend, device):
    x = torch.rand(3, 5, 7, device=device)
    a = robust_fast.gaussian_copies(x, 6, SIGMA, generator=seeded(4, device), backend=backend)
    b = robust_fast.gaussian_copies(x, 6, SIGMA, generator=seeded(4, device), backend=backend)
    c = robust_fast.gaussian_copies(x, 6, SIGMA, generator=seeded(5, device), backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    generator = seeded(4, device)
    robust_fast.gaussian_copies(x, 6, SIGMA, generator=generator, backend=backend)
    assert not torch.equal(a, robust_fast.gaussian_copies(x, 6, SIGMA, generator=generator, backend=backend))
    # each call advances the generator by one draw, whatever its size
    generator = seeded(4, device)
    robust_fast.gaussian_copies(torch.rand(50, 9, device=device), 30, SIGMA, generator=generator, backend=backend)
    assert torch.equal(generator.get_state(), seeded(4, device).get_state()) is False
    reference = seeded(4, device)
    torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64, generator=reference, device=device)
    assert torch.equal(generator.get_state(), reference.get_state())


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_default_generator_follows_manual_seed(backend, device):
    x = torch.rand(2, 9, device=device)
    torch.manual_seed(11)
    a = robust_fast.gaussian_copies(x, 3, SIGMA, backend=backend)
    b = robust_fast.gaussian_copies(x, 3, SIGMA, backend=backend)
    torch.manual_seed(11)
    assert torch.equal(robust_fast.gaussian_copies(x, 3, SIGMA, backend=backend), a)
    assert not torch.equal(a, b)


@cpp_only
def test_cpp_numbers_do_not_depend_on_the_thread_count():
    x = torch.rand(3, 1, 28, 28)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = robust_fast.gaussian_copies(x, 50, SIGMA, generator=seeded(6), backend="cpp")
        torch.set_num_threads(max(2, threads))
        many = robust_fast.gaussian_copies(x, 50, SIGMA, generator=seeded(6), backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced"])
def test_layouts_and_x_unchanged(backend, device, layout):
    x = torch.rand(3, 4, 6, 5, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    before, strides = x.clone(), x.stride()
    out = robust_fast.gaussian_copies(x, 5, 1e-9, generator=seeded(7, device), backend=backend)
    assert torch.equal(x, before) and x.stride() == strides
    torch.testing.assert_close(out, x.repeat_interleave(5, 0), rtol=0, atol=1e-6)
    assert out.is_contiguous()
    # x's layout never changes the numbers
    same = robust_fast.gaussian_copies(x.contiguous(), 5, 1e-9, generator=seeded(7, device), backend=backend)
    assert torch.equal(out, same)
    z = standardized(robust_fast.gaussian_copies(x, 40, SIGMA, generator=seeded(8, device), backend=backend), x, 40)
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel()) and abs(float(z.std()) - 1) < 0.03


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_out(backend, device):
    x = torch.rand(3, 2, 4, device=device)
    fresh = robust_fast.gaussian_copies(x, 4, SIGMA, generator=seeded(9, device), backend=backend)
    out = torch.empty(12, 2, 4, device=device)
    returned = robust_fast.gaussian_copies(x, 4, SIGMA, generator=seeded(9, device), out=out, backend=backend)
    assert returned is out and torch.equal(out, fresh)
    # an out in another layout takes the same values; a slice of a larger buffer works too
    strided = torch.empty(12, 4, 2, device=device).transpose(1, 2)
    robust_fast.gaussian_copies(x, 4, SIGMA, generator=seeded(9, device), out=strided, backend=backend)
    assert torch.equal(strided, fresh)
    buffer = torch.zeros(20, 2, 4, device=device)
    robust_fast.gaussian_copies(x, 4, SIGMA, generator=seeded(9, device), out=buffer[5:17], backend=backend)
    assert torch.equal(buffer[5:17], fresh) and not buffer[:5].any() and not buffer[17:].any()


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_empty_batch_and_one_copy(backend, device):
    empty = torch.empty(0, 3, 4, device=device)
    assert robust_fast.gaussian_copies(empty, 5, SIGMA, backend=backend).shape == (0, 3, 4)
    assert robust_fast.gaussian_copies(empty, 5, SIGMA, out=torch.empty(0, 3, 4, device=device),
                                       backend=backend).shape == (0, 3, 4)
    x = torch.rand(2, 3, device=device)
    assert robust_fast.gaussian_copies(x, 1, SIGMA, backend=backend).shape == (2, 3)
    assert robust_fast.gaussian_copies(torch.rand(4, device=device), 3, SIGMA, backend=backend).shape == (12,)


@pytest.mark.parametrize("backend, device", [p for p in PAIRS_AND_REFERENCE if p.values[0] != "triton"]
                         + [p for p in PAIRS_AND_REFERENCE if p.values[0] == "triton" and p.values[1] == "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(backend, device, dtype):
    x = torch.rand(2, 3, 16, 16, device=device).to(dtype)
    out = robust_fast.gaussian_copies(x, 100, SIGMA, generator=seeded(10, device), backend=backend)
    assert out.dtype == dtype
    z = standardized(out, x, 100)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_gradient_sums_the_copies(backend, device):
    x = torch.rand(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    weights = torch.rand(15, 4, dtype=torch.float64, device=device)
    (robust_fast.gaussian_copies(x, 5, SIGMA, backend=backend) * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights.view(3, 5, 4).sum(1))
    with pytest.raises(RuntimeError, match="out= does not support automatic differentiation"):
        robust_fast.gaussian_copies(x, 5, SIGMA, out=torch.empty(15, 4, dtype=torch.float64, device=device),
                                    backend=backend)


# --- the C++ op under torch.library tooling ---------------------------------------------------

@cpp_only
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_opcheck(layout):
    x = torch.rand(3, 2, 5, 4)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(-1, -2)
    seed = torch.tensor(123456789012345, dtype=torch.int64)
    # an explicit seed makes the op deterministic: opcheck's repeated calls must agree
    torch.library.opcheck(torch.ops.robust_fast.gaussian_copies.default, (x, 3, 0.5, seed))
    torch.library.opcheck(torch.ops.robust_fast.gaussian_copies.default,
                          (x.double().requires_grad_(), 2, 0.25, seed))
    torch.library.opcheck(torch.ops.robust_fast.gaussian_copies_out.default,
                          (x, 3, 0.5, seed, torch.empty((9,) + tuple(x.shape[1:]))))


@cpp_only
def test_torch_compile_fullgraph():
    x = torch.rand(4, 1, 8, 8)

    def noisy(x, seed):  # the op itself: the same numbers compiled and eager
        return torch.ops.robust_fast.gaussian_copies(x, 6, SIGMA, seed)

    seed = torch.tensor(42, dtype=torch.int64)
    compiled = torch.compile(noisy, fullgraph=True, backend="inductor")
    assert torch.equal(compiled(x, seed), noisy(x, seed))

    def augment(x):  # the public function, its seed drawn inside the graph
        return robust_fast.gaussian_copies(x, 6, SIGMA, backend="cpp")

    out = torch.compile(augment, fullgraph=True, backend="inductor")(x)
    z = standardized(out, x, 6)
    assert out.shape == (24, 1, 8, 8) and abs(float(z.std()) - 1) < 0.1

    def into(x, out):
        robust_fast.gaussian_copies(x, 6, SIGMA, out=out, backend="cpp")
        return out

    buffer = torch.empty(24, 1, 8, 8)
    torch.compile(into, fullgraph=True, backend="aot_eager")(x, buffer)
    assert abs(float(standardized(buffer, x, 6).std()) - 1) < 0.1


@cpp_only
def test_direct_op_call_with_the_same_seed_repeats():
    x = torch.rand(2, 10)
    seed = torch.tensor(-7, dtype=torch.int64)
    a = torch.ops.robust_fast.gaussian_copies(x, 3, 1.0, seed)
    assert torch.equal(a, torch.ops.robust_fast.gaussian_copies(x, 3, 1.0, seed))
    assert not torch.equal(a, torch.ops.robust_fast.gaussian_copies(x, 3, 1.0, seed + 1))


def philox4x32_10(groups, seed):
    """The four 32-bit words of Philox4x32-10 for each counter (group, 0, 0, 0) and the 64-bit
    key `seed`: the published algorithm in numpy uint64 arithmetic (a 32x32-bit product is exact
    there), written independently of the C++."""
    mask = np.uint64(0xFFFFFFFF)
    c0, c1 = groups & mask, groups >> np.uint64(32)
    c2, c3 = np.zeros_like(groups), np.zeros_like(groups)
    k0, k1 = np.uint64(seed) & mask, np.uint64(seed) >> np.uint64(32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c0, c1, c2, c3


def box_muller(a, b):
    u1 = ((a >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0 ** -24
    u2 = (b >> np.uint64(8)).astype(np.float64) * 2.0 ** -24
    radius = np.sqrt(-2 * np.log(u1))
    return radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)


@cpp_only
@pytest.mark.parametrize("seed", [0, 7, -3, 2 ** 40 + 12345])
def test_cpp_cpu_draws_philox_box_muller(seed):
    # element e of the output is normal e % 4 of counter e // 4: checks the SIMD lanes' order and
    # the vectorized Philox rounds against the algorithm (1,000 counters: several SIMD blocks
    # and a partial one)
    x = torch.zeros(1, 4000)
    out = torch.ops.robust_fast.gaussian_copies(x, 1, 1.0, torch.tensor(seed, dtype=torch.int64))
    w0, w1, w2, w3 = philox4x32_10(np.arange(1000, dtype=np.uint64), seed % 2 ** 64)
    z0, z1 = box_muller(w0, w1)
    z2, z3 = box_muller(w2, w3)
    expected = torch.from_numpy(np.stack([z0, z1, z2, z3], axis=1).flatten())
    torch.testing.assert_close(out.flatten().double(), expected, rtol=0, atol=2e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible")
@cpp_only
def test_cpp_cpu_and_cuda_draw_the_same_numbers():
    x = torch.rand(3, 2, 8, 8)
    seed = torch.tensor(2024, dtype=torch.int64)
    on_cpu = torch.ops.robust_fast.gaussian_copies(x, 7, SIGMA, seed)
    on_gpu = torch.ops.robust_fast.gaussian_copies(x.cuda(), 7, SIGMA, seed.cuda())
    # the same expressions; only contractions into FMAs may differ, in the last bits
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-5, atol=1e-5)


def test_range_shows_in_torch_profiler():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        robust_fast.gaussian_copies(torch.rand(2, 3), 4, SIGMA)
    assert "robust_fast::gaussian_copies" in {event.name for event in prof.events()}


def test_nvtx_range_name(monkeypatch):
    class Recorder:
        calls = []

        def push_range(self, name, domain=None):
            self.calls.append(name)

        def pop_range(self, domain=None):
            pass

    recorder = Recorder()
    monkeypatch.setattr(_profiling, "_nvtx", recorder)
    robust_fast.gaussian_copies(torch.rand(2, 3), 4, SIGMA)
    assert recorder.calls == ["robust_fast::gaussian_copies"]


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, error, words", [
    (([1.0], 2, 0.5), {}, TypeError, "x must be a torch.Tensor"),
    ((torch.zeros(2, 3, dtype=torch.int64), 2, 0.5), {}, TypeError, "x must have a floating-point"),
    ((torch.tensor(1.0), 2, 0.5), {}, ValueError, "batch dimension"),
    ((torch.zeros(2, 3), 0, 0.5), {}, ValueError, "copies must be >= 1"),
    ((torch.zeros(2, 3), 2.0, 0.5), {}, TypeError, "copies must be an int"),
    ((torch.zeros(2, 3), True, 0.5), {}, TypeError, "copies must be an int"),
    ((torch.zeros(2, 3), 2, 0.0), {}, ValueError, "sigma must be > 0 and finite"),
    ((torch.zeros(2, 3), 2, -1.0), {}, ValueError, "sigma must be > 0 and finite"),
    ((torch.zeros(2, 3), 2, float("nan")), {}, ValueError, "sigma must be > 0 and finite"),
    ((torch.zeros(2, 3), 2, float("inf")), {}, ValueError, "sigma must be > 0 and finite"),
    ((torch.zeros(2, 3), 2, "0.5"), {}, TypeError, "sigma must be a float"),
    ((torch.zeros(2, 3), 2, 0.5), dict(generator=0), TypeError, "generator must be a torch.Generator"),
    ((torch.zeros(2, 3), 3, 0.5), dict(out=torch.zeros(4, 3)), ValueError, r"out must have shape \(6, 3\)"),
    ((torch.zeros(2, 3), 2, 0.5), dict(out=torch.zeros(4, 3, dtype=torch.float64)), ValueError, "out must have shape"),
    ((torch.zeros(2, 3), 2, 0.5), dict(out=torch.zeros(3).expand(4, 3)), RuntimeError, "share memory"),
    ((torch.zeros(2, 3), 2, 0.5), dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_names_the_argument(args, kwargs, error, words):
    with pytest.raises(error, match=words):
        robust_fast.gaussian_copies(*args, **kwargs)


def test_out_sharing_memory_with_x_is_refused():
    buffer = torch.zeros(8, 3)
    with pytest.raises(RuntimeError, match="out must share no memory with x"):
        robust_fast.gaussian_copies(buffer[:2], 4, SIGMA, out=buffer)
