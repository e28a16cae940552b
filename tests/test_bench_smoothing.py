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
    copies = [r for r in stored["rows"] if r["part"] == "gaussian_copies"]
    impls = {r["impl"] for r in copies}
    assert {"eager expression", "torch.randn (output size)", "copy (output size)", "fill (output size)"} <= impls
    assert "torch.compile(eager)" not in impls  # --no-compile
    if _build.cpp_unavailable_reason("cpu") is None:
        assert {"cpp", "cpp (out=)"} <= impls
    for r in copies:
        assert r["median_ms"] > 0 and r["vs_eager"] > 0 and r["fraction_of_copy"] > 0
        assert r["bytes"] >= 4 * r["copies"] * r["shape"][0]
    # certification: ours at auto and at each batch of the sweep, the reference loop at each, a profile of each
    certify = [r for r in stored["rows"] if r["part"] == "certify"]
    sweep = stored["settings"]["certify"]["batch_sizes"]
    assert {r["impl"] for r in certify} == ({"robust_fast certify (auto)"} | {f"robust_fast certify ({b})" for b in sweep}
                                            | {f"reference loop ({b})" for b in sweep})
    for r in certify:
        assert r["forward_passes_per_s"] > 0 and r["vs_reference_best"] > 0 and r["reference_best_batch"] in sweep
    profiles = [r for r in stored["rows"] if r["part"] == "certify profile"]
    assert len(profiles) == 2
    for r in profiles:
        assert 0 < r["forward_fraction"] < 1 and 0 <= r["noise_fraction"] < 1 and r["forward_calls"] > 0
    auto = [r for r in stored["rows"] if r["part"] == "auto batch size"][0]
    assert auto["batch_size"] in auto["candidates"] and str(auto["batch_size"]) in auto["rows_per_s"]
    summary = stored["summary"]["certify"]
    assert summary["auto_batch_size"] == auto["batch_size"] and summary["vs_reference_best"] > 0


def test_reference_loop_certifies_like_certify():
    """The baseline is a certification, not just a loop: on a model whose class never changes under
    the noise both give the class with the same radius bound's verdict."""
    from robust_fast.benchmarks.bench_smoothing import reference_certify
    from robust_fast.certify import smoothing

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):  # class 2 wherever the image's mean is below 10
            logits = torch.zeros(x.shape[0], 4)
            logits[:, 2] = self.scale * (10 - x.flatten(1).mean(1))
            return logits
    x = torch.rand(3, 1, 4, 4)
    model = Constant()
    assert reference_certify(model, x, 0.25, 10, 200, 0.001, 64, 4) == [2, 2, 2]
    ours = smoothing.certify(model, x, 0.25, n0=10, n=200, batch_size=64, generator=torch.Generator().manual_seed(0))
    assert ours.prediction.tolist() == [2, 2, 2]
