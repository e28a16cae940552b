"""robust-fast demo crt: the paired bootstrap on hand examples, and the --quick path end to end."""
import json

import pytest
import torch

from robust_fast import cli, data
from robust_fast.certify.smoothing import SmoothedCertificate, per_image_radius
from robust_fast.demo_crt import CRTDemoSettings, paired_bootstrap, teacher_key

needs_data = pytest.mark.skipif(not data.available(), reason="Fashion-MNIST is not installed "
                                "(apt-get install dataset-fashion-mnist, or set ROBUST_FAST_DATA)")


def test_bootstrap_of_a_constant_difference_is_that_difference():
    result = paired_bootstrap([1.0, 2.0, 3.0], [0.5, 1.5, 2.5], samples=200)
    assert result["difference"] == pytest.approx(0.5)
    assert result["low"] == pytest.approx(0.5) and result["high"] == pytest.approx(0.5)
    assert result["share_not_above_zero"] == 0.0


def test_bootstrap_of_two_images_follows_the_binomial_by_hand():
    # differences (0, 2): a resample's mean is 0, 1 or 2 with probabilities 1/4, 1/2, 1/4
    result = paired_bootstrap([0.0, 2.0], [0.0, 0.0], samples=20000, confidence=0.9, seed=1)
    assert result["difference"] == 1.0
    assert result["low"] == 0.0 and result["high"] == 2.0   # the 5% and 95% quantiles
    assert result["share_not_above_zero"] == pytest.approx(0.25, abs=0.02)
    again = paired_bootstrap([0.0, 2.0], [0.0, 0.0], samples=20000, confidence=0.9, seed=1)
    assert again == result                                  # seeded: repeatable


def test_bootstrap_pairs_the_items():
    # b = a + 0.1 image by image: the pairing removes the spread between images entirely
    a = torch.linspace(0, 1, 50)
    result = paired_bootstrap(a + 0.1, a, samples=500)
    assert result["low"] == pytest.approx(0.1) and result["high"] == pytest.approx(0.1)


def test_bootstrap_rejects_bad_inputs():
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1.0], [0.0], confidence=1.0)


def test_per_image_radius_is_the_radius_where_right_else_zero():
    certificate = SmoothedCertificate(prediction=torch.tensor([0, 1, -1, 2]),
                                      radius=torch.tensor([0.3, 0.5, 0.0, 0.7], dtype=torch.float64),
                                      pa_lower=torch.zeros(4, dtype=torch.float64), counts=torch.zeros(4, 3),
                                      selection_counts=torch.zeros(4, 3), sigma=0.25, n0=1, n=1, alpha=0.001)
    radius = per_image_radius(certificate, torch.tensor([0, 2, 1, 2]))
    assert radius.tolist() == [0.3, 0.0, 0.0, 0.7]


def test_the_teacher_cache_key_names_the_certified_recipe():
    settings = CRTDemoSettings()
    key = teacher_key(settings)
    assert key["recipe"] == "smoothadv" and key["sigma"] == 0.25
    other = CRTDemoSettings(teacher_steps=settings.teacher_steps + 1)
    assert teacher_key(other) != key


@needs_data
def test_demo_crt_quick_writes_table_json_and_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUST_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert cli.main(["demo", "crt", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for word in ("| Gaussian |", "| SmoothAdv |", "| CRT |", "CRT student:", "ACR / SmoothAdv",
                 "with teacher / SmoothAdv", "paired bootstrap interval"):
        assert word in printed, word
    results = json.loads((out / "results.json").read_text())
    settings = CRTDemoSettings.quick()
    assert [row["recipe"] for row in results["students"]] == ["gaussian", "smoothadv", "crt"]
    for row in results["students"]:
        radii = row["radius_if_correct"]
        assert len(radii) == settings.test_samples
        assert row["acr"] == pytest.approx(sum(radii) / len(radii))
        by_radius = row["certified_acc_by_radius"]
        assert 1 >= by_radius["0"] >= by_radius["0.25"] >= by_radius["0.5"] >= by_radius["0.75"] >= 0
        assert row["train_time_s"] > 0 and row["certify_time_s"] > 0
    by_name = {row["recipe"]: row for row in results["students"]}
    crt, reference = by_name["crt"], by_name["smoothadv"]
    assert results["crt_vs_smoothadv"]["time"] == crt["train_time_s"] / reference["train_time_s"]
    assert crt["train_time_with_teacher_s"] == crt["train_time_s"] + results["teacher"]["train_time_s"]
    assert by_name["gaussian"]["train_time_with_teacher_s"] == by_name["gaussian"]["train_time_s"]
    bootstrap = results["crt_minus_gaussian_acr"]
    assert bootstrap["difference"] == pytest.approx(crt["acr"] - by_name["gaussian"]["acr"])
    assert bootstrap["low"] <= bootstrap["difference"] <= bootstrap["high"]
    assert (out / "certified.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").is_file() and (out / "crt" / "checkpoint.pt").is_file()
    # a second run finds the teacher in the cache
    assert cli.main(["demo", "crt", "--quick", "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "results.json").read_text())["teacher"]["cached"]


@pytest.mark.parametrize("argv", [["demo", "--crt-epochs", "2"], ["demo", "--certify-teacher"],
                                  ["demo", "crt", "--rrm-lambda", "0.01"]])
def test_one_sections_options_are_refused_by_the_other(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2 and "not an option of `demo" in capsys.readouterr().err
