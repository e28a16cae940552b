"""Benchmark of randomized smoothing's hot path, the noisy copies, in one run, as ratios:

robust_fast.gaussian_copies (each usable backend; cpp also into a preallocated out=, as
certification calls it; Triton on CUDA only) at (1,1,28,28) x 10,000 copies, (1,3,32,32) x 1,000
and (64,1,28,28) x 16, fp32, against the eager expression x.repeat_interleave(copies, 0) +
sigma * torch.randn(...), torch.compile of that expression, and the machine's limits for the same
output bytes: a copy (reads and writes the output's size) and a fill (writes it once, as the op
does). torch.randn of the output's size alone shows what the eager expression's generator costs.

    robust-fast bench smoothing [--quick] [--device cpu|cuda] [--out DIR | --save-reference]
                                [--no-compile] [--threads N]

Results: smoothing.json + smoothing.png (smoothing_cuda.* on CUDA, smoothing_quick.* with
--quick) in --out DIR, by default benchmarks/results/local/ (see harness.py).
Speed-ups are "baseline median / this median" (> 1: this is faster).
"""
from __future__ import annotations

import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

import robust_fast
from robust_fast import _build
from robust_fast.benchmarks import harness

SIGMA = 0.25
CASES = [((1, 1, 28, 28), 10_000), ((1, 3, 32, 32), 1_000), ((64, 1, 28, 28), 16)]
FULL = {"cases": CASES, "rounds": 3, "min_run_time": 1.0, "min_runs": 9}
QUICK = {"cases": [((1, 1, 8, 8), 50), ((4, 1, 8, 8), 4)], "rounds": 1, "min_run_time": 0.02, "min_runs": 3}
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
                                min_run_time=config["min_run_time"], min_runs=config["min_runs"])
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


def _panels(rows) -> List[Dict[str, object]]:
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


def _summary(rows) -> Dict[str, object]:
    return {f"gaussian_copies {r['impl']} {_label(r['shape'], r['copies'])}":
            {k: r[k] for k in ("median_ms", "gbps", "vs_eager", "vs_compile", "fraction_of_copy", "fraction_of_fill")}
            for r in rows if r["impl"] in OURS}


def bench(run: harness.Run) -> List[Dict[str, object]]:
    harness.log("gaussian_copies: the noisy copies of randomized smoothing")
    start = time.perf_counter()
    rows = bench_copies(run.config, run.device, run.compile, run.notes)
    run.durations["gaussian_copies"] = time.perf_counter() - start
    harness.log(harness.format_table(rows, COLUMNS))
    return rows


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """`robust-fast bench smoothing [argv]`: returns the stored payload plus "paths" (json, png)."""
    return harness.run_benchmarks(
        bench, name="smoothing", description=__doc__, argv=argv, full=FULL, quick=QUICK,
        quick_help="smoke run: tiny sizes, few repeats (results not for quoting)",
        settings=lambda run: {"dtype": "float32", "sigma": SIGMA, **run.config},
        summary=_summary, panels=_panels, title="robust_fast smoothing benchmark",
        ratio_definition="speed-up = baseline median time / this median time; fraction_of_copy = "
                         "time of a copy of an output-size tensor (reads and writes the output's "
                         "bytes) / this time; fraction_of_fill = time to write the output once / this "
                         "time (the floor for an op that writes its output once)")


if __name__ == "__main__":
    sys.exit(harness.main(run))
