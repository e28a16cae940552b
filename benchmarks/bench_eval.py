"""Benchmark of AutoAttack's standard version against torchattacks, in one run:

(a) each attack of the standard version on the same images (the test images the model gets
    right): robust_fast apgd (CE), apgdt, fab_t and square against torchattacks' APGD, APGDT,
    FAB (multi_targeted) and Square, each with the reference AutoAttack's settings (100 steps,
    9 target classes, 1 restart; FAB alpha_max 0.1, eta 1.05, beta 0.9; Square 5000 queries,
    p_init 0.8, the schedule not rescaled);
(b) the whole: robust_fast auto_attack(version="standard") against
    torchattacks.AutoAttack(version='standard'), with torchattacks' settings matched to the
    reference's explicitly: its AutoAttack builds APGD, APGDT and FAB without a steps argument
    (so they run their default 10 steps, not 100) and Square with the rescaled schedule; the
    benchmark sets steps = 100 on the three and Square's rescale_schedule = False after
    construction.
Same model (the PGD-trained SmallCNN of bench_pgd and bench_apgd, cached under
~/.cache/robust_fast/models), same images, one run of each, robust accuracy beside each time,
the 1-minute load average before and after each pair.

    robust-fast bench eval [--quick] [--parts attacks,auto] [--threads N] [--out DIR]

Results: eval.json + eval.png (eval_quick.* with --quick) in --out DIR, by default
benchmarks/results/local/. Speed-ups are "torchattacks seconds / robust_fast seconds".
"""
from __future__ import annotations

import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from robust_fast import attacks, data
from robust_fast.benchmarks import harness
from robust_fast.benchmarks.bench_apgd import MODEL, ImageCounter
from robust_fast.benchmarks.bench_pgd import trained_model

torchattacks, TORCHATTACKS_ERROR = harness.optional_import("torchattacks")

FULL = {"train": MODEL, "n_images": 100, "eps": 0.1, "seed": 0,
        "steps": 100, "n_target_classes": 9, "fab_steps": 100, "n_queries": 5000}
QUICK = {"train": {"n_train": 256, "epochs": 1, "eps": 0.1, "alpha": 0.025, "steps": 2,
                   "batch_size": 128, "lr": 1e-3, "seed": 0},
         "n_images": 12, "eps": 0.1, "seed": 0, "steps": 3, "n_target_classes": 2, "fab_steps": 3, "n_queries": 20}
PARTS = ("attacks", "auto")


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _timed(fn):
    """(result, wall seconds, CPU seconds of the process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _pairs(model, x, y, c) -> List[tuple]:
    """(name, robust_fast call, torchattacks call or None): the standard version's attacks."""
    eps, seed = c["eps"], c["seed"]
    gen = lambda: torch.Generator().manual_seed(seed)
    ours = [
        ("APGD-CE", lambda: attacks.apgd(model, x, y, eps=eps, steps=c["steps"], loss="ce", generator=gen())),
        ("APGD-T", lambda: attacks.apgdt(model, x, y, eps=eps, steps=c["steps"],
                                         n_target_classes=c["n_target_classes"], generator=gen())),
        ("FAB-T", lambda: attacks.fab_t(model, x, y, eps=eps, steps=c["fab_steps"],
                                        n_target_classes=c["n_target_classes"], generator=gen())),
        ("FAB-T (early_stop=False)", lambda: attacks.fab_t(model, x, y, eps=eps, steps=c["fab_steps"],
                                                           n_target_classes=c["n_target_classes"],
                                                           early_stop=False, generator=gen())),
        ("Square", lambda: attacks.square(model, x, y, eps=eps, n_queries=c["n_queries"],
                                          rescale_schedule=False, generator=gen())),
    ]
    if torchattacks is None:
        return [(name, fn, None) for name, fn in ours]
    n_classes = c["n_target_classes"] + 1
    theirs = {
        "APGD-CE": torchattacks.APGD(model, norm="Linf", eps=eps, steps=c["steps"], n_restarts=1, seed=seed, loss="ce"),
        "APGD-T": torchattacks.APGDT(model, norm="Linf", eps=eps, steps=c["steps"], n_restarts=1, seed=seed,
                                     n_classes=n_classes),
        "FAB-T": torchattacks.FAB(model, norm="Linf", eps=eps, steps=c["fab_steps"], n_restarts=1, seed=seed,
                                  multi_targeted=True, n_classes=n_classes),
        "Square": torchattacks.Square(model, norm="Linf", eps=eps, n_queries=c["n_queries"], n_restarts=1,
                                      p_init=0.8, loss="margin", resc_schedule=False, seed=seed),
    }
    return [(name, fn, (lambda a=theirs[name]: a(x, y)) if name in theirs else None) for name, fn in ours]


def matched_torchattacks_autoattack(model, c):
    """torchattacks.AutoAttack(version='standard') with the reference's settings set explicitly."""
    aa = torchattacks.AutoAttack(model, norm="Linf", eps=c["eps"], version="standard",
                                 n_classes=c["n_target_classes"] + 1, seed=c["seed"])
    apgd_ce, apgd_t, fab, square = aa._autoattack.attacks
    apgd_ce.steps, apgd_t.steps, fab.steps = c["steps"], c["steps"], c["fab_steps"]
    square.n_queries, square.rescale_schedule = c["n_queries"], False
    return aa


def bench_attacks(model, x, y, c, notes, durations) -> List[Dict[str, object]]:
    with torch.no_grad():
        right = model(x).argmax(1) == y
    x, y = x[right], y[right]  # every attack starts from the same correctly classified images

    def accuracy(x_adv) -> float:
        with torch.no_grad():
            return float((model(x_adv).argmax(1) == y).float().mean())

    counter = ImageCounter(model)
    rows = []
    for name, ours, theirs in _pairs(model, x, y, c):
        stage = harness.case(name, 1 if theirs is None else 2)
        load_before = _load()
        counter.images, counter.on = 0, True
        stage.set_postfix(impl="robust_fast")
        x_adv, wall, cpu = _timed(ours)
        counter.on = False
        stage.update(1)
        row = {"part": "attacks", "attack": name, "impl": f"robust_fast {name}", "n_images": int(x.shape[0]),
               "seconds": wall, "cpu_seconds": cpu, "robust_accuracy": accuracy(x_adv),
               "images_seen": counter.images, "load_before": load_before}
        if theirs is not None:
            counter.images, counter.on = 0, True
            stage.set_postfix(impl="torchattacks")
            x_ta, wall_ta, cpu_ta = _timed(theirs)
            counter.on = False
            stage.update(1)
            row.update(torchattacks_seconds=wall_ta, torchattacks_cpu_seconds=cpu_ta,
                       torchattacks_robust_accuracy=accuracy(x_ta), torchattacks_images_seen=counter.images,
                       vs_torchattacks=harness.ratio(wall_ta, wall), vs_torchattacks_cpu=harness.ratio(cpu_ta, cpu))
        row["load_after"] = _load()
        stage.close(seconds=f"{wall:.1f}")
        row["ms_per_image_seen"] = 1e3 * wall / max(row["images_seen"], 1)
        rows.append(row)
        harness.log(f"    {name}: {wall:.1f} s, robust acc {row['robust_accuracy']:.2%}"
                    + (f"; torchattacks {row['torchattacks_seconds']:.1f} s, {row['torchattacks_robust_accuracy']:.2%}"
                       f" -> {row['vs_torchattacks']:.2f}x" if theirs is not None else "")
                    + f" (load {load_before:.1f} -> {row['load_after']:.1f})")
    durations["attacks"] = sum(r["seconds"] + r.get("torchattacks_seconds", 0.0) for r in rows)
    return rows


def bench_auto(model, x, y, c, notes, durations) -> List[Dict[str, object]]:
    stage = harness.case("AutoAttack standard", 2 if torchattacks is not None else 1)
    stage.set_postfix(impl="robust_fast")
    load_before = _load()
    result, wall, cpu = _timed(lambda: attacks.auto_attack(
        model, x, y, eps=c["eps"], version="standard", steps=c["steps"], n_target_classes=c["n_target_classes"],
        fab_steps=c["fab_steps"], fab_n_target_classes=c["n_target_classes"], n_queries=c["n_queries"],
        generator=torch.Generator().manual_seed(c["seed"])))
    row = {"part": "auto", "attack": "AutoAttack standard", "impl": "robust_fast auto_attack(version='standard')",
           "n_images": int(x.shape[0]), "seconds": wall, "cpu_seconds": cpu,
           "robust_accuracy": result.robust_accuracy(), "stage_seconds": result.seconds,
           "fooled": result.breakdown(), "version": result.version, "settings": result.settings,
           "load_before": load_before}
    stage.update(1)
    if torchattacks is not None:
        aa = matched_torchattacks_autoattack(model, c)
        stage.set_postfix(impl="torchattacks")
        x_ta, wall_ta, cpu_ta = _timed(lambda: aa(x, y))
        stage.update(1)
        with torch.no_grad():
            accuracy_ta = float((model(x_ta).argmax(1) == y).float().mean())
        row.update(torchattacks_seconds=wall_ta, torchattacks_cpu_seconds=cpu_ta,
                   torchattacks_robust_accuracy=accuracy_ta, vs_torchattacks=harness.ratio(wall_ta, wall),
                   vs_torchattacks_cpu=harness.ratio(cpu_ta, cpu),
                   torchattacks_settings="AutoAttack(version='standard') with APGD, APGDT, FAB steps set to "
                                         f"{c['steps']}/{c['steps']}/{c['fab_steps']} and Square rescale_schedule=False, "
                                         f"n_queries {c['n_queries']}")
    else:
        notes.append(f"torchattacks not importable ({TORCHATTACKS_ERROR})")
    row["load_after"] = _load()
    stage.close(seconds=f"{wall:.1f}")
    durations["auto"] = wall + row.get("torchattacks_seconds", 0.0)
    harness.log(f"    AutoAttack standard, {x.shape[0]} images: {wall:.1f} s, robust acc {row['robust_accuracy']:.2%}"
                + (f"; torchattacks {row['torchattacks_seconds']:.1f} s, {row['torchattacks_robust_accuracy']:.2%}"
                   f" -> {row['vs_torchattacks']:.2f}x" if "vs_torchattacks" in row else "")
                + f" (load {load_before:.1f} -> {row['load_after']:.1f})")
    harness.log("    stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    return [row]


COLUMNS = [("attack", "attack", None), ("images", "n_images", None), ("robust_fast s", "seconds", ".1f"),
           ("robust acc", "robust_accuracy", ".2%"), ("torchattacks s", "torchattacks_seconds", ".1f"),
           ("torchattacks acc", "torchattacks_robust_accuracy", ".2%"), ("speed-up", "vs_torchattacks", ".2f"),
           ("speed-up (cpu)", "vs_torchattacks_cpu", ".2f"), ("load", "load_before", ".1f")]


def bench(run: harness.Run) -> List[Dict[str, object]]:
    c, notes, durations = run.config, run.notes, run.durations
    if not data.available():
        notes.append(f"skipped: Fashion-MNIST not found in {data.data_root()} (apt-get install {data.PACKAGE})")
        return []
    model, info = trained_model(c["train"], "cpu")
    model.eval()
    notes.append(f"model: {info['path']} (cached: {info['cached']})")
    x, y = data.load_fashion_mnist("test", limit=c["n_images"])
    rows: List[Dict[str, object]] = []
    if "attacks" in run.parts:
        harness.log("(a) each attack of the standard version, on the correctly classified images")
        rows += bench_attacks(model, x, y, c, notes, durations)
    if "auto" in run.parts:
        harness.log("(b) the standard version, whole")
        rows += bench_auto(model, x, y, c, notes, durations)
    return rows


def _summary(rows) -> Dict[str, object]:
    return {r["attack"]: {k: r.get(k) for k in ("seconds", "robust_accuracy", "torchattacks_seconds",
                                                 "torchattacks_robust_accuracy", "vs_torchattacks", "load_before")}
            for r in rows}


def _panels(rows) -> List[Dict[str, object]]:
    timed = [r for r in rows if r.get("vs_torchattacks") is not None]
    if not timed:
        return []
    return [{"title": "speed-up vs torchattacks (same model, images, settings)", "ylabel": "speed-up",
             "groups": [r["attack"] for r in timed], "reference": 1.0,
             "series": {"vs torchattacks": [r["vs_torchattacks"] for r in timed]}}]


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """`robust-fast bench eval [argv]`: returns the stored payload plus "paths" (json, png)."""
    return harness.run_benchmarks(
        bench, name="eval", description=__doc__, argv=argv, full=FULL, quick=QUICK, parts=PARTS,
        devices=False, compile_baseline=False, summary=_summary, panels=_panels, columns=COLUMNS,
        title="robust_fast AutoAttack (standard) benchmark",
        ratio_definition="torchattacks seconds / robust_fast seconds, one run each")


if __name__ == "__main__":
    sys.exit(harness.main(run))
