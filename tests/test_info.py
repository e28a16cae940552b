"""The command line, and the profiler ranges of the ops."""
import os
import subprocess
import sys

import torch

import robust_fast
from robust_fast import attacks
from robust_fast.cli import main


def test_info_lists_every_backend_with_a_reason(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch       {torch.__version__}" in out
    for device in ("cpu", "cuda"):
        for backend in ("cpp", "triton", "reference"):
            line = next(l for l in out.splitlines() if l.split()[:2] == [device, backend])
            assert "usable" in line
            assert "unusable" not in line or ": " in line.split("unusable", 1)[1]  # a reason follows


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "robust_fast", "info"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "backends:" in done.stdout


def test_unknown_benchmark_is_reported(capsys):
    assert main(["bench", "no_such_benchmark"]) == 2
    assert "unknown benchmark 'no_such_benchmark'" in capsys.readouterr().err


def test_profiler_sees_the_named_ranges():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    with torch.profiler.profile() as prof:
        robust_fast.pgd_step(x, torch.randn_like(x), x, eps=0.1, alpha=0.1)
        attacks.pgd(model, x, y, steps=2)
    names = {event.name for event in prof.events()}
    assert {"robust_fast::pgd_step", "robust_fast::pgd", "robust_fast::attack_step"} <= names


def test_the_tests_cache_is_their_own():
    # conftest points ROBUST_FAST_CACHE at a temporary folder: nothing lands in ~/.cache/robust_fast
    import tempfile
    assert os.environ["ROBUST_FAST_CACHE"].startswith(tempfile.gettempdir())
