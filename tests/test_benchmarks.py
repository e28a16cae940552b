"""Smoke test of benchmarks/bench_pgd.py (robust_fast.benchmarks.bench_pgd) and the harness
that runs it: every part runs in --quick mode and the JSON holds the expected fields; `robust-fast
bench pgd` reaches it. No timing is asserted: speed is never a test."""
import importlib
import json
import os

import pytest
import torch


def load_bench():
    return importlib.import_module("robust_fast.benchmarks.bench_pgd")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("torchattacks")
    out = tmp_path_factory.mktemp("bench")
    saved_cache = os.environ.get("ROBUST_FAST_CACHE")
    os.environ["ROBUST_FAST_CACHE"] = str(out / "cache")  # the tiny model stays in tmp
    threads = torch.get_num_threads()
    try:
        # One thread: no OpenMP workers to wait for on a busy machine; no compile: a cold
        # inductor cache alone can take tens of seconds.
        payload = load_bench().run(["--quick", "--out", str(out), "--no-compile", "--threads", "1"])
    finally:
        if saved_cache is None:
            os.environ.pop("ROBUST_FAST_CACHE", None)
        else:
            os.environ["ROBUST_FAST_CACHE"] = saved_cache
    assert torch.get_num_threads() == threads  # the harness restores the thread count
    return out, payload


def test_writes_json_and_png(quick_run):
    out, payload = quick_run
    path = out / "pgd_quick.json"
    assert path.is_file()
    assert payload["paths"]["json"] == str(path)
    with open(path) as f:
        stored = json.load(f)
    for key in ("benchmark", "machine", "settings", "rows", "notes", "durations_s", "summary"):
        assert key in stored, key
    for key in ("cpu", "cpu_count", "torch", "python", "torch_threads", "robust_fast_backends", "date"):
        assert key in stored["machine"], key
    assert "hostname" not in json.dumps(stored["machine"]).lower()
    assert stored["settings"]["quick"] is True
    pytest.importorskip("matplotlib")
    assert (out / "pgd_quick.png").is_file()


def test_step_rows(quick_run):
    _, payload = quick_run
    rows = [r for r in payload["rows"] if r["part"] == "pgd_step"]
    impls = {r["impl"] for r in rows}
    assert {"eager reference", "torchattacks step", "copy (same bytes)"} <= impls
    assert "torch.compile(reference)" not in impls  # --no-compile
    assert {r["norm"] for r in rows} == {"linf", "l2"}
    for r in rows:
        for key in ("shape", "median_ms", "iqr_ms", "samples", "bytes", "gbps", "vs_eager",
                    "vs_compile", "vs_torchattacks", "fraction_of_copy"):
            assert key in r, key
        assert r["median_ms"] > 0 and r["samples"] >= 1
        assert r["vs_compile"] is None
    from robust_fast import _build
    if _build.cpp_unavailable_reason("cpu") is None:
        assert {"cpp", "cpp (out=x_adv)"} <= impls
        for r in rows:
            if r["impl"] == "cpp":  # the timed kernel computes what the reference computes
                assert r["max_abs_diff_vs_eager"] <= 1e-6


def test_attack_rows(quick_run):
    _, payload = quick_run
    rows = {r["impl"]: r for r in payload["rows"] if r["part"] == "pgd_attack"}
    assert {"robust_fast.attacks.pgd", "torchattacks.PGD"} <= set(rows)
    ours = rows["robust_fast.attacks.pgd"]
    assert ours["vs_torchattacks"] is not None and ours["steps"] == 10
    assert ours["max_abs_diff_vs_torchattacks"] == 0.0  # same random start, same step


def test_early_stop_rows(quick_run):
    _, payload = quick_run
    rows = {r["impl"]: r for r in payload["rows"] if r["part"] == "early_stop_eval"}
    from robust_fast import data
    if not data.available():
        assert not rows
        assert any("early_stop_eval: skipped" in n for n in payload["notes"])
        return
    ours, theirs = rows["robust_fast pgd(early_stop=True)"], rows["torchattacks.PGD"]
    for key in ("median_ms", "vs_torchattacks", "robust_accuracy", "clean_accuracy", "model"):
        assert key in ours, key
    assert 0.0 <= ours["robust_accuracy"] <= ours["clean_accuracy"] <= 1.0
    # At least as strong. Slack of one sample: early stop decides "misclassified" from the
    # logits of a compacted batch, the final count from the full batch, and a CPU forward may
    # round differently with the batch size (matters only at an exact tie of two logits).
    assert ours["robust_accuracy"] <= theirs["robust_accuracy"] + 1.0 / ours["n_eval"]
    # Without early stop: the same starts and steps as torchattacks, the same accuracy.
    assert rows["robust_fast pgd(early_stop=False)"]["robust_accuracy"] == theirs["robust_accuracy"]
    assert os.path.isfile(ours["model"]["cache"])


def test_torchattacks_step_copies_match_torchattacks():
    """The copied step expressions agree with a one-step torchattacks attack."""
    torchattacks = pytest.importorskip("torchattacks")
    bench = load_bench()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    for norm, attack_cls, step in (("linf", torchattacks.PGD, bench.torchattacks_step_linf),
                                   ("l2", torchattacks.PGDL2, bench.torchattacks_step_l2)):
        eps, alpha = (0.1, 0.03) if norm == "linf" else (0.5, 0.2)
        expected = attack_cls(model, eps=eps, alpha=alpha, steps=1, random_start=False)(x, y)
        x_leaf = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x_leaf), y)
        (grad,) = torch.autograd.grad(loss, x_leaf)
        assert torch.equal(step(x, grad, x, eps, alpha), expected), norm


def test_cli_runs_the_benchmark(tmp_path, monkeypatch):
    cli = pytest.importorskip("robust_fast.cli")
    monkeypatch.setenv("ROBUST_FAST_CACHE", str(tmp_path / "cache"))
    code = cli.main(["bench", "pgd", "--quick", "--parts", "step", "--no-compile", "--threads", "1",
                     "--out", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "pgd_quick.json") as f:
        stored = json.load(f)
    assert stored["settings"]["parts"] == ["step"]
    assert {r["part"] for r in stored["rows"]} == {"pgd_step"}


@pytest.fixture
def bench_dirs(tmp_path, monkeypatch):
    """bench_pgd with its reference and local folders in tmp, the quick sizes as its full run
    (so a reference run takes seconds), and a load average the test sets."""
    pytest.importorskip("torchattacks")
    bench = load_bench()
    reference, local = tmp_path / "reference", tmp_path / "local"
    reference.mkdir()
    (reference / "pgd.json").write_text("committed\n")
    monkeypatch.setattr(bench.harness, "REFERENCE_DIR", str(reference))
    monkeypatch.setattr(bench.harness, "LOCAL_RESULTS_DIR", str(local))
    monkeypatch.setattr(bench, "FULL", bench.QUICK)
    monkeypatch.setenv("ROBUST_FAST_CACHE", str(tmp_path / "cache"))
    load = [0.0, 0.0, 0.0]
    monkeypatch.setattr(bench.harness, "_load_average", lambda: list(load))
    return bench, reference, local, load


STEP_ONLY = ["--parts", "step", "--no-compile", "--threads", "1"]


def test_results_go_to_the_local_folder_by_default(bench_dirs):
    bench, reference, local, _ = bench_dirs
    assert bench.harness.main(bench.run, ["--quick"] + STEP_ONLY) == 0
    assert (local / "pgd_quick.json").is_file()
    assert (reference / "pgd.json").read_text() == "committed\n"


def test_save_reference_on_a_quiet_machine(bench_dirs):
    bench, reference, local, _ = bench_dirs
    assert bench.harness.main(bench.run, ["--save-reference"] + STEP_ONLY) == 0
    with open(reference / "pgd.json") as f:
        assert json.load(f)["benchmark"] == "pgd"
    assert not local.exists()


def test_busy_machine_never_overwrites_the_reference(bench_dirs, capsys):
    bench, reference, local, load = bench_dirs
    load[:] = [99.0, 99.0, 99.0]
    assert bench.harness.main(bench.run, ["--save-reference"] + STEP_ONLY) == 1
    assert (reference / "pgd.json").read_text() == "committed\n"
    with open(local / "pgd.json") as f:
        notes = json.load(f)["notes"]
    assert any("not to be trusted" in n for n in notes)
    err = capsys.readouterr().err
    assert "not to be trusted" in err and "--save-reference refused" in err


def test_save_reference_refuses_quick_and_out(bench_dirs):
    bench = bench_dirs[0]
    for argv in (["--save-reference", "--quick"], ["--save-reference", "--out", "x"]):
        with pytest.raises(SystemExit):
            bench.run(argv)


def test_busy_warning_threshold(monkeypatch):
    harness = load_bench().harness
    cores = harness.usable_cores()
    monkeypatch.setattr(harness, "_load_average", lambda: [cores + 0.5, 0.0, 0.0])
    assert "not to be trusted" in harness.busy_warning("now")
    assert harness.busy_warning("now", own_threads=1) is None  # this run's own threads
    monkeypatch.setattr(harness, "_load_average", lambda: [float(cores), 0.0, 0.0])
    assert harness.busy_warning("now") is None


def test_cold_cache_timing_flushes_before_every_call(monkeypatch):
    harness = load_bench().harness
    size = harness.last_level_cache_bytes()
    assert size is None or size > 0
    flushes, calls = [], []
    real_flush = harness._flush_cpu_caches
    monkeypatch.setattr(harness, "_flush_cpu_caches", lambda: (flushes.append(len(calls)), real_flush()))
    stats = harness.compare({"add": lambda: calls.append(1)}, rounds=2, min_run_time=0.0,
                            min_runs=4, warmup_runs=1, warmup_time=0.0, cold_cache=True)
    assert stats["add"]["samples"] == 4  # one call per sample
    timed = len(calls) - 1  # the warm-up call is not timed and not flushed
    assert flushes == list(range(1, timed + 1))  # a flush before each timed call, none after
