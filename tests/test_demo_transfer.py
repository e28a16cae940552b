"""robust-fast demo transfer: the source cache key, the claims, and the --quick path end to end."""
import json

import pytest

from robust_fast import cli, data
from robust_fast.demo_transfer import RUNS, TransferDemoSettings, claims, source_key

needs_data = pytest.mark.skipif(not data.available(), reason="Fashion-MNIST is not installed "
                                "(apt-get install dataset-fashion-mnist, or set ROBUST_FAST_DATA)")


def test_the_source_keys_tell_the_robust_and_natural_sources_and_their_classes_apart():
    settings = TransferDemoSettings()
    robust, natural = source_key(settings, True), source_key(settings, False)
    assert robust != natural and robust["recipe"] == "pgd_at" and natural["recipe"] == "standard"
    assert robust["classes"] == [0, 1, 2, 3, 4]
    assert source_key(TransferDemoSettings(source_classes=(0, 1, 2)), True) != robust


def row(run, clean, robust, time_vs):
    return {"run": run, "clean_acc": clean, "robust_acc": robust, "time_vs_pgd_at": time_vs}


def test_claims_read_the_rows():
    rows = [row("head_robust", 0.89, 0.43, 0.03), row("head_natural", 0.91, 0.01, 0.03),
            row("finetune", 0.96, 0.18, 0.3), row("lwf", 0.93, 0.48, 0.4), row("pgd_at", 0.95, 0.86, 1.0)]
    found = claims([{"setting": "all", "runs": rows}])["all"]
    assert found == {"robust_head_far_above_natural_head": True, "lwf_above_robust_head_clean_and_pgd": True,
                     "finetune_loses_half_the_robustness": True, "robust_head_under_5pct_of_pgd_at_time": True,
                     "robust_head_above_pgd_at_from_scratch": False}
    rows[3] = row("lwf", 0.88, 0.48, 0.4)      # less accurate on clean images than the head
    assert not claims([{"setting": "all", "runs": rows}])["all"]["lwf_above_robust_head_clean_and_pgd"]


@needs_data
def test_demo_transfer_quick_writes_table_json_and_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUST_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert cli.main(["demo", "transfer", "--quick", "--out", str(out), "--naive-head"]) == 0
    printed = capsys.readouterr().out
    for word in ("| head on the robust source |", "| head on the natural source |", "| LwF fine-tune",
                 "| naive fine-tune", "| PGD-AT from scratch |", "time / PGD-AT from scratch", "10 training images per class",
                 "claims (all)", "claims (few)"):
        assert word in printed, word
    results = json.loads((out / "results.json").read_text())
    settings = TransferDemoSettings.quick()
    assert [block["per_class"] for block in results["targets"]] == [None, 10]
    assert [r["run"] for r in results["targets"][0]["runs"]] == list(RUNS) + ["head_naive"]
    assert [r["run"] for r in results["targets"][1]["runs"]] == list(RUNS)
    assert results["targets"][1]["train_images"] == 50
    for block in results["targets"]:
        scratch = next(r for r in block["runs"] if r["run"] == "pgd_at")
        for r in block["runs"]:
            assert 0 <= r["robust_acc_auto"] <= r["robust_acc"] + 0.05 and 0 <= r["robust_acc"] <= r["clean_acc"]
            assert r["time_vs_pgd_at"] == r["train_time_s"] / scratch["train_time_s"]
    assert set(results["claims"]) == {"all", "few"}
    assert (out / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").is_file() and (out / "all" / "lwf" / "head" / "checkpoint.pt").is_file()
    head = json.loads(json.dumps(results["targets"][0]["runs"][0]))
    assert head["epochs"] == settings.epochs["all"]["head"]
    # a second run finds both sources in the cache
    assert cli.main(["demo", "transfer", "--quick", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["sources"]["robust"]["cached"] and again["sources"]["natural"]["cached"]


@pytest.mark.parametrize("argv", [["demo", "--lwf-lambda", "2"], ["demo", "crt", "--naive-head"],
                                  ["demo", "transfer", "--rrm-lambda", "0.01"], ["demo", "transfer", "--n", "100"]])
def test_other_sections_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2 and "not an option of `demo" in capsys.readouterr().err
