"""Benchmark of interval bound propagation (robust_fast.certify.interval_bounds), in one run, as
ratios:

interval_bounds of three networks at batch 128:
  small   the IBP paper's small CNN (Gowal et al. 2018) on Fashion-MNIST: conv 16 4x4/2, conv 32
          4x4/1, FC 100, FC 10
  medium  its medium CNN: conv 32 3x3/1, conv 32 4x4/2, conv 64 3x3/1, conv 64 4x4/2, FC 512,
          FC 512, FC 10
  cifar   a CIFAR-sized CNN (3x32x32; conv-relu-conv-relu-flatten-linear-relu-linear: this
          library's SmallCNN(in_channels=3, input_size=32))
without gradients and with the backward pass of a loss on the bounds (to the parameters),
against the eager reference (interval arithmetic written plainly in lower/upper form, two
products per layer, |W| recomputed each call), torch.compile of it, and the machine's limit (two
plain forward passes of the same network; one forward pass is timed too). Then E = 4 radii in one
call against 4 calls. On CPU each candidate's time inside the vendor's products (convolutions and
matrix products, from torch's profiler) is recorded too, and with it the speed-up over the eager
reference that removing everything else would give.

    robust-fast bench ibp [--quick] [--device cpu|cuda] [--networks small medium cifar]
                          [--out DIR | --save-reference] [--no-compile] [--threads N]

Results: ibp.json + .png (_cuda, _quick suffixes as for pgd), where harness.py says.
Speed-ups are "baseline median / this median" (> 1: this is faster).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_fast import _build
from robust_fast.benchmarks import harness
from robust_fast.certify import interval_bounds
from robust_fast.models import SmallCNN


def ibp_small(in_channels=1, size=28, classes=10) -> nn.Sequential:
    side = ((size - 4) // 2 + 1) - 3
    return nn.Sequential(nn.Conv2d(in_channels, 16, 4, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * side * side, 100), nn.ReLU(), nn.Linear(100, classes))


def ibp_medium(in_channels=1, size=28, classes=10) -> nn.Sequential:
    side = size - 2
    side = (side - 4) // 2 + 1
    side = side - 2
    side = (side - 4) // 2 + 1
    return nn.Sequential(nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 4, stride=2), nn.ReLU(),
                         nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 4, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * side * side, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, classes))


NETWORKS = {
    "small": (lambda: ibp_small(), (1, 28, 28), 0.1),
    "medium": (lambda: ibp_medium(), (1, 28, 28), 0.1),
    "cifar": (lambda: SmallCNN(in_channels=3, input_size=32), (3, 32, 32), 8 / 255),
}
FULL = {"networks": ["small", "medium", "cifar"], "batch": 128, "rounds": 3, "min_run_time": 1.5, "min_runs": 15}
QUICK = {"networks": ["small"], "batch": 8, "rounds": 1, "min_run_time": 0.02, "min_runs": 3}
EPS_BATCH = 4


# --------------------------------------------------------------------------------------------
# the eager reference: interval arithmetic as research code writes it

def eager_interval_bounds(model: nn.Sequential, x: torch.Tensor, eps: float):
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            mid, rad = (upper + lower) / 2, (upper - lower) / 2
            if isinstance(layer, nn.Linear):
                mid = F.linear(mid, layer.weight, layer.bias)
                rad = F.linear(rad, layer.weight.abs())
            else:
                mid = F.conv2d(mid, layer.weight, layer.bias, layer.stride, layer.padding)
                rad = F.conv2d(rad, layer.weight.abs(), None, layer.stride, layer.padding)
            lower, upper = mid - rad, mid + rad
        elif isinstance(layer, nn.ReLU):
            lower, upper = F.relu(lower), F.relu(upper)
        elif isinstance(layer, nn.Flatten):
            lower, upper = lower.flatten(1), upper.flatten(1)
        else:
            raise TypeError(type(layer).__name__)
    return lower, upper


def bound_loss(lower, upper):
    # Any scalar of both bounds; the IBP loss's cross-entropy of the margins costs the same.
    return upper.sum() - lower.sum()


# The vendor's products (convolutions, matrix products and their backward passes), by the names
# torch's profiler gives their CPU kernels.
PRODUCT_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::mkldnn_convolution_backward",
               "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::mm", "aten::addmm",
               "aten::bmm", "aten::baddbmm")


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's backend writes a line to the process's stderr at each start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def products_ms(fn, calls: int = 3) -> Optional[float]:
    """Milliseconds per call spent inside the vendor's products (self time of PRODUCT_OPS in
    torch's profiler): what no fusion around them can take away."""
    fn()
    with _stderr_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in PRODUCT_OPS)
    return total_us / 1e3 / calls


def bench_network(name, config, device, use_compile) -> List[Dict[str, object]]:
    make, shape, eps = NETWORKS[name]
    torch.manual_seed(0)
    model = make().to(device).eval()
    params = [p for p in model.parameters()]
    batch = config["batch"]
    x = torch.rand((batch,) + shape, device=device)
    compiled = None
    compile_s = None
    if use_compile:
        torch._dynamo.reset()
        compiled = torch.compile(eager_interval_bounds, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(model, x, eps)
        torch.autograd.grad(bound_loss(*compiled(model, x, eps)), params)
        compile_s = time.perf_counter() - start
    backends = []
    if _build.cpp_unavailable_reason(device) is None:
        backends.append("cpp")
    if device != "cpu" and _build.triton_unavailable_reason(device) is None:
        backends.append("triton")
    impls = {f"interval_bounds ({b})": (lambda b=b: (lambda m, x_, e: interval_bounds(m, x_, e, backend=b)))()
             for b in backends}
    impls["eager reference"] = eager_interval_bounds
    if compiled is not None:
        impls["torch.compile(eager reference)"] = compiled

    rows = []
    for mode in ("no grad", "with backward"):
        candidates = {}
        for impl, fn in impls.items():
            if mode == "no grad":
                def run_no_grad(fn=fn):
                    with torch.no_grad():
                        return fn(model, x, eps)
                candidates[impl] = run_no_grad
            else:
                candidates[impl] = lambda fn=fn: torch.autograd.grad(bound_loss(*fn(model, x, eps)), params)
        if mode == "no grad":
            def two_forward():
                with torch.no_grad():
                    model(x)
                    return model(x)

            def one_forward():
                with torch.no_grad():
                    return model(x)
            candidates["limit: two forward passes"] = two_forward
            candidates["one forward pass"] = one_forward
        else:
            candidates["limit: two forward + backward passes"] = lambda: [
                torch.autograd.grad(model(x).sum(), params) for _ in range(2)]
        # Every implementation must agree with the eager reference before its time means anything.
        with torch.no_grad():
            expected = eager_interval_bounds(model, x, eps)
            max_diff = {}
            for impl, fn in impls.items():
                got = fn(model, x, eps)
                max_diff[impl] = max(float((g - e).abs().max()) for g, e in zip(got, expected))
        stats = harness.compare(candidates, device=device, rounds=config["rounds"],
                                min_run_time=config["min_run_time"], min_runs=config["min_runs"],
                                label=f"interval_bounds {name} ({mode})")
        in_products = {impl: products_ms(fn) for impl, fn in candidates.items()} if device == "cpu" else {}
        eager_ms = stats["eager reference"]["median_ms"]
        compile_ms = stats.get("torch.compile(eager reference)", {}).get("median_ms")
        forward_ms = stats.get("one forward pass", {}).get("median_ms")
        limit_key = "limit: two forward passes" if mode == "no grad" else "limit: two forward + backward passes"
        limit_ms = stats[limit_key]["median_ms"]
        for impl, s in stats.items():
            ms = s["median_ms"]
            rows.append({
                "part": "interval_bounds", "network": name, "batch": batch, "eps": eps, "mode": mode,
                "device": device, "impl": impl, "median_ms": ms, "iqr_ms": s["iqr_ms"], "min_ms": s["min_ms"],
                "samples": s["samples"], "vs_eager": harness.ratio(eager_ms, ms),
                "vs_compile": harness.ratio(compile_ms, ms),
                "times_one_forward": None if forward_ms is None else ms / forward_ms,
                "vs_limit": harness.ratio(limit_ms, ms),
                "products_ms": in_products.get(impl),
                # The speed-up over the eager reference if everything but the products took no time.
                "vs_eager_bound": harness.ratio(eager_ms, in_products.get(impl)),
                "max_abs_diff_vs_eager": max_diff.get(impl),
                "compile_s": compile_s if impl.startswith("torch.compile") else None,
            })
    # E radii in one call against E calls.
    radii = [eps * (i + 1) / EPS_BATCH for i in range(EPS_BATCH)]
    for backend in backends:
        def batched(backend=backend):
            with torch.no_grad():
                return interval_bounds(model, x, radii, backend=backend)

        def separate(backend=backend):
            with torch.no_grad():
                return [interval_bounds(model, x, e, backend=backend) for e in radii]
        stats = harness.compare({"E=4 in one call": batched, "4 calls": separate}, device=device,
                                rounds=config["rounds"], min_run_time=config["min_run_time"],
                                min_runs=config["min_runs"], label=f"{name}: E={EPS_BATCH} radii ({backend})")
        calls_ms = stats["4 calls"]["median_ms"]
        for impl, s in stats.items():
            rows.append({"part": "E radii", "network": name, "batch": batch, "eps": radii, "mode": "no grad",
                         "device": device, "impl": f"{impl} ({backend})", "median_ms": s["median_ms"],
                         "iqr_ms": s["iqr_ms"], "min_ms": s["min_ms"], "samples": s["samples"],
                         "vs_separate_calls": harness.ratio(calls_ms, s["median_ms"])})
    harness.log(f"  {name}: done")
    return rows


def _panels(rows) -> List[Dict[str, object]]:
    panels = []
    ours = sorted({r["impl"] for r in rows if r["part"] == "interval_bounds" and r["impl"].startswith("interval_bounds")})
    for mode in ("no grad", "with backward"):
        for impl in ours:
            mode_rows = [r for r in rows if r["part"] == "interval_bounds" and r["mode"] == mode and r["impl"] == impl]
            groups = [r["network"] for r in mode_rows]
            panels.append({"title": f"{impl}, {mode}: speed-up (baseline time / our time)", "ylabel": "speed-up",
                           "groups": groups, "reference": 1.0,
                           "series": {"vs eager reference": [r["vs_eager"] for r in mode_rows],
                                      "vs torch.compile(reference)": [r["vs_compile"] for r in mode_rows],
                                      "vs limit (two plain passes)": [r["vs_limit"] for r in mode_rows]}})
    e_rows = [r for r in rows if r["part"] == "E radii" and r["impl"].startswith("E=4")]
    if e_rows:
        panels.append({"title": "E=4 radii in one call: speed-up over 4 calls", "ylabel": "speed-up",
                       "groups": [f"{r['network']} {r['impl']}" for r in e_rows], "reference": 1.0,
                       "series": {"vs 4 calls": [r["vs_separate_calls"] for r in e_rows]}})
    return panels


def _summary(rows) -> Dict[str, object]:
    out = {}
    for r in rows:
        if r["impl"].startswith("interval_bounds") or r["impl"].startswith("E=4"):
            keys = ("median_ms", "vs_eager", "vs_compile", "times_one_forward", "vs_limit", "products_ms",
                    "vs_eager_bound", "vs_separate_calls")
            out[f"{r['network']} {r['mode']} {r['impl']}"] = {k: r.get(k) for k in keys if k in r}
    return out


COLUMNS = [("network", "network", None), ("mode", "mode", None), ("impl", "impl", None),
           ("median ms", "median_ms", ".3f"), ("iqr ms", "iqr_ms", ".3f"), ("vs eager", "vs_eager", ".2f"),
           ("vs compile", "vs_compile", ".2f"), ("x forward", "times_one_forward", ".2f"),
           ("vs limit", "vs_limit", ".2f"), ("products ms", "products_ms", ".2f"),
           ("vs eager bound", "vs_eager_bound", ".2f"), ("vs 4 calls", "vs_separate_calls", ".2f"),
           ("max|diff|", "max_abs_diff_vs_eager", ".1e")]


def bench(run: harness.Run) -> List[Dict[str, object]]:
    if run.args.networks:
        run.config["networks"] = list(run.args.networks)
    rows: List[Dict[str, object]] = []
    for network in run.config["networks"]:
        rows += bench_network(network, run.config, run.device, run.compile)
    return rows


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """`robust-fast bench ibp [argv]`: returns the stored payload plus "paths" (json, png)."""
    return harness.run_benchmarks(
        bench, name="ibp", description=__doc__, argv=argv, full=FULL, quick=QUICK,
        add_arguments=lambda parser: parser.add_argument("--networks", nargs="*", choices=sorted(NETWORKS),
                                                         default=None),
        settings=lambda run: {"dtype": "float32", **run.config}, summary=_summary, panels=_panels,
        columns=COLUMNS, title="robust_fast interval_bounds",
        ratio_definition="speed-up = baseline median time / this median time; times_one_forward = "
                         "this time / one plain forward pass; vs_limit = two plain passes' time / "
                         "this time (1.0 would reach the limit)")


if __name__ == "__main__":
    sys.exit(harness.main(run))
