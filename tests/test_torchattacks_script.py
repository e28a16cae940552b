"""A torchattacks user's script runs unchanged but for its import, and gives torchattacks'
results: bit for bit for L-inf and FGSM, within 1e-6 for L2 (the fused step divides once)."""
import os

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "torchattacks_usage.py")
IMPORT = "import torchattacks\n"
OURS = "from robust_fast import attacks as torchattacks\n"


def run_script(source: str) -> dict:
    namespace = {"__name__": "__main__"}
    exec(compile(source, SCRIPT, "exec"), namespace)
    return namespace["results"]


def test_script_gives_torchattacks_results(capsys):
    pytest.importorskip("torchattacks")
    with open(SCRIPT) as f:
        source = f.read()
    assert source.count(IMPORT) == 1
    expected = run_script(source)
    ours = run_script(source.replace(IMPORT, OURS))
    capsys.readouterr()  # torchattacks prints its mode changes
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        if key == "pgdl2":
            torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-6)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key
