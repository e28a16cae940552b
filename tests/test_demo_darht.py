"""robust-fast demo darht: the heterogeneous set's choice on a hand-made matrix, and --quick end to end."""
import json

import pytest

from robust_fast import cli, data
from robust_fast.demo_darht import DARHTDemoSettings, TeacherSpec, heterogeneous_set, teacher_key
from robust_fast.demo import DemoSettings, teacher_key as rrm_teacher_key

needs_data = pytest.mark.skipif(not data.available(), reason="Fashion-MNIST is not installed "
                                "(apt-get install dataset-fashion-mnist, or set ROBUST_FAST_DATA)")


def _spec(name, model, recipe):
    return TeacherSpec(name, {"name": model, "kwargs": {}}, recipe, {}, 1)


def test_heterogeneous_set_takes_the_best_then_the_least_transfer_of_another_kind():
    specs = [_spec("a", "wide_cnn", "pgd_at"), _spec("a2", "wide_cnn", "pgd_at"), _spec("b", "small_cnn", "ibp"),
             _spec("c", "resnet_small", "fast_at"), _spec("weak", "wide_cnn", "gaussian")]
    rate = [[1.0, 0.1, 0.5, 0.7, 0.2],
            [0.1, 1.0, 0.5, 0.7, 0.2],
            [0.3, 0.3, 1.0, 0.4, 0.1],
            [0.6, 0.6, 0.8, 1.0, 0.1],
            [0.1, 0.1, 0.1, 0.1, 1.0]]
    matrix = {"robust_acc": [0.6, 0.59, 0.4, 0.5, 0.1], "transfer_rate": rate}
    picked, why = heterogeneous_set(matrix, specs, 2, min_relative_robustness=0.5)
    # a2 transfers least with a but is the same kind; weak is below half a's robustness
    assert picked == [0, 2] and len(why["steps"]) == 2
    picked3, _ = heterogeneous_set(matrix, specs, 3, min_relative_robustness=0.5)
    assert picked3 == [0, 2, 3]
    with pytest.raises(ValueError, match="no heterogeneous set of 4"):
        heterogeneous_set(matrix, specs, 4, min_relative_robustness=0.5)


def test_the_pgd_at_teacher_shares_the_rrm_demos_cache_key():
    settings = DARHTDemoSettings()
    assert teacher_key(settings.teachers[0], settings) == rrm_teacher_key(DemoSettings())
    assert teacher_key(settings.teachers[1], settings) != teacher_key(settings.teachers[0], settings)


@needs_data
def test_demo_darht_quick_writes_table_json_and_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUST_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert cli.main(["demo", "darht", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for word in ("| DARHT, heterogeneous set |", "| DARHT, homogeneous set |", "| ARD from the best teacher |",
                 "| PGD-AT |", "made on \\ transfer rate to", "The claim", "one DARHT step", "time / PGD-AT"):
        assert word in printed, word
    results = json.loads((out / "results.json").read_text())
    settings = DARHTDemoSettings.quick()
    assert [row["recipe"] for row in results["students"]] == ["darht_heterogeneous", "darht_homogeneous", "ard",
                                                             "pgd_at"]
    assert len(results["runs"]) == 8 and {r["seed"] for r in results["runs"]} == {0, 1}
    for row in results["students"]:
        assert row["seeds"] == 2 and 0 <= row["robust_acc_auto"] <= row["clean_acc"] <= 1
        mine = [r["robust_acc"] for r in results["runs"] if r["recipe"] == row["recipe"]]
        assert row["robust_acc"] == pytest.approx(sum(mine) / 2)
    assert results["students"][3]["time_vs_pgd_at"] == 1.0
    assert len(results["transferability"]["accuracy"]) == len(settings.teachers)
    assert results["sets"]["homogeneous"] == list(settings.homogeneous)
    assert len(results["sets"]["heterogeneous"]) == settings.set_size
    assert set(results["claim"]) >= {"holds", "above_homogeneous_auto", "above_ard_auto"}
    step = results["step_ms"]
    assert step["attack"] > 0 and "teacher 1" in step and step["PGD-AT step"] > 0
    assert step["step, expected"] == pytest.approx(step["step, clean batch"] + 0.5 * step["attack"])
    for figure in ("transferability.png", "darht.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run finds every teacher in the cache
    assert cli.main(["demo", "darht", "--quick", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert all(t["cached"] for t in again["teachers"]) and again["transferability"]["cached"]
    assert again["transferability"]["accuracy"] == results["transferability"]["accuracy"]


@pytest.mark.parametrize("argv", [["demo", "crt", "--seeds", "2"], ["demo", "crt", "--darht-epochs", "2"],
                                  ["demo", "darht", "--rrm-lambda", "0.01"], ["demo", "darht", "--samples", "9"]])
def test_sections_refuse_each_others_options(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2 and "not an option of `demo" in capsys.readouterr().err
