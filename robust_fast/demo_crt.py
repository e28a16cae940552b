"""`robust-fast demo crt`: certified robustness transfer end to end on Fashion-MNIST at sigma = 0.25.

1. A teacher (WideCNN) trained with SmoothAdv, the expensive certified method, once, and cached
   like the RRM demo's teacher (a name derived from its settings, robust_fast.demo.cache_dir).
2. One student architecture (ResNetSmall) trained three ways from the same initial weights:
   Gaussian noise (Cohen et al.), SmoothAdv (Salman et al.), and CRT from the teacher.
3. Each smoothed classifier certified (robust_fast.certify.smoothing.certify) on the same test
   images with the same n0, n, alpha and noise streams.
4. One table (clean accuracy of g, certified accuracy at r = 0.25, 0.5, 0.75, ACR, training time
   with and without the teacher's, time and ACR against the SmoothAdv student), a paired
   bootstrap interval of the ACR difference CRT - Gaussian over the same images, and in the
   results folder: results.json (every number and each image's radius), table.md,
   certified.png (certified accuracy against radius), each run's checkpoint and log.

--quick runs the same path on a subset with a tiny n (a check that everything works, not a
measurement).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Union

import torch

from robust_fast.certify.smoothing import per_image_radius, plot_certified_accuracy
from robust_fast.data import load_fashion_mnist
from robust_fast.demo import _machine, cached_teacher, demo_threads, output_folder, report
from robust_fast.models import build_model
from robust_fast.train.commands import format_table
from robust_fast.train.config import TrainConfig
from robust_fast.train.evaluate_smoothing import SmoothingSettings, certify_sharded, smoothing_numbers
from robust_fast.train.loop import fit
from robust_fast.train.recipes import CRT, Gaussian, SmoothAdv

STUDENTS = ("gaussian", "smoothadv", "crt")
LABELS = {"gaussian": "Gaussian", "smoothadv": "SmoothAdv", "crt": "CRT"}
RADII = (0.0, 0.25, 0.5, 0.75)


@dataclass
class CRTDemoSettings:
    sigma: float = 0.25
    train_samples: int = 20000          # the first N training images (every run)
    test_samples: int = 500             # the first N test images, certified (n = 10,000: ~0.3 s each on 2 cores)
    seed: int = 0                       # the students' initial weights, draws and certification noise
    teacher_seed: int = 0
    teacher_model: Dict[str, Any] = field(default_factory=lambda: {"name": "wide_cnn", "kwargs": {"width": 16}})
    # The teacher and the SmoothAdv student share SmoothAdv's setting (as in the paper: CRT transfers
    # from the method it is compared with). 4 steps x 4 draws: a light setting (2 x 2) made SmoothAdv
    # only 5x Gaussian's cost, and the CRT student no better than the Gaussian one (docs/training.md).
    teacher_epochs: int = 6
    teacher_eps: float = 0.5            # SmoothAdv's L2 radius, PGD steps and noise draws for the teacher
    teacher_steps: int = 4
    teacher_noise_samples: int = 4
    student_model: Dict[str, Any] = field(default_factory=lambda: {"name": "resnet_small", "kwargs": {"width": 8}})
    # CRT's loss still falls after 3 epochs; the Gaussian student gets as many (it costs about as much)
    epochs: Dict[str, int] = field(default_factory=lambda: {"gaussian": 6, "smoothadv": 3, "crt": 6})
    smoothadv_eps: float = 0.5          # the SmoothAdv student's (the teacher's setting)
    smoothadv_steps: int = 4
    smoothadv_noise_samples: int = 4
    crt_alpha: float = 1.0              # the paper's: the L2 logit distance only
    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "cosine"
    batch_size: int = 128
    curve_samples: int = 300            # held-out images of the per-epoch record (accuracy under noise)
    n0: int = 100                       # certify's selection samples
    n: int = 10000                      # its estimation samples: the radius is capped at sigma * Phi^-1(alpha^(1/n))
    alpha: float = 0.001
    certify_batch: Union[int, str] = "auto"  # noisy copies per forward pass: measured (the numbers do not depend on it)
    bootstrap_samples: int = 10000

    @classmethod
    def quick(cls) -> "CRTDemoSettings":
        return cls(train_samples=512, test_samples=16, teacher_epochs=1, teacher_steps=2, teacher_noise_samples=2,
                   teacher_model={"name": "wide_cnn", "kwargs": {"width": 4}}, smoothadv_steps=2,
                   smoothadv_noise_samples=2, student_model={"name": "resnet_small", "kwargs": {"width": 4}},
                   epochs={"gaussian": 1, "smoothadv": 1, "crt": 1}, curve_samples=32, n0=10, n=200,
                   certify_batch=200, bootstrap_samples=500)


def teacher_key(settings: CRTDemoSettings) -> Dict[str, Any]:
    """Everything the teacher's weights depend on: its cache name is a hash of this."""
    return {"model": settings.teacher_model, "recipe": "smoothadv", "sigma": settings.sigma,
            "eps": settings.teacher_eps, "steps": settings.teacher_steps,
            "noise_samples": settings.teacher_noise_samples, "epochs": settings.teacher_epochs,
            "train_samples": settings.train_samples, "seed": settings.teacher_seed, "optimizer": settings.optimizer,
            "lr": settings.lr, "schedule": settings.schedule, "batch_size": settings.batch_size}


def _config(settings: CRTDemoSettings, epochs: int, seed: int) -> TrainConfig:
    # eval_steps 0: no L-inf PGD per epoch; the smoothing recipes record accuracy under noise
    return TrainConfig(epochs=epochs, batch_size=settings.batch_size, optimizer=settings.optimizer,
                       lr=settings.lr, weight_decay=0.0, schedule=settings.schedule, seed=seed,
                       eval_samples=settings.curve_samples, eval_steps=0)


def smoothadv_teacher(settings: CRTDemoSettings, train, held_out, log=print, retrain: bool = False):
    """(teacher, info): from the cache when a teacher with these settings was trained before."""
    recipe = SmoothAdv(sigma=settings.sigma, eps=settings.teacher_eps, steps=settings.teacher_steps,
                       noise_samples=settings.teacher_noise_samples)
    return cached_teacher(teacher_key(settings), settings.teacher_model, recipe, train, held_out,
                          _config(settings, settings.teacher_epochs, settings.teacher_seed), log=log,
                          retrain=retrain, what=f"SmoothAdv (eps {settings.teacher_eps:g}, "
                                                f"{settings.teacher_steps} steps, {settings.teacher_noise_samples} draws)")


def _recipe(name: str, settings: CRTDemoSettings, teacher, teacher_path: str):
    if name == "gaussian":
        return Gaussian(sigma=settings.sigma)
    if name == "smoothadv":
        return SmoothAdv(sigma=settings.sigma, eps=settings.smoothadv_eps, steps=settings.smoothadv_steps,
                         noise_samples=settings.smoothadv_noise_samples)
    return CRT(teacher, sigma=settings.sigma, alpha=settings.crt_alpha, teacher_path=teacher_path)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, samples: int = 10000, confidence: float = 0.95,
                     seed: int = 0) -> Dict[str, float]:
    """The mean difference mean(a - b) over paired items (the same images) and its percentile
    bootstrap interval: resample the items with replacement, `samples` times. Also the share of
    resamples whose difference is <= 0 (a one-sided bootstrap p-value for a > b)."""
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    if d.dim() != 1 or d.shape[0] == 0:
        raise ValueError(f"paired_bootstrap: a and b must be equal-length non-empty sequences, got {tuple(d.shape)}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap: confidence must be in (0, 1), got {confidence!r}")
    generator = torch.Generator().manual_seed(seed)
    means = torch.empty(samples, dtype=torch.float64)
    for start in range(0, samples, 1000):  # bounded memory: 1000 resamples at a time
        rows = min(1000, samples - start)
        means[start:start + rows] = d[torch.randint(0, d.shape[0], (rows, d.shape[0]), generator=generator)].mean(1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"difference": d.mean().item(), "low": low, "high": high, "confidence": confidence,
            "samples": samples, "share_not_above_zero": (means <= 0).double().mean().item()}


def _certify(model, test, settings: CRTDemoSettings):
    start = time.perf_counter()
    smoothing = SmoothingSettings(sigma=settings.sigma, n0=settings.n0, n=settings.n, alpha=settings.alpha)
    certificate = certify_sharded(model, test[0], smoothing, seed=settings.seed, batch_size=settings.certify_batch)
    numbers = smoothing_numbers(certificate, test[1], RADII)
    numbers["certify_time_s"] = time.perf_counter() - start
    numbers["radius_if_correct"] = per_image_radius(certificate, test[1]).tolist()
    return certificate, numbers


def run(settings: CRTDemoSettings, out: str, log=print, retrain_teacher: bool = False,
        data_root: Optional[str] = None, certify_teacher: bool = False) -> Dict[str, Any]:
    """Runs the demo into the folder `out` and returns what results.json holds."""
    os.makedirs(out, exist_ok=True)
    started = time.time()
    train = load_fashion_mnist("train", root=data_root, limit=settings.train_samples)
    test = load_fashion_mnist("test", root=data_root, limit=settings.test_samples)
    held_out = (test[0][:settings.curve_samples], test[1][:settings.curve_samples])
    teacher, teacher_info = smoothadv_teacher(settings, train, held_out, log=log, retrain=retrain_teacher)
    if certify_teacher:
        log("teacher: certifying")
        teacher_info.update(_certify(teacher, test, settings)[1])
    rows, certificates = [], {}
    for name in STUDENTS:
        torch.manual_seed(settings.seed)  # every student starts from the same weights
        student = build_model(settings.student_model["name"], **settings.student_model["kwargs"])
        log(f"student: {LABELS[name]} ({settings.epochs[name]} epochs)")
        result = fit(_recipe(name, settings, teacher, teacher_info["path"]), student, train,
                     _config(settings, settings.epochs[name], settings.seed), eval_data=held_out,
                     out_dir=os.path.join(out, name))
        log(f"student: {LABELS[name]} trained in {result.train_time_s:.1f} s; certifying {test[0].shape[0]} images")
        certificates[LABELS[name]], numbers = _certify(student, test, settings)
        rows.append({"recipe": name, "student": LABELS[name], "epochs": settings.epochs[name],
                     "train_time_s": result.train_time_s, "history": result.history, **numbers})
    by_name = {row["recipe"]: row for row in rows}
    reference = by_name["smoothadv"]
    for row in rows:
        row["train_time_with_teacher_s"] = row["train_time_s"] + (teacher_info["train_time_s"]
                                                                  if row["recipe"] == "crt" else 0.0)
        row["time_vs_smoothadv"] = row["train_time_s"] / reference["train_time_s"]
        row["time_with_teacher_vs_smoothadv"] = row["train_time_with_teacher_s"] / reference["train_time_s"]
        row["acr_vs_smoothadv"] = row["acr"] / reference["acr"] if reference["acr"] else None
        for r, value in row["certified_acc_by_radius"].items():
            row[f"certified_acc_{r}"] = value
    crt, gaussian = by_name["crt"], by_name["gaussian"]
    bootstrap = paired_bootstrap(crt["radius_if_correct"], gaussian["radius_if_correct"],
                                 samples=settings.bootstrap_samples, seed=settings.seed)
    plot_certified_accuracy(certificates, test[1], os.path.join(out, "certified.png"),
                            title=f"Student ({settings.student_model['name']}) trained three ways, sigma "
                                  f"{settings.sigma:g}\n{settings.test_samples} test images, n = {settings.n:,}, "
                                  f"alpha = {settings.alpha:g}")
    results = {"settings": dataclasses.asdict(settings), "machine": _machine(), "teacher": teacher_info,
               "students": rows, "total_time_s": time.time() - started,
               "crt_vs_smoothadv": {"acr": crt["acr_vs_smoothadv"], "time": crt["time_vs_smoothadv"],
                                    "time_with_teacher": crt["time_with_teacher_vs_smoothadv"]},
               "crt_minus_gaussian_acr": bootstrap}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


def table(results: Dict[str, Any]) -> str:
    s = results["settings"]
    columns = [("student", "student", ""), ("epochs", "epochs", "d"), ("clean acc of g", "smoothed_clean_acc", ".1%"),
               ("cert. acc r = 0.25", "certified_acc_0.25", ".1%"), ("r = 0.5", "certified_acc_0.5", ".1%"),
               ("r = 0.75", "certified_acc_0.75", ".1%"), ("ACR", "acr", ".3f"),
               ("training time s", "train_time_s", ".1f"), ("with teacher's s", "train_time_with_teacher_s", ".1f"),
               ("time / SmoothAdv", "time_vs_smoothadv", ".2f"),
               ("with teacher / SmoothAdv", "time_with_teacher_vs_smoothadv", ".2f"),
               ("ACR / SmoothAdv", "acr_vs_smoothadv", ".2f")]
    t = results["teacher"]
    teacher_line = (f"teacher {s['teacher_model']['name']} (SmoothAdv eps {s['teacher_eps']:g}, {s['teacher_steps']} "
                    f"steps, {s['teacher_noise_samples']} draws, {s['teacher_epochs']} epochs, {t['train_time_s']:.0f} s"
                    f"{', cached' if t['cached'] else ''})")
    if "acr" in t:
        teacher_line += f": clean acc of g {t['smoothed_clean_acc']:.1%}, ACR {t['acr']:.3f}"
    c, b = results["crt_vs_smoothadv"], results["crt_minus_gaussian_acr"]

    def percent(value):
        return "-" if value is None else f"{value:.0%}"
    summary = (f"CRT student: {percent(c['acr'])} of the SmoothAdv student's ACR in {percent(c['time'])} of its "
               f"training time ({percent(c['time_with_teacher'])} with the teacher's). ACR CRT - Gaussian: "
               f"{b['difference']:+.3f} ({b['confidence']:.0%} paired bootstrap interval over the same images "
               f"[{b['low']:+.3f}, {b['high']:+.3f}]; {b['share_not_above_zero']:.1%} of resamples <= 0).")
    header = (f"Fashion-MNIST, sigma {s['sigma']:g}, {s['train_samples']} training images, {s['test_samples']} "
              f"test images certified with n0 = {s['n0']}, n = {s['n']:,}, alpha = {s['alpha']:g}; "
              f"student {s['student_model']['name']}")
    return "\n".join([header, teacher_line, "", format_table(results["students"], columns), "", summary])


def add_crt_demo_options(p) -> None:
    """`robust-fast demo crt`'s own options, on the demo command's parser."""
    crt = p.add_argument_group("demo crt")
    for name in STUDENTS:
        crt.add_argument(f"--{name}-epochs", type=int, default=None, help=f"the {LABELS[name]} student's epochs")
    crt.add_argument("--samples", type=int, default=None, help="test images certified (default 500)")
    crt.add_argument("--n", type=int, default=None, help="certify's estimation samples (default 10,000)")
    crt.add_argument("--teacher-epochs", type=int, default=None)
    crt.add_argument("--teacher-steps", type=int, default=None, help="the SmoothAdv teacher's L2 PGD steps")
    crt.add_argument("--teacher-eps", type=float, default=None, help="the SmoothAdv teacher's L2 radius")
    crt.add_argument("--teacher-noise-samples", type=int, default=None, help="the SmoothAdv teacher's noise draws")
    crt.add_argument("--smoothadv-steps", type=int, default=None, help="the SmoothAdv student's L2 PGD steps")
    crt.add_argument("--smoothadv-noise-samples", type=int, default=None, help="the SmoothAdv student's noise draws")
    crt.add_argument("--certify-teacher", action="store_true", help="certify the teacher's smoothed classifier too")


_CRT_OPTIONS = tuple(f"{name}_epochs" for name in STUDENTS) + (
    "samples", "n", "teacher_epochs", "teacher_steps", "teacher_eps", "teacher_noise_samples", "smoothadv_steps",
    "smoothadv_noise_samples")


CRT_SECTION_OPTIONS = {option: ("crt",) for option in _CRT_OPTIONS + ("certify_teacher",)}


def run_crt_demo(args) -> int:
    """The `robust-fast demo crt` command."""
    with demo_threads(args.threads):
        return _run_crt_demo(args)


def _run_crt_demo(args) -> int:
    settings = CRTDemoSettings.quick() if args.quick else CRTDemoSettings()
    settings.seed = args.seed
    for name in STUDENTS:
        if getattr(args, f"{name}_epochs") is not None:
            settings.epochs[name] = getattr(args, f"{name}_epochs")
    for option in _CRT_OPTIONS[len(STUDENTS):]:
        if getattr(args, option) is not None:
            setattr(settings, "test_samples" if option == "samples" else option, getattr(args, option))
    out = output_folder(args, "crt")
    results = run(settings, out, retrain_teacher=args.retrain_teacher, data_root=args.data,
                  certify_teacher=args.certify_teacher)
    report(out, table(results), "results.json, table.md, certified.png, one folder per student")
    return 0
