"""Benchmark of APGD, APGD-T and AutoAttack-style evaluation, in one run:

(a) apgd_step at (256, 1, 28, 28), L-inf and L2, in place (as the attack calls it): the C++
    kernel against the eager reference.
(b) On a SmallCNN adversarially trained on Fashion-MNIST (eps 0.1; the model of bench_pgd,
    cached under ~/.cache/robust_fast/models), 256 test images, 50 steps:
    robust_fast.attacks.apgd (CE) against torchattacks.APGD, and robust_fast.attacks.apgdt
    against torchattacks.APGDT (9 target classes), timed in interleaved rounds, with each
    one's robust accuracy, the images the model saw (sample-steps: where the time goes) and
    PGD-20's robust accuracy on the same images. Besides the wall-clock medians, the process's
    CPU time per call: on a machine shared with other work it is the figure the neighbours
    do not move.
(c) auto_attack (APGD-CE, APGD-T, Square) of 1000 test images: its time, each attack's time
    and how many samples each fooled.

    robust-fast bench apgd [--quick] [--parts step,attacks,auto] [--threads N]
                           [--out DIR | --save-reference]

Results: apgd.json + apgd.png (apgd_quick.* with --quick) in --out DIR, by default
benchmarks/results/local/ (ignored by git; see harness.py); --save-reference writes the
committed benchmarks/results/ of a source checkout, on a quiet machine only. Speed-ups are
"baseline median / this median" (> 1: this is faster).
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

import robust_fast
from robust_fast import _build, attacks, data
from robust_fast.benchmarks import harness
from robust_fast.benchmarks.bench_pgd import trained_model
from robust_fast.reference.apgd import apgd_step_reference

torchattacks, TORCHATTACKS_ERROR = harness.optional_import("torchattacks")

# The model of bench_pgd's early-stop evaluation (the same cache entry).
MODEL = {"n_train": 20000, "epochs": 3, "eps": 0.1, "alpha": 0.025, "steps": 7,
         "batch_size": 128, "lr": 1e-3, "seed": 0}
FULL = {
    "step": {"shape": (256, 1, 28, 28), "rounds": 3, "min_run_time": 1.0, "min_runs": 9},
    "train": MODEL,
    "attacks": {"n_images": 256, "eps": 0.1, "steps": 50, "seed": 0, "pgd_alpha": 0.025, "pgd_steps": 20},
    "attack_timing": {"rounds": 3, "min_run_time": 0.0, "min_runs": 3, "warmup_runs": 1, "warmup_time": 0.0},
    "auto": {"n_images": 1000, "eps": 0.1, "steps": 100, "n_target_classes": 9, "n_queries": 5000,
             "batch_size": 500, "seed": 0},
}
QUICK = {  # a smoke run: every code path, tiny sizes
    "step": {"shape": (8, 1, 28, 28), "rounds": 1, "min_run_time": 0.02, "min_runs": 3},
    "train": {"n_train": 256, "epochs": 1, "eps": 0.1, "alpha": 0.025, "steps": 2,
              "batch_size": 128, "lr": 1e-3, "seed": 0},
    "attacks": {"n_images": 16, "eps": 0.1, "steps": 5, "seed": 0, "pgd_alpha": 0.025, "pgd_steps": 5},
    "attack_timing": {"rounds": 1, "min_run_time": 0.0, "min_runs": 1, "warmup_runs": 1, "warmup_time": 0.0},
    "auto": {"n_images": 16, "eps": 0.1, "steps": 5, "n_target_classes": 2, "n_queries": 20,
             "batch_size": 8, "seed": 0},
}
PARTS = ("step", "attacks", "auto")


# --------------------------------------------------------------------------------------------
# (a) the step

def bench_step(config, notes) -> List[Dict[str, object]]:
    shape = tuple(config["shape"])
    g = torch.Generator().manual_seed(0)
    x_nat = torch.rand(shape, generator=g)
    x = (x_nat + (torch.rand(shape, generator=g) * 2 - 1) * 0.1).clamp(0, 1)
    x_prev = (x_nat + (torch.rand(shape, generator=g) * 2 - 1) * 0.1).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    eta = torch.full((shape[0],), 0.05, dtype=torch.float64)
    rows = []
    for norm, eps in (("linf", 0.1), ("l2", 1.5)):
        work, prev = x.clone(), x_prev.clone()
        candidates = {"eager reference": lambda: apgd_step_reference(
            x, x_prev, grad, x_nat, eta=eta, eps=eps, momentum=0.75, norm=norm, clip_min=0.0, clip_max=1.0)}
        reason = _build.cpp_unavailable_reason("cpu")
        if reason is None:
            # In place, as the attack calls it: x and x_prev keep moving within the ball.
            candidates["cpp (in place)"] = lambda: robust_fast.apgd_step(
                work, prev, grad, x_nat, eta=eta, eps=eps, norm=norm, in_place=True, backend="cpp")
        else:
            notes.append(f"apgd_step: cpp backend not timed: {reason}")
        stats = harness.compare(candidates, rounds=config["rounds"], min_run_time=config["min_run_time"],
                                min_runs=config["min_runs"], label=f"apgd_step {norm}")
        eager_ms = stats["eager reference"]["median_ms"]
        for name, s in stats.items():
            rows.append({"part": "apgd_step", "impl": name, "norm": norm, "shape": list(shape),
                         "median_ms": s["median_ms"], "iqr_ms": s["iqr_ms"], "samples": s["samples"],
                         "vs_eager": harness.ratio(eager_ms, s["median_ms"])})
    return rows


# --------------------------------------------------------------------------------------------
# (b) the attacks

class ImageCounter:
    """Counts the images the model sees, while switched on (a forward pre-hook)."""

    def __init__(self, model):
        self.images, self.on = 0, False
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        if self.on:
            self.images += inputs[0].shape[0]


def _counted(counter: ImageCounter, seen: Dict[str, int], cpu_s: Dict[str, List[float]], name: str, fn):
    """fn, counting the images of its first call only (the untimed warm-up that gives the
    result), and recording the CPU time of every later call in cpu_s[name]."""
    def run():
        first = name not in seen
        counter.on, counter.images = first, 0
        start = time.process_time()
        try:
            return fn()
        finally:
            if first:
                seen[name] = counter.images
            else:
                cpu_s.setdefault(name, []).append(time.process_time() - start)
            counter.on = False
    return run


def bench_attacks(config, notes, durations) -> List[Dict[str, object]]:
    if not data.available():
        notes.append(f"attacks: skipped, Fashion-MNIST not found in {data.data_root()} "
                     f"(apt-get install {data.PACKAGE}); a model trained on random data says nothing")
        return []
    start = time.perf_counter()
    model, info = trained_model(config["train"], "cpu")
    model.eval()
    durations["train_or_load"] = time.perf_counter() - start
    settings = config["attacks"]
    x, y = data.load_fashion_mnist("test", limit=settings["n_images"])
    eps, steps, seed = settings["eps"], settings["steps"], settings["seed"]

    def robust_accuracy(x_adv) -> float:
        with torch.no_grad():
            return float((model(x_adv).argmax(1) == y).float().mean())

    counter, seen = ImageCounter(model), {}
    candidates = {
        "robust_fast apgd (CE)": lambda: robust_accuracy(attacks.apgd(
            model, x, y, eps=eps, steps=steps, loss="ce", generator=torch.Generator().manual_seed(seed))),
        "robust_fast apgdt": lambda: robust_accuracy(attacks.apgdt(
            model, x, y, eps=eps, steps=steps, n_target_classes=9, generator=torch.Generator().manual_seed(seed))),
    }
    if torchattacks is not None:
        apgd_ta = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce")
        apgdt_ta = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=10)
        candidates["torchattacks.APGD"] = lambda: robust_accuracy(apgd_ta(x, y))
        candidates["torchattacks.APGDT"] = lambda: robust_accuracy(apgdt_ta(x, y))
    else:
        notes.append(f"attacks: torchattacks not importable ({TORCHATTACKS_ERROR})")
    pgd_accuracy = robust_accuracy(attacks.pgd(model, x, y, eps=eps, alpha=settings["pgd_alpha"],
                                               steps=settings["pgd_steps"],
                                               generator=torch.Generator().manual_seed(seed)))
    clean = robust_accuracy(x)
    cpu_s: Dict[str, List[float]] = {}
    timed = {name: _counted(counter, seen, cpu_s, name, fn) for name, fn in candidates.items()}
    start = time.perf_counter()
    stats = harness.compare(timed, **config["attack_timing"])
    durations["attacks"] = time.perf_counter() - start
    # One forward and backward of the model at the attack's batch size, per image: the
    # floor of an attack's time is about sample-steps times this.
    counter.on = False
    grad_batch = x[: max(1, int(x.shape[0] * clean))]
    def forward_backward():
        return attacks.input_gradient(model, grad_batch, y[:grad_batch.shape[0]])
    per_image = harness.compare({"forward+backward": forward_backward}, rounds=1, min_run_time=0.5,
                                min_runs=5)["forward+backward"]["median_ms"] / grad_batch.shape[0]
    cpu_times = []
    for _ in range(5):
        start = time.process_time()
        forward_backward()
        cpu_times.append(time.process_time() - start)
    per_image_cpu = statistics.median(cpu_times) * 1e3 / grad_batch.shape[0]
    pairs = {"robust_fast apgd (CE)": "torchattacks.APGD", "robust_fast apgdt": "torchattacks.APGDT",
             "torchattacks.APGD": "torchattacks.APGD", "torchattacks.APGDT": "torchattacks.APGDT"}
    # CPU time of the process (all its threads): what a call costs, whatever else runs on the
    # machine. On a busy machine the wall-clock medians carry the neighbours' noise.
    cpu_ms = {name: statistics.median(times) * 1e3 for name, times in cpu_s.items() if times}
    rows = []
    for name, s in stats.items():
        peer = stats.get(pairs[name], {})
        rows.append({
            "cpu_ms": cpu_ms.get(name), "vs_torchattacks_cpu": harness.ratio(cpu_ms.get(pairs[name]), cpu_ms.get(name)),
            "part": "attacks", "impl": name, "n_images": x.shape[0], "eps": eps, "steps": steps,
            "median_ms": s["median_ms"], "iqr_ms": s["iqr_ms"], "min_ms": s["min_ms"], "samples": s["samples"],
            "vs_torchattacks": harness.ratio(peer.get("median_ms"), s["median_ms"]),
            "robust_accuracy": s["result"], "torchattacks_robust_accuracy": peer.get("result"),
            "pgd20_robust_accuracy": pgd_accuracy, "clean_accuracy": clean,
            "images_seen": seen.get(name),
            "forward_backward_ms_per_image": per_image, "forward_backward_cpu_ms_per_image": per_image_cpu,
            "model_share": None if seen.get(name) is None else seen[name] * per_image / s["median_ms"],
            "model_share_cpu": None if seen.get(name) is None or name not in cpu_ms
            else seen[name] * per_image_cpu / cpu_ms[name],
            "model": {"settings": config["train"], "cache": info["path"], "cached": info["cached"]},
        })
    return rows


# --------------------------------------------------------------------------------------------
# (c) auto_attack

def bench_auto(config, notes, durations) -> List[Dict[str, object]]:
    if not data.available():
        notes.append("auto_attack: skipped, Fashion-MNIST not found")
        return []
    model, _ = trained_model(config["train"], "cpu")
    model.eval()
    settings = config["auto"]
    x, y = data.load_fashion_mnist("test", limit=settings["n_images"])
    stage = harness.case("auto_attack", 1)
    start = time.perf_counter()
    result = attacks.auto_attack(model, x, y, eps=settings["eps"], steps=settings["steps"],
                                 n_target_classes=settings["n_target_classes"],
                                 n_queries=settings["n_queries"], batch_size=settings["batch_size"],
                                 generator=torch.Generator().manual_seed(settings["seed"]))
    total = time.perf_counter() - start
    stage.close(seconds=f"{total:.1f}")
    durations["auto_attack"] = total
    counts = result.breakdown()
    return [{"part": "auto_attack", "impl": "robust_fast auto_attack", "n_images": x.shape[0],
             "attacks": list(result.attacks), "total_s": total, "seconds": result.seconds,
             "fooled": counts, "robust_accuracy": result.robust_accuracy(),
             "clean_accuracy": 1 - counts["misclassified_clean"] / x.shape[0], **settings}]


# --------------------------------------------------------------------------------------------
# report

STEP_COLUMNS = [("norm", "norm", None), ("impl", "impl", None), ("median ms", "median_ms", ".3f"),
                ("vs eager", "vs_eager", ".2f")]
ATTACK_COLUMNS = [("impl", "impl", None), ("median ms", "median_ms", ".0f"), ("iqr ms", "iqr_ms", ".0f"),
                  ("vs torchattacks", "vs_torchattacks", ".2f"), ("cpu ms", "cpu_ms", ".0f"),
                  ("vs torchattacks (cpu)", "vs_torchattacks_cpu", ".2f"), ("robust acc", "robust_accuracy", ".2%"),
                  ("images seen", "images_seen", None), ("model share (cpu)", "model_share_cpu", ".0%")]


def _panels(rows) -> List[Dict[str, object]]:
    panels = []
    attack_rows = [r for r in rows if r["part"] == "attacks" and r["impl"].startswith("robust_fast")]
    if attack_rows and any(r["vs_torchattacks"] is not None for r in attack_rows):
        panels.append({"title": "speed-up vs torchattacks (same model, images and steps)", "ylabel": "speed-up",
                       "groups": [r["impl"] for r in attack_rows], "reference": 1.0,
                       "series": {"vs torchattacks": [r["vs_torchattacks"] for r in attack_rows]}})
    auto = [r for r in rows if r["part"] == "auto_attack"]
    if auto:
        names = [n for n in auto[0]["seconds"]]
        panels.append({"title": f"auto_attack of {auto[0]['n_images']} images: seconds per stage",
                       "ylabel": "s", "groups": names, "reference": None,
                       "series": {"seconds": [auto[0]["seconds"][n] for n in names]}})
    return panels


def bench(run: harness.Run) -> List[Dict[str, object]]:
    config, notes, durations, log = run.config, run.notes, run.durations, harness.log
    rows: List[Dict[str, object]] = []
    if "step" in run.parts:
        log("(a) apgd_step, in place")
        step_rows = bench_step(config["step"], notes)
        rows += step_rows
        log(harness.format_table(step_rows, STEP_COLUMNS))
    if "attacks" in run.parts:
        log("(b) APGD and APGD-T against torchattacks")
        attack_rows = bench_attacks(config, notes, durations)
        rows += attack_rows
        if attack_rows:
            first = attack_rows[0]
            log(f"    {first['n_images']} test images, eps {first['eps']}, {first['steps']} steps; clean "
                f"{first['clean_accuracy']:.2%}, PGD-{config['attacks']['pgd_steps']} {first['pgd20_robust_accuracy']:.2%}; "
                f"forward+backward {first['forward_backward_ms_per_image']:.3f} ms per image")
            log(harness.format_table(attack_rows, ATTACK_COLUMNS))
    if "auto" in run.parts:
        log("(c) auto_attack")
        auto_rows = bench_auto(config, notes, durations)
        rows += auto_rows
        for r in auto_rows:
            log(f"    {r['n_images']} test images, eps {r['eps']}: robust accuracy {r['robust_accuracy']:.2%} "
                f"(clean {r['clean_accuracy']:.2%}) in {r['total_s']:.1f} s")
            log("    seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))
            log("    fooled by: " + ", ".join(f"{k} {v}" for k, v in r["fooled"].items()))
    return rows


def _summary(rows) -> Dict[str, object]:
    return {f"{r['part']} {r['impl']}" + (f" {r['norm']}" if "norm" in r else ""):
            {k: r.get(k) for k in ("median_ms", "vs_torchattacks", "vs_eager", "robust_accuracy",
                                   "total_s", "seconds", "fooled") if r.get(k) is not None}
            for r in rows if r["impl"].startswith(("robust_fast", "cpp"))}


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """`robust-fast bench apgd [argv]`: returns the stored payload plus "paths" (json, png)."""
    return harness.run_benchmarks(
        bench, name="apgd", description=__doc__, argv=argv, full=FULL, quick=QUICK, parts=PARTS,
        devices=False, compile_baseline=False, summary=_summary, panels=_panels,
        title="robust_fast APGD benchmark")


if __name__ == "__main__":
    sys.exit(harness.main(run))
