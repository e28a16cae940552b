"""`robust-fast demo`: robustness transfer end to end on Fashion-MNIST at L-inf eps = 0.1.

1. A robust teacher (WideCNN, PGD adversarial training), trained once and cached outside the
   checkout under a name derived from its settings (~/.cache/robust_fast/models, or
   $ROBUST_FAST_CACHE/models).
2. Students, over --seeds seeds (3): the demo's architecture (ResNetSmall, another family than
   the teacher) trained by PGD-AT, Fast-AT and RRM from the teacher, each seed from the same
   initial weights; and an RRM student of the teacher's own architecture. Each RRM student
   uses its best head option as measured (docs/training.md, "RRM's head and matching points").
   A standard student, one seed: the non-robust reference.
3. Each evaluated with the same PGD-20 and AutoAttack-style pair (APGD-CE, APGD-T) on the same
   test images.
4. One table (mean ± standard deviation over seeds; clean and robust accuracy, training time
   with and without the teacher's, ratios to the same seed's PGD-AT student), and in the
   results folder: results.json, curves.jsonl (every epoch of every run), robustness.png
   (robust accuracy against training time), each run's checkpoint and log.

--quick runs the same path on a subset (a check that everything works, not a measurement).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from robust_fast.data import load_fashion_mnist
from robust_fast.models import build_model
from robust_fast.train.checkpoint import load_checkpoint, model_from_checkpoint
from robust_fast.train.config import TrainConfig
from robust_fast.train.evaluate import evaluate
from robust_fast.train.loop import CHECKPOINT_NAME, fit
from robust_fast.train.recipes import HEADS, NOISE_SCALES, PGDAT, RRM, FastAT, Standard

STUDENTS = ("standard", "pgd_at", "fast_at", "rrm", "rrm_teacher_arch")
RRM_STUDENTS = ("rrm", "rrm_teacher_arch")      # the students that learn from the teacher
ONE_SEED = ("standard",)                        # the non-robust reference: the first seed only
LABELS = {"standard": "standard", "pgd_at": "PGD-AT", "fast_at": "Fast-AT", "rrm": "RRM",
          "rrm_teacher_arch": "RRM, teacher's architecture"}
# the demo's options that set RRM students (refused by the other sections)
RRM_OPTIONS = ("rrm_epochs", "rrm_lambda", "rrm_noise", "rrm_noise_scales", "rrm_head", "rrm_robust_head")
# Options that only some sections take: argparse dest -> those sections. Each section's module
# declares its own; usage_error refuses any of them given to another section.
RRM_SECTION_OPTIONS = {option: ("rrm",) for option in RRM_OPTIONS}
METHODS = ("standard: cross-entropy on clean images. PGD-AT: adversarial training, cross-entropy on PGD "
           "examples. Fast-AT: adversarial training on one FGSM step from a random start. RRM: robust "
           "representation matching, noisy images, a small cross-entropy term minus the cosine (or the "
           "normalised L2 distance) between the student's and the frozen robust teacher's penultimate "
           "features; 'teacher's head': the teacher's classifier on the student's projected features, "
           "'robust head': the last layer alone trained last on the student's PGD examples.")


def epochs_text(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


@dataclass
class DemoSettings:
    eps: float = 0.1
    train_samples: int = 20000          # the first N training images (every run)
    # the first N test images (final evaluation); 500, not 1,000, and no PGD restarts
    # (eval_restarts) keep 3 seeds of every student within the demo's time
    test_samples: int = 500
    seed: int = 0                       # the students' first seed (initial weights and draws)
    seeds: int = 3                      # seeds seed, seed + 1, ... of every student but ONE_SEED's
    teacher_seed: int = 0
    teacher_model: Dict[str, Any] = field(default_factory=lambda: {"name": "wide_cnn", "kwargs": {"width": 16}})
    teacher_epochs: int = 4
    teacher_steps: int = 5
    student_model: Dict[str, Any] = field(default_factory=lambda: {"name": "resnet_small", "kwargs": {"width": 8}})
    epochs: Dict[str, int] = field(default_factory=lambda: {"standard": 3, "pgd_at": 3, "fast_at": 3, "rrm": 4,
                                                            "rrm_teacher_arch": 4})
    pgd_at_steps: int = 7
    # RRM: a small cross-entropy weight and matching on noisy inputs gave the most robustness per
    # second in our trials (docs/training.md, "How the RRM settings were chosen").
    rrm_lambda_ce: float = 0.001
    rrm_noise_std: float = 0.2
    rrm_noise_scales: str = "fixed"     # train rrm --noise-scales: "uniform" draws each image's std in [0, std]
    # Each RRM student's classifier (train rrm --head), passes of the robust head trained last
    # (--robust-head-epochs) and matching distance (--kind): the best by AutoAttack-style accuracy
    # in docs/training.md, "RRM's head and matching points" (3 seeds each): the demo's
    # architecture with the teacher's head and the robust head (42.6%, against 34.3% without it);
    # the teacher's with the teacher's head, the robust head and normalised L2 (49.7%, against
    # 46.5% without the robust head; cosine gave 49.9% but a PGD-20 further above AutoAttack's).
    rrm: Dict[str, Dict[str, Any]] = field(default_factory=lambda: {
        "rrm": {"head": "teacher", "robust_head_epochs": 0.25, "kind": "cosine"},
        "rrm_teacher_arch": {"head": "teacher", "robust_head_epochs": 0.25, "kind": "l2_normalized"}})
    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "cosine"
    batch_size: int = 128
    curve_samples: int = 300            # held-out images of the per-epoch curve
    curve_steps: int = 10               # its PGD steps
    eval_steps: int = 20
    eval_restarts: int = 0              # > 0: also PGD with this many restarts (a column of its own)
    # AutoAttack-style evaluation: APGD-CE then APGD-T on the survivors. Square (5000 queries)
    # is left out here for time; `robust-fast eval --attack auto` runs it too.
    auto_attacks: Tuple[str, ...] = ("apgd-ce", "apgd-t")
    auto_steps: int = 50

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(train_samples=1000, test_samples=200, seeds=2, teacher_epochs=1, teacher_steps=3,
                   epochs={"standard": 1, "pgd_at": 1, "fast_at": 1, "rrm": 2, "rrm_teacher_arch": 2},
                   curve_samples=100, curve_steps=5, auto_steps=10)


def cache_dir() -> str:
    root = os.environ.get("ROBUST_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "robust_fast")
    return os.path.join(root, "models")


def teacher_key(settings: DemoSettings) -> Dict[str, Any]:
    """Everything the teacher's weights depend on: its cache name is a hash of this."""
    return {"model": settings.teacher_model, "recipe": "pgd_at", "eps": settings.eps,
            "steps": settings.teacher_steps, "epochs": settings.teacher_epochs,
            "train_samples": settings.train_samples, "seed": settings.teacher_seed, "optimizer": settings.optimizer,
            "lr": settings.lr, "schedule": settings.schedule, "batch_size": settings.batch_size}


def _config(settings: DemoSettings, epochs: int, seed: Optional[int] = None) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=settings.batch_size, optimizer=settings.optimizer,
                       lr=settings.lr, weight_decay=0.0, schedule=settings.schedule,
                       seed=settings.seed if seed is None else seed,
                       eval_samples=settings.curve_samples, eval_steps=settings.curve_steps,
                       eval_eps=settings.eps)


def cached_teacher(key: Dict[str, Any], model_spec: Dict[str, Any], recipe, train, held_out, config: TrainConfig,
                   log=print, retrain: bool = False, what: str = "teacher"):
    """(teacher, info): the model `model_spec` trained by `recipe` under `config` (its seed also
    seeds the initial weights), or the cached one when the same key was trained before. The
    cache name is a hash of key: everything the weights depend on."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"demo_teacher_{digest}.pt")
    if os.path.isfile(path) and not retrain:
        state = load_checkpoint(path)
        log(f"teacher: cached {path}")
        return model_from_checkpoint(state), {"path": path, "cached": True, "train_time_s": state["train_time_s"],
                                             "key": key}
    log(f"teacher: training {model_spec['name']} with {what} ({config.epochs} epochs); cached afterwards in {path}")
    torch.manual_seed(config.seed)
    teacher = build_model(model_spec["name"], **model_spec["kwargs"])
    work = path + ".run"
    result = fit(recipe, teacher, train, config, eval_data=held_out, out_dir=work)
    os.makedirs(cache_dir(), exist_ok=True)
    os.replace(os.path.join(work, CHECKPOINT_NAME), path)
    shutil.rmtree(work, ignore_errors=True)
    return teacher.eval(), {"path": path, "cached": False, "train_time_s": result.train_time_s, "key": key}


def robust_teacher(settings: DemoSettings, train, held_out, log=print, retrain: bool = False):
    """(teacher, info): from the cache when a teacher with these settings was trained before."""
    config = _config(settings, settings.teacher_epochs)
    config.seed = settings.teacher_seed
    return cached_teacher(teacher_key(settings), settings.teacher_model,
                          PGDAT(eps=settings.eps, steps=settings.teacher_steps), train, held_out, config,
                          log=log, retrain=retrain, what=f"PGD-{settings.teacher_steps} AT")


def _recipe(name: str, settings: DemoSettings, teacher, teacher_path: str, seed: int):
    if name == "standard":
        return Standard()
    if name == "pgd_at":
        return PGDAT(eps=settings.eps, steps=settings.pgd_at_steps)
    if name == "fast_at":
        return FastAT(eps=settings.eps)
    options = settings.rrm[name]
    return RRM(teacher, lambda_ce=settings.rrm_lambda_ce, noise_std=settings.rrm_noise_std,
               noise_scales=settings.rrm_noise_scales, kind=options["kind"],
               teacher_path=teacher_path, head=options["head"], robust_head_epochs=options["robust_head_epochs"],
               eps=settings.eps, seed=seed)


def initial_student(name: str, settings: DemoSettings, seed: int) -> torch.nn.Module:
    """The student `name` of seed `seed`, untrained: every student of the demo's architecture
    starts from the same weights for one seed. The teacher's architecture draws its weights
    after those, so that no seed restarts from the teacher's own initial weights (its seed is
    drawn from the same numbers)."""
    torch.manual_seed(seed)
    model = build_model(settings.student_model["name"], **settings.student_model["kwargs"])
    if name == "rrm_teacher_arch":
        model = build_model(settings.teacher_model["name"], **settings.teacher_model["kwargs"])
    return model


def model_name(name: str, settings: DemoSettings) -> str:
    return (settings.teacher_model if name == "rrm_teacher_arch" else settings.student_model)["name"]


def variant(name: str, settings: DemoSettings) -> str:
    """What sets the student apart, for the table: an RRM student's head, distance and (when not
    the one fixed std) noise scales."""
    if name not in RRM_STUDENTS:
        return ""
    o = settings.rrm[name]
    parts = ["teacher's head" if o["head"] == "teacher" else "teacher's head fine-tuned"
             if o["head"] == "teacher_finetune" else "own head",
             "normalised L2" if o["kind"] == "l2_normalized" else o["kind"]]
    if o["robust_head_epochs"]:
        parts.append(f"robust head ({o['robust_head_epochs']:g} pass)")
    if settings.rrm_noise_scales == "uniform":
        parts.append(f"noise std uniform in [0, {settings.rrm_noise_std:g}]")
    return ", ".join(parts)


def _evaluate(model, test, settings: DemoSettings, seed: int) -> Dict[str, Any]:
    one = evaluate(model, *test, eps=settings.eps, steps=settings.eval_steps, seed=seed)
    row = {"clean_acc": one["clean_acc"], "robust_acc": one["robust_acc"], "eval_time_s": one["time_s"]}
    if settings.eval_restarts:
        # With restarts a sample counts as robust only if every restart fails on it (attacks.pgd
        # keeps, per sample, the restart that succeeds).
        many = evaluate(model, *test, eps=settings.eps, steps=settings.eval_steps, restarts=settings.eval_restarts,
                        seed=seed + 1)
        row["robust_acc_restarts"] = many["robust_acc"]
        row["eval_time_s"] += many["time_s"]
    auto = evaluate(model, *test, eps=settings.eps, steps=settings.auto_steps, attack="auto",
                    auto_attacks=settings.auto_attacks, seed=seed + 2)
    row["robust_acc_auto"] = auto["robust_acc"]
    row["eval_time_s"] += auto["time_s"]
    return row


# per seed: a run's numbers; over seeds: their mean and standard deviation
METRICS = ("clean_acc", "robust_acc", "robust_acc_restarts", "robust_acc_auto", "train_time_s",
           "train_time_with_teacher_s")
RATIOS = ("time", "time_with_teacher", "robust", "auto")
BASES = ("pgd_at", "fast_at")


def add_ratios(runs: List[Dict[str, Any]]) -> None:
    """Each run's times and accuracies divided by the same seed's PGD-AT and Fast-AT students'
    (in place: time_vs_pgd_at, time_with_teacher_vs_pgd_at, robust_vs_pgd_at, auto_vs_pgd_at...).
    None where there is nothing to divide (no teacher's time, or a reference of accuracy 0)."""
    reference = {(run["recipe"], run["seed"]): run for run in runs}
    for run in runs:
        for base in BASES:
            ref = reference[(base, run["seed"])]
            pairs = {"time": ("train_time_s", "train_time_s"),
                     "time_with_teacher": ("train_time_with_teacher_s", "train_time_s"),
                     "robust": ("robust_acc", "robust_acc"), "auto": ("robust_acc_auto", "robust_acc_auto")}
            for ratio, (mine, theirs) in pairs.items():
                value, divisor = run.get(mine), ref.get(theirs)
                run[f"{ratio}_vs_{base}"] = value / divisor if value is not None and divisor else None


def summarize(runs: List[Dict[str, Any]], keys) -> Dict[str, Any]:
    """Mean, sample standard deviation (0 for one run), min and max of each key over runs;
    a key no run has (None everywhere) is left out."""
    out: Dict[str, Any] = {}
    for key in keys:
        values = [run[key] for run in runs if run.get(key) is not None]
        if not values:
            continue
        out[key] = statistics.fmean(values)
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    return out


def student_rows(runs: List[Dict[str, Any]], settings: DemoSettings) -> List[Dict[str, Any]]:
    """One row per student: its runs' mean and spread over seeds (ratios: the mean of each seed's)."""
    rows = []
    for name in STUDENTS:
        mine = [run for run in runs if run["recipe"] == name]
        if not mine:
            continue
        # a ratio's mean only where every seed has one: a mean over some seeds would mix
        ratios = [key for key in (f"{r}_vs_{b}" for r in RATIOS for b in BASES)
                  if all(run[key] is not None for run in mine)]
        rows.append({"recipe": name, "student": LABELS[name], "model": model_name(name, settings),
                     "variant": variant(name, settings), "epochs": settings.epochs[name],
                     "seeds": [run["seed"] for run in mine], **summarize(mine, METRICS + tuple(ratios))})
    return rows


def _machine() -> Dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": list(load) if load else None}


def plot(rows: List[Dict[str, Any]], curves: Dict[Tuple[str, int], List[Dict[str, Any]]], settings: DemoSettings,
         path: str) -> None:
    """Robust accuracy against training time: the first seed's per-epoch curve of each student,
    and a star at the mean over seeds of its final PGD accuracy and training time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for row in rows:
        name = row["recipe"]
        history = curves[(name, row["seeds"][0])]
        times = [0.0] + [r["train_time_s"] for r in history]
        accuracies = [None] + [r.get("robust_acc") for r in history]
        points = [(t, a) for t, a in zip(times, accuracies) if a is not None]
        label = LABELS[name] + (f" ({row['model']})" if name in RRM_STUDENTS else "")
        line, = axes.plot([t for t, _ in points], [100 * a for _, a in points], marker="o", label=label)
        axes.scatter([row["train_time_s"]], [100 * row["robust_acc"]], marker="*", s=160, color=line.get_color(),
                     zorder=3)
    axes.set_xlabel("training time (s)")
    axes.set_ylabel(f"robust accuracy (%), L-inf eps {settings.eps:g}")
    axes.set_title(f"Students trained five ways; lines: per epoch, PGD-{settings.curve_steps}, first seed\n"
                   f"stars: final PGD-{settings.eval_steps} on {settings.test_samples} test images, mean of "
                   f"{settings.seeds} seed(s)", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def usage_error(args, *section_options: Dict[str, Tuple[str, ...]]) -> Optional[str]:
    """The options given to `demo <section>` that only other sections take (section_options:
    dest -> sections), as one line; None when there are none. A flag counts when set."""
    given = [option for options in section_options for option, sections in options.items()
             if args.section not in sections and getattr(args, option, None) is not None
             and getattr(args, option) is not False]
    if not given:
        return None
    return f"{', '.join('--' + o.replace('_', '-') for o in given)}: not an option of `demo {args.section}`"


def run(settings: DemoSettings, out: str, log=print, retrain_teacher: bool = False,
        data_root: Optional[str] = None) -> Dict[str, Any]:
    """Runs the demo into the folder `out` and returns what results.json holds."""
    if isinstance(settings.seeds, bool) or not isinstance(settings.seeds, int) or settings.seeds < 1:
        raise ValueError(f"demo: seeds must be an int >= 1, got {settings.seeds!r}")
    os.makedirs(out, exist_ok=True)
    started = time.time()
    train = load_fashion_mnist("train", root=data_root, limit=settings.train_samples)
    test = load_fashion_mnist("test", root=data_root, limit=settings.test_samples)
    held_out = (test[0][:settings.curve_samples], test[1][:settings.curve_samples])
    teacher, teacher_info = robust_teacher(settings, train, held_out, log=log, retrain=retrain_teacher)
    teacher_info.update(_evaluate(teacher, test, settings, settings.seed))
    runs, curves = [], {}
    for seed in range(settings.seed, settings.seed + settings.seeds):
        for name in STUDENTS:
            if name in ONE_SEED and seed != settings.seed:
                continue
            student = initial_student(name, settings, seed)
            log(f"student: {LABELS[name]} ({model_name(name, settings)}, {epochs_text(settings.epochs[name])}, "
                f"seed {seed})")
            result = fit(_recipe(name, settings, teacher, teacher_info["path"], seed), student, train,
                         _config(settings, settings.epochs[name], seed), eval_data=held_out,
                         out_dir=os.path.join(out, f"{name}-seed{seed}"))
            curves[(name, seed)] = result.history
            # a student that learns from the teacher also costs the teacher's training, shown beside
            with_teacher = (result.train_time_s + teacher_info["train_time_s"] if name in RRM_STUDENTS else None)
            runs.append({"recipe": name, "seed": seed, "train_time_s": result.train_time_s,
                         "train_time_with_teacher_s": with_teacher, **_evaluate(student, test, settings, seed)})
    add_ratios(runs)
    rows = student_rows(runs, settings)
    with open(os.path.join(out, "curves.jsonl"), "w", encoding="utf-8") as f:
        for (name, seed), history in curves.items():
            for record in history:
                f.write(json.dumps({"recipe": name, "seed": seed, **record}) + "\n")
    plot(rows, curves, settings, os.path.join(out, "robustness.png"))
    by_name = {row["recipe"]: row for row in rows}
    versus = {name: {base: {ratio: by_name[name].get(f"{ratio}_vs_{base}") for ratio in RATIOS} for base in BASES}
              for name in RRM_STUDENTS}
    results = {"settings": dataclasses.asdict(settings), "machine": _machine(), "teacher": teacher_info,
               "students": rows, "runs": runs, "versus": versus, "total_time_s": time.time() - started}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


def _cell(row: Dict[str, Any], key: str, fmt: str) -> str:
    """mean ± standard deviation over seeds (the mean alone for one seed); '-' for none."""
    if row.get(key) is None:
        return "-"
    text = format(row[key], fmt)
    return text + (f" ± {format(row[f'{key}_sd'], fmt)}" if len(row["seeds"]) > 1 else "")


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def table(results: Dict[str, Any]) -> str:
    s = results["settings"]
    auto = f"AutoAttack-style ({' + '.join(a.upper() for a in s['auto_attacks'])}, {s['auto_steps']} steps)"
    columns = [("clean acc", "clean_acc", ".1%"), (f"PGD-{s['eval_steps']} acc", "robust_acc", ".1%")]
    if s["eval_restarts"]:
        columns.append((f"PGD-{s['eval_steps']} x{s['eval_restarts']} restarts", "robust_acc_restarts", ".1%"))
    columns += [(auto, "robust_acc_auto", ".1%"), ("training time s", "train_time_s", ".1f"),
                ("with teacher s", "train_time_with_teacher_s", ".1f"), ("time / PGD-AT", "time_vs_pgd_at", ".2f"),
                ("with teacher / PGD-AT", "time_with_teacher_vs_pgd_at", ".2f"),
                (f"PGD-{s['eval_steps']} / PGD-AT", "robust_vs_pgd_at", ".2f"),
                ("AutoAttack-style / PGD-AT", "auto_vs_pgd_at", ".2f")]
    lines = ["| student | model | seeds | epochs | " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "---|" * (4 + len(columns))]
    for row in results["students"]:
        name = row["student"] + (f": {row['variant']}" if row["variant"] else "")
        cells = [name, row["model"], str(len(row["seeds"])), str(row["epochs"])]
        lines.append("| " + " | ".join(cells + [_cell(row, key, fmt) for _, key, fmt in columns]) + " |")
    t = results["teacher"]
    teacher_line = (f"teacher {s['teacher_model']['name']} (PGD-{s['teacher_steps']} AT, "
                    f"{epochs_text(s['teacher_epochs'])}, {t['train_time_s']:.0f} s of training"
                    f"{', cached' if t['cached'] else ''}): clean {t['clean_acc']:.1%}, PGD-{s['eval_steps']} "
                    f"{t['robust_acc']:.1%}, AutoAttack-style {t['robust_acc_auto']:.1%}")
    by_name = {row["recipe"]: row for row in results["students"]}
    summary = []
    for name in RRM_STUDENTS:
        v, row = results["versus"][name], by_name[name]
        p, f = v["pgd_at"], v["fast_at"]
        summary.append(
            f"{LABELS[name]} student ({row['model']}): {_percent(p['auto'])} of the PGD-AT student's AutoAttack-style "
            f"accuracy (PGD-{s['eval_steps']}: {_percent(p['robust'])}) in {_percent(p['time'])} of its training "
            f"time ({_percent(p['time_with_teacher'])} counting the teacher's training); {_percent(f['auto'])} of "
            f"the Fast-AT student's in {_percent(f['time'])} of its time.")
    seeds = s["seeds"]
    header = (f"Fashion-MNIST, L-inf eps {s['eps']:g}, {s['train_samples']} training images, "
              f"{s['test_samples']} test images; seeds {s['seed']}-{s['seed'] + seeds - 1} (mean ± standard "
              f"deviation; {', '.join(LABELS[n] for n in ONE_SEED)}: seed {s['seed']} only)" if seeds > 1 else
              f"Fashion-MNIST, L-inf eps {s['eps']:g}, {s['train_samples']} training images, "
              f"{s['test_samples']} test images; seed {s['seed']}")
    legend = [METHODS,
              "time / PGD-AT: this student's training time / the same seed's PGD-AT student's (the mean over "
              "seeds); 'with teacher' adds the teacher's training time for the students that learn from it. "
              f"PGD-{s['eval_steps']} / PGD-AT and AutoAttack-style / PGD-AT: its accuracies / the same seed's "
              "PGD-AT student's.",
              f"The per-epoch curves (robustness.png, curves.jsonl) use PGD-{s['curve_steps']} on the first "
              f"{s['curve_samples']} test images; the table's accuracies use all {s['test_samples']}."]
    return "\n".join([header, teacher_line, "", *lines, "", *summary, ""] + legend)


def add_demo_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("demo", help="robustness transfer end to end on Fashion-MNIST (eps 0.1): a cached "
                                         "robust teacher, students trained five ways over 3 seeds, one table; "
                                         "`demo crt`: certified robustness transfer (randomized smoothing)")
    p.add_argument("section", nargs="?", choices=("rrm", "crt", "darht", "transfer"), default="rrm",
                   help="rrm (default): RRM against adversarial training at L-inf eps 0.1; crt: CRT against "
                        "Gaussian and SmoothAdv training, certified by randomized smoothing at sigma 0.25; darht: "
                        "DARHT from heterogeneous and homogeneous teacher sets against ARD and PGD-AT; transfer: "
                        "robust transfer learning (a new head, fine-tuning, LwF) to new classes")
    p.add_argument("--quick", action="store_true", help="the same path on a subset (a check, not a measurement)")
    p.add_argument("--out", default=None, help="results folder (default runs/demo-<time>)")
    p.add_argument("--retrain-teacher", action="store_true",
                   help="train the teacher (demo transfer: the sources) even when cached")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default $ROBUST_FAST_DATA or Debian's)")
    p.add_argument("--seed", type=int, default=0,
                   help="the students' (first) seed (the teacher's is fixed); rrm and darht: --seeds N runs "
                        "seeds seed..seed+N-1")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's, or 1 when the load average exceeds the core count: "
                        "oversubscribed threads wait on each other)")
    # each --rrm-* option sets both RRM students (the demo's architecture and the teacher's)
    p.add_argument("--rrm-epochs", type=int, default=None, help="both RRM students' epochs (default 4)")
    p.add_argument("--rrm-lambda", type=float, default=None, help="RRM's cross-entropy weight")
    p.add_argument("--rrm-noise", type=float, default=None, help="RRM: match on x + N(0, std^2)")
    p.add_argument("--rrm-noise-scales", choices=NOISE_SCALES, default=None,
                   help="RRM: fixed (default): every image's noise std is --rrm-noise's; uniform: each image's "
                        "drawn uniform in [0, that std] (as train rrm --noise-scales)")
    p.add_argument("--rrm-head", choices=HEADS, default=None,
                   help="both RRM students' classifier (as train rrm --head; default teacher)")
    p.add_argument("--rrm-robust-head", type=float, default=None, metavar="EPOCHS",
                   help="both RRM students: train the last layer alone on PGD examples for this many passes "
                        "at the end (default 0.25)")
    return p


def choose_threads(requested: Optional[int]) -> int:
    if requested is not None:
        torch.set_num_threads(requested)
    elif hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        torch.set_num_threads(1)
    return torch.get_num_threads()


@contextlib.contextmanager
def demo_threads(requested: Optional[int]):
    """Every demo section's torch threads (choose_threads), printed, and restored afterwards:
    main() may be called from a longer-lived process."""
    previous = torch.get_num_threads()
    try:
        print(f"torch threads: {choose_threads(requested)}")
        yield
    finally:
        torch.set_num_threads(previous)


def output_folder(args: argparse.Namespace, section: str = "") -> str:
    """--out, or runs/demo[-<section>][-quick]-<time>."""
    name = "demo" + (f"-{section}" if section else "") + ("-quick" if args.quick else "")
    return args.out or os.path.join("runs", time.strftime(f"{name}-%Y%m%d-%H%M%S"))


def report(out: str, text: str, files: str) -> None:
    """Prints a section's table, writes it to out/table.md and says what the folder holds."""
    print(text)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"\nresults: {out}/ ({files})")


def run_demo(args: argparse.Namespace) -> int:
    with demo_threads(args.threads):
        return _run_demo(args)


def demo_settings(args: argparse.Namespace) -> DemoSettings:
    """The RRM section's settings: the defaults (or --quick's) and the options given."""
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.seed = args.seed
    if getattr(args, "seeds", None) is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        settings.seeds = args.seeds
    # checked here, not when the first RRM student starts (after the other students' training)
    if args.rrm_epochs is not None and args.rrm_epochs < 1:
        raise ValueError(f"--rrm-epochs must be >= 1, got {args.rrm_epochs}")
    if args.rrm_robust_head is not None and not args.rrm_robust_head >= 0:
        raise ValueError(f"--rrm-robust-head must be >= 0, got {args.rrm_robust_head}")
    if args.rrm_epochs is not None:
        for name in RRM_STUDENTS:
            settings.epochs[name] = args.rrm_epochs
    if args.rrm_lambda is not None:
        settings.rrm_lambda_ce = args.rrm_lambda
    if args.rrm_noise is not None:
        settings.rrm_noise_std = args.rrm_noise
    if args.rrm_noise_scales is not None:
        if args.rrm_noise_scales != "fixed" and not settings.rrm_noise_std:
            raise ValueError(f"--rrm-noise-scales {args.rrm_noise_scales} needs --rrm-noise > 0 (its largest std)")
        settings.rrm_noise_scales = args.rrm_noise_scales
    for option, key in (("rrm_head", "head"), ("rrm_robust_head", "robust_head_epochs")):
        if getattr(args, option) is not None:
            for name in RRM_STUDENTS:
                settings.rrm[name][key] = getattr(args, option)
    return settings


def _run_demo(args: argparse.Namespace) -> int:
    try:
        settings = demo_settings(args)
    except ValueError as error:
        print(f"robust-fast demo: error: {error}")
        return 2
    out = output_folder(args)
    results = run(settings, out, retrain_teacher=args.retrain_teacher, data_root=args.data)
    report(out, table(results), "results.json, table.md, curves.jsonl, robustness.png, one folder per run; "
                                f"{results['total_time_s']:.0f} s")
    return 0
