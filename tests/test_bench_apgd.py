"""Smoke test of benchmarks/bench_apgd.py (`robust-fast bench apgd`): a --quick run writes the
JSON with the expected fields. No timing is asserted: speed is never a test."""
import json

import pytest
import torch

from robust_fast import cli, data


def test_quick_run_through_the_cli(tmp_path, monkeypatch):
    pytest.importorskip("torchattacks")
    monkeypatch.setenv("ROBUST_FAST_CACHE", str(tmp_path / "cache"))  # the tiny model stays in tmp
    threads = torch.get_num_threads()
    assert cli.main(["bench", "apgd", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads
    with open(tmp_path / "apgd_quick.json") as f:
        stored = json.load(f)
    for key in ("benchmark", "machine", "settings", "rows", "notes", "summary", "durations_s"):
        assert key in stored, key
    parts = {r["part"] for r in stored["rows"]}
    assert "apgd_step" in parts
    if not data.available():
        return
    assert {"attacks", "auto_attack"} <= parts
    impls = {r["impl"] for r in stored["rows"] if r["part"] == "attacks"}
    assert impls == {"robust_fast apgd (CE)", "robust_fast apgdt", "torchattacks.APGD", "torchattacks.APGDT"}
    for r in stored["rows"]:
        if r["part"] == "attacks":
            assert 0 <= r["robust_accuracy"] <= 1 and r["images_seen"] > 0
        if r["part"] == "auto_attack":
            assert sum(r["fooled"].values()) == r["n_images"]
            assert set(r["seconds"]) == {"clean", "apgd-ce", "apgd-t", "square"}
