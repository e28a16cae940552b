"""Benchmark of the PGD family, in one run, as ratios:

(a) pgd_step at (128,3,32,32), (256,3,64,64), (64,3,224,224), fp32, L-inf and L2: each usable
    backend (cpp as a new output and in place, out=x_adv, as the attack loop calls it; Triton
    on CUDA only) against the eager reference, torch.compile of the reference, torchattacks'
    own step expressions, and the machine's memory limit (a copy moving the same bytes).
(b) the PGD-10 attack on SmallCNN (batch 256, Fashion-MNIST test images) against
    torchattacks.PGD with the same settings and the same random start.
(c) early-stop evaluation: a SmallCNN adversarially trained on Fashion-MNIST (cached), its
    robust accuracy under PGD-20 with robust_fast.attacks.pgd(early_stop=True) against
    torchattacks.PGD: time ratio and both robust accuracies.

    robust-fast bench pgd [--quick] [--device cpu|cuda] [--parts step,attack,early_stop]
                          [--out DIR | --save-reference] [--no-compile] [--threads N]

Results: pgd.json + pgd.png (pgd_cuda.* on CUDA, pgd_quick.* with --quick) in --out DIR, by
default benchmarks/results/local/ (ignored by git; see harness.py). --save-reference writes the
committed benchmarks/results/ of a source checkout instead, which the README quotes; only a full
run on a quiet machine may.
Speed-ups are "baseline median / this median" (> 1: this is faster).

Run it on a quiet machine. With other processes on the cores, PyTorch's OpenMP workers spin
while they wait and lose whole scheduler ticks (~4-8 ms) per parallel region: the multi-op
eager baselines then look many times slower than they are. When the 1-minute load average
(less this run's threads, at the end) exceeds the core count, at the start or at the end, the
run warns that its figures are not to be trusted, notes it in the JSON, and a --save-reference
run is stored in the local folder instead (exit status 1). OMP_WAIT_POLICY=PASSIVE (set before
Python starts) or --threads 1 tame the noise.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

import robust_fast
from robust_fast import _build, data
from robust_fast.attacks import pgd
from robust_fast.benchmarks import harness
from robust_fast.models import SmallCNN
from robust_fast.reference.pgd import pgd_step_reference
from robust_fast.train import PGDAT, TrainConfig, accuracy, fit

torchattacks, TORCHATTACKS_ERROR = harness.optional_import("torchattacks")

STEP_SHAPES = [(128, 3, 32, 32), (256, 3, 64, 64), (64, 3, 224, 224)]
STEP_SETTINGS = {"linf": {"eps": 8 / 255, "alpha": 2 / 255}, "l2": {"eps": 0.5, "alpha": 0.1}}

FULL = {
    "step_shapes": STEP_SHAPES, "rounds": 3, "min_run_time": 1.0, "min_runs": 9,
    "attack": {"batch": 256, "eps": 0.1, "alpha": 0.01, "steps": 10, "seed": 0},
    "attack_timing": {"rounds": 3, "min_run_time": 2.0, "min_runs": 9},
    "train": {"n_train": 20000, "epochs": 3, "eps": 0.1, "alpha": 0.025, "steps": 7,
              "batch_size": 128, "lr": 1e-3, "seed": 0},
    "eval": {"n_eval": 2000, "eps": 0.1, "alpha": 0.025, "steps": 20, "batch_size": 500, "seed": 1},
    "eval_timing": {"rounds": 3, "min_run_time": 0.0, "min_runs": 6, "warmup_runs": 1, "warmup_time": 0.0},
}
QUICK = {  # a smoke run: every code path, tiny sizes
    "step_shapes": [(8, 3, 16, 16)], "rounds": 1, "min_run_time": 0.02, "min_runs": 3,
    "attack": {"batch": 32, "eps": 0.1, "alpha": 0.01, "steps": 10, "seed": 0},
    "attack_timing": {"rounds": 1, "min_run_time": 0.02, "min_runs": 2, "warmup_runs": 1, "warmup_time": 0.0},
    "train": {"n_train": 256, "epochs": 1, "eps": 0.1, "alpha": 0.025, "steps": 2,
              "batch_size": 128, "lr": 1e-3, "seed": 0},
    "eval": {"n_eval": 64, "eps": 0.1, "alpha": 0.025, "steps": 5, "batch_size": 32, "seed": 1},
    "eval_timing": {"rounds": 1, "min_run_time": 0.0, "min_runs": 1, "warmup_runs": 1, "warmup_time": 0.0},
}


# --------------------------------------------------------------------------------------------
# (a) the step

def torchattacks_step_linf(x_adv, grad, x_nat, eps, alpha):
    """torchattacks.PGD.forward's update, line for line."""
    adv_images = x_adv + alpha * grad.sign()
    delta = torch.clamp(adv_images - x_nat, min=-eps, max=eps)
    return torch.clamp(x_nat + delta, min=0, max=1)


def torchattacks_step_l2(x_adv, grad, x_nat, eps, alpha, eps_for_division=1e-10):
    """torchattacks.PGDL2.forward's update, line for line (generalised from 4-d to n-d views)."""
    batch_size = len(x_adv)
    view = (-1,) + (1,) * (x_adv.dim() - 1)
    grad_norms = torch.norm(grad.view(batch_size, -1), p=2, dim=1) + eps_for_division
    grad = grad / grad_norms.view(view)
    adv_images = x_adv + alpha * grad
    delta = adv_images - x_nat
    delta_norms = torch.norm(delta.view(batch_size, -1), p=2, dim=1)
    factor = eps / delta_norms
    factor = torch.min(factor, torch.ones_like(delta_norms))
    delta = delta * factor.view(view)
    return torch.clamp(x_nat + delta, min=0, max=1)


TORCHATTACKS_STEPS = {"linf": torchattacks_step_linf, "l2": torchattacks_step_l2}


def _step_inputs(shape, eps, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=g)
    x_adv = (x_nat + (torch.rand(shape, generator=g) * 2 - 1) * eps).clamp_(0, 1)
    grad = torch.randn(shape, generator=g)
    return x_adv.to(device), grad.to(device), x_nat.to(device)


def _compiled_reference(norm, eps, alpha):
    def reference_step(x_adv, grad, x_nat):
        return pgd_step_reference(x_adv, grad, x_nat, eps=eps, alpha=alpha, norm=norm,
                                  clip_min=0.0, clip_max=1.0)
    return torch.compile(reference_step, mode="default", dynamic=False)


def bench_step(config, device, use_compile, notes) -> List[Dict[str, object]]:
    rows = []
    cpp_reason = _build.cpp_unavailable_reason(device)
    triton_reason = _build.triton_unavailable_reason(device)
    if cpp_reason:
        notes.append(f"pgd_step: cpp backend not timed: {cpp_reason}")
    if device != "cpu" and triton_reason:
        notes.append(f"pgd_step: triton backend not timed: {triton_reason}")
    for shape in config["step_shapes"]:
        numel = 1
        for size in shape:
            numel *= size
        tensor_bytes = numel * 4
        op_bytes = 4 * tensor_bytes  # reads x_adv, grad, x_nat; writes the result
        src = torch.empty(2 * numel, device=device).uniform_()
        dst = torch.empty_like(src)
        for norm, settings in STEP_SETTINGS.items():
            eps, alpha = settings["eps"], settings["alpha"]
            x_adv, grad, x_nat = _step_inputs(shape, eps, device)
            in_place = x_adv.clone()
            candidates, compile_s = {}, None
            if cpp_reason is None:
                candidates["cpp"] = lambda: robust_fast.pgd_step(
                    x_adv, grad, x_nat, eps=eps, alpha=alpha, norm=norm, backend="cpp")
                candidates["cpp (out=x_adv)"] = lambda: robust_fast.pgd_step(
                    in_place, grad, x_nat, eps=eps, alpha=alpha, norm=norm, out=in_place, backend="cpp")
            if device != "cpu" and triton_reason is None:
                candidates["triton"] = lambda: robust_fast.pgd_step(
                    x_adv, grad, x_nat, eps=eps, alpha=alpha, norm=norm, backend="triton")
                candidates["triton (out=x_adv)"] = lambda: robust_fast.pgd_step(
                    in_place, grad, x_nat, eps=eps, alpha=alpha, norm=norm, out=in_place, backend="triton")
            candidates["eager reference"] = lambda: pgd_step_reference(
                x_adv, grad, x_nat, eps=eps, alpha=alpha, norm=norm, clip_min=0.0, clip_max=1.0)
            if use_compile:
                torch._dynamo.reset()
                compiled = _compiled_reference(norm, eps, alpha)
                start = time.perf_counter()
                compiled(x_adv, grad, x_nat)  # compile once, before any timing
                if device != "cpu":
                    torch.cuda.synchronize()
                compile_s = time.perf_counter() - start
                candidates["torch.compile(reference)"] = lambda: compiled(x_adv, grad, x_nat)
            candidates["torchattacks step"] = lambda: TORCHATTACKS_STEPS[norm](x_adv, grad, x_nat, eps, alpha)
            candidates["copy (same bytes)"] = lambda: dst.copy_(src)  # timed with each case
            # Every implementation must agree with the reference before its time means anything.
            expected = candidates["eager reference"]()
            max_diff = {}
            for name, fn in candidates.items():
                if name.startswith("copy") or "out=" in name:
                    continue
                max_diff[name] = float((fn() - expected).abs().max()) if numel else 0.0
            in_place.copy_(x_adv)
            stats = harness.compare(candidates, device=device, rounds=config["rounds"],
                                    min_run_time=config["min_run_time"], min_runs=config["min_runs"],
                                    label=f"pgd_step {norm} {tuple(shape)}")
            eager_ms = stats["eager reference"]["median_ms"]
            compile_ms = stats.get("torch.compile(reference)", {}).get("median_ms")
            ta_ms = stats["torchattacks step"]["median_ms"]
            copy_ms = stats["copy (same bytes)"]["median_ms"]
            for name, s in stats.items():
                ms = s["median_ms"]
                rows.append({
                    "part": "pgd_step", "shape": list(shape), "norm": norm, "dtype": "float32",
                    "device": device, "impl": name, "eps": eps, "alpha": alpha,
                    "median_ms": ms, "iqr_ms": s["iqr_ms"], "min_ms": s["min_ms"],
                    "samples": s["samples"], "bytes": op_bytes,
                    "gbps": op_bytes / (ms * 1e-3) / 1e9,
                    "vs_eager": harness.ratio(eager_ms, ms),
                    "vs_compile": harness.ratio(compile_ms, ms),
                    "vs_torchattacks": harness.ratio(ta_ms, ms),
                    "fraction_of_copy": harness.ratio(copy_ms, ms),
                    "max_abs_diff_vs_eager": max_diff.get(name),
                    "compile_s": compile_s if name == "torch.compile(reference)" else None,
                })
            harness.log(f"  pgd_step {norm} {'x'.join(map(str, shape))}: done")
        del src, dst
    torch._dynamo.reset()
    return rows


# --------------------------------------------------------------------------------------------
# data and the model

def _test_data(n: int, device: str, notes: List[str], part: str):
    if data.available():
        x, y = data.load_fashion_mnist("test", limit=n)
        return x.to(device), y.to(device), "fashion-mnist test"
    notes.append(f"{part}: Fashion-MNIST not found in {data.data_root()} (apt-get install "
                 f"{data.PACKAGE}): random images and labels instead")
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 1, 28, 28, generator=g).to(device),
            torch.randint(0, 10, (n,), generator=g).to(device), "random")


def cache_dir() -> str:
    return os.environ.get("ROBUST_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                "robust_fast")


def _model_key_fields(settings: Dict[str, object]) -> Dict[str, object]:
    return dict(settings, model="SmallCNN(1,10,28)", data="fashion-mnist train[:n_train]",
                recipe="robust_fast.train.fit PGDAT constant-lr v2")


def model_cache_path(settings: Dict[str, object]) -> str:
    """Where trained_model keeps the model of `settings` (it may not exist yet)."""
    key = hashlib.sha256(json.dumps(_model_key_fields(settings), sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "models", f"smallcnn_fmnist_pgdat_{key}.pt")


def trained_model(settings: Dict[str, object], device: str):
    """A SmallCNN adversarially trained with `settings`, from the cache when it is there.

    Returns (model, info) with info = {"path", "cached", "train_s", "log"}.
    """
    key_fields = _model_key_fields(settings)
    path = model_cache_path(settings)
    folder = os.path.dirname(path)
    model = SmallCNN()
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model.to(device), {"path": path, "cached": True, "train_s": saved.get("train_s"),
                                  "log": saved.get("log", [])}
    torch.manual_seed(settings["seed"])
    model = SmallCNN().to(device)
    x, y = data.load_fashion_mnist("train", limit=settings["n_train"])
    start = time.perf_counter()
    # Adam at a constant rate, no held-out evaluation, no files: PGD-AT as the benchmark uses it
    config = TrainConfig(epochs=settings["epochs"], batch_size=settings["batch_size"], optimizer="adam",
                         lr=settings["lr"], schedule="constant", seed=settings["seed"], eval_samples=0,
                         progress=False)
    result = fit(PGDAT(eps=settings["eps"], steps=settings["steps"], alpha=settings["alpha"]), model, (x, y),
                 config, device=torch.device(device))
    train_s = time.perf_counter() - start
    lines = [f"epoch {r['epoch']}/{settings['epochs']}: adversarial loss {r['loss']:.4f}, accuracy on "
             f"PGD-{settings['steps']} examples {r['train_acc']:.2%} ({r['epoch_time_s']:.1f} s)"
             for r in result.history]
    for line in lines:
        harness.log("    " + line)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "settings": key_fields, "train_s": train_s, "log": lines}, tmp)
    os.replace(tmp, path)
    return model, {"path": path, "cached": False, "train_s": train_s, "log": lines}


# --------------------------------------------------------------------------------------------
# (b) the attack

def _generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def bench_attack(config, device, notes) -> List[Dict[str, object]]:
    settings = config["attack"]
    eps, alpha, steps, seed = settings["eps"], settings["alpha"], settings["steps"], settings["seed"]
    x, y, source = _test_data(settings["batch"], device, notes, "pgd_attack")
    torch.manual_seed(seed)
    model = SmallCNN().to(device).eval()  # timing does not depend on the weights
    candidates = {
        "robust_fast.attacks.pgd": lambda: pgd(model, x, y, eps=eps, alpha=alpha, steps=steps,
                                               random_start=True, generator=_generator(device, seed)),
        "robust_fast.attacks.pgd (reference step)": lambda: pgd(
            model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=True,
            generator=_generator(device, seed), backend="reference"),
    }
    identical = None
    if torchattacks is not None:
        attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)

        def run_torchattacks():
            torch.manual_seed(seed)
            return attack(x, y)
        candidates["torchattacks.PGD"] = run_torchattacks
        ours, theirs = candidates["robust_fast.attacks.pgd"](), run_torchattacks()
        identical = float((ours - theirs).abs().max())
    else:
        notes.append(f"pgd_attack: torchattacks not importable ({TORCHATTACKS_ERROR})")
    timing = config["attack_timing"]
    stats = harness.compare(candidates, device=device, label="PGD attack", **timing)
    # The step alone at this shape, to say how much of the attack it is.
    x_adv, grad, x_nat = _step_inputs(tuple(x.shape), eps, device)
    step_stats = harness.compare({
        "cpp": lambda: robust_fast.pgd_step(x_adv, grad, x_nat, eps=eps, alpha=alpha, out=x_adv),
        "torchattacks step": lambda: torchattacks_step_linf(x_adv, grad, x_nat, eps, alpha),
    }, device=device, rounds=1, min_run_time=config["min_run_time"], min_runs=config["min_runs"])
    ta_ms = stats.get("torchattacks.PGD", {}).get("median_ms")
    rows = []
    for name, s in stats.items():
        step_ms = step_stats["torchattacks step" if name == "torchattacks.PGD" else "cpp"]["median_ms"]
        if name.endswith("(reference step)"):
            step_ms = None
        rows.append({
            "part": "pgd_attack", "impl": name, "device": device, "data": source,
            "shape": list(x.shape), "norm": "linf", "eps": eps, "alpha": alpha, "steps": steps,
            "random_start": True, "median_ms": s["median_ms"], "iqr_ms": s["iqr_ms"],
            "min_ms": s["min_ms"], "samples": s["samples"],
            "vs_torchattacks": harness.ratio(ta_ms, s["median_ms"]),
            "step_share": None if step_ms is None else steps * step_ms / s["median_ms"],
            "max_abs_diff_vs_torchattacks": identical if name == "robust_fast.attacks.pgd" else None,
        })
    return rows


# --------------------------------------------------------------------------------------------
# (c) early-stop evaluation

def bench_early_stop(config, device, notes, durations) -> List[Dict[str, object]]:
    if not data.available():
        notes.append(f"early_stop_eval: skipped, Fashion-MNIST not found in {data.data_root()} "
                     f"(apt-get install {data.PACKAGE}); a model trained on random data says nothing")
        return []
    start = time.perf_counter()
    model, info = trained_model(config["train"], device)
    model.eval()
    durations["early_stop_train_or_load"] = time.perf_counter() - start
    ev = config["eval"]
    x, y = data.load_fashion_mnist("test", limit=ev["n_eval"])
    x, y = x.to(device), y.to(device)
    eps, alpha, steps, seed, bs = ev["eps"], ev["alpha"], ev["steps"], ev["seed"], ev["batch_size"]

    def correct_fraction(x_adv):
        correct = 0
        with torch.no_grad():
            for i in range(0, x.shape[0], bs):
                correct += int((model(x_adv[i:i + bs]).argmax(dim=1) == y[i:i + bs]).sum())
        return correct / x.shape[0]

    def robust_correct(attack_fn):
        return correct_fraction(torch.cat([attack_fn(x[i:i + bs], y[i:i + bs])
                                           for i in range(0, x.shape[0], bs)]))

    def ours(early_stop):
        # The whole set in one call, `bs` samples through the model at a time: with early stop,
        # a sample that leaves is replaced by a waiting one, so the batches stay full.
        def run():
            g = _generator(device, seed)
            return correct_fraction(pgd(model, x, y, eps=eps, alpha=alpha, steps=steps,
                                        random_start=True, early_stop=early_stop, generator=g,
                                        batch_size=bs))
        return run

    candidates = {"robust_fast pgd(early_stop=True)": ours(True),
                  "robust_fast pgd(early_stop=False)": ours(False)}
    if torchattacks is not None:
        attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)

        def run_torchattacks():
            torch.manual_seed(seed)
            return robust_correct(attack)
        candidates["torchattacks.PGD"] = run_torchattacks
    else:
        notes.append(f"early_stop_eval: torchattacks not importable ({TORCHATTACKS_ERROR})")
    start = time.perf_counter()
    stats = harness.compare(candidates, device=device, label="early-stop evaluation", **config["eval_timing"])
    durations["early_stop_eval"] = time.perf_counter() - start
    clean = accuracy(model, x, y)
    ta = stats.get("torchattacks.PGD", {})
    rows = []
    for name, s in stats.items():
        rows.append({
            "part": "early_stop_eval", "impl": name, "device": device, "n_eval": x.shape[0],
            "eval_batch_size": bs, "norm": "linf", "eps": eps, "alpha": alpha, "steps": steps,
            "random_start": True, "seed": seed, "median_ms": s["median_ms"], "iqr_ms": s["iqr_ms"],
            "min_ms": s["min_ms"], "samples": s["samples"],
            "vs_torchattacks": harness.ratio(ta.get("median_ms"), s["median_ms"]),
            "robust_accuracy": s["result"], "clean_accuracy": clean,
            "torchattacks_robust_accuracy": ta.get("result"),
            "at_least_as_strong": None if not ta else s["result"] <= ta["result"],
            "model": {"settings": config["train"], "cache": info["path"], "cached": info["cached"],
                      "train_s": info["train_s"], "log": info["log"]},
        })
    return rows


# --------------------------------------------------------------------------------------------
# report

STEP_COLUMNS = [("shape", "shape", None), ("norm", "norm", None), ("impl", "impl", None),
                ("median ms", "median_ms", ".3f"), ("iqr ms", "iqr_ms", ".3f"), ("GB/s", "gbps", ".1f"),
                ("vs eager", "vs_eager", ".2f"), ("vs compile", "vs_compile", ".2f"),
                ("vs torchattacks", "vs_torchattacks", ".2f"), ("of copy BW", "fraction_of_copy", ".2f")]
ATTACK_COLUMNS = [("impl", "impl", None), ("median ms", "median_ms", ".1f"), ("iqr ms", "iqr_ms", ".1f"),
                  ("vs torchattacks", "vs_torchattacks", ".2f"), ("step share", "step_share", ".1%")]
EVAL_COLUMNS = ATTACK_COLUMNS[:4] + [("robust acc", "robust_accuracy", ".2%"),
                                     ("clean acc", "clean_accuracy", ".2%")]


def _panels(rows) -> List[Dict[str, object]]:
    panels = []
    step_rows = [r for r in rows if r["part"] == "pgd_step"]
    cases = []
    for r in step_rows:
        case = (r["norm"], tuple(r["shape"]))
        if case not in cases:
            cases.append(case)
    labels = [f"{norm} {'x'.join(map(str, shape))}" for norm, shape in cases]

    def value(impl, key):
        out = []
        for norm, shape in cases:
            match = [r for r in step_rows if r["impl"] == impl and r["norm"] == norm and tuple(r["shape"]) == shape]
            out.append(match[0][key] if match else None)
        return out
    impls = [i for i in ("cpp", "cpp (out=x_adv)", "triton", "triton (out=x_adv)")
             if any(r["impl"] == i for r in step_rows)]
    for impl in impls:
        panels.append({"title": f"pgd_step, {impl}: speed-up (baseline time / {impl} time)",
                       "ylabel": "speed-up", "groups": labels, "reference": 1.0,
                       "series": {"vs eager": value(impl, "vs_eager"),
                                  "vs torch.compile": value(impl, "vs_compile"),
                                  "vs torchattacks": value(impl, "vs_torchattacks")}})
    if step_rows:
        names = impls + ["eager reference", "torch.compile(reference)", "torchattacks step"]
        panels.append({"title": "pgd_step: fraction of copy bandwidth (copy time / op time, same bytes)",
                       "ylabel": "fraction", "groups": labels, "reference": 1.0,
                       "series": {n: value(n, "fraction_of_copy") for n in names
                                  if any(r["impl"] == n for r in step_rows)}})
    groups, speedups = [], []
    for part, impl, label in (("pgd_attack", "robust_fast.attacks.pgd", "PGD-10 attack"),
                              ("pgd_attack", "robust_fast.attacks.pgd (reference step)", "PGD-10, reference step"),
                              ("early_stop_eval", "robust_fast pgd(early_stop=True)", "PGD-20 eval, early stop"),
                              ("early_stop_eval", "robust_fast pgd(early_stop=False)", "PGD-20 eval, no early stop")):
        match = [r for r in rows if r["part"] == part and r["impl"] == impl]
        if match and match[0]["vs_torchattacks"] is not None:
            groups.append(label)
            speedups.append(match[0]["vs_torchattacks"])
    if groups:
        panels.append({"title": "SmallCNN attacks: speed-up vs torchattacks.PGD", "ylabel": "speed-up",
                       "groups": groups, "reference": 1.0, "series": {"vs torchattacks.PGD": speedups}})
    return panels


def _summary(rows) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for r in rows:
        if r["part"] == "pgd_step" and r["impl"] in ("cpp", "cpp (out=x_adv)", "triton", "triton (out=x_adv)"):
            key = f"pgd_step {r['impl']} {r['norm']} {'x'.join(map(str, r['shape']))}"
            out[key] = {k: r[k] for k in ("median_ms", "gbps", "vs_eager", "vs_compile",
                                           "vs_torchattacks", "fraction_of_copy")}
        elif r["part"] in ("pgd_attack", "early_stop_eval") and r["impl"].startswith("robust_fast"):
            key = f"{r['part']} {r['impl']}"
            out[key] = {k: r.get(k) for k in ("median_ms", "vs_torchattacks", "robust_accuracy",
                                               "torchattacks_robust_accuracy") if k in r}
    return out


def bench(run: harness.Run) -> List[Dict[str, object]]:
    config, device, notes, durations, log = run.config, run.device, run.notes, run.durations, harness.log
    rows: List[Dict[str, object]] = []
    if "step" in run.parts:
        log("(a) pgd_step")
        start = time.perf_counter()
        step_rows = bench_step(config, device, run.compile, notes)
        durations["pgd_step"] = time.perf_counter() - start
        rows += step_rows
        log(harness.format_table(step_rows, STEP_COLUMNS))
        log(f"    ({durations['pgd_step']:.0f} s)")
    if "attack" in run.parts:
        log("(b) PGD-10 attack on SmallCNN")
        start = time.perf_counter()
        attack_rows = bench_attack(config, device, notes)
        durations["pgd_attack"] = time.perf_counter() - start
        rows += attack_rows
        first = attack_rows[0]
        log(f"    batch {'x'.join(map(str, first['shape']))} ({first['data']}), eps {first['eps']}, "
            f"alpha {first['alpha']}, {first['steps']} steps, random start; "
            f"max |ours - torchattacks| = {first['max_abs_diff_vs_torchattacks']}")
        log(harness.format_table(attack_rows, ATTACK_COLUMNS))
        log(f"    ({durations['pgd_attack']:.0f} s)")
    if "early_stop" in run.parts:
        log("(c) early-stop evaluation (PGD-20) of an adversarially trained SmallCNN")
        start = time.perf_counter()
        eval_rows = bench_early_stop(config, device, notes, durations)
        durations["early_stop"] = time.perf_counter() - start
        rows += eval_rows
        if eval_rows:
            model_info = eval_rows[0]["model"]
            state = "loaded from cache" if model_info["cached"] else "trained"
            train_s = model_info["train_s"]
            log(f"    model {state}: {model_info['cache']}"
                + (f" (training took {train_s:.0f} s)" if train_s is not None else ""))
            log(f"    {eval_rows[0]['n_eval']} test images, eps {eval_rows[0]['eps']}, alpha "
                f"{eval_rows[0]['alpha']}, {eval_rows[0]['steps']} steps, random start, seed {eval_rows[0]['seed']}")
            log(harness.format_table(eval_rows, EVAL_COLUMNS))
        log(f"    ({durations['early_stop']:.0f} s)")
    return rows


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """`robust-fast bench pgd [argv]`: returns the stored payload plus "paths" (json, png)."""
    return harness.run_benchmarks(
        bench, name="pgd", description=__doc__, argv=argv, full=FULL, quick=QUICK,
        parts=("step", "attack", "early_stop"),
        quick_help="smoke run: small shapes, few repeats, a tiny model (results not for quoting)",
        settings=lambda run: {"dtype": "float32", "step_settings": STEP_SETTINGS, **run.config},
        summary=_summary, panels=_panels, title="robust_fast PGD benchmark",
        ratio_definition="speed-up = baseline median time / this median time; "
                         "fraction_of_copy = copy time / this time for the same bytes "
                         "(4 tensor-sizes: 3 reads + 1 write; the copy reads and writes "
                         "2 each). On write-allocate caches a copy also reads its "
                         "destination, so an op writing 1 of 4 can exceed 1.0")


if __name__ == "__main__":
    sys.exit(harness.main(run))
