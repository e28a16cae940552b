"""Smoke test of benchmarks/bench_smoothing.py (`robust-fast bench smoothing`): a --quick run
writes the JSON with the expected rows and ratios. No timing is asserted: speed is never a test."""
import json

import torch

from robust_fast import _build, cli


def test_quick_run_through_the_cli(tmp_path):
    threads = torch.get_num_threads()
    assert cli.main(["bench", "smoothing", "--quick", "--no-compile", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads
    with open(tmp_path / "smoothing_quick.json") as f:
        stored = json.load(f)
    for key in ("benchmark", "machine", "settings", "rows", "notes", "summary", "durations_s"):
        assert key in stored, key
    rows = stored["rows"]
    impls = {r["impl"] for r in rows}
    assert {"eager expression", "torch.randn (output size)", "copy (output size)", "fill (output size)"} <= impls
    assert "torch.compile(eager)" not in impls  # --no-compile
    if _build.cpp_unavailable_reason("cpu") is None:
        assert {"cpp", "cpp (out=)"} <= impls
    for r in rows:
        assert r["median_ms"] > 0 and r["vs_eager"] > 0 and r["fraction_of_copy"] > 0
        assert r["bytes"] >= 4 * r["copies"] * r["shape"][0]
