"""Smoke test of benchmarks/bench_eval.py (`robust-fast bench eval`): a --quick run writes the JSON
with each attack of the standard version beside torchattacks'. No timing is asserted."""
import json

import pytest

from robust_fast import cli, data


def test_quick_run_through_the_cli(tmp_path, monkeypatch):
    pytest.importorskip("torchattacks")
    monkeypatch.setenv("ROBUST_FAST_CACHE", str(tmp_path / "cache"))  # the tiny model stays in tmp
    assert cli.main(["bench", "eval", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "eval_quick.json") as f:
        stored = json.load(f)
    for key in ("benchmark", "machine", "settings", "rows", "notes", "summary"):
        assert key in stored, key
    if not data.available():
        return
    attacks = {r["attack"]: r for r in stored["rows"]}
    assert set(attacks) == {"APGD-CE", "APGD-T", "FAB-T", "FAB-T (early_stop=False)", "Square", "AutoAttack standard"}
    for name in ("APGD-CE", "APGD-T", "FAB-T", "Square", "AutoAttack standard"):
        row = attacks[name]
        assert 0 <= row["robust_accuracy"] <= 1 and 0 <= row["torchattacks_robust_accuracy"] <= 1
        assert row["seconds"] > 0 and row["torchattacks_seconds"] > 0
    auto = attacks["AutoAttack standard"]
    assert sum(auto["fooled"].values()) == auto["n_images"]
    assert set(auto["stage_seconds"]) == {"clean", "apgd-ce", "apgd-t", "fab-t", "square"}
