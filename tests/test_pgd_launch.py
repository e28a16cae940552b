"""How the PGD step reaches the device: the Triton launcher's device, the L2 sums' accumulation
type at the edges of the float range, the kernels' L2 paths and out=, and host synchronisations
in an attack's loop."""

import contextlib

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import robust_fast
from robust_fast import attacks
from robust_fast.reference.pgd import pgd_step_reference
from conftest import backend_devices, unavailable_reason, usable_backends

PAIRS = backend_devices()
PAIRS_AND_REFERENCE = backend_devices(include_reference=True)
triton_on_cpu = pytest.mark.skipif(unavailable_reason("triton", "cpu") is not None,
                                   reason=str(unavailable_reason("triton", "cpu")))


# --- the Triton launcher runs on the operands' device -----------------------------------------

@triton_on_cpu
def test_triton_launches_under_the_operands_device(monkeypatch):
    """x on cuda:1 while cuda:0 is current: the kernels must be launched with cuda:1 current.
    No second GPU is needed: fake tensors carry the device, and torch.cuda.device is recorded."""
    from robust_fast.kernels import pgd as triton_pgd

    current = {"index": 0}
    seen = []

    @contextlib.contextmanager
    def fake_device_guard(device):
        before, current["index"] = current["index"], torch.device(device).index
        try:
            yield
        finally:
            current["index"] = before

    monkeypatch.setattr(torch.cuda, "device", fake_device_guard)
    monkeypatch.setattr(triton_pgd, "_launch", lambda *args: seen.append(current["index"]))
    with FakeTensorMode():
        x = torch.empty(4, 3, 8, device="cuda:1")
        for norm in ("linf", "l2"):
            triton_pgd.pgd_step_triton(x, x, x, torch.empty_like(x), 0.1, 0.01, norm, 0.0, 1.0, False)
    assert seen == [1, 1]
    assert current["index"] == 0  # the caller's current device is given back


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_second_gpu_while_the_first_is_current(backend):
    x_adv, grad, x_nat = (torch.rand(8, 3, 16, 16, device="cuda:1") for _ in range(3))
    expected = pgd_step_reference(x_adv, grad, x_nat, eps=0.1, alpha=0.01, norm="l2")
    with torch.cuda.device(0):
        out = robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.1, alpha=0.01, norm="l2", backend=backend)
    torch.cuda.synchronize(1)
    torch.testing.assert_close(out, expected)


# --- L2 at the edges of the float range ------------------------------------------------------

def _gradients(shape, dtype):
    """(name, gradient) of scales whose squares underflow, sit in the subnormals, or overflow
    the accumulation type; and mixes of tiny and ordinary entries."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    cases = [(f"x{scale:g}", base * scale) for scale in
             (1e-30, 1e-21, 1e-19, 1e-17, 1e19, 1e30, tiny ** 0.5, 1.0)]
    if dtype == torch.float64:
        cases += [(f"x{scale:g}", base * scale) for scale in (1e-160, 1e-154, 1e154, 1e200)]
    mixed = base * 1e-22
    mixed[:, 0] = 1e-18  # one entry whose square is normal among subnormal ones
    cases.append(("mixed-subnormal", mixed))
    one_big = base * 1e-30
    one_big[:, -1] = 1.0
    cases.append(("one-ordinary", one_big))
    return cases


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3077), (3, 3, 32, 32), (2, 5)])
def test_l2_step_never_outgrows_alpha(backend, device, dtype, shape):
    alpha = 0.01
    x_nat = torch.rand(shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
    for name, grad in _gradients(shape, dtype):
        grad = grad.to(device)
        out = robust_fast.pgd_step(x_nat, grad, x_nat, eps=100.0, alpha=alpha, norm="l2",
                                   clip=None, backend=backend)
        step = (out - x_nat).flatten(1).double().norm(dim=1)
        assert torch.isfinite(out).all(), name
        # Rounding x_nat + step to dtype moves each entry by up to half an ulp of 1.
        slack = torch.finfo(dtype).eps * grad[0].numel() ** 0.5
        assert (step <= alpha + slack).all(), (name, step)
        # A sample moves by alpha, or not at all.
        assert ((step == 0) | ((step - alpha).abs() <= slack)).all(), (name, step)
        if grad.abs().max() <= 1:
            # Below the reliable norm every backend stays put. (Where float sums overflow, the
            # order of summation decides whether a sample moves: by alpha, or not at all.)
            expected = pgd_step_reference(x_nat, grad, x_nat, eps=100.0, alpha=alpha, norm="l2")
            expected_step = (expected - x_nat).flatten(1).double().norm(dim=1)
            assert torch.equal(step == 0, expected_step == 0), (name, step, expected_step)


@pytest.mark.parametrize("backend, device", PAIRS_AND_REFERENCE)
def test_gradient_whose_squares_underflow_makes_no_move(backend, device):
    # A fp32 gradient of 1e-30 has squares of 1e-60: zero in float, so its norm is unknown.
    torch.manual_seed(0)
    x_nat = torch.rand(2, 3077, device=device)
    grad = torch.randn(2, 3077, device=device) * 1e-30
    out = robust_fast.pgd_step(x_nat, grad, x_nat, eps=100.0, alpha=0.01, norm="l2", clip=None,
                               backend=backend)
    assert torch.equal(out, x_nat)


# --- the kernels' L2 paths and out= ----------------------------------------------------------

@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("shape", [
    (3, 40),           # a sample in one block
    (2, 3, 33, 17),    # few samples larger than a block: split into blocks
    (9, 3, 20, 20),    # many samples larger than a block: one program per sample, looping
    (1, 70000),        # one large sample, split into many blocks
])
@pytest.mark.parametrize("per_sample", [False, True])
def test_l2_paths_match_the_reference(backend, device, shape, per_sample):
    g = torch.Generator().manual_seed(3)
    x_nat = torch.rand(shape, generator=g).to(device)
    x_adv = (x_nat + (torch.rand(shape, generator=g) - 0.5).to(device) * 0.2).clamp(0, 1)
    grad = torch.randn(shape, generator=g).to(device)
    batch = shape[0]
    eps = (torch.rand(batch, generator=g, dtype=torch.float64) + 0.1).to(device) if per_sample else 0.5
    alpha = torch.full((batch,), 0.3, dtype=torch.float64, device=device) if per_sample else 0.3
    for targeted in (False, True):
        expected = pgd_step_reference(x_adv, grad, x_nat, eps=eps, alpha=alpha, norm="l2",
                                      clip_min=0.0, clip_max=1.0, targeted=targeted)
        actual = robust_fast.pgd_step(x_adv, grad, x_nat, eps=eps, alpha=alpha, norm="l2",
                                      targeted=targeted, backend=backend)
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
        in_place = x_adv.clone()
        robust_fast.pgd_step(in_place, grad, x_nat, eps=eps, alpha=alpha, norm="l2",
                             targeted=targeted, out=in_place, backend=backend)
        assert torch.equal(in_place, actual)


@triton_on_cpu
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_triton_writes_into_out_directly(monkeypatch, norm):
    from robust_fast.kernels import pgd as triton_pgd

    written = []
    launch = triton_pgd._launch

    def recording_launch(x_adv, grad, x_nat, out, *rest):
        written.append(out.data_ptr())
        return launch(x_adv, grad, x_nat, out, *rest)

    monkeypatch.setattr(triton_pgd, "_launch", recording_launch)
    x_adv, grad, x_nat = (torch.rand(4, 3, 5, 5) for _ in range(3))
    expected = robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.1, alpha=0.02, norm=norm, backend="reference")
    work = x_adv.clone()
    robust_fast.pgd_step(work, grad, x_nat, eps=0.1, alpha=0.02, norm=norm, out=work, backend="triton")
    assert written[-1] == work.data_ptr()  # no temporary, no copy
    assert torch.equal(work, expected) if norm == "linf" else torch.allclose(work, expected)
    # An out in another layout goes through a temporary, with the same values.
    other = torch.empty(4, 5, 5, 3).permute(0, 3, 1, 2)
    robust_fast.pgd_step(x_adv, grad, x_nat, eps=0.1, alpha=0.02, norm=norm, out=other, backend="triton")
    assert written[-1] != other.data_ptr()
    assert torch.equal(other, work)


@pytest.mark.parametrize("backend, device", PAIRS)
def test_out_partially_overlapping_an_input_is_refused(backend, device):
    buffer = torch.rand(5, 4, device=device)
    x_adv, shifted = buffer[:4], buffer[1:]
    with pytest.raises(RuntimeError, match="out partially overlaps x_adv"):
        robust_fast.pgd_step(x_adv, torch.randn(4, 4, device=device), torch.rand(4, 4, device=device),
                             eps=0.1, alpha=0.1, out=shifted, backend=backend)


# --- host synchronisations in an attack's loop -----------------------------------------------

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@contextlib.contextmanager
def counting_host_reads():
    """Counts the tensor methods that read a value back to the host (each a synchronisation
    on a GPU)."""
    counts = {"reads": 0}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(original):
        def read(self, *args, **kwargs):
            counts["reads"] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_steps_read_nothing_back(backend, norm):
    """Host reads happen at the attack's entry, never per step: per-sample eps, a 0-dim alpha."""
    if backend != "reference" and unavailable_reason(backend, "cpu") is not None:
        pytest.skip(str(unavailable_reason(backend, "cpu")))
    model = _small_model()
    x = torch.rand(6, 3, 4, 4)
    y = torch.randint(0, 10, (6,))
    eps = torch.linspace(0.05, 0.3, 6, dtype=torch.float64)
    alpha = torch.tensor(0.02)
    reads = []
    for steps in (1, 5):
        with counting_host_reads() as counts:
            attacks.pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, backend=backend,
                        generator=torch.Generator().manual_seed(0))
        reads.append(counts["reads"])
    assert reads[0] == reads[1], f"host reads grow with the steps: {reads}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", usable_backends("cuda"))
def test_pgd_step_on_gpu_never_synchronises(backend):
    x_adv, grad, x_nat = (torch.rand(16, 3, 32, 32, device="cuda") for _ in range(3))
    eps = torch.full((16,), 0.1, dtype=torch.float64, device="cuda")
    alpha = torch.tensor(0.01, device="cuda")
    for norm in ("linf", "l2"):  # the first calls compile and warm up
        robust_fast.pgd_step(x_adv, grad, x_nat, eps=eps, alpha=alpha, norm=norm, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for norm in ("linf", "l2"):
            robust_fast.pgd_step(x_adv, grad, x_nat, eps=eps, alpha=alpha, norm=norm,
                                 out=x_adv, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", usable_backends("cuda"))
def test_attack_step_captures_in_a_cuda_graph(backend):
    """A step with no host synchronisation can be captured; a sync would abort the capture."""
    from robust_fast.ops.pgd import run_pgd_step

    model = _small_model().cuda().eval()
    x = torch.rand(8, 3, 4, 4, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    x_adv = x.clone()
    eps = torch.full((8,), 0.1, dtype=torch.float64, device="cuda")

    def step():
        grad, _ = attacks.input_gradient(model, x_adv, y)
        run_pgd_step(x_adv, grad, x, eps, 0.01, "l2", 0.0, 1.0, False, out=x_adv, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    start = x_adv.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(start, x_adv)
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.1 + 1e-6).all()
