"""Smoke test of benchmarks/bench_multi_teacher_loss.py (`robust-fast bench loss`): a --quick
run writes the JSON with the expected fields. No timing is asserted."""
import json
import os

import torch

from robust_fast import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_through_the_cli(tmp_path):
    threads = torch.get_num_threads()
    assert cli.main(["bench", "loss", "--quick", "--no-compile", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads
    with open(tmp_path / "multi_teacher_loss_quick.json") as f:
        stored = json.load(f)
    for key in ("benchmark", "machine", "settings", "rows", "notes", "summary"):
        assert key in stored, key
    impls = {r["impl"] for r in stored["rows"]}
    assert {"eager loop", "copy (same bytes)"} <= impls
    modes = {r["mode"] for r in stored["rows"]}
    assert modes == {"forward+backward", "forward"}
    for r in stored["rows"]:
        if r["impl"] == "cpp":
            assert r["max_abs_diff_vs_eager"] < 1e-4
            assert r["vs_eager"] is not None and r["fraction_of_copy"] is not None
