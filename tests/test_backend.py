"""Backend choice: per call, per block, per process, from the environment; errors and fallback."""
import subprocess
import sys
import warnings

import pytest
import torch

import robust_fast
from robust_fast import _backend, _build


@pytest.fixture(autouse=True)
def _clean_backend_state(monkeypatch):
    monkeypatch.delenv("ROBUST_FAST_BACKEND", raising=False)
    robust_fast.set_backend(None)
    yield
    robust_fast.set_backend(None)


def spy_on_backends(monkeypatch):
    """Records which concrete backend each pgd_step call resolves to."""
    chosen = []
    real = _backend.resolve

    def recording(requested, device_type):
        result = real(requested, device_type)
        chosen.append(result)
        return result

    monkeypatch.setattr(_backend, "resolve", recording)
    return chosen


def one_step(**kwargs):
    x = torch.rand(2, 3)
    return robust_fast.pgd_step(x, torch.randn(2, 3), x, eps=0.1, alpha=0.05, **kwargs)


def test_precedence_call_block_process_environment(monkeypatch):
    chosen = spy_on_backends(monkeypatch)
    monkeypatch.setenv("ROBUST_FAST_BACKEND", "reference")
    one_step()
    robust_fast.set_backend("auto")
    one_step()
    with robust_fast.use_backend("reference"):
        one_step()
        one_step(backend="auto")
        with robust_fast.use_backend("auto"):
            one_step()
        one_step()
    one_step()
    auto = "cpp" if _build.cpp_unavailable_reason("cpu") is None else "reference"
    assert chosen == ["reference", auto, "reference", auto, auto, "reference", auto]
    assert robust_fast.get_backend() == "auto"


def test_unknown_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        robust_fast.set_backend("fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        with robust_fast.use_backend("gpu"):
            pass
    monkeypatch.setenv("ROBUST_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="ROBUST_FAST_BACKEND must be one of"):
        one_step()


def test_unusable_backend_says_why(monkeypatch):
    monkeypatch.setattr(_build, "cpp_unavailable_reason", lambda device: "robust_fast._C could not be loaded (test)")
    monkeypatch.setattr(_build, "triton_unavailable_reason", lambda device: "triton is not importable (test)")
    with pytest.raises(robust_fast.BackendUnavailableError, match="'cpp' cannot run on cpu: robust_fast._C could not"):
        one_step(backend="cpp")
    with pytest.raises(robust_fast.BackendUnavailableError, match="'triton' cannot run on cpu: triton is not"):
        one_step(backend="triton")


def test_auto_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(_build, "cpp_unavailable_reason", lambda device: "robust_fast._C could not be loaded (test)")
    monkeypatch.setattr(_backend, "_warned_fallback", set())
    chosen = spy_on_backends(monkeypatch)
    with pytest.warns(RuntimeWarning, match="using the reference backend on cpu"):
        first = one_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step()  # the second call is silent
    assert chosen == ["reference", "reference"]
    assert first.shape == (2, 3)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if _build.triton_import_error() is not None:
        pytest.skip(_build.triton_import_error())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in _build.triton_unavailable_reason("cpu")


def test_package_imports_without_the_compiled_library():
    # A fresh interpreter in which robust_fast._C cannot be imported (as on a failed build).
    script = """
import sys, warnings
sys.modules["robust_fast._C"] = None
import torch, robust_fast
from robust_fast.info import info_lines
print([line for line in info_lines() if line.startswith("compiled")][0])
x = torch.rand(2, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = robust_fast.pgd_step(x, torch.randn(2, 3), x, eps=0.1, alpha=0.05)
print("fallback warning:", [str(w.message) for w in caught])
try:
    robust_fast.pgd_step(x, torch.randn(2, 3), x, eps=0.1, alpha=0.05, backend="cpp")
except robust_fast.BackendUnavailableError as exc:
    print("cpp refused:", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "compiled    robust_fast._C could not be loaded" in done.stdout
    assert "using the reference backend on cpu" in done.stdout
    assert "cpp refused: backend 'cpp' cannot run on cpu: robust_fast._C could not be loaded" in done.stdout


def test_meta_tensors_name_the_fake_registration():
    if _build.compiled_library_error() is not None:
        pytest.skip(_build.compiled_library_error())
    x = torch.empty(2, 3, device="meta")
    with pytest.raises(robust_fast.BackendUnavailableError, match="no Meta kernel.*FakeTensorMode") as info:
        robust_fast.pgd_step(x, x, x, eps=0.1, alpha=0.1, backend="cpp")
    assert "rebuild" not in str(info.value)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # what the message points to works
        fake = torch.empty(2, 3)
        assert robust_fast.pgd_step(fake, fake, fake, eps=0.1, alpha=0.1, backend="cpp").shape == (2, 3)
