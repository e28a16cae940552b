"""robust-fast demo (rrm): seeds, the two RRM students and their options, the ratios to the same
seed's PGD-AT student, and --quick end to end."""
import argparse
import json
import os

import pytest
import torch

from robust_fast import cli, data
from robust_fast.demo import (RRM_STUDENTS, DemoSettings, _recipe, add_ratios, demo_settings, initial_student,
                              student_rows, table)
from robust_fast.cli import demo_usage_error
from robust_fast.models import build_model

needs_data = pytest.mark.skipif(not data.available(), reason="Fashion-MNIST is not installed "
                                "(apt-get install dataset-fashion-mnist, or set ROBUST_FAST_DATA)")


def _args(*argv):
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    from robust_fast.demo import add_demo_parser
    from robust_fast.demo_darht import add_darht_demo_options
    add_darht_demo_options(add_demo_parser(commands))
    return parser.parse_args(["demo", *argv])


def test_defaults_are_three_seeds_and_each_rrm_students_best_head_option():
    settings = demo_settings(_args())
    assert settings.seeds == 3 and settings.seed == 0
    assert settings.rrm["rrm"] == {"head": "teacher", "robust_head_epochs": 0.25, "kind": "cosine"}
    assert settings.rrm["rrm_teacher_arch"] == {"head": "teacher", "robust_head_epochs": 0.25,
                                                "kind": "l2_normalized"}
    assert settings.epochs["rrm"] == settings.epochs["rrm_teacher_arch"] == 4
    assert DemoSettings.quick().seeds > 1  # --quick runs the seeds' path too


def test_rrm_options_set_both_rrm_students_and_leave_the_defaults_alone():
    settings = demo_settings(_args("--rrm-head", "own", "--rrm-robust-head", "0.5", "--rrm-epochs", "2",
                                   "--seeds", "2", "--seed", "4"))
    for name in RRM_STUDENTS:
        assert settings.rrm[name]["head"] == "own" and settings.rrm[name]["robust_head_epochs"] == 0.5
        assert settings.epochs[name] == 2
    assert settings.rrm["rrm_teacher_arch"]["kind"] == "l2_normalized"
    assert settings.seeds == 2 and settings.seed == 4
    assert DemoSettings().rrm["rrm"]["head"] == "teacher"  # the defaults are not shared, nor changed


@pytest.mark.parametrize("argv, word", [(("--seeds", "0"), "--seeds"), (("--rrm-robust-head", "-1"), "--rrm-robust-head"),
                                        (("--rrm-epochs", "0"), "--rrm-epochs")])
def test_bad_settings_are_named(argv, word):
    with pytest.raises(ValueError, match=word):
        demo_settings(_args(*argv))
    assert cli.main(["demo", *argv]) == 2


@pytest.mark.parametrize("section, option", [("crt", "--rrm-head"), ("transfer", "--rrm-robust-head"),
                                             ("darht", "--rrm-head"), ("crt", "--seeds")])
def test_other_sections_refuse_the_rrm_sections_options(section, option, capsys):
    value = {"--rrm-head": "own", "--rrm-robust-head": "0.25", "--seeds": "2"}[option]
    with pytest.raises(SystemExit):
        cli.main(["demo", section, option, value])
    assert option in capsys.readouterr().err


def test_the_rrm_section_takes_seeds():
    assert demo_usage_error(_args("rrm", "--seeds", "2")) is None
    assert demo_usage_error(_args("--seeds", "2")) is None


def test_students_start_from_one_seeds_weights_and_not_from_the_teachers():
    settings = DemoSettings()
    pgd_at, rrm = initial_student("pgd_at", settings, 0), initial_student("rrm", settings, 0)
    assert all(torch.equal(a, b) for a, b in zip(pgd_at.parameters(), rrm.parameters()))
    other = initial_student("pgd_at", settings, 1)
    assert not torch.equal(next(other.parameters()), next(pgd_at.parameters()))
    wide = initial_student("rrm_teacher_arch", settings, settings.teacher_seed)
    torch.manual_seed(settings.teacher_seed)  # how the demo's teacher draws its initial weights
    teachers_start = build_model(settings.teacher_model["name"], **settings.teacher_model["kwargs"])
    assert type(wide) is type(teachers_start) and wide.feature_dim == teachers_start.feature_dim
    assert not torch.equal(next(wide.parameters()), next(teachers_start.parameters()))
    again = initial_student("rrm_teacher_arch", settings, settings.teacher_seed)
    assert all(torch.equal(a, b) for a, b in zip(wide.parameters(), again.parameters()))


def test_each_rrm_student_gets_its_own_head_option():
    settings = DemoSettings()
    teacher = build_model(settings.teacher_model["name"], **settings.teacher_model["kwargs"])
    demo = _recipe("rrm", settings, teacher, "t.pt", seed=2)
    wide = _recipe("rrm_teacher_arch", settings, teacher, "t.pt", seed=2)
    assert (demo.head, demo.robust_head_epochs, demo.kind) == ("teacher", 0.25, "cosine")
    assert (wide.head, wide.robust_head_epochs, wide.kind) == ("teacher", 0.25, "l2_normalized")
    assert demo.seed == 2 and demo.lambda_ce == settings.rrm_lambda_ce and demo.noise_std == settings.rrm_noise_std


def _run(recipe, seed, robust, auto, time, teacher_time=None):
    return {"recipe": recipe, "seed": seed, "clean_acc": 0.8, "robust_acc": robust, "robust_acc_auto": auto,
            "train_time_s": time, "train_time_with_teacher_s": None if teacher_time is None else time + teacher_time}


def test_ratios_divide_by_the_same_seeds_pgd_at_student_then_average_over_seeds():
    runs = [_run("standard", 0, 0.1, 0.1, 4.0),
            _run("pgd_at", 0, 0.6, 0.5, 30.0), _run("fast_at", 0, 0.6, 0.4, 10.0),
            _run("rrm", 0, 0.45, 0.40, 12.0, 40.0), _run("rrm_teacher_arch", 0, 0.5, 0.45, 15.0, 40.0),
            _run("pgd_at", 1, 0.5, 0.4, 20.0), _run("fast_at", 1, 0.5, 0.5, 5.0),
            _run("rrm", 1, 0.45, 0.30, 12.0, 40.0), _run("rrm_teacher_arch", 1, 0.5, 0.0, 15.0, 40.0)]
    add_ratios(runs)
    rrm0, rrm1 = runs[3], runs[7]
    assert rrm0["auto_vs_pgd_at"] == pytest.approx(0.8) and rrm1["auto_vs_pgd_at"] == pytest.approx(0.75)
    assert rrm0["time_with_teacher_vs_pgd_at"] == pytest.approx(52 / 30)
    assert rrm1["time_vs_fast_at"] == pytest.approx(12 / 5) and rrm1["robust_vs_fast_at"] == pytest.approx(0.9)
    assert runs[0]["time_with_teacher_vs_pgd_at"] is None  # no teacher behind the standard student
    rows = {row["recipe"]: row for row in student_rows(runs, DemoSettings(seeds=2))}
    assert rows["standard"]["seeds"] == [0] and rows["standard"]["time_vs_pgd_at"] == pytest.approx(4 / 30)
    rrm = rows["rrm"]
    assert rrm["seeds"] == [0, 1] and rrm["auto_vs_pgd_at"] == pytest.approx(0.775)  # not 0.35 / 0.45
    assert rrm["robust_acc_auto"] == pytest.approx(0.35) and rrm["robust_acc_auto_sd"] == pytest.approx(0.0707, abs=1e-4)
    assert rrm["train_time_with_teacher_s"] == pytest.approx(52.0) and rrm["time_vs_pgd_at"] == pytest.approx(0.5)
    # a student at 0% has a ratio of 0 (only a reference at 0% has none)
    assert rows["rrm_teacher_arch"]["auto_vs_pgd_at"] == pytest.approx((0.9 + 0.0) / 2)
    assert rows["rrm_teacher_arch"]["model"] == "wide_cnn" and rows["rrm"]["model"] == "resnet_small"
    assert "teacher's head" in rows["rrm"]["variant"] and "robust head" in rows["rrm"]["variant"]
    assert "normalised L2" in rows["rrm_teacher_arch"]["variant"]


def test_a_ratio_that_some_seed_lacks_is_left_out():
    runs = [_run("pgd_at", 0, 0.6, 0.0, 30.0), _run("fast_at", 0, 0.6, 0.4, 10.0), _run("rrm", 0, 0.4, 0.3, 12.0, 40.0),
            _run("pgd_at", 1, 0.5, 0.4, 20.0), _run("fast_at", 1, 0.5, 0.5, 5.0), _run("rrm", 1, 0.4, 0.3, 12.0, 40.0)]
    add_ratios(runs)
    rrm = {row["recipe"]: row for row in student_rows(runs, DemoSettings(seeds=2))}["rrm"]
    assert runs[2]["auto_vs_pgd_at"] is None and runs[5]["auto_vs_pgd_at"] == pytest.approx(0.75)
    assert "auto_vs_pgd_at" not in rrm and rrm["robust_vs_pgd_at"] == pytest.approx((0.4 / 0.6 + 0.8) / 2)


@needs_data
def test_demo_quick_writes_table_json_curves_and_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUST_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for word in ("| standard |", "| PGD-AT |", "| Fast-AT |", "| RRM: teacher's head, cosine, robust head (0.25 pass) |",
                 "| RRM, teacher's architecture: teacher's head, normalised L2, robust head (0.25 pass) | wide_cnn | 2 |",
                 "RRM student (resnet_small):", "RRM, teacher's architecture student (wide_cnn):",
                 "AutoAttack-style (APGD-CE + APGD-T", "AutoAttack-style / PGD-AT", "with teacher / PGD-AT", " ± "):
        assert word in printed, word
    results = json.loads((out / "results.json").read_text())
    students = ["standard", "pgd_at", "fast_at", "rrm", "rrm_teacher_arch"]
    assert [row["recipe"] for row in results["students"]] == students
    assert [(r["recipe"], r["seed"]) for r in results["runs"]] == (
        [(name, 0) for name in students] + [(name, 1) for name in students[1:]])
    for run in results["runs"]:
        # (a misclassified image can land on a correct point of its ball: a little slack)
        assert 0 <= run["robust_acc"] <= run["clean_acc"] + 0.02 and run["clean_acc"] <= 1
        assert 0 <= run["robust_acc_auto"] <= run["clean_acc"] + 0.02 and run["train_time_s"] > 0
        assert (run["train_time_with_teacher_s"] is None) == (run["recipe"] not in RRM_STUDENTS)
        assert os.path.isfile(out / f"{run['recipe']}-seed{run['seed']}" / "checkpoint.pt")
    by_run = {(r["recipe"], r["seed"]): r for r in results["runs"]}
    rows = {row["recipe"]: row for row in results["students"]}
    for name in RRM_STUDENTS:
        times = [by_run[(name, s)]["train_time_s"] / by_run[("pgd_at", s)]["train_time_s"] for s in (0, 1)]
        assert rows[name]["time_vs_pgd_at"] == pytest.approx(sum(times) / 2)
        assert results["versus"][name]["pgd_at"]["time"] == rows[name]["time_vs_pgd_at"]
        with_teacher = by_run[(name, 0)]["train_time_s"] + results["teacher"]["train_time_s"]
        assert by_run[(name, 0)]["train_time_with_teacher_s"] == pytest.approx(with_teacher)
    wide = torch.load(out / "rrm_teacher_arch-seed0" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert wide["model_spec"]["name"] == "wide_cnn"
    curves = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert {(c["recipe"], c["seed"]) for c in curves} == set(by_run)
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").read_text().startswith("Fashion-MNIST")


def test_table_of_one_seed_has_no_spread():
    settings = DemoSettings(seeds=1)
    runs = [_run(name, 0, 0.5, 0.4, 10.0, 40.0 if name in RRM_STUDENTS else None)
            for name in ("standard", "pgd_at", "fast_at", "rrm", "rrm_teacher_arch")]
    add_ratios(runs)
    import dataclasses
    results = {"settings": dataclasses.asdict(settings), "students": student_rows(runs, settings),
               "teacher": {"train_time_s": 40.0, "cached": True, "clean_acc": 0.8, "robust_acc": 0.6,
                           "robust_acc_auto": 0.55},
               "versus": {name: {base: {"time": 1.0, "time_with_teacher": 5.0, "robust": 1.0, "auto": 1.0}
                                 for base in ("pgd_at", "fast_at")} for name in RRM_STUDENTS}}
    text = table(results)
    assert " ± " not in text and "seed 0" in text and "AutoAttack-style 55.0%" in text
    assert "| RRM, teacher's architecture: teacher's head, normalised L2, robust head (0.25 pass) | wide_cnn | 1 | 4 |" \
        in text


def test_restarts_are_evaluated_and_shown_only_when_asked():
    from robust_fast.demo import _evaluate
    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    images, labels = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    quiet = DemoSettings(eval_steps=2, auto_steps=2)
    assert "robust_acc_restarts" not in _evaluate(model, (images, labels), quiet, 0)
    row = _evaluate(model, (images, labels), DemoSettings(eval_steps=2, auto_steps=2, eval_restarts=2), 0)
    assert 0 <= row["robust_acc_restarts"] <= row["clean_acc"] and row["eval_time_s"] > 0
