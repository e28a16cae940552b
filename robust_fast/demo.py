"""`robust-fast demo`: robustness transfer end to end on Fashion-MNIST at L-inf eps = 0.1.

1. A robust teacher (WideCNN, PGD adversarial training), trained once and cached outside the
   checkout under a name derived from its settings (~/.cache/robust_fast/models, or
   $ROBUST_FAST_CACHE/models).
2. One student architecture (ResNetSmall, another family than the teacher) trained four ways
   from the same initial weights: standard, PGD-AT, Fast-AT, and RRM from the teacher.
3. Each evaluated with the same PGD-20 (and PGD-20 with restarts) on the same test images.
4. One table (clean and robust accuracy, training time, RRM against PGD-AT and Fast-AT), and
   in the results folder: results.json, curves.jsonl (every epoch of every run), robustness.png
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
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from robust_fast.data import load_fashion_mnist
from robust_fast.models import build_model
from robust_fast.train.checkpoint import load_checkpoint, model_from_checkpoint
from robust_fast.train.commands import format_table
from robust_fast.train.config import TrainConfig
from robust_fast.train.evaluate import evaluate
from robust_fast.train.loop import CHECKPOINT_NAME, fit
from robust_fast.train.recipes import HEADS, PGDAT, RRM, FastAT, Standard

STUDENTS = ("standard", "pgd_at", "fast_at", "rrm")
LABELS = {"standard": "standard", "pgd_at": "PGD-AT", "fast_at": "Fast-AT", "rrm": "RRM"}
METHODS = ("standard: cross-entropy on clean images. PGD-AT: adversarial training, cross-entropy on PGD "
           "examples. Fast-AT: adversarial training on one FGSM step from a random start. RRM: robust "
           "representation matching, clean images, a small cross-entropy term minus the cosine between the "
           "student's and the frozen robust teacher's penultimate features.")


def epochs_text(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


@dataclass
class DemoSettings:
    eps: float = 0.1
    train_samples: int = 20000          # the first N training images (every run)
    test_samples: int = 1000            # the first N test images (final evaluation)
    seed: int = 0                       # the students' initial weights and draws
    teacher_seed: int = 0
    teacher_model: Dict[str, Any] = field(default_factory=lambda: {"name": "wide_cnn", "kwargs": {"width": 16}})
    teacher_epochs: int = 4
    teacher_steps: int = 5
    student_model: Dict[str, Any] = field(default_factory=lambda: {"name": "resnet_small", "kwargs": {"width": 8}})
    epochs: Dict[str, int] = field(default_factory=lambda: {"standard": 3, "pgd_at": 3, "fast_at": 3, "rrm": 4})
    pgd_at_steps: int = 7
    # RRM: a small cross-entropy weight and matching on noisy inputs gave the most robustness per
    # second in our trials (README, "Training and the demo"); 4 epochs fit in a third of PGD-AT's time.
    rrm_lambda_ce: float = 0.001
    rrm_noise_std: float = 0.2
    # RRM's classifier (train rrm --head) and the passes of the robust head trained last
    # (--robust-head-epochs): docs/training.md, "RRM's head and matching points".
    rrm_head: str = "own"
    rrm_robust_head_epochs: float = 0.0
    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "cosine"
    batch_size: int = 128
    curve_samples: int = 300            # held-out images of the per-epoch curve
    curve_steps: int = 10               # its PGD steps
    eval_steps: int = 20
    eval_restarts: int = 3
    # AutoAttack-style evaluation: APGD-CE then APGD-T on the survivors. Square (5000 queries)
    # is left out here for time; `robust-fast eval --attack auto` runs it too.
    auto_attacks: Tuple[str, ...] = ("apgd-ce", "apgd-t")
    auto_steps: int = 50

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(train_samples=1000, test_samples=200, teacher_epochs=1, teacher_steps=3,
                   epochs={"standard": 1, "pgd_at": 1, "fast_at": 1, "rrm": 2}, curve_samples=100,
                   curve_steps=5, eval_restarts=2, auto_steps=10)


def cache_dir() -> str:
    root = os.environ.get("ROBUST_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "robust_fast")
    return os.path.join(root, "models")


def teacher_key(settings: DemoSettings) -> Dict[str, Any]:
    """Everything the teacher's weights depend on: its cache name is a hash of this."""
    return {"model": settings.teacher_model, "recipe": "pgd_at", "eps": settings.eps,
            "steps": settings.teacher_steps, "epochs": settings.teacher_epochs,
            "train_samples": settings.train_samples, "seed": settings.teacher_seed, "optimizer": settings.optimizer,
            "lr": settings.lr, "schedule": settings.schedule, "batch_size": settings.batch_size}


def _config(settings: DemoSettings, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=settings.batch_size, optimizer=settings.optimizer,
                       lr=settings.lr, weight_decay=0.0, schedule=settings.schedule, seed=settings.seed,
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


def _recipe(name: str, settings: DemoSettings, teacher, teacher_path: str):
    if name == "standard":
        return Standard()
    if name == "pgd_at":
        return PGDAT(eps=settings.eps, steps=settings.pgd_at_steps)
    if name == "fast_at":
        return FastAT(eps=settings.eps)
    return RRM(teacher, lambda_ce=settings.rrm_lambda_ce, noise_std=settings.rrm_noise_std,
               teacher_path=teacher_path, head=settings.rrm_head, robust_head_epochs=settings.rrm_robust_head_epochs,
               eps=settings.eps, seed=settings.seed)


def _evaluate(model, test, settings: DemoSettings) -> Dict[str, Any]:
    one = evaluate(model, *test, eps=settings.eps, steps=settings.eval_steps, seed=settings.seed)
    many = evaluate(model, *test, eps=settings.eps, steps=settings.eval_steps, restarts=settings.eval_restarts,
                    seed=settings.seed + 1)
    # With restarts a sample counts as robust only if every restart fails on it (attacks.pgd keeps,
    # per sample, the restart that succeeds).
    auto = evaluate(model, *test, eps=settings.eps, steps=settings.auto_steps, attack="auto",
                    auto_attacks=settings.auto_attacks, seed=settings.seed + 2)
    return {"clean_acc": one["clean_acc"], "robust_acc": one["robust_acc"],
            "robust_acc_restarts": many["robust_acc"], "robust_acc_auto": auto["robust_acc"],
            "eval_time_s": one["time_s"] + many["time_s"] + auto["time_s"]}


def _machine() -> Dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": list(load) if load else None}


def plot(rows: List[Dict[str, Any]], curves: Dict[str, List[Dict[str, Any]]], settings: DemoSettings, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for row in rows:
        name = row["recipe"]
        history = curves[name]
        times = [0.0] + [r["train_time_s"] for r in history]
        accuracies = [None] + [r.get("robust_acc") for r in history]
        points = [(t, a) for t, a in zip(times, accuracies) if a is not None]
        line, = axes.plot([t for t, _ in points], [100 * a for _, a in points], marker="o",
                          label=f"{LABELS[name]} (per epoch, PGD-{settings.curve_steps})")
        axes.scatter([row["train_time_s"]], [100 * row["robust_acc"]], marker="*", s=160, color=line.get_color(),
                     zorder=3)
    axes.set_xlabel("training time (s)")
    axes.set_ylabel(f"robust accuracy (%), L-inf eps {settings.eps:g}")
    axes.set_title(f"Student ({settings.student_model['name']}) trained four ways\n"
                   f"stars: final PGD-{settings.eval_steps} on {settings.test_samples} test images", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(settings: DemoSettings, out: str, log=print, retrain_teacher: bool = False,
        data_root: Optional[str] = None) -> Dict[str, Any]:
    """Runs the demo into the folder `out` and returns what results.json holds."""
    os.makedirs(out, exist_ok=True)
    started = time.time()
    train = load_fashion_mnist("train", root=data_root, limit=settings.train_samples)
    test = load_fashion_mnist("test", root=data_root, limit=settings.test_samples)
    held_out = (test[0][:settings.curve_samples], test[1][:settings.curve_samples])
    teacher, teacher_info = robust_teacher(settings, train, held_out, log=log, retrain=retrain_teacher)
    teacher_info.update(_evaluate(teacher, test, settings))
    rows, curves = [], {}
    for name in STUDENTS:
        torch.manual_seed(settings.seed)  # every student starts from the same weights
        student = build_model(settings.student_model["name"], **settings.student_model["kwargs"])
        run_dir = os.path.join(out, name)
        log(f"student: {LABELS[name]} ({epochs_text(settings.epochs[name])})")
        result = fit(_recipe(name, settings, teacher, teacher_info["path"]), student, train,
                     _config(settings, settings.epochs[name]), eval_data=held_out, out_dir=run_dir)
        curves[name] = result.history
        # a student that learns from the teacher also costs the teacher's training, shown beside
        with_teacher = result.train_time_s + teacher_info["train_time_s"] if name == "rrm" else None
        rows.append({"recipe": name, "student": LABELS[name], "epochs": settings.epochs[name],
                     "train_time_s": result.train_time_s, "train_time_with_teacher_s": with_teacher,
                     **_evaluate(student, test, settings)})
    by_name = {row["recipe"]: row for row in rows}
    rrm = by_name["rrm"]
    for row in rows:
        for base in ("pgd_at", "fast_at"):
            reference = by_name[base]
            row[f"time_vs_{base}"] = row["train_time_s"] / reference["train_time_s"]
            if row["train_time_with_teacher_s"] is not None:
                row[f"time_with_teacher_vs_{base}"] = row["train_time_with_teacher_s"] / reference["train_time_s"]
            row[f"robust_vs_{base}"] = (row["robust_acc"] / reference["robust_acc"]
                                        if reference["robust_acc"] else None)
    with open(os.path.join(out, "curves.jsonl"), "w", encoding="utf-8") as f:
        for name in STUDENTS:
            for record in curves[name]:
                f.write(json.dumps({"recipe": name, **record}) + "\n")
    plot(rows, curves, settings, os.path.join(out, "robustness.png"))
    results = {"settings": dataclasses.asdict(settings), "machine": _machine(), "teacher": teacher_info,
               "students": rows, "total_time_s": time.time() - started,
               "rrm_vs_pgd_at": {"robust": rrm["robust_vs_pgd_at"], "time": rrm["time_vs_pgd_at"]},
               "rrm_vs_fast_at": {"robust": rrm["robust_vs_fast_at"], "time": rrm["time_vs_fast_at"]}}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


def table(results: Dict[str, Any]) -> str:
    s = results["settings"]
    columns = [("student", "student", ""), ("epochs", "epochs", "d"), ("clean acc", "clean_acc", ".1%"),
               (f"PGD-{s['eval_steps']} acc", "robust_acc", ".1%"),
               (f"PGD-{s['eval_steps']} x{s['eval_restarts']} restarts", "robust_acc_restarts", ".1%"),
               (f"AutoAttack-style ({' + '.join(a.upper() for a in s['auto_attacks'])}, {s['auto_steps']} steps)",
                "robust_acc_auto", ".1%"),
               ("training time s", "train_time_s", ".1f"), ("with teacher s", "train_time_with_teacher_s", ".1f"),
               ("time / PGD-AT", "time_vs_pgd_at", ".2f"), ("robust / PGD-AT", "robust_vs_pgd_at", ".2f")]
    t = results["teacher"]
    teacher_line = (f"teacher {s['teacher_model']['name']} (PGD-{s['teacher_steps']} AT, "
                    f"{epochs_text(s['teacher_epochs'])}, {t['train_time_s']:.0f} s of training"
                    f"{', cached' if t['cached'] else ''}): clean {t['clean_acc']:.1%}, PGD-{s['eval_steps']} "
                    f"{t['robust_acc']:.1%}")
    r, f = results["rrm_vs_pgd_at"], results["rrm_vs_fast_at"]
    by_name = {row["recipe"]: row for row in results["students"]}

    def robust_part(ratio, base):  # a ratio is None when the reference student has no robust accuracy
        if ratio["robust"] is None:
            return f"no robust-accuracy ratio (the {base} student has none)"
        return f"{ratio['robust']:.0%} of the {base} student's robust accuracy"
    with_teacher = by_name["rrm"]["time_with_teacher_vs_pgd_at"]
    summary = (f"RRM student: {robust_part(r, 'PGD-AT')} in {r['time']:.0%} of its training time "
               f"({with_teacher:.0%} counting the teacher's training); {robust_part(f, 'Fast-AT')} in "
               f"{f['time']:.0%} of its time.")
    header = (f"Fashion-MNIST, L-inf eps {s['eps']:g}, {s['train_samples']} training images, "
              f"{s['test_samples']} test images; student {s['student_model']['name']}")
    legend = [METHODS,
              "time / PGD-AT: this student's training time / the PGD-AT student's; robust / PGD-AT: its PGD-"
              f"{s['eval_steps']} accuracy / the PGD-AT student's. training time excludes the teacher's; "
              "'with teacher' adds it for the student that learns from it.",
              f"The per-epoch curves (robustness.png, curves.jsonl) use PGD-{s['curve_steps']} on the first "
              f"{s['curve_samples']} test images; the table's accuracies use all {s['test_samples']}."]
    return "\n".join([header, teacher_line, "", format_table(results["students"], columns), "", summary, ""]
                     + legend)


def add_demo_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("demo", help="robustness transfer end to end on Fashion-MNIST (eps 0.1): a cached "
                                         "robust teacher, a student trained four ways, one table; "
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
    p.add_argument("--seed", type=int, default=0, help="the students' seed (the teacher's is fixed)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's, or 1 when the load average exceeds the core count: "
                        "oversubscribed threads wait on each other)")
    p.add_argument("--rrm-epochs", type=int, default=None)
    p.add_argument("--rrm-lambda", type=float, default=None, help="RRM's cross-entropy weight")
    p.add_argument("--rrm-noise", type=float, default=None, help="RRM: match on x + N(0, std^2)")
    p.add_argument("--rrm-head", choices=HEADS, default=None, help="RRM's classifier (as train rrm --head)")
    p.add_argument("--rrm-robust-head", type=float, default=None, metavar="EPOCHS",
                   help="RRM: train the last layer alone on PGD examples for this many passes at the end")
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


def _run_demo(args: argparse.Namespace) -> int:
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.seed = args.seed
    if args.rrm_epochs is not None:
        settings.epochs["rrm"] = args.rrm_epochs
    if args.rrm_lambda is not None:
        settings.rrm_lambda_ce = args.rrm_lambda
    if args.rrm_noise is not None:
        settings.rrm_noise_std = args.rrm_noise
    if args.rrm_head is not None:
        settings.rrm_head = args.rrm_head
    if args.rrm_robust_head is not None:
        settings.rrm_robust_head_epochs = args.rrm_robust_head
    out = output_folder(args)
    results = run(settings, out, retrain_teacher=args.retrain_teacher, data_root=args.data)
    report(out, table(results), "results.json, table.md, curves.jsonl, robustness.png, one folder per student")
    return 0
