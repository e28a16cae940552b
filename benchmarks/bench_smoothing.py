"""Benchmark of randomized smoothing: the noisy copies and certification, in one run, as ratios.

(a) copies: robust_fast.gaussian_copies (each usable backend; cpp also into a preallocated out=,
as certification calls it; Triton on CUDA only) at (1,1,28,28) x 10,000 copies, (1,3,32,32) x
1,000 and (64,1,28,28) x 16, fp32, against the eager expression x.repeat_interleave(copies, 0) +
sigma * torch.randn(...), torch.compile of that expression, and the machine's limits for the same
output bytes: a copy (reads and writes the output's size) and a fill (writes it once, as the op
does). torch.randn of the output's size alone shows what the eager expression's generator costs.

(b) certify: noisy forward passes per second of robust_fast.certify.smoothing.certify (n0 = 100,
n = 10,000, sigma 0.25) on the CRT demo's student (ResNetSmall(width=8), randomly initialised
with seed 0: the speed of a forward does not depend on the weights) over the first 8
Fashion-MNIST test images (random images when the data set is missing), at batch_size="auto" and
at each fixed batch size of the sweep, against a loop written as Cohen et al.'s reference code
writes it (one image at a time; per batch x.repeat(b, 1, 1, 1) + randn_like * sigma, the forward,
argmax, counts by bincount on the host) at each batch size of the sweep; the speed-up is against
that loop's best batch size. Then 3 profiled calls of each at its batch size (auto's choice; the
loop's best): the fraction of their time inside the model's forward and in the noise, and what
the auto choice measured and cost. Each call's process CPU time is recorded beside its wall
time (the cpu_* fields): other processes on a shared machine move wall time, not CPU time.

    robust-fast bench smoothing [--quick] [--device cpu|cuda] [--parts copies,certify]
                                [--out DIR | --save-reference] [--no-compile] [--threads N]

Results: smoothing.json + smoothing.png (smoothing_cuda.* on CUDA, smoothing_quick.* with
--quick) in --out DIR, by default benchmarks/results/local/ (see harness.py).
Speed-ups are "baseline median / this median" (> 1: this is faster).
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

import robust_fast
from robust_fast import _build, data
from robust_fast.benchmarks import harness
from robust_fast.certify import autobatch, smoothing
from robust_fast.demo_crt import CRTDemoSettings
from robust_fast.models import build_model

SIGMA = 0.25
CASES = [((1, 1, 28, 28), 10_000), ((1, 3, 32, 32), 1_000), ((64, 1, 28, 28), 16)]
PARTS = ("copies", "certify")
# The reference loop's sweep (the batch sizes Cohen et al.'s code is run at, and more).
SWEEP = (100, 200, 400, 1000, 2000)
FULL = {"cases": CASES, "rounds": 3, "min_run_time": 1.0, "min_runs": 9,
        "certify": {"images": 8, "n0": 100, "n": 10_000, "alpha": 0.001, "batch_sizes": SWEEP, "rounds": 3,
                    "model": CRTDemoSettings().student_model}}
QUICK = {"cases": [((1, 1, 8, 8), 50), ((4, 1, 8, 8), 4)], "rounds": 1, "min_run_time": 0.02, "min_runs": 3,
         "certify": {"images": 2, "n0": 10, "n": 190, "alpha": 0.001, "batch_sizes": (64, 128), "rounds": 1,
                     "model": {"name": "resnet_small", "kwargs": {"width": 2}}}}
OURS = ("cpp", "cpp (out=)", "triton", "triton (out=)")


def eager_copies(x: torch.Tensor, copies: int, sigma: float, generator=None) -> torch.Tensor:
    """What the op replaces: three passes over the output (repeat, randn, add)."""
    rows = x.repeat_interleave(copies, 0)
    return rows + sigma * torch.randn(rows.shape, generator=generator, device=x.device, dtype=x.dtype)


def _label(shape, copies) -> str:
    return f"{'x'.join(map(str, shape))} x {copies}"


def bench_copies(config, device, use_compile, notes) -> List[Dict[str, object]]:
    rows = []
    reasons = {"cpp": _build.cpp_unavailable_reason(device),
               "triton": _build.triton_unavailable_reason(device) if device != "cpu" else "CPU"}
    for backend, reason in reasons.items():
        if reason and not (backend == "triton" and device == "cpu"):
            notes.append(f"gaussian_copies: {backend} backend not timed: {reason}")
    for shape, copies in config["cases"]:
        x = torch.rand(shape, device=device)
        out_shape = (shape[0] * copies,) + tuple(shape[1:])
        out = torch.empty(out_shape, device=device)
        out_bytes = out.numel() * out.element_size()
        op_bytes = out_bytes + x.numel() * x.element_size()  # x read once, the output written once
        src, dst = torch.rand(out_shape, device=device), torch.empty(out_shape, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        candidates, compile_s = {}, None
        for backend in ("cpp", "triton"):
            if reasons[backend] is None:
                candidates[backend] = lambda b=backend: robust_fast.gaussian_copies(
                    x, copies, SIGMA, generator=generator, backend=b)
                candidates[f"{backend} (out=)"] = lambda b=backend: robust_fast.gaussian_copies(
                    x, copies, SIGMA, generator=generator, out=out, backend=b)
        candidates["eager expression"] = lambda: eager_copies(x, copies, SIGMA, generator)
        if use_compile:
            torch._dynamo.reset()
            compiled = torch.compile(eager_copies, mode="default", dynamic=False)
            start = time.perf_counter()
            compiled(x, copies, SIGMA)  # compile once, before any timing (inductor's own RNG)
            if device != "cpu":
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            candidates["torch.compile(eager)"] = lambda: compiled(x, copies, SIGMA)
        candidates["torch.randn (output size)"] = lambda: torch.randn(
            out_shape, generator=generator, device=device)
        candidates["copy (output size)"] = lambda: dst.copy_(src)
        candidates["fill (output size)"] = lambda: dst.fill_(1.0)
        stats = harness.compare(candidates, device=device, rounds=config["rounds"],
                                min_run_time=config["min_run_time"], min_runs=config["min_runs"],
                                label=f"gaussian_copies {_label(shape, copies)}")
        eager_ms = stats["eager expression"]["median_ms"]
        compile_ms = stats.get("torch.compile(eager)", {}).get("median_ms")
        copy_ms = stats["copy (output size)"]["median_ms"]
        fill_ms = stats["fill (output size)"]["median_ms"]
        for name, s in stats.items():
            ms = s["median_ms"]
            rows.append({
                "part": "gaussian_copies", "shape": list(shape), "copies": copies, "dtype": "float32",
                "device": device, "impl": name, "sigma": SIGMA, "median_ms": ms, "iqr_ms": s["iqr_ms"],
                "min_ms": s["min_ms"], "samples": s["samples"], "bytes": op_bytes,
                "gbps": op_bytes / (ms * 1e-3) / 1e9,
                "elements_per_ns": out.numel() / (ms * 1e6),
                "vs_eager": harness.ratio(eager_ms, ms), "vs_compile": harness.ratio(compile_ms, ms),
                "fraction_of_copy": harness.ratio(copy_ms, ms), "fraction_of_fill": harness.ratio(fill_ms, ms),
                "compile_s": compile_s if name == "torch.compile(eager)" else None,
            })
        harness.log(f"  gaussian_copies {_label(shape, copies)}: done")
        del src, dst, out
    return rows


# --------------------------------------------------------------------------------------------
# (b) certification throughput

def reference_certify(model, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, batch_size: int,
                      num_classes: int) -> List[int]:
    """Cohen et al.'s CERTIFY as their reference code writes it: one image at a time; per batch
    the image repeated, torch.randn_like noise, the forward, argmax, the counts on the host;
    the class from n0 samples, the Clopper-Pearson bound from n more. Returns the predictions
    (-1 abstain)."""
    from scipy.stats import beta

    def sample_noise(image, num):
        counts = np.zeros(num_classes, dtype=np.int64)
        remaining = num
        for _ in range(math.ceil(num / batch_size)):
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            batch = image.repeat((this_batch, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
        return counts

    model.eval()
    answers = []
    with torch.no_grad():
        for image in x:
            c_hat = int(sample_noise(image, n0).argmax())
            n_a = int(sample_noise(image, n)[c_hat])
            p_lower = beta.ppf(alpha, n_a, n - n_a + 1) if n_a else 0.0
            answers.append(c_hat if p_lower > 0.5 else -1)
    return answers


class TimedForward(nn.Module):
    """The model, with the wall seconds and the process CPU seconds spent in its forward added up
    (CUDA: synchronised around it)."""
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seconds, self.cpu_seconds, self.calls = model, 0.0, 0.0, 0

    def forward(self, x):
        harness._synchronize(x.device.type)
        start, cpu = time.perf_counter(), time.process_time()
        out = self.model(x)
        harness._synchronize(x.device.type)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu
        self.calls += 1
        return out


def _cpu_timed(fn, record: List[float]):
    """fn, with each call's process CPU time appended to record (other processes on a shared
    machine do not move it; with 1 thread it is the call's cost on its core)."""
    def timed():
        start = time.process_time()
        out = fn()
        record.append(time.process_time() - start)
        return out
    return timed


def _certify_inputs(config, device):
    if data.available():
        images, _ = data.load_fashion_mnist("test", limit=config["images"])
        where = "the first Fashion-MNIST test images"
    else:
        images, where = torch.rand(config["images"], 1, 28, 28), "random images (Fashion-MNIST is not installed)"
    torch.manual_seed(0)
    spec = config["model"]
    model = build_model(spec["name"], **spec["kwargs"]).to(device).eval()
    return model, images.to(device), where


def _profiled(fn, model: TimedForward, calls: int) -> Dict[str, float]:
    """`calls` calls of fn: the seconds of one, and the shares of their time in the model's forward
    and in the noise (robust_fast's noisy copies; the reference's repeat, randn_like and add are
    in "rest")."""
    noise = {"seconds": 0.0, "cpu_seconds": 0.0}
    original = smoothing.noisy_copies

    def timed_copies(*args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        out = original(*args, **kwargs)
        harness._synchronize(out.device.type)
        noise["seconds"] += time.perf_counter() - start
        noise["cpu_seconds"] += time.process_time() - cpu
        return out

    model.seconds, model.cpu_seconds, model.calls = 0.0, 0.0, 0
    smoothing.noisy_copies = timed_copies
    try:
        harness._synchronize(next(model.parameters()).device.type)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        harness._synchronize(next(model.parameters()).device.type)
        total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        smoothing.noisy_copies = original
    return {"seconds": total / calls, "cpu_seconds": total_cpu / calls, "forward_fraction": model.seconds / total,
            "noise_fraction": noise["seconds"] / total, "forward_cpu_fraction": model.cpu_seconds / total_cpu,
            "noise_cpu_fraction": noise["cpu_seconds"] / total_cpu, "forward_calls": model.calls // calls}


def bench_certify(config, device, notes) -> List[Dict[str, object]]:
    model, images, where = _certify_inputs(config, device)
    n0, n, alpha, sweep = config["n0"], config["n"], config["alpha"], tuple(config["batch_sizes"])
    passes = images.shape[0] * (n0 + n)
    with torch.inference_mode():
        num_classes = int(model(images[:1]).shape[1])
    notes.append(f"certify: {config['model']['name']}{config['model']['kwargs']} randomly initialised (seed 0), "
                 f"{images.shape[0]} images: {where}; n0 {n0}, n {n}, sigma {SIGMA}")
    ours = lambda batch_size: smoothing.certify(model, images, SIGMA, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                                                generator=torch.Generator().manual_seed(0), progress=False)
    # the auto choice, measured once here (timed), then cached for the calls below
    autobatch.clear_cache()
    start = time.perf_counter()
    chosen = autobatch.choose_batch_size(model, images[0], SIGMA, passes, images.device)
    measure_s = time.perf_counter() - start
    measured = autobatch.cached_choice(model, images.device, images[0])
    candidates = {"robust_fast certify (auto)": lambda: ours("auto")}
    for b in sweep:
        candidates[f"robust_fast certify ({b})"] = lambda b=b: ours(b)
    for b in sweep:
        candidates[f"reference loop ({b})"] = lambda b=b: reference_certify(model, images, SIGMA, n0, n, alpha, b,
                                                                              num_classes)
    cpu_times = {name: [] for name in candidates}
    candidates = {name: _cpu_timed(fn, cpu_times[name]) for name, fn in candidates.items()}
    stats = harness.compare(candidates, device=device, rounds=config["rounds"], min_run_time=0.0, label="certify",
                            min_runs=config["rounds"], warmup_runs=1, warmup_time=0.0)
    cpu_ms = {name: 1e3 * statistics.median(times[1:] or times) for name, times in cpu_times.items()}  # no warm-up
    reference = {b: stats[f"reference loop ({b})"]["median_ms"] for b in sweep}
    best = min(reference, key=reference.get)
    reference_cpu = {b: cpu_ms[f"reference loop ({b})"] for b in sweep}
    best_cpu = min(reference_cpu, key=reference_cpu.get)
    rows = []
    for name, s in stats.items():
        batch = chosen if name.endswith("(auto)") else int(name.rsplit("(", 1)[1].rstrip(")"))
        rows.append({"part": "certify", "impl": name, "batch_size": batch, "auto": name.endswith("(auto)"),
                     "device": device, "images": images.shape[0], "n0": n0, "n": n, "median_ms": s["median_ms"],
                     "iqr_ms": s["iqr_ms"], "min_ms": s["min_ms"], "samples": s["samples"],
                     "forward_passes_per_s": passes / (s["median_ms"] * 1e-3),
                     "vs_reference_best": harness.ratio(reference[best], s["median_ms"]),
                     "reference_best_batch": best, "cpu_median_ms": cpu_ms[name],
                     "cpu_passes_per_s": passes / (cpu_ms[name] * 1e-3),
                     "vs_reference_best_cpu": harness.ratio(reference_cpu[best_cpu], cpu_ms[name]),
                     "reference_best_batch_cpu": best_cpu})
    # the profile: `rounds` calls each, at auto's choice and at the reference loop's best
    timed = TimedForward(model)
    mine = _profiled(lambda: smoothing.certify(timed, images, SIGMA, n0=n0, n=n, alpha=alpha, batch_size=chosen,
                                               generator=torch.Generator().manual_seed(0), progress=False),
                     timed, config["rounds"])
    theirs = _profiled(lambda: reference_certify(timed, images, SIGMA, n0, n, alpha, best, num_classes), timed,
                       config["rounds"])
    for name, batch, p in (("robust_fast certify (auto)", chosen, mine), (f"reference loop ({best})", best, theirs)):
        rows.append({"part": "certify profile", "impl": name, "batch_size": batch, "device": device,
                     "images": images.shape[0], "n0": n0, "n": n, **p,
                     "rest_fraction": 1.0 - p["forward_fraction"] - p["noise_fraction"],
                     "rest_cpu_fraction": 1.0 - p["forward_cpu_fraction"] - p["noise_cpu_fraction"]})
    rows.append({"part": "auto batch size", "impl": "autobatch.choose_batch_size", "device": device,
                 "batch_size": chosen, "measure_s": measure_s,
                 "rows_per_s": {str(k): v for k, v in measured.rows_per_s.items()} if measured else None,
                 "candidates": list(autobatch.needed(images.device, passes))})
    return rows


CERTIFY_COLUMNS = [("impl", "impl", None), ("batch", "batch_size", None), ("median ms", "median_ms", ".1f"),
                   ("iqr ms", "iqr_ms", ".1f"), ("passes/s", "forward_passes_per_s", ".0f"),
                   ("vs reference best", "vs_reference_best", ".2f"), ("cpu ms", "cpu_median_ms", ".1f"),
                   ("cpu passes/s", "cpu_passes_per_s", ".0f"), ("vs best, cpu", "vs_reference_best_cpu", ".2f")]
PROFILE_COLUMNS = [("impl", "impl", None), ("batch", "batch_size", None), ("s", "seconds", ".2f"),
                   ("forward", "forward_fraction", ".3f"), ("noise", "noise_fraction", ".3f"),
                   ("rest", "rest_fraction", ".3f"), ("cpu s", "cpu_seconds", ".2f"),
                   ("forward cpu", "forward_cpu_fraction", ".3f"), ("noise cpu", "noise_cpu_fraction", ".3f"),
                   ("forwards", "forward_calls", None)]


COLUMNS = [("shape", "shape", None), ("copies", "copies", None), ("impl", "impl", None),
           ("median ms", "median_ms", ".3f"), ("iqr ms", "iqr_ms", ".3f"), ("GB/s", "gbps", ".1f"),
           ("elem/ns", "elements_per_ns", ".2f"), ("vs eager", "vs_eager", ".2f"),
           ("vs compile", "vs_compile", ".2f"), ("of copy", "fraction_of_copy", ".2f"),
           ("of fill", "fraction_of_fill", ".2f")]


def _cases(rows):
    cases = []
    for r in rows:
        case = (tuple(r["shape"]), r["copies"])
        if case not in cases:
            cases.append(case)
    return cases


def _copies_panels(rows) -> List[Dict[str, object]]:
    cases = _cases(rows)
    labels = [_label(shape, copies) for shape, copies in cases]

    def value(impl, key):
        found = []
        for shape, copies in cases:
            match = [r for r in rows if r["impl"] == impl and tuple(r["shape"]) == shape and r["copies"] == copies]
            found.append(match[0][key] if match else None)
        return found
    panels = []
    for impl in (i for i in OURS if any(r["impl"] == i for r in rows)):
        panels.append({"title": f"gaussian_copies, {impl}: speed-up (baseline time / {impl} time)",
                       "ylabel": "speed-up", "groups": labels, "reference": 1.0,
                       "series": {"vs eager": value(impl, "vs_eager"),
                                  "vs torch.compile": value(impl, "vs_compile")}})
    names = [n for n in OURS + ("eager expression", "torch.compile(eager)") if any(r["impl"] == n for r in rows)]
    panels.append({"title": "gaussian_copies: fraction of copy bandwidth (copy time / op time)",
                   "ylabel": "fraction", "groups": labels, "reference": 1.0,
                   "series": {n: value(n, "fraction_of_copy") for n in names}})
    return panels


def _certify_panels(rows) -> List[Dict[str, object]]:
    timed = [r for r in rows if r["part"] == "certify"]
    profiles = [r for r in rows if r["part"] == "certify profile"]
    if not timed:
        return []
    auto = [r for r in timed if r["auto"]][0]
    sweep = sorted({r["batch_size"] for r in timed if not r["auto"]})
    groups = [str(b) for b in sweep] + [f"auto ({auto['batch_size']})"]

    def rate(prefix, key):
        by_batch = {r["batch_size"]: r[key] / 1e3 for r in timed if r["impl"].startswith(prefix) and not r["auto"]}
        return [by_batch.get(b) for b in sweep]
    first = timed[0]
    panels = [{"title": f"certify, {first['images']} images, n0 {first['n0']}, n {first['n']}: thousands of noisy "
                        "forward passes per second by batch size (wall time; CPU time of the process)",
               "ylabel": "thousand passes / s", "groups": groups, "reference": None,
               "series": {"robust_fast certify": rate("robust_fast", "forward_passes_per_s")
                          + [auto["forward_passes_per_s"] / 1e3],
                          "reference loop (one image at a time)": rate("reference", "forward_passes_per_s") + [None],
                          "robust_fast certify, CPU time": rate("robust_fast", "cpu_passes_per_s")
                          + [auto["cpu_passes_per_s"] / 1e3],
                          "reference loop, CPU time": rate("reference", "cpu_passes_per_s") + [None]}}]
    if profiles:
        panels.append({"title": "certify: fraction of the time in the model's forward / the noise / the rest",
                       "ylabel": "fraction", "groups": [f"{r['impl']}" for r in profiles], "reference": 0.9,
                       "series": {key: [r[f"{key}_fraction"] for r in profiles] for key in ("forward", "noise", "rest")}})
    return panels


def _panels(rows) -> List[Dict[str, object]]:
    return _copies_panels([r for r in rows if r["part"] == "gaussian_copies"]) + _certify_panels(rows)


def _summary(rows) -> Dict[str, object]:
    summary: Dict[str, object] = {
        f"gaussian_copies {r['impl']} {_label(r['shape'], r['copies'])}":
        {k: r[k] for k in ("median_ms", "gbps", "vs_eager", "vs_compile", "fraction_of_copy", "fraction_of_fill")}
        for r in rows if r["part"] == "gaussian_copies" and r["impl"] in OURS}
    timed = [r for r in rows if r["part"] == "certify"]
    if timed:
        auto = [r for r in timed if r["auto"]][0]
        best = [r for r in timed if r["impl"] == f"reference loop ({auto['reference_best_batch']})"][0]
        profile = {r["impl"]: r for r in rows if r["part"] == "certify profile"}
        measured = [r for r in rows if r["part"] == "auto batch size"][0]
        summary["certify"] = {
            "images": auto["images"], "n0": auto["n0"], "n": auto["n"],
            "auto_batch_size": auto["batch_size"], "auto_measure_s": measured["measure_s"],
            "passes_per_s": auto["forward_passes_per_s"],
            "reference_best_batch_size": best["batch_size"], "reference_best_passes_per_s": best["forward_passes_per_s"],
            "vs_reference_best": auto["vs_reference_best"],
            "best_fixed_batch_size": max((r for r in timed if r["impl"].startswith("robust_fast") and not r["auto"]),
                                         key=lambda r: r["forward_passes_per_s"])["batch_size"],
            "forward_fraction": profile[auto["impl"]]["forward_fraction"],
            "noise_fraction": profile[auto["impl"]]["noise_fraction"],
            "reference_forward_fraction": profile[best["impl"]]["forward_fraction"],
            "cpu_passes_per_s": auto["cpu_passes_per_s"], "vs_reference_best_cpu": auto["vs_reference_best_cpu"],
            "reference_best_batch_size_cpu": auto["reference_best_batch_cpu"],
            "forward_cpu_fraction": profile[auto["impl"]]["forward_cpu_fraction"],
            "noise_cpu_fraction": profile[auto["impl"]]["noise_cpu_fraction"],
            "reference_forward_cpu_fraction": profile[best["impl"]]["forward_cpu_fraction"],
        }
    return summary


def bench(run: harness.Run) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    if "copies" in run.parts:
        harness.log("(a) gaussian_copies: the noisy copies of randomized smoothing")
        start = time.perf_counter()
        copies = bench_copies(run.config, run.device, run.compile, run.notes)
        run.durations["gaussian_copies"] = time.perf_counter() - start
        harness.log(harness.format_table(copies, COLUMNS))
        rows += copies
    if "certify" in run.parts:
        harness.log("(b) certify: noisy forward passes per second against the reference loop")
        start = time.perf_counter()
        certified = bench_certify(run.config["certify"], run.device, run.notes)
        run.durations["certify"] = time.perf_counter() - start
        harness.log(harness.format_table([r for r in certified if r["part"] == "certify"], CERTIFY_COLUMNS))
        harness.log(harness.format_table([r for r in certified if r["part"] == "certify profile"], PROFILE_COLUMNS))
        measured = [r for r in certified if r["part"] == "auto batch size"][0]
        harness.log(f"    batch_size='auto' chose {measured['batch_size']} in {measured['measure_s']:.2f} s "
                    f"(rows/s: {measured['rows_per_s']})")
        rows += certified
    return rows


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """`robust-fast bench smoothing [argv]`: returns the stored payload plus "paths" (json, png)."""
    return harness.run_benchmarks(
        bench, name="smoothing", description=__doc__, argv=argv, full=FULL, quick=QUICK, parts=PARTS,
        quick_help="smoke run: tiny sizes, few repeats (results not for quoting)",
        settings=lambda run: {"dtype": "float32", "sigma": SIGMA, **run.config},
        summary=_summary, panels=_panels, title="robust_fast smoothing benchmark",
        ratio_definition="speed-up = baseline median time / this median time; fraction_of_copy = "
                         "time of a copy of an output-size tensor (reads and writes the output's "
                         "bytes) / this time; fraction_of_fill = time to write the output once / this "
                         "time (the floor for an op that writes its output once); vs_reference_best = "
                         "median time of the one-image-at-a-time reference loop at its best batch size / "
                         "this median time; forward_passes_per_s = images * (n0 + n) / median seconds; the cpu_* "
                         "fields: the same from each call's process CPU time")


if __name__ == "__main__":
    sys.exit(harness.main(run))
