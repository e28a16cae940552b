"""`robust-fast train <recipe>` (and `train transfer --source CKPT --mode ...`) and `robust-fast eval <checkpoint>`."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from robust_fast._progress import command_progress
from robust_fast._user_errors import writable_folder
from robust_fast.data import CLASSES as CLASS_NAMES
from robust_fast.data import TARGET_CLASSES, load_fashion_mnist, load_task, parse_classes
from robust_fast.models import PREDICTIONS, TeacherMapStudent, build_model
from robust_fast.train import distributed as dist_util
from robust_fast.train.checkpoint import check_classes, checkpoint_classes, load_checkpoint, model_from_checkpoint
from robust_fast.train.config import OPTIMIZERS, SCHEDULES, TrainConfig
from robust_fast.train.darht import DARHT
from robust_fast.train.darht import HEADS as DARHT_HEADS
from robust_fast.train.darht import WEIGHTS as DARHT_WEIGHTS
from robust_fast.train.evaluate import ATTACKS, CERTIFIERS, NORMS, VERSIONS, evaluate
from robust_fast.train.evaluate_smoothing import SmoothingSettings
from robust_fast.train.functions import train_transfer
from robust_fast.train.loop import fit
from robust_fast.train.recipes import (ARD, CRT, HEADS, IBP, KD, MATCH_POINTS, NOISE_SCALES, PGDAT, RECIPES, RRM,
                                       TEACHER_RECIPES, FastAT, Gaussian, SmoothAdv, Standard)
from robust_fast.train.transfer import MODES, SCALES, LwF

TRANSFER_NAMES = tuple(cls.name for cls in MODES.values())  # `train transfer --mode ...` runs them


def _default(recipe, name: str):
    """A recipe's default for a setting: the command repeats no number of its own."""
    return inspect.signature(recipe).parameters[name].default


RECIPE_HELP = {
    "standard": "cross-entropy on clean images",
    "pgd_at": "adversarial training: cross-entropy on L-inf PGD examples (Madry et al.)",
    "fast_at": "adversarial training on one FGSM step from a random start (Wong et al.)",
    "rrm": "robust representation matching: clean images, lambda*CE - cos(student, frozen teacher) features",
    "kd": "knowledge distillation from a frozen teacher (Hinton et al.)",
    "ard": "adversarially robust distillation: KD on the student's PGD examples (Goldblum et al.)",
    "ibp": "IBP certified training: the worst-case logits of the eps box, eps and kappa ramped (Gowal et al.)",
    "gaussian": "cross-entropy on Gaussian-noise copies, for randomized smoothing (Cohen et al.)",
    "smoothadv": "L2 PGD against the smoothed classifier, then cross-entropy on it (Salman et al.)",
    "crt": "certified robustness transfer: match a smoothed teacher's logits under noise (Vaishnavi et al.)",
    "darht": "distillation from several heterogeneous teachers through a student-teacher map (Deng et al.)",
    "transfer": "robust transfer learning from --source: a new head on its frozen features, fine-tuning, or "
                "fine-tuning with a feature-change penalty (--mode head|finetune|lwf; Shafahi et al.)",
}


def _common_options() -> argparse.ArgumentParser:
    """The options every recipe takes: model, optimisation, data, evaluation, output."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--epochs", type=_positive(int), default=5, help="epochs to train")
    p.add_argument("--batch-size", type=_positive(int), default=128, help="the global batch (split over ranks)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="the optimizer")
    p.add_argument("--lr", type=_positive(float), default=1e-3, help="the peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="sgd's momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="the learning-rate schedule")
    p.add_argument("--lr-decay-epochs", type=int, nargs="*", default=[], metavar="EPOCH",
                   help="the learning rate x 0.1 from each of these epochs on (1-based; on top of --schedule)")
    p.add_argument("--seed", type=int, default=0, help="initial weights, data order and the recipe's draws")
    p.add_argument("--eps", type=_positive(float), default=0.1,
                   help="L-inf radius of the training attack (pgd_at, fast_at, ard), of ibp, and of evaluation")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images (default all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--eval-samples", type=int, default=500, help="held-out test images evaluated each epoch")
    p.add_argument("--eval-steps", type=int, default=10, help="PGD steps of the per-epoch robust accuracy (0: none)")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: $ROBUST_FAST_DATA or "
                                                "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe>)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--backend", default=None, help="robust_fast backend for the fused ops (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_class_options(p)
    return p


def _teacher(p, recipe) -> None:
    p.add_argument("--teacher", action="append", metavar="CHECKPOINT",
                   help="checkpoint of the frozen teacher (required)")


def _steps(p, recipe) -> None:
    p.add_argument("--steps", type=_positive(int), default=_default(recipe, "steps"), help="PGD steps")


def _distillation(p, recipe) -> None:
    p.add_argument("--temperature", type=_positive(float), default=_default(recipe, "temperature"),
                   help="softmax temperature of the distillation")
    p.add_argument("--alpha", type=float, default=_default(recipe, "alpha"), help="weight of the distillation term")


def _noise(p, recipe) -> None:
    p.add_argument("--sigma", type=_positive(float), default=_default(recipe, "sigma"),
                   help="std of the Gaussian noise")
    p.add_argument("--noise-samples", type=_positive(int), default=_default(recipe, "noise_samples"),
                   help="noise draws per image")


def _rrm(p, recipe) -> None:
    _teacher(p, recipe)
    p.add_argument("--lambda-ce", type=float, default=_default(recipe, "lambda_ce"), help="weight of the cross-entropy")
    p.add_argument("--kind", default=_default(recipe, "kind"), choices=("cosine", "l2_normalized"),
                   help="feature distance")
    p.add_argument("--noise-std", type=float, default=_default(recipe, "noise_std"),
                   help="match on x + N(0, std^2) (0: clean images)")
    p.add_argument("--noise-scales", choices=NOISE_SCALES, default=_default(recipe, "noise_scales"),
                   help="fixed: every image's noise std is --noise-std; uniform: each image's std drawn anew "
                        "(per image and batch) uniform in [0, --noise-std]")
    p.add_argument("--head", choices=HEADS, default=_default(recipe, "head"),
                   help="the classifier: the student's own; the teacher's, frozen, on the projected features; "
                        "or the teacher's, fine-tuned by the CE term (folded into the student's last layer)")
    p.add_argument("--robust-head-epochs", type=float, default=_default(recipe, "robust_head_epochs"),
                   help="at the end, train the last layer alone on the student's PGD examples (features "
                        "frozen) for this many passes over the data (fractions allowed; 0: not)")
    p.add_argument("--head-steps", type=_positive(int), default=_default(recipe, "head_steps"),
                   help="PGD steps (size eps/4) of the robust head's examples, at --eps")
    p.add_argument("--match-points", choices=MATCH_POINTS, default=_default(recipe, "match_points"),
                   help="clean: match on the images; teacher_pgd: also on the teacher's own PGD points "
                        "(at --eps, computed once per run and cached, like its clean features)")
    p.add_argument("--match-steps", type=_positive(int), default=_default(recipe, "match_steps"),
                   help="PGD steps (size eps/4) of the teacher's cached points")


def _ibp(p, recipe) -> None:
    p.add_argument("--warmup-epochs", type=float, default=_default(recipe, "warmup_epochs"),
                   help="epochs on clean inputs first")
    p.add_argument("--ramp-epochs", type=float, default=_default(recipe, "ramp_epochs"),
                   help="epochs over which eps and kappa ramp")
    p.add_argument("--kappa-end", type=float, default=_default(recipe, "kappa_end"),
                   help="final weight of the clean loss")
    p.add_argument("--ramp", choices=("smoothed", "linear"), default=_default(recipe, "ramp"), help="the eps ramp")


def _smoothadv(p, recipe) -> None:
    _noise(p, recipe)
    _steps(p, recipe)
    p.add_argument("--l2-eps", type=_positive(float), default=_default(recipe, "eps"), help="L2 radius of the attack")


def _crt(p, recipe) -> None:
    _teacher(p, recipe)
    _noise(p, recipe)
    p.add_argument("--alpha", type=float, default=_default(recipe, "alpha"), help="weight of the distillation term")


def _ard(p, recipe) -> None:
    _teacher(p, recipe)
    _steps(p, recipe)
    _distillation(p, recipe)


def _kd(p, recipe) -> None:
    _teacher(p, recipe)
    _distillation(p, recipe)


def _darht(p, recipe) -> None:
    p.add_argument("--teacher", action="append", metavar="CHECKPOINT",
                   help="checkpoint of a frozen teacher: repeat it, once per teacher (any architecture)")
    p.add_argument("--steps", type=_positive(int), default=_default(recipe, "attack_steps"),
                   help="PGD steps of the adversarial batches")
    p.add_argument("--adversarial-fraction", type=float, default=_default(recipe, "adversarial_fraction"),
                   help="the share of batches replaced by PGD examples against the student")
    p.add_argument("--weights", choices=DARHT_WEIGHTS, default=_default(recipe, "weights"),
                   help="teacher weights exp(-CE(T_k(x), y)) per batch (the public code's), per sample (the "
                        "paper's formula), or none")
    p.add_argument("--head", choices=DARHT_HEADS, default=_default(recipe, "head"),
                   help="the K*C -> C head in the distillation-only phase: follow (trained on the detached map) "
                        "or frozen (the public code's)")
    p.add_argument("--prediction", choices=PREDICTIONS, default="head",
                   help="the student's logits: its head or the mean of its map's slices")


# Each recipe's own options, added to its subcommand (`robust-fast train <recipe> --help`).
RECIPE_OPTIONS = {"standard": None, "pgd_at": _steps, "fast_at": None, "rrm": _rrm, "kd": _kd, "ard": _ard,
                  "ibp": _ibp, "gaussian": _noise, "smoothadv": _smoothadv, "crt": _crt, "darht": _darht}


class _Help(argparse.HelpFormatter):
    """Shows every default beside its option (unless its help already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_train_parser(commands) -> None:
    p = commands.add_parser("train", help="train a model with one recipe on Fashion-MNIST "
                                          "(under torchrun: data-parallel)",
                            description="Train a model with one recipe on Fashion-MNIST. "
                                        "`robust-fast train RECIPE --help` lists that recipe's options.")
    recipes = p.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    common = _common_options()
    for name in sorted(n for n in RECIPES if n not in TRANSFER_NAMES):
        recipe = RECIPES[name]
        sub = recipes.add_parser(name, parents=[common], help=RECIPE_HELP.get(name, ""),
                                 description=f"{name}: {RECIPE_HELP.get(name, '')}", formatter_class=_Help)
        sub.add_argument("--model", default="small_cnn" if name == "ibp" else "resnet_small",
                         help="small_cnn, wide_cnn or resnet_small")
        sub.add_argument("--width", type=_positive(int), default=None,
                         help="the model's width (wide_cnn, resnet_small; default: the model's own)")
        clip = (_default(recipe, "max_grad_norm") if "max_grad_norm" in inspect.signature(recipe).parameters
                else recipe.max_grad_norm)
        sub.add_argument("--max-grad-norm", type=_positive(float), default=clip,
                         help="clip the gradient's norm (None: no clipping)")
        if RECIPE_OPTIONS.get(name):
            RECIPE_OPTIONS[name](sub.add_argument_group(f"{name} options"), recipe)
    sub = recipes.add_parser("transfer", parents=[common], help=RECIPE_HELP["transfer"],
                             description=f"transfer: {RECIPE_HELP['transfer']}. The model is the source's "
                                         "(its architecture and width) with a new head.", formatter_class=_Help)
    sub.add_argument("--max-grad-norm", type=_positive(float), default=None,
                     help="clip the gradient's norm (None: no clipping)")
    _transfer(sub.add_argument_group("transfer options"))


def _transfer(p) -> None:
    p.add_argument("--source", default=None, metavar="CHECKPOINT",
                   help="the source model's checkpoint (required; not modified)")
    p.add_argument("--mode", choices=tuple(MODES), default="head",
                   help="head (a new head on the frozen extractor), finetune (every layer, CE), lwf "
                        "(every layer, CE + lambda * feature change)")
    p.add_argument("--blocks", type=int, default=None,
                   help="head also retrains the extractor's last N blocks; finetune and lwf train only "
                        "them (default: head 0, others all)")
    p.add_argument("--head-epochs", type=int, default=None,
                   help="finetune / lwf: epochs of head-only warm start first (default: lwf 1, finetune 0)")
    p.add_argument("--lambda-feat", type=float, default=None,
                   help=f"lwf: weight of the feature change (default {_default(LwF, 'lambda_feat'):g}, "
                        f"relative to the source features' mean L1 norm; see --feature-scale)")
    p.add_argument("--feature-scale", choices=SCALES, default="relative",
                   help="lwf: relative (lambda * ||z - z0||_1 / mean ||z0||_1) or absolute "
                        "(lambda * ||z - z0||_1, the published form with lambda 0.005)")
    p.add_argument("--no-cache", action="store_true",
                   help="run the frozen part on every batch instead of once per image (slower; same result)")


def _classes(text: str):
    try:
        return parse_classes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def add_class_options(p) -> None:
    """--classes and --num-classes: the task is a subset of Fashion-MNIST's classes, relabelled
    0..k-1 in the order named, the model's head as wide as the task."""
    p.add_argument("--classes", type=_classes, default=None, metavar="LIST",
                   help="train on these classes only, relabelled 0..k-1 in this order: '0-4', '5,7,9' "
                        "(default: all 10; the checkpoint records them)")
    p.add_argument("--num-classes", type=_positive(int), default=None,
                   help="the head's outputs (default: the number of --classes, else 10); without --classes: "
                        "classes 0..N-1")
    p.add_argument("--per-class", type=_positive(int), default=None,
                   help="at most N training images of each class (a seeded draw: --seed)")


def task_classes(args: argparse.Namespace) -> Optional[Tuple[int, ...]]:
    """The classes --classes / --num-classes name (None: all ten, as they are)."""
    classes, count = args.classes, args.num_classes
    if classes is not None and count is not None and count != len(classes):
        raise ValueError(f"--num-classes {count} does not match the {len(classes)} classes of --classes "
                         f"{','.join(map(str, classes))}")
    if classes is None and count is not None:
        classes = parse_classes(f"0-{count - 1}") if count <= len(CLASS_NAMES) else None
        if classes is None:
            raise ValueError(f"--num-classes {count}: Fashion-MNIST has {len(CLASS_NAMES)} classes")
    return classes


def load_train_data(args: argparse.Namespace, classes, seed: int):
    """(training images, labels) of the task, and the held-out test slice of the same classes."""
    if classes is None and args.per_class is None:
        train = load_fashion_mnist("train", root=args.data, limit=args.limit)
        held_out = load_fashion_mnist("test", root=args.data, limit=args.eval_samples or None)
    else:
        every = classes if classes is not None else tuple(range(len(CLASS_NAMES)))
        train = load_task("train", every, per_class=args.per_class, seed=seed, root=args.data, limit=args.limit)
        held_out = load_task("test", every, root=args.data, limit=args.eval_samples or None)
    return train, held_out


def build_recipe(name: str, *, eps: float = 0.1, steps: Optional[int] = None, teacher: Optional[torch.nn.Module] = None,
                 teacher_path: Optional[str] = None, lambda_ce: float = 0.005, kind: str = "cosine",
                 noise_std: float = 0.0, temperature: Optional[float] = None, alpha: Optional[float] = None,
                 warmup_epochs: Optional[float] = None, ramp_epochs: Optional[float] = None,
                 kappa_end: Optional[float] = None, ramp: Optional[str] = None, sigma: Optional[float] = None,
                 noise_samples: Optional[int] = None, l2_eps: Optional[float] = None, head: Optional[str] = None,
                 robust_head_epochs: Optional[float] = None, head_steps: Optional[int] = None,
                 match_points: Optional[str] = None, match_steps: Optional[int] = None,
                 noise_scales: Optional[str] = None):
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
        given = dict(head=head, robust_head_epochs=robust_head_epochs, head_steps=head_steps,
                     match_points=match_points, match_steps=match_steps, noise_scales=noise_scales)
        return RRM(teacher, lambda_ce=lambda_ce, kind=kind, noise_std=noise_std, teacher_path=teacher_path, eps=eps,
                   **{k: v for k, v in given.items() if v is not None})
    if name == "kd":
        return KD(teacher, teacher_path=teacher_path, **extra)
    if name == "ard":
        return ARD(teacher, eps=eps, teacher_path=teacher_path, **given_steps, **extra)
    if name == "ibp":
        given = dict(warmup_epochs=warmup_epochs, ramp_epochs=ramp_epochs, kappa_end=kappa_end, ramp=ramp)
        return IBP(eps=eps, **{k: v for k, v in given.items() if v is not None})
    raise ValueError(f"recipe must be one of {tuple(RECIPES)}, got {name!r}")


# The settings build_recipe takes from a recipe's subcommand (those it lacks stay the recipe's).
RECIPE_SETTINGS = ("eps", "steps", "lambda_ce", "kind", "noise_std", "temperature", "alpha", "warmup_epochs",
                   "ramp_epochs", "kappa_end", "ramp", "sigma", "noise_samples", "l2_eps", "head",
                   "robust_head_epochs", "head_steps", "match_points", "match_steps", "noise_scales")


def _transfer_usage_error(args: argparse.Namespace) -> Optional[str]:
    if args.recipe == "transfer" and args.source is None:
        return "train transfer needs --source CHECKPOINT (the source model)"
    return None


def run_transfer(args: argparse.Namespace, config: TrainConfig, device) -> int:
    """`robust-fast train transfer --source CKPT --mode head|finetune|lwf`: the target task is
    --classes (default 5-9, data.TARGET_CLASSES)."""
    source = model_from_checkpoint(args.source, map_location=device)
    if args.classes is None and args.num_classes is None:
        args.classes = TARGET_CLASSES
    classes = task_classes(args)
    if args.resume is not None:
        check_classes(args.resume, classes, "resumed checkpoint")
    out = writable_folder(args.out or os.path.join("runs", f"transfer_{args.mode}"))  # before any work
    train, held_out = load_train_data(args, classes, args.seed)
    given = {k: v for k, v in (("head_epochs", args.head_epochs), ("lambda_feat", args.lambda_feat)) if v is not None}
    result = train_transfer(source, train, config, mode=args.mode, classes=classes,
                            blocks=-1 if args.blocks is None else args.blocks, cache=not args.no_cache,
                            scale=args.feature_scale, source_path=args.source, eval_data=held_out, out_dir=out,
                            resume=args.resume, device=device, **given)
    if dist_util.is_main():
        print(f"transfer ({args.mode}, classes {','.join(map(str, classes))}): {result.train_time_s:.1f} s of "
              f"training; checkpoint {result.checkpoint}, per-epoch record {os.path.join(out, 'log.jsonl')}")
    return 0


def _darht_recipe(args: argparse.Namespace, teachers, paths) -> DARHT:
    given = {k: v for k, v in (("attack_steps", args.steps), ("weights", args.weights), ("head", args.head),
                               ("adversarial_fraction", args.adversarial_fraction)) if v is not None}
    return DARHT(teachers, eps=args.eps, teacher_paths=paths, **given)


def _usage_error(message: str) -> int:
    print(f"robust-fast train: error: {message}", file=sys.stderr)
    return 2


def run_train(args: argparse.Namespace) -> int:
    problem = _transfer_usage_error(args)
    if problem:
        raise ValueError(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = getattr(args, "teacher", None) or []
    if args.recipe == "darht" and not paths:
        return _usage_error("darht needs its teachers: --teacher CHECKPOINT, once per teacher")
    if args.recipe != "darht" and len(paths) > 1:
        return _usage_error(f"{args.recipe} takes one --teacher, got {len(paths)} (only darht takes several)")
    joined = dist_util.init_from_env()
    device = dist_util.default_device()
    if args.recipe == "transfer":
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                             momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                             lr_decay_epochs=tuple(args.lr_decay_epochs), seed=args.seed,
                             eval_samples=args.eval_samples, eval_steps=args.eval_steps, eval_eps=args.eps,
                             progress=not args.no_progress, backend=args.backend, max_grad_norm=args.max_grad_norm)
        try:
            return run_transfer(args, config, device)
        finally:
            if joined:
                torch.distributed.destroy_process_group()
    teachers = [model_from_checkpoint(path, map_location=device) for path in paths]
    recipe = None  # darht's is built with its student, below
    if args.recipe != "darht":
        given = {key: getattr(args, key) for key in RECIPE_SETTINGS if getattr(args, key, None) is not None}
        recipe = build_recipe(args.recipe, teacher=teachers[0] if teachers else None,
                              teacher_path=paths[0] if paths else None, **given)
    # the clip the run uses, written into its configuration (and so its checkpoint)
    max_grad_norm = args.max_grad_norm
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                         momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                         lr_decay_epochs=tuple(args.lr_decay_epochs), seed=args.seed, eval_samples=args.eval_samples, eval_steps=args.eval_steps,
                         eval_eps=args.eps, progress=not args.no_progress, backend=args.backend,
                         max_grad_norm=max_grad_norm)
    out = writable_folder(args.out or os.path.join("runs", args.recipe))  # before any work
    classes = task_classes(args)
    if args.resume is not None:
        check_classes(args.resume, classes if classes is not None else range(len(CLASS_NAMES)), "resumed checkpoint")
    train, held_out = load_train_data(args, classes, args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.model, classes=classes, **({"width": args.width} if args.width else {}))
    if args.recipe == "darht":
        try:
            recipe = _darht_recipe(args, teachers, paths)
            model = TeacherMapStudent(model, len(teachers), prediction=args.prediction)
            recipe.check_student(model)
        except (TypeError, ValueError) as error:
            if joined:
                torch.distributed.destroy_process_group()
            return _usage_error(str(error))
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


def _batch_size_or_auto(text: str):
    return "auto" if text == "auto" else _positive(int)(text)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


SMOOTHING_OPTIONS = (("--sigma", "sigma"), ("--n0", "n0"), ("--n", "n"), ("--smoothing-alpha", "smoothing_alpha"),
                     ("--smoothing-batch-size", "smoothing_batch_size"))


def add_eval_parser(commands) -> None:
    p = commands.add_parser("eval", help="clean and robust accuracy (PGD-20 by default, APGD or AutoAttack; "
                                         "L-inf or L2) and optionally IBP- or randomized-smoothing-certified accuracy "
                                         "of a checkpoint on Fashion-MNIST's test set (under torchrun AutoAttack's "
                                         "batches and the smoothing certification are split across processes)")
    p.add_argument("checkpoint")
    p.add_argument("--attack", choices=ATTACKS, default="pgd",
                   help="pgd (default), apgd (APGD-CE) or auto (AutoAttack: the attacks of --version in turn)")
    p.add_argument("--version", choices=VERSIONS, default=None, dest="auto_version",
                   help="--attack auto: standard (APGD-CE, APGD-T, FAB-T, Square with the reference's settings: "
                        "the number people publish) or fast (APGD-CE, APGD-T, Square; the default)")
    p.add_argument("--no-attack", action="store_true", help="no attack: clean accuracy (and certificates) only")
    p.add_argument("--norm", choices=NORMS, default="linf", help="the attack's ball: linf (default) or l2")
    p.add_argument("--certify", choices=CERTIFIERS, default=None,
                   help="also the certified accuracy: ibp (at eps, L-inf) or smoothing (Gaussian randomized "
                        "smoothing, L2; needs --sigma)")
    p.add_argument("--eps", type=_positive(float), default=None,
                   help="the attack's radius: L-inf (default: the run's) or, with --norm l2, L2 (required)")
    p.add_argument("--steps", type=_positive(int), default=None,
                   help="attack iterations (default 20 for pgd and apgd; for auto the version's, 100)")
    p.add_argument("--alpha", type=float, default=None, help="PGD step (default eps/4)")
    p.add_argument("--restarts", type=_positive(int), default=1)
    p.add_argument("--no-early-stop", action="store_true")
    p.add_argument("--sigma", type=_positive(float), default=None, help="smoothing: the noise's standard deviation")
    p.add_argument("--n0", type=_positive(int), default=None,
                   help=f"smoothing: noise samples that choose the class (default {SmoothingSettings.n0})")
    p.add_argument("--n", type=_positive(int), default=None,
                   help=f"smoothing: noise samples that bound its probability (default {SmoothingSettings.n})")
    p.add_argument("--smoothing-alpha", type=_probability, default=None,
                   help=f"smoothing: the certificate's failure probability (default {SmoothingSettings.alpha})")
    p.add_argument("--smoothing-batch-size", type=_batch_size_or_auto, default=None,
                   help="smoothing: noisy copies per forward pass, or auto (default: the fastest of a few, "
                        "measured on the model; the numbers do not depend on it)")
    p.add_argument("--classes", type=_classes, default=None, metavar="LIST",
                   help="the classes the checkpoint's head stands for, checked (default: the ones it records); "
                        "the test images of those classes, relabelled as in training")
    p.add_argument("--samples", type=int, default=None, help="the first N test images (default all)")
    p.add_argument("--batch-size", type=_positive(int), default=500,
                   help="the attack's images through the model at once")
    p.add_argument("--seed", type=int, default=0, help="seeds the attack's random starts and the smoothing noise")
    p.add_argument("--data", default=None)
    p.add_argument("--json", "--out", dest="json", default=None, metavar="PATH",
                   help="also write the numbers as JSON to PATH (default: print them only; an existing file "
                        "is replaced, and the command says so)")
    p.add_argument("--backend", default=None)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (default: bars on a terminal, one line per stage in a log file)")


def format_table(rows: List[Dict[str, Any]], columns) -> str:
    """A Markdown table: columns are (header, key, format) triples."""
    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else format(value, fmt) if fmt else str(value)
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in columns) + " |" for r in rows]
    return "\n".join(lines)


ATTACK_NAMES = {"pgd": "PGD", "apgd": "APGD-CE", "auto": "AutoAttack"}


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
    if args.auto_version is not None and args.attack != "auto":
        return "--version applies to --attack auto only"
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
    if args.json:  # found now, not after the attack has run
        writable_folder(os.path.dirname(os.path.abspath(args.json)), option="--json")
    state = load_checkpoint(args.checkpoint)
    try:
        if args.classes is not None:
            check_classes(state, args.classes)
        classes = checkpoint_classes(state)
    except ValueError as error:
        print(f"robust-fast eval: {error}", file=sys.stderr)
        return 2
    model = model_from_checkpoint(state, map_location=dist_util.default_device())
    eps = args.eps if args.eps is not None else float(state["config"].get("eval_eps", 0.1))
    if classes == tuple(range(len(CLASS_NAMES))):
        images, labels = load_fashion_mnist("test", root=args.data, limit=args.samples)
    else:
        images, labels = load_task("test", classes, root=args.data, limit=args.samples)
    smoothing = None
    if args.certify == "smoothing":
        given = {k: v for k, v in (("n0", args.n0), ("n", args.n), ("alpha", args.smoothing_alpha),
                                   ("batch_size", args.smoothing_batch_size)) if v is not None}
        smoothing = SmoothingSettings(sigma=args.sigma, **given)
    try:
        numbers = evaluate(model, images, labels, eps=eps, steps=args.steps, alpha=args.alpha,
                           restarts=args.restarts, early_stop=not args.no_early_stop, batch_size=args.batch_size,
                           seed=args.seed, robust=not args.no_attack, attack=args.attack, certify=args.certify,
                           backend=args.backend, norm=args.norm, smoothing=smoothing, auto_version=args.auto_version or "fast",
                           progress=command_progress(not args.no_progress))
    except TypeError as error:  # a layer interval bound propagation does not support
        print(f"robust-fast eval: {error}", file=sys.stderr)
        return 2
    if not dist_util.is_main():  # rank 0 prints and writes
        return 0
    row = {"checkpoint": args.checkpoint, "recipe": state["recipe"], "model": (state.get("model_spec") or {}).get("name"),
           "epochs": state["epoch"], "train_time_s": state["train_time_s"], "classes": list(classes), **numbers}
    restarts = f", {args.restarts} restart{'s' if args.restarts > 1 else ''}" if args.attack != "auto" else ""
    ball = "L2 eps" if args.norm == "l2" else "eps"
    if args.attack == "auto":
        attack = f"AutoAttack {numbers['auto_version']} acc ({ball} {eps:g})"
    else:
        attack = f"{ATTACK_NAMES[args.attack]}-{numbers.get('steps', args.steps)} acc ({ball} {eps:g}{restarts})"
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
    if args.json:
        replaced = os.path.exists(args.json)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(row, f, indent=2)
        print(f"{'replaced' if replaced else 'written'}: {args.json}")
    return 0
