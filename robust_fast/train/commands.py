"""`robust-fast train <recipe>` and `robust-fast eval <checkpoint>`."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import Any, Dict, List, Optional

import torch

from robust_fast.data import load_fashion_mnist
from robust_fast.models import PREDICTIONS, TeacherMapStudent, build_model
from robust_fast.train import distributed as dist_util
from robust_fast.train.checkpoint import load_checkpoint, model_from_checkpoint
from robust_fast.train.config import OPTIMIZERS, SCHEDULES, TrainConfig
from robust_fast.train.darht import DARHT
from robust_fast.train.darht import HEADS as DARHT_HEADS
from robust_fast.train.darht import WEIGHTS as DARHT_WEIGHTS
from robust_fast.train.evaluate import ATTACKS, CERTIFIERS, NORMS, evaluate
from robust_fast.train.evaluate_smoothing import SmoothingSettings
from robust_fast.train.loop import fit
from robust_fast.train.recipes import (ARD, CRT, IBP, KD, PGDAT, RECIPES, RRM, TEACHER_RECIPES, FastAT, Gaussian,
                                       SmoothAdv, Standard)


def _default(recipe, name: str):
    """A recipe's default for a setting: the command repeats no number of its own."""
    return inspect.signature(recipe).parameters[name].default


def _ibp_default(name: str):
    return _default(IBP, name)


def add_train_parser(commands) -> None:
    p = commands.add_parser("train", help="train a model with one recipe on Fashion-MNIST "
                                          "(under torchrun: data-parallel)")
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("--model", default=None,
                   help="small_cnn, wide_cnn or resnet_small (default; small_cnn for ibp)")
    p.add_argument("--width", type=int, default=None, help="the model's width (wide_cnn, resnet_small)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128, help="the global batch (split over ranks)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    p.add_argument("--lr-decay-epochs", type=int, nargs="*", default=[], metavar="EPOCH",
                   help="the learning rate x 0.1 from each of these epochs on (1-based; on top of --schedule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eps", type=float, default=0.1, help="L-inf radius of training attacks and of evaluation")
    p.add_argument("--steps", type=int, default=None,
                   help=f"PGD steps (pgd_at, ard: {_default(PGDAT, 'steps')}; "
                        f"smoothadv: {_default(SmoothAdv, 'steps')}; darht: {_default(DARHT, 'attack_steps')})")
    p.add_argument("--teacher", action="append", default=None, metavar="CHECKPOINT",
                   help="checkpoint of the frozen teacher (rrm, kd, ard, crt: one; darht: repeat it, one per "
                        "teacher, any architecture)")
    p.add_argument("--weights", choices=DARHT_WEIGHTS, default=None,
                   help="darht: teacher weights exp(-CE(T_k(x), y)) per batch (default, the public code's), "
                        "per sample (the paper's formula), or none")
    p.add_argument("--head", choices=DARHT_HEADS, default=None,
                   help="darht: the K*C -> C head in the distillation-only phase: follow (default: trained on "
                        "the detached map) or frozen (the public code's)")
    p.add_argument("--prediction", choices=PREDICTIONS, default="head",
                   help="darht: the student's logits: its head (default) or the mean of its map's slices")
    p.add_argument("--adversarial-fraction", type=float, default=None,
                   help="darht: the share of batches replaced by PGD examples against the student (default 0.5)")
    p.add_argument("--lambda-ce", type=float, default=0.005, help="rrm: weight of the cross-entropy")
    p.add_argument("--kind", default="cosine", choices=("cosine", "l2_normalized"), help="rrm: feature distance")
    p.add_argument("--noise-std", type=float, default=0.0, help="rrm: match on x + N(0, std^2)")
    p.add_argument("--temperature", type=float, default=None, help="kd (4), ard (30)")
    p.add_argument("--alpha", type=float, default=None,
                   help="kd (0.9), ard (1.0), crt (1.0): weight of the distillation term")
    p.add_argument("--sigma", type=float, default=None,
                   help=f"gaussian, smoothadv, crt: std of the Gaussian noise (default {_default(Gaussian, 'sigma')})")
    p.add_argument("--noise-samples", type=int, default=None,
                   help=f"gaussian, smoothadv, crt: noise draws per image (default "
                        f"{_default(Gaussian, 'noise_samples')}; smoothadv {_default(SmoothAdv, 'noise_samples')})")
    p.add_argument("--l2-eps", type=float, default=None,
                   help=f"smoothadv: L2 radius of the attack (default {_default(SmoothAdv, 'eps')})")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"ibp: epochs on clean inputs first (default {_ibp_default('warmup_epochs')})")
    p.add_argument("--ramp-epochs", type=float, default=None,
                   help=f"ibp: epochs over which eps and kappa ramp (default {_ibp_default('ramp_epochs')})")
    p.add_argument("--kappa-end", type=float, default=None,
                   help=f"ibp: final weight of the clean loss (default {_ibp_default('kappa_end')})")
    p.add_argument("--ramp", choices=("smoothed", "linear"), default=None,
                   help=f"ibp: the eps ramp (default {_ibp_default('ramp')})")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help=f"clip the gradient's norm (default: the recipe's, {_ibp_default('max_grad_norm'):g} "
                        f"for ibp, none otherwise)")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--eval-samples", type=int, default=500, help="held-out test images evaluated each epoch")
    p.add_argument("--eval-steps", type=int, default=10, help="PGD steps of the per-epoch robust accuracy (0: none)")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default $ROBUST_FAST_DATA or Debian's)")
    p.add_argument("--out", default=None, help="output folder (default runs/<recipe>)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--backend", default=None, help="robust_fast backend for the fused ops")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_recipe(name: str, *, eps: float = 0.1, steps: Optional[int] = None, teacher: Optional[torch.nn.Module] = None,
                 teacher_path: Optional[str] = None, lambda_ce: float = 0.005, kind: str = "cosine",
                 noise_std: float = 0.0, temperature: Optional[float] = None, alpha: Optional[float] = None,
                 warmup_epochs: Optional[float] = None, ramp_epochs: Optional[float] = None,
                 kappa_end: Optional[float] = None, ramp: Optional[str] = None, sigma: Optional[float] = None,
                 noise_samples: Optional[int] = None, l2_eps: Optional[float] = None):
    """A recipe from command-line style settings (unused ones are ignored; None: the recipe's default)."""
    if name in TEACHER_RECIPES and teacher is None:
        raise ValueError(f"recipe {name!r} needs a teacher (--teacher CHECKPOINT)")
    extra = {k: v for k, v in (("temperature", temperature), ("alpha", alpha)) if v is not None}
    given_steps = {"steps": steps} if steps is not None else {}
    noise = {k: v for k, v in (("sigma", sigma), ("noise_samples", noise_samples)) if v is not None}
    if name == "gaussian":
        return Gaussian(**noise)
    if name == "smoothadv":
        return SmoothAdv(**noise, **given_steps, **({"eps": l2_eps} if l2_eps is not None else {}))
    if name == "crt":
        return CRT(teacher, teacher_path=teacher_path, **noise, **({"alpha": alpha} if alpha is not None else {}))
    if name == "standard":
        return Standard()
    if name == "pgd_at":
        return PGDAT(eps=eps, **given_steps)
    if name == "fast_at":
        return FastAT(eps=eps)
    if name == "rrm":
        return RRM(teacher, lambda_ce=lambda_ce, kind=kind, noise_std=noise_std, teacher_path=teacher_path)
    if name == "kd":
        return KD(teacher, teacher_path=teacher_path, **extra)
    if name == "ard":
        return ARD(teacher, eps=eps, teacher_path=teacher_path, **given_steps, **extra)
    if name == "ibp":
        given = dict(warmup_epochs=warmup_epochs, ramp_epochs=ramp_epochs, kappa_end=kappa_end, ramp=ramp)
        return IBP(eps=eps, **{k: v for k, v in given.items() if v is not None})
    raise ValueError(f"recipe must be one of {tuple(RECIPES)}, got {name!r}")


def _darht_recipe(args: argparse.Namespace, teachers, paths) -> DARHT:
    given = {k: v for k, v in (("attack_steps", args.steps), ("weights", args.weights), ("head", args.head),
                               ("adversarial_fraction", args.adversarial_fraction)) if v is not None}
    return DARHT(teachers, eps=args.eps, teacher_paths=paths, **given)


def _usage_error(message: str) -> int:
    print(f"robust-fast train: error: {message}", file=sys.stderr)
    return 2


def run_train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = args.teacher or []
    if args.recipe == "darht" and not paths:
        return _usage_error("darht needs its teachers: --teacher CHECKPOINT, once per teacher")
    if args.recipe != "darht" and len(paths) > 1:
        return _usage_error(f"{args.recipe} takes one --teacher, got {len(paths)} (only darht takes several)")
    joined = dist_util.init_from_env()
    device = dist_util.default_device()
    teachers = [model_from_checkpoint(path, map_location=device) for path in paths]
    torch.manual_seed(args.seed)
    model_name = args.model or ("small_cnn" if args.recipe == "ibp" else "resnet_small")
    model = build_model(model_name, **({"width": args.width} if args.width else {}))
    if args.recipe == "darht":
        try:
            recipe = _darht_recipe(args, teachers, paths)
            model = TeacherMapStudent(model, len(teachers), prediction=args.prediction)
            recipe.check_student(model)
        except (TypeError, ValueError) as error:
            if joined:
                torch.distributed.destroy_process_group()
            return _usage_error(str(error))
    else:
        teacher = teachers[0] if teachers else None
        teacher_path = paths[0] if paths else None
        recipe = build_recipe(args.recipe, eps=args.eps, steps=args.steps, teacher=teacher, teacher_path=teacher_path,
                              lambda_ce=args.lambda_ce, kind=args.kind, noise_std=args.noise_std,
                              temperature=args.temperature, alpha=args.alpha, warmup_epochs=args.warmup_epochs,
                              ramp_epochs=args.ramp_epochs, kappa_end=args.kappa_end, ramp=args.ramp,
                              sigma=args.sigma, noise_samples=args.noise_samples, l2_eps=args.l2_eps)
    # the clip the run uses, written into its configuration (and so its checkpoint)
    max_grad_norm = args.max_grad_norm if args.max_grad_norm is not None else recipe.max_grad_norm
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                         momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                         lr_decay_epochs=tuple(args.lr_decay_epochs), seed=args.seed, eval_samples=args.eval_samples, eval_steps=args.eval_steps,
                         eval_eps=args.eps, progress=not args.no_progress, backend=args.backend,
                         max_grad_norm=max_grad_norm)
    train = load_fashion_mnist("train", root=args.data, limit=args.limit)
    held_out = load_fashion_mnist("test", root=args.data, limit=args.eval_samples or None)
    out = args.out or os.path.join("runs", args.recipe)
    result = fit(recipe, model, train, config, eval_data=held_out, out_dir=out, resume=args.resume, device=device)
    if dist_util.is_main():
        print(f"{args.recipe}: {result.train_time_s:.1f} s of training; checkpoint {result.checkpoint}, "
              f"per-epoch record {os.path.join(out, 'log.jsonl')}")
    if joined:
        torch.distributed.destroy_process_group()
    return 0


def _positive(kind):
    """An argparse type: a number of `kind` > 0 (argparse names the option in its error)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an int' if kind is int else 'a number'}, got {text!r}")
        if not value > 0 or (kind is float and value == float("inf")):
            raise argparse.ArgumentTypeError(f"must be {'>= 1' if kind is int else '> 0 and finite'}, got {text}")
        return value
    return parse


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


SMOOTHING_OPTIONS = (("--sigma", "sigma"), ("--n0", "n0"), ("--n", "n"), ("--smoothing-alpha", "smoothing_alpha"))


def add_eval_parser(commands) -> None:
    p = commands.add_parser("eval", help="clean and robust accuracy (PGD-20 by default, APGD or AutoAttack-style; "
                                         "L-inf or L2) and optionally IBP- or randomized-smoothing-certified accuracy "
                                         "of a checkpoint on Fashion-MNIST's test set (under torchrun the smoothing "
                                         "certification is split across processes)")
    p.add_argument("checkpoint")
    p.add_argument("--attack", choices=ATTACKS, default="pgd",
                   help="pgd (default), apgd (APGD-CE) or auto (APGD-CE, APGD-T, Square in turn)")
    p.add_argument("--no-attack", action="store_true", help="no attack: clean accuracy (and certificates) only")
    p.add_argument("--norm", choices=NORMS, default="linf", help="the attack's ball: linf (default) or l2")
    p.add_argument("--certify", choices=CERTIFIERS, default=None,
                   help="also the certified accuracy: ibp (at eps, L-inf) or smoothing (Gaussian randomized "
                        "smoothing, L2; needs --sigma)")
    p.add_argument("--eps", type=float, default=None,
                   help="the attack's radius: L-inf (default: the run's) or, with --norm l2, L2 (required)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--alpha", type=float, default=None, help="PGD step (default eps/4)")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--no-early-stop", action="store_true")
    p.add_argument("--sigma", type=_positive(float), default=None, help="smoothing: the noise's standard deviation")
    p.add_argument("--n0", type=_positive(int), default=None,
                   help=f"smoothing: noise samples that choose the class (default {SmoothingSettings.n0})")
    p.add_argument("--n", type=_positive(int), default=None,
                   help=f"smoothing: noise samples that bound its probability (default {SmoothingSettings.n})")
    p.add_argument("--smoothing-alpha", type=_probability, default=None,
                   help=f"smoothing: the certificate's failure probability (default {SmoothingSettings.alpha})")
    p.add_argument("--samples", type=int, default=None, help="the first N test images (default all)")
    p.add_argument("--batch-size", type=_positive(int), default=500,
                   help="inputs through the model at once: the attack's images, the certification's noisy copies")
    p.add_argument("--seed", type=int, default=0, help="seeds the attack's random starts and the smoothing noise")
    p.add_argument("--data", default=None)
    p.add_argument("--json", default=None, help="write the numbers here (default: eval.json next to the checkpoint)")
    p.add_argument("--backend", default=None)


def format_table(rows: List[Dict[str, Any]], columns) -> str:
    """A Markdown table: columns are (header, key, format) triples."""
    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else format(value, fmt) if fmt else str(value)
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in columns) + " |" for r in rows]
    return "\n".join(lines)


ATTACK_NAMES = {"pgd": "PGD", "apgd": "APGD-CE", "auto": "AutoAttack-style"}


def _eval_usage_error(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with a combination of eval's options (each option is checked by argparse)."""
    if args.certify == "smoothing" and args.sigma is None:
        return "--certify smoothing needs --sigma (the noise's standard deviation)"
    given = [flag for flag, key in SMOOTHING_OPTIONS if getattr(args, key) is not None]
    if args.certify != "smoothing" and given:
        return f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --certify smoothing only"
    if args.norm == "l2" and args.certify == "ibp":
        return "--certify ibp certifies L-inf balls: it does not go with --norm l2"
    if args.norm == "l2" and args.eps is None and not args.no_attack:
        return "--norm l2 needs --eps (the L2 radius; the run's eps is an L-inf radius)"
    if args.samples is not None and args.samples < 1:
        return f"--samples must be >= 1, got {args.samples}"
    return None


def _smoothing_table(row: Dict[str, Any]) -> str:
    """Certified accuracy of the smoothed classifier against L2 radius, as the papers tabulate it."""
    by_radius = row["certified_acc_by_radius"]
    columns = [("sigma", "sigma", "g")] + [(f"r = {r}", f"r{r}", ".1%") for r in by_radius] + [
        ("ACR", "acr", ".3f"), ("abstained", "abstain_rate", ".1%"), ("certify time s", "certify_time_s", ".1f")]
    cells = {**row, **{f"r{r}": a for r, a in by_radius.items()}}
    note = (f"randomized smoothing: certified accuracy (n0 {row['smoothing_n0']}, n {row['smoothing_n']}, "
            f"alpha {row['smoothing_alpha']:g}, seed {row['smoothing_seed']}, "
            f"{row['certify_processes']} process{'es' if row['certify_processes'] > 1 else ''})")
    return note + "\n" + format_table([cells], columns)


def run_eval(args: argparse.Namespace) -> int:
    problem = _eval_usage_error(args)
    if problem:
        print(f"robust-fast eval: {problem}", file=sys.stderr)
        return 2
    joined = dist_util.init_from_env()
    try:
        return _eval(args)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _eval(args: argparse.Namespace) -> int:
    state = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(state, map_location=dist_util.default_device())
    eps = args.eps if args.eps is not None else float(state["config"].get("eval_eps", 0.1))
    images, labels = load_fashion_mnist("test", root=args.data, limit=args.samples)
    smoothing = None
    if args.certify == "smoothing":
        given = {k: v for k, v in (("n0", args.n0), ("n", args.n), ("alpha", args.smoothing_alpha)) if v is not None}
        smoothing = SmoothingSettings(sigma=args.sigma, **given)
    try:
        numbers = evaluate(model, images, labels, eps=eps, steps=args.steps, alpha=args.alpha,
                           restarts=args.restarts, early_stop=not args.no_early_stop, batch_size=args.batch_size,
                           seed=args.seed, robust=not args.no_attack, attack=args.attack, certify=args.certify,
                           backend=args.backend, norm=args.norm, smoothing=smoothing)
    except TypeError as error:  # a layer interval bound propagation does not support
        print(f"robust-fast eval: {error}", file=sys.stderr)
        return 2
    if not dist_util.is_main():  # rank 0 prints and writes
        return 0
    row = {"checkpoint": args.checkpoint, "recipe": state["recipe"], "model": (state.get("model_spec") or {}).get("name"),
           "epochs": state["epoch"], "train_time_s": state["train_time_s"], **numbers}
    restarts = f", {args.restarts} restart{'s' if args.restarts > 1 else ''}" if args.attack != "auto" else ""
    ball = "L2 eps" if args.norm == "l2" else "eps"
    attack = f"{ATTACK_NAMES[args.attack]}-{args.steps} acc ({ball} {eps:g}{restarts})"
    columns = [("recipe", "recipe", ""), ("model", "model", ""), ("test images", "n", "d"),
               ("clean acc", "clean_acc", ".2%")]
    if not args.no_attack:
        columns.append((attack, "robust_acc", ".2%"))
    if args.certify == "ibp":
        columns.append((f"IBP-certified acc (eps {eps:g})", "certified_acc", ".2%"))
    if args.certify == "smoothing":
        columns.append((f"smoothed clean acc (sigma {args.sigma:g})", "smoothed_clean_acc", ".2%"))
    print(format_table([row], columns + [("training time s", "train_time_s", ".1f")]))
    if args.certify == "smoothing":
        print(_smoothing_table(row))
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(row, f, indent=2)
    print(f"written: {path}")
    return 0
