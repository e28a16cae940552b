"""Smoke test of benchmarks/bench_ibp.py (`robust-fast bench ibp`): a --quick run writes the JSON
with the expected rows, and every implementation agrees with the eager reference. No timing is
asserted."""
import json

import torch

from robust_fast import cli


def test_quick_run_through_the_cli(tmp_path):
    threads = torch.get_num_threads()
    assert cli.main(["bench", "ibp", "--quick", "--no-compile", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads
    with open(tmp_path / "ibp_quick.json") as f:
        stored = json.load(f)
    for key in ("benchmark", "machine", "settings", "rows", "notes", "summary"):
        assert key in stored, key
    impls = {r["impl"] for r in stored["rows"]}
    assert {"eager reference", "limit: two forward passes", "one forward pass",
            "limit: two forward + backward passes"} <= impls
    assert {r["mode"] for r in stored["rows"]} == {"no grad", "with backward"}
    ours = [r for r in stored["rows"] if r["impl"].startswith("interval_bounds")]
    assert ours and all(r["max_abs_diff_vs_eager"] < 1e-4 and r["vs_eager"] is not None for r in ours)
    batched = [r for r in stored["rows"] if r["part"] == "E radii"]
    assert {r["impl"].split(" (")[0] for r in batched} == {"E=4 in one call", "4 calls"}
