"""Benchmark of the multi-teacher loss (robust_fast.multi_teacher_loss), in one run, as ratios:

forward + backward (the student's gradient, teachers frozen) and forward alone, for
  cosine        (B=256, D=512, K=1, 3, 5)      RRM-like feature matching
  l2_normalized (B=128, D=2048, K=3)           RRM's ImageNet setting
  kl            (B=512, C=100, K=4)            DARHT: the student map's K slices vs K teachers
  cosine        (B=1024, D=2048, K=3)          memory-bound
each usable backend (cpp; Triton on CUDA only; teachers as one (K, B, D) tensor, and for cpp
also as K separately allocated tensors, which the op stacks into one copy) against the eager loop as research code writes it
(a Python loop over teachers of F.cosine_similarity / norms / F.kl_div), torch.compile of that
loop, and the machine's memory limit (a copy moving the bytes the op must read and write).
Forward + backward rows also time the C++ op called alone (torch.ops, no autograd: the
kernel's share of the time) and the copy followed by an unrelated 4-element autograd.grad
(what the autograd engine adds to a memory-bound step), and count minor page faults per call.
A case whose forward + backward bytes exceed the CPU's last-level cache is timed with cold caches (flushed before
every call, untimed), so that neither the op nor the copy is served from the cache by the call
before it.

    robust-fast bench loss [--quick] [--device cpu|cuda] [--out DIR | --save-reference]
                           [--no-compile] [--threads N]

Results: multi_teacher_loss.json + .png (_cuda, _quick suffixes as for pgd), where harness.py says.
Speed-ups are "baseline median / this median" (> 1: this is faster).
"""
from __future__ import annotations

import math
try:
    import resource  # Unix: minor page faults per call
except ImportError:  # pragma: no cover
    resource = None
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import robust_fast
from robust_fast import _build
from robust_fast.benchmarks import harness

# (kind, batch, dim, teachers, student sliced per teacher)
CASES = [
    ("cosine", 256, 512, 1, False),
    ("cosine", 256, 512, 3, False),
    ("cosine", 256, 512, 5, False),
    ("l2_normalized", 128, 2048, 3, False),
    ("kl", 512, 100, 4, True),
    ("cosine", 1024, 2048, 3, False),
]
FULL = {"cases": CASES, "rounds": 3, "min_run_time": 1.0, "min_runs": 15}
QUICK = {"cases": [("cosine", 16, 32, 3, False), ("kl", 16, 10, 2, True)],
         "rounds": 1, "min_run_time": 0.02, "min_runs": 3}
MODES = ("forward+backward", "forward")
OP_DIRECT = "cpp op alone (no autograd)"
COPY_AND_AUTOGRAD = "copy + a 4-element autograd.grad"


# --------------------------------------------------------------------------------------------
# the loop research code writes

def eager_loop(kind: str):
    """One teacher at a time, the way RRM / DARHT / LwF code computes the term."""
    def cosine(student, teachers):
        loss = 0.0
        for t in teachers:
            loss = loss + (1 - F.cosine_similarity(student, t, dim=1)).mean()
        return loss

    def l2_normalized(student, teachers):
        loss = 0.0
        for t in teachers:
            loss = loss + (torch.norm(student - t, p=2, dim=1) / torch.norm(t, p=2, dim=1)).mean()
        return loss

    def kl(student, teachers):  # student (B, K, C): slice k imitates teacher k (T = 1)
        loss = 0.0
        for k, t in enumerate(teachers):
            loss = loss + F.kl_div(F.log_softmax(student[:, k], dim=1), F.softmax(t, dim=1),
                                   reduction="batchmean")
        return loss
    return {"cosine": cosine, "l2_normalized": l2_normalized, "kl": kl}[kind]


def _inputs(kind, batch, dim, count, sliced, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = 3.0 if kind == "kl" else 1.0
    student = (torch.randn((batch, count, dim) if sliced else (batch, dim), generator=g) * scale).to(device)
    # One (K, B, D) tensor (iterating it gives the loop its K teacher views), and the same values
    # as K separately allocated tensors, as K teacher models return them.
    stacked = (torch.randn(count, batch, dim, generator=g) * scale).to(device)
    separate = [t.clone() for t in stacked]
    return student.requires_grad_(), stacked, separate


def minor_faults_per_call(candidates: Dict[str, object], rounds: int = 10) -> Dict[str, Optional[float]]:
    """Minor page faults per call of each candidate, called in turn as the timing rounds call
    them: pages the allocator maps afresh and the kernel zeroes. A large output freed and
    allocated again faults when the C allocator handed its pages back to the system in between
    (glibc trims the top of its heap, depending on what else was allocated); that time is in
    the medians, so the JSON shows the faults beside them."""
    if resource is None:
        return {name: None for name in candidates}
    counts = {name: 0 for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            counts[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {name: count / rounds for name, count in counts.items()}


def bench_case(case, config, device, use_compile) -> List[Dict[str, object]]:
    kind, batch, dim, count, sliced = case
    student, teachers, separate = _inputs(kind, batch, dim, count, sliced, device)
    loop = eager_loop(kind)
    compiled = None
    compile_s = None
    if use_compile:
        torch._dynamo.reset()
        compiled = torch.compile(loop, mode="default", dynamic=False)
        start = time.perf_counter()
        torch.autograd.grad(compiled(student, teachers), student)
        with torch.no_grad():
            compiled(student, teachers)
        if device != "cpu":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
    backends = []
    if _build.cpp_unavailable_reason(device) is None:
        backends.append("cpp")
    if device != "cpu" and _build.triton_unavailable_reason(device) is None:
        backends.append("triton")

    def ours(backend):
        return lambda s, ts: robust_fast.multi_teacher_loss(s, ts, kind=kind, backend=backend)

    impls = {b: ours(b) for b in backends}
    if "cpp" in backends:  # a list of separate tensors is stacked into one (K, B, D) copy first
        impls["cpp (list of K tensors)"] = lambda s, ts: ours("cpp")(s, separate)
    impls["eager loop"] = loop
    if compiled is not None:
        impls["torch.compile(eager loop)"] = compiled

    elem = 4
    student_bytes = student.numel() * elem
    read_bytes = student_bytes + count * batch * dim * elem
    case_bytes = read_bytes + student_bytes  # forward + backward: the rows read, the gradient written
    rows = []
    for mode in MODES:
        op_bytes = read_bytes + (student_bytes if mode == "forward+backward" else 0)
        src = torch.empty(max(1, op_bytes // (2 * elem)), device=device).uniform_()
        dst = torch.empty_like(src)
        candidates = {}
        for name, fn in impls.items():
            if mode == "forward+backward":
                candidates[name] = (lambda fn=fn: torch.autograd.grad(fn(student, teachers), student)[0])
            else:
                def forward_only(fn=fn):
                    with torch.no_grad():
                        return fn(student, teachers)
                candidates[name] = forward_only
        if mode == "forward+backward" and "cpp" in backends and not sliced:
            # The kernel's share: the op called directly (loss and gradient in one call, no
            # autograd, no Python wrapper); the difference to "cpp" is per-call overhead.
            candidates[OP_DIRECT] = lambda: torch.ops.robust_fast.multi_teacher_loss(
                student.detach(), teachers, None, kind, 1.0, "mean", True, False)[2]
        candidates["copy (same bytes)"] = lambda: dst.copy_(src)
        if mode == "forward+backward":
            # What torch's autograd engine costs a memory-bound step by itself: the copy, then a
            # backward pass through a 4-element graph that shares nothing with it.
            tiny = torch.zeros(4, device=device, requires_grad=True)
            candidates[COPY_AND_AUTOGRAD] = lambda: (dst.copy_(src), torch.autograd.grad((tiny * 2).sum(), tiny))
        # Every implementation must agree with the eager loop before its time means anything.
        expected = candidates["eager loop"]()
        max_diff = {}
        for name, fn in candidates.items():
            if not name.startswith("copy"):
                max_diff[name] = float((fn() - expected).abs().max())
        # A working set larger than the last-level cache is what memory bandwidth is about:
        # every call of such a case starts with cold caches, so that none is served from the
        # cache by the call before it (a copy run back to back is, in part). The case decides,
        # not the mode: its forward alone moves less (here exactly the cache's size), and timed
        # warm its copy would be partly served from the cache.
        cold = device == "cpu" and case_bytes > (harness.last_level_cache_bytes() or math.inf)
        stats = harness.compare(candidates, device=device, rounds=config["rounds"],
                                min_run_time=config["min_run_time"], min_runs=config["min_runs"],
                                cold_cache=cold, label=f"{kind} B={batch} D={dim} x{count} ({mode})")
        faults = minor_faults_per_call(candidates) if device == "cpu" else {}
        eager_ms = stats["eager loop"]["median_ms"]
        compile_ms = stats.get("torch.compile(eager loop)", {}).get("median_ms")
        copy_ms = stats["copy (same bytes)"]["median_ms"]
        for name, s in stats.items():
            ms = s["median_ms"]
            rows.append({
                "part": "multi_teacher_loss", "kind": kind, "batch": batch, "dim": dim, "teachers": count,
                "student": "(B, K, D)" if sliced else "(B, D)", "mode": mode, "dtype": "float32",
                "device": device, "impl": name, "median_ms": ms, "iqr_ms": s["iqr_ms"],
                "min_ms": s["min_ms"], "samples": s["samples"], "bytes": op_bytes,
                "gbps": op_bytes / (ms * 1e-3) / 1e9,
                "vs_eager": harness.ratio(eager_ms, ms), "vs_compile": harness.ratio(compile_ms, ms),
                "fraction_of_copy": harness.ratio(copy_ms, ms),
                "max_abs_diff_vs_eager": max_diff.get(name),
                "page_faults_per_call": faults.get(name), "cold_cache": cold,
                "compile_s": compile_s if name.startswith("torch.compile") else None,
            })
        del src, dst
    harness.log(f"  {kind} B={batch} D={dim} K={count}: done")
    return rows


def _label(r) -> str:
    return f"{r['kind']} {r['batch']}x{r['dim']} K={r['teachers']}"


def _panels(rows) -> List[Dict[str, object]]:
    panels = []
    for mode in MODES:
        mode_rows = [r for r in rows if r["mode"] == mode]
        labels = []
        for r in mode_rows:
            if _label(r) not in labels:
                labels.append(_label(r))

        def value(impl, key):
            out = []
            for label in labels:
                match = [r for r in mode_rows if r["impl"] == impl and _label(r) == label]
                out.append(match[0][key] if match else None)
            return out
        for impl in [i for i in ("cpp", "triton") if any(r["impl"] == i for r in mode_rows)]:
            panels.append({"title": f"multi_teacher_loss {mode}, {impl}: speed-up (baseline time / {impl} time)",
                           "ylabel": "speed-up", "groups": labels, "reference": 1.0,
                           "series": {"vs eager loop": value(impl, "vs_eager"),
                                      "vs torch.compile(loop)": value(impl, "vs_compile"),
                                      "fraction of copy bandwidth": value(impl, "fraction_of_copy")}})
    return panels


def _summary(rows) -> Dict[str, object]:
    out = {}
    for r in rows:
        if r["impl"] in ("cpp", "triton"):
            out[f"{r['impl']} {r['mode']} {_label(r)}"] = {
                k: r[k] for k in ("median_ms", "gbps", "vs_eager", "vs_compile", "fraction_of_copy")}
    return out


COLUMNS = [("case", "case", None), ("mode", "mode", None), ("impl", "impl", None),
           ("median ms", "median_ms", ".3f"), ("iqr ms", "iqr_ms", ".3f"), ("GB/s", "gbps", ".1f"),
           ("vs eager", "vs_eager", ".2f"), ("vs compile", "vs_compile", ".2f"),
           ("of copy", "fraction_of_copy", ".2f"), ("faults/call", "page_faults_per_call", ".0f"),
           ("max|diff|", "max_abs_diff_vs_eager", ".1e")]


def bench(run: harness.Run) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    for case in run.config["cases"]:
        rows += bench_case(case, run.config, run.device, run.compile)
    for r in rows:
        r["case"] = _label(r)
    return rows


def _settings(run: harness.Run) -> Dict[str, object]:
    cases = [dict(zip(("kind", "batch", "dim", "teachers", "sliced_student"), c)) for c in run.config["cases"]]
    return {"dtype": "float32", "cases": cases, **{k: v for k, v in run.config.items() if k != "cases"}}


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """`robust-fast bench loss [argv]`: returns the stored payload plus "paths" (json, png)."""
    return harness.run_benchmarks(
        bench, name="multi_teacher_loss", description=__doc__, argv=argv, full=FULL, quick=QUICK,
        settings=_settings, summary=_summary, panels=_panels, columns=COLUMNS,
        title="robust_fast multi_teacher_loss",
        ratio_definition="speed-up = baseline median time / this median time; "
                         "fraction_of_copy = time of a copy moving the op's bytes (reads of the "
                         "student and K teachers, plus the student gradient's write in "
                         "forward+backward) / this time")


if __name__ == "__main__":
    sys.exit(harness.main(run))
