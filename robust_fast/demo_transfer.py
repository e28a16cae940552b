"""`robust-fast demo transfer`: adversarially robust transfer learning (Shafahi et al., ICLR 2020)
on Fashion-MNIST at L-inf eps = 0.1.

1. Two sources of one architecture (WideCNN) on the source classes (default 0-4): one robust
   (PGD adversarial training), one naturally trained; each trained once and cached like the
   other demos' teachers (a name derived from its settings, robust_fast.demo.cache_dir).
2. On the target classes (default 5-9), with all target training images and with a few per
   class (default 100): a new head on the robust source's frozen extractor, the same on the
   natural source, naive fine-tuning of the robust source (every layer, cross-entropy), LwF
   fine-tuning of it (head warm start, then every layer with the feature penalty), and PGD-AT
   from scratch on the target (the same architecture, the source's recipe).
3. Each evaluated on the same target test images: clean accuracy, PGD-20, and the
   AutoAttack-style evaluation (APGD-CE, then APGD-T on the survivors).
4. One table per setting (training time, and time relative to PGD-AT from scratch), and in the
   results folder: results.json, table.md, transfer.png, each run's checkpoint and log.

--quick runs the same path on a subset (a check that everything works, not a measurement).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from robust_fast.data import SOURCE_CLASSES, TARGET_CLASSES, load_task
from robust_fast.demo import _machine, cached_teacher, demo_threads, output_folder, report
from robust_fast.models import build_model
from robust_fast.train.commands import format_table
from robust_fast.train.config import TrainConfig
from robust_fast.train.evaluate import evaluate
from robust_fast.train.functions import train_transfer
from robust_fast.train.loop import fit
from robust_fast.train.recipes import PGDAT, Standard

RUNS = ("head_robust", "head_natural", "finetune", "lwf", "pgd_at")
LABELS = {"head_robust": "head on the robust source", "head_natural": "head on the natural source",
          "finetune": "naive fine-tune of the robust source", "lwf": "LwF fine-tune of the robust source",
          "pgd_at": "PGD-AT from scratch", "head_naive": "head on the robust source, no feature cache"}


@dataclass
class TransferDemoSettings:
    eps: float = 0.1
    source_classes: Tuple[int, ...] = SOURCE_CLASSES
    target_classes: Tuple[int, ...] = TARGET_CLASSES
    source_train_samples: Optional[int] = None   # the source task's first N training images (None: all)
    target_train_samples: Optional[int] = None   # the target task's first N training images (None: all)
    seed: int = 0                                 # the target runs' heads, initial weights and draws
    source_seed: int = 0
    model: Dict[str, Any] = field(default_factory=lambda: {"name": "wide_cnn", "kwargs": {"width": 16}})
    source_epochs: int = 4
    source_steps: int = 5                         # the robust source's PGD steps (step eps/4)
    # the target's training sets: all its images, and per_class images of each class (seeded draw)
    per_class: Tuple[Optional[int], ...] = (None, 100)
    # epochs per setting. All images: PGD-AT from scratch 3 epochs (4 gave 84.5% PGD-20 against
    # 3's, for a third more time); the head 4 on cached features. 100 per class: 4 batches an
    # epoch, so more epochs; a head epoch on cached features costs next to nothing.
    epochs: Dict[str, Dict[str, int]] = field(default_factory=lambda: {
        "all": {"head": 4, "finetune": 3, "lwf": 3, "head_warm": 1, "pgd_at": 3},
        "few": {"head": 200, "finetune": 20, "lwf": 20, "head_warm": 50, "pgd_at": 20}})
    lwf_lambda: float = 4.0                       # relative to the source features' mean L1 norm
    pgd_at_steps: int = 5                         # PGD-AT from scratch: the robust source's recipe
    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "cosine"
    batch_size: int = 128
    test_samples: int = 1000                      # the target test set's first N images
    source_test_samples: int = 500                # the source test set's (each source on its own classes)
    eval_steps: int = 20
    auto_attacks: Tuple[str, ...] = ("apgd-ce", "apgd-t")
    auto_steps: int = 20
    curve_samples: int = 300                      # the sources' per-epoch held-out record
    naive_head: bool = False                      # also time the head trained through the network

    @classmethod
    def quick(cls) -> "TransferDemoSettings":
        return cls(source_train_samples=600, target_train_samples=600, model={"name": "wide_cnn", "kwargs": {"width": 4}}, source_epochs=1,
                   source_steps=2, per_class=(None, 10), pgd_at_steps=2,
                   epochs={"all": {"head": 2, "finetune": 1, "lwf": 1, "head_warm": 1, "pgd_at": 1},
                           "few": {"head": 2, "finetune": 1, "lwf": 1, "head_warm": 1, "pgd_at": 1}},
                   test_samples=100, source_test_samples=50, eval_steps=5, auto_steps=5, curve_samples=50)


def source_key(settings: TransferDemoSettings, robust: bool) -> Dict[str, Any]:
    """Everything a source's weights depend on: its cache name is a hash of this."""
    return {"model": settings.model, "recipe": "pgd_at" if robust else "standard", "classes": list(settings.source_classes),
            "eps": settings.eps if robust else None, "steps": settings.source_steps if robust else None,
            "epochs": settings.source_epochs, "train_samples": settings.source_train_samples,
            "seed": settings.source_seed, "optimizer": settings.optimizer, "lr": settings.lr,
            "schedule": settings.schedule, "batch_size": settings.batch_size}


def _config(settings: TransferDemoSettings, epochs: int, seed: int, eval_samples: int = 0) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=settings.batch_size, optimizer=settings.optimizer, lr=settings.lr,
                       weight_decay=0.0, schedule=settings.schedule, seed=seed, eval_samples=eval_samples,
                       eval_steps=5, eval_eps=settings.eps, progress=False)


def sources(settings: TransferDemoSettings, log=print, retrain: bool = False, data_root: Optional[str] = None):
    """{"robust": (model, info), "natural": (model, info)}: from the cache when trained before."""
    train = load_task("train", settings.source_classes, root=data_root, limit=settings.source_train_samples)
    held_out = load_task("test", settings.source_classes, root=data_root, limit=settings.curve_samples)
    spec = {"name": settings.model["name"], "kwargs": {**settings.model["kwargs"],
                                                       "classes": list(settings.source_classes)}}
    found = {}
    for robust in (True, False):
        recipe = PGDAT(eps=settings.eps, steps=settings.source_steps) if robust else Standard()
        config = _config(settings, settings.source_epochs, settings.source_seed, settings.curve_samples)
        model, info = cached_teacher(source_key(settings, robust), spec, recipe, train, held_out, config, log=log,
                                     retrain=retrain, what=f"PGD-{settings.source_steps} AT" if robust else "standard")
        found["robust" if robust else "natural"] = (model, info)
    return found


def _evaluate(model, test, settings: TransferDemoSettings) -> Dict[str, Any]:
    pgd20 = evaluate(model, *test, eps=settings.eps, steps=settings.eval_steps, seed=settings.seed)
    auto = evaluate(model, *test, eps=settings.eps, steps=settings.auto_steps, attack="auto",
                    auto_attacks=settings.auto_attacks, seed=settings.seed + 1)
    return {"clean_acc": pgd20["clean_acc"], "robust_acc": pgd20["robust_acc"], "robust_acc_auto": auto["robust_acc"],
            "eval_time_s": pgd20["time_s"] + auto["time_s"]}


def _train(name: str, settings: TransferDemoSettings, epochs: Dict[str, int], found, train, out: str):
    """(model, TrainResult) of one target run."""
    config = _config(settings, epochs["head"] if name.startswith("head") else epochs[name], settings.seed)
    robust, natural = found["robust"][0], found["natural"][0]
    common = dict(classes=settings.target_classes, out_dir=out)
    if name == "head_robust":
        result = train_transfer(robust, train, config, mode="head", **common)
    elif name == "head_naive":
        result = train_transfer(robust, train, config, mode="head", cache=False, **common)
    elif name == "head_natural":
        result = train_transfer(natural, train, config, mode="head", **common)
    elif name == "finetune":
        result = train_transfer(robust, train, config, mode="finetune", **common)
    elif name == "lwf":
        result = train_transfer(robust, train, config, mode="lwf", head_epochs=epochs["head_warm"],
                                lambda_feat=settings.lwf_lambda, **common)
    else:
        torch.manual_seed(settings.seed)
        model = build_model(settings.model["name"], classes=settings.target_classes, **settings.model["kwargs"])
        result = fit(PGDAT(eps=settings.eps, steps=settings.pgd_at_steps), model, train, config, out_dir=out)
    return result.model, result


def _setting_name(per_class: Optional[int]) -> str:
    return "all" if per_class is None else "few"


def run(settings: TransferDemoSettings, out: str, log=print, retrain_sources: bool = False,
        data_root: Optional[str] = None) -> Dict[str, Any]:
    """Runs the demo into the folder `out` and returns what results.json holds."""
    os.makedirs(out, exist_ok=True)
    started = time.time()
    found = sources(settings, log=log, retrain=retrain_sources, data_root=data_root)
    test = load_task("test", settings.target_classes, root=data_root, limit=settings.test_samples)
    source_test = load_task("test", settings.source_classes, root=data_root, limit=settings.source_test_samples)
    source_info = {}
    for kind, (model, info) in found.items():  # clean and PGD-20 on its own classes (no AutoAttack: time)
        numbers = evaluate(model, *source_test, eps=settings.eps, steps=settings.eval_steps, seed=settings.seed)
        source_info[kind] = dict(info, source_clean_acc=numbers["clean_acc"], source_robust_acc=numbers["robust_acc"])
    settings_rows: List[Dict[str, Any]] = []
    for per_class in settings.per_class:
        setting = _setting_name(per_class)
        epochs = settings.epochs[setting]
        train = load_task("train", settings.target_classes, per_class=per_class, seed=settings.seed, root=data_root,
                          limit=settings.target_train_samples)
        runs = RUNS + (("head_naive",) if settings.naive_head and per_class is None else ())
        rows = []
        for name in runs:
            log(f"target ({'all images' if per_class is None else f'{per_class} per class'}, {train[0].shape[0]} "
                f"images): {LABELS[name]}")
            model, result = _train(name, settings, epochs, found, train, os.path.join(out, setting, name))
            row = {"run": name, "label": LABELS[name], "train_images": int(train[0].shape[0]),
                   "epochs": epochs["head" if name.startswith("head") else name],
                   "train_time_s": result.train_time_s, **_evaluate(model, test, settings)}
            if name == "lwf":  # the penalty's weight on ||z - z0||_1 after the relative scaling
                row.update(head_epochs=epochs["head_warm"], lambda_feat=settings.lwf_lambda,
                           lambda_effective=result.history[-1]["lambda_effective"])
            rows.append(row)
            log(f"  {row['train_time_s']:.1f} s; clean {row['clean_acc']:.1%}, PGD-{settings.eval_steps} "
                f"{row['robust_acc']:.1%}")
        scratch = next(r for r in rows if r["run"] == "pgd_at")
        for row in rows:
            row["time_vs_pgd_at"] = row["train_time_s"] / scratch["train_time_s"]
        settings_rows.append({"setting": setting, "per_class": per_class, "train_images": int(train[0].shape[0]),
                              "runs": rows})
    results = {"settings": dataclasses.asdict(settings), "machine": _machine(), "sources": source_info,
               "targets": settings_rows, "claims": claims(settings_rows), "total_time_s": time.time() - started}
    plot(results, os.path.join(out, "transfer.png"))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


def claims(settings_rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The method's claims, checked on each setting's rows."""
    found = {}
    for block in settings_rows:
        r = {row["run"]: row for row in block["runs"]}
        head, natural, tuned, lwf, scratch = (r[k] for k in RUNS)
        found[block["setting"]] = {
            "robust_head_far_above_natural_head": head["robust_acc"] - natural["robust_acc"] >= 0.2,
            "lwf_above_robust_head_clean_and_pgd": lwf["clean_acc"] > head["clean_acc"]
            and lwf["robust_acc"] > head["robust_acc"],
            "finetune_loses_half_the_robustness": tuned["robust_acc"] <= 0.5 * head["robust_acc"],
            "robust_head_under_5pct_of_pgd_at_time": head["time_vs_pgd_at"] < 0.05,
            "robust_head_above_pgd_at_from_scratch": head["robust_acc"] > scratch["robust_acc"],
        }
    return found


def plot(results: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = results["targets"]
    s = results["settings"]
    from matplotlib.ticker import ScalarFormatter

    figure, axes = plt.subplots(1, len(blocks), figsize=(5.2 * len(blocks), 4.8), squeeze=False)
    colours = {name: f"C{i}" for i, name in enumerate(list(RUNS) + ["head_naive"])}
    for axis, block in zip(axes[0], blocks):
        for row in block["runs"]:
            colour = colours[row["run"]]
            axis.scatter(row["train_time_s"], 100 * row["robust_acc"], s=60, zorder=3, color=colour, label=row["label"])
            axis.scatter(row["train_time_s"], 100 * row["clean_acc"], s=60, marker="x", color=colour)
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(ScalarFormatter())
        axis.tick_params(axis="x", which="minor", labelsize=7)
        axis.set_ylim(-3, 103)
        axis.set_xlabel("training time on the target (s, log)")
        axis.set_ylabel(f"accuracy (%): dots PGD-{s['eval_steps']} at eps {s['eps']:g}, crosses clean")
        title = "all target images" if block["per_class"] is None else f"{block['per_class']} images per class"
        axis.set_title(f"{title} ({block['train_images']})", fontsize=10)
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle(f"Transfer from classes {s['source_classes']} to {s['target_classes']}", fontsize=10)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(results: Dict[str, Any]) -> str:
    s = results["settings"]
    columns = [("run", "label", ""), ("epochs", "epochs", "d"), ("clean acc", "clean_acc", ".1%"),
               (f"PGD-{s['eval_steps']} acc", "robust_acc", ".1%"),
               (f"{' + '.join(a.upper() for a in s['auto_attacks'])} ({s['auto_steps']} steps)", "robust_acc_auto",
                ".1%"),
               ("training time s", "train_time_s", ".1f"), ("time / PGD-AT from scratch", "time_vs_pgd_at", ".3f")]
    lines = [f"Fashion-MNIST, L-inf eps {s['eps']:g}: sources on classes {s['source_classes']}, target classes "
             f"{s['target_classes']}, {s['test_samples']} target test images; {s['model']['name']} "
             f"{s['model']['kwargs']}"]
    for kind, info in results["sources"].items():
        lines.append(f"{kind} source ({'PGD-%d AT' % s['source_steps'] if kind == 'robust' else 'standard'}, "
                     f"{s['source_epochs']} epochs, {info['train_time_s']:.0f} s{', cached' if info['cached'] else ''})"
                     f": on its own classes clean {info['source_clean_acc']:.1%}, PGD-{s['eval_steps']} "
                     f"{info['source_robust_acc']:.1%}")
    for block in results["targets"]:
        title = "all target training images" if block["per_class"] is None else \
            f"{block['per_class']} training images per class"
        lines += ["", f"{title} ({block['train_images']}):", "", format_table(block["runs"], columns)]
    lines.append("")
    for setting, checks in results["claims"].items():
        shown = "; ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'no'}" for k, v in checks.items())
        lines.append(f"claims ({setting}): {shown}")
    return "\n".join(lines)


def add_transfer_demo_options(p) -> None:
    """`robust-fast demo transfer`'s own options, on the demo command's parser."""
    t = p.add_argument_group("demo transfer")
    t.add_argument("--source-classes", default=None, help="the source task's classes (default 0-4)")
    t.add_argument("--target-classes", default=None, help="the target task's classes (default 5-9)")
    t.add_argument("--per-class", type=int, default=None,
                   help="the low-data setting's images per class (default 100)")
    t.add_argument("--lwf-lambda", type=float, default=None,
                   help="LwF's weight, relative to the source features' mean L1 norm (default 4)")
    t.add_argument("--source-epochs", type=int, default=None)
    t.add_argument("--naive-head", action="store_true",
                   help="also train the robust head through the network on every batch (no feature cache), timed")


# --test-samples (added by demo_darht) is also this section's: the target test images (default 1000)
TRANSFER_SECTION_OPTIONS = {option: ("transfer",) for option in ("source_classes", "target_classes", "per_class",
                                                                 "lwf_lambda", "source_epochs", "naive_head")}


def run_transfer_demo(args) -> int:
    """The `robust-fast demo transfer` command."""
    with demo_threads(args.threads):
        return _run_transfer_demo(args)


def _run_transfer_demo(args) -> int:
    from robust_fast.data import parse_classes

    settings = TransferDemoSettings.quick() if args.quick else TransferDemoSettings()
    settings.seed = args.seed
    if args.source_classes is not None:
        settings.source_classes = parse_classes(args.source_classes)
    if args.target_classes is not None:
        settings.target_classes = parse_classes(args.target_classes)
    if args.per_class is not None:
        settings.per_class = (None, args.per_class)
    for option in ("lwf_lambda", "source_epochs", "test_samples"):
        if getattr(args, option) is not None:
            setattr(settings, option, getattr(args, option))
    settings.naive_head = settings.naive_head or args.naive_head
    out = output_folder(args, "transfer")
    results = run(settings, out, retrain_sources=args.retrain_teacher, data_root=args.data)
    report(out, table(results), "results.json, table.md, transfer.png, one folder per run")
    return 0
