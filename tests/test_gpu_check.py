"""scripts/gpu_check.sh: without a GPU it names every GPU part it skips, writes its report and
succeeds (on a GPU machine the script itself is the check)."""
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_check.sh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: run scripts/gpu_check.sh itself")
def test_without_a_gpu_the_gpu_parts_are_skipped_by_name(tmp_path):
    done = subprocess.run(["bash", SCRIPT], env=dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = (tmp_path / "report.md").read_text()
    assert "No CUDA device is visible" in report
    for part in ("SKIPPED build with the CUDA kernels", "SKIPPED the CUDA and compiled-Triton tests",
                 "SKIPPED the GPU benchmarks"):
        assert part in report and part in done.stdout
