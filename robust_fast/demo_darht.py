"""`robust-fast demo darht`: distilling adversarial robustness from heterogeneous teachers
(DARHT) end to end on Fashion-MNIST at L-inf eps = 0.1.

1. Candidate teachers trained by different methods with the library's recipes, each once and
   cached (robust_fast.demo.cache_dir): WideCNN by PGD-AT (two seeds: the homogeneous pair),
   SmallCNN by IBP, ResNetSmall by Fast-AT, WideCNN on Gaussian noise.
2. Their transferability matrix (robust_fast.transferability: PGD-20 examples made on one,
   accuracy of the other on them) on the test images.
3. Two teacher sets of the same size: homogeneous (the PGD-AT WideCNN and its second seed) and
   heterogeneous, picked by the measured matrix: the most robust teacher, then each time the
   candidate whose examples transfer least, both ways, to and from those already picked
   (among candidates at least half as robust as the best).
4. Students of one architecture (ResNetSmall with the student-teacher map where DARHT needs
   it) from the same initial backbone weights: DARHT with each set, single-teacher ARD from the
   most robust teacher, PGD-AT; clean, PGD-20 and AutoAttack-style (APGD-CE + APGD-T) accuracy
   on the same test images, training time and time against PGD-AT. --seeds N: N seeds per
   student, mean and spread.
5. results.json, table.md, transferability.png (the matrix), darht.png (robust accuracy
   against training time), each run's checkpoint and log.

--quick runs the same path on a subset (a check that everything works, not a measurement).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from robust_fast.data import load_fashion_mnist
from robust_fast.demo import (_machine, cache_dir, cached_teacher, demo_threads, output_folder,
                              report, summarize)
from robust_fast.models import TeacherMapStudent, build_model
from robust_fast.train.config import TrainConfig
from robust_fast.train.darht import DARHT
from robust_fast.train.evaluate import evaluate
from robust_fast.train.loop import fit
from robust_fast.train.recipes import ARD, IBP, PGDAT, FastAT, Gaussian
from robust_fast.transferability import mean_transfer, plot_transferability, transferability

STUDENTS = ("darht_heterogeneous", "darht_homogeneous", "ard", "pgd_at")
LABELS = {"darht_heterogeneous": "DARHT, heterogeneous set", "darht_homogeneous": "DARHT, homogeneous set",
          "ard": "ARD from the best teacher", "pgd_at": "PGD-AT"}


@dataclass
class TeacherSpec:
    name: str                           # its label in the tables
    model: Dict[str, Any]               # a build_model spec
    recipe: str                         # pgd_at, fast_at, ibp, gaussian
    settings: Dict[str, Any]            # the recipe's arguments
    epochs: int
    seed: int = 0


def default_teachers() -> List[TeacherSpec]:
    wide = {"name": "wide_cnn", "kwargs": {"width": 16}}
    return [TeacherSpec("WideCNN PGD-AT", wide, "pgd_at", {"eps": 0.1, "steps": 5}, 4, seed=0),
            TeacherSpec("WideCNN PGD-AT seed 1", wide, "pgd_at", {"eps": 0.1, "steps": 5}, 4, seed=1),
            TeacherSpec("SmallCNN IBP", {"name": "small_cnn", "kwargs": {}}, "ibp", {"eps": 0.1}, 5),
            TeacherSpec("ResNetSmall Fast-AT", {"name": "resnet_small", "kwargs": {"width": 16}}, "fast_at",
                        {"eps": 0.1}, 3),
            TeacherSpec("WideCNN Gaussian", wide, "gaussian", {"sigma": 0.3}, 3)]


@dataclass
class DARHTDemoSettings:
    eps: float = 0.1
    teacher_train_samples: int = 20000  # the first N training images: the teachers'
    train_samples: int = 10000          # the students' (the first N), for time: 4 students x --seeds
    test_samples: int = 1000            # the first N test images (matrix and final evaluation)
    seeds: int = 1                      # seeds per student (initial weights and draws: seed, seed + 1, ...)
    seed: int = 0
    teachers: List[TeacherSpec] = field(default_factory=default_teachers)
    homogeneous: Tuple[str, ...] = ("WideCNN PGD-AT", "WideCNN PGD-AT seed 1")
    set_size: int = 2
    min_relative_robustness: float = 0.5  # heterogeneous candidates: at least this share of the best's PGD-20
    student_model: Dict[str, Any] = field(default_factory=lambda: {"name": "resnet_small", "kwargs": {"width": 8}})
    # the same epochs for every student: DARHT's step (half the batches PGD-10, K teacher forwards)
    # then costs less than PGD-AT's (every batch PGD-7)
    epochs: Dict[str, int] = field(default_factory=lambda: {name: 3 for name in STUDENTS})
    pgd_at_steps: int = 7
    darht_attack_steps: int = 10
    darht_weights: str = "batch"
    darht_head: str = "follow"
    darht_adversarial_fraction: float = 0.5
    ard_temperature: float = 30.0       # ARD's own (its CIFAR-10 setting, the library default)
    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "cosine"
    batch_size: int = 128
    curve_samples: int = 300
    curve_steps: int = 10
    matrix_steps: int = 20
    eval_steps: int = 20
    auto_attacks: Tuple[str, ...] = ("apgd-ce", "apgd-t")
    auto_steps: int = 50

    @classmethod
    def quick(cls) -> "DARHTDemoSettings":
        tiny = {"name": "wide_cnn", "kwargs": {"width": 4}}
        teachers = [TeacherSpec("WideCNN PGD-AT", tiny, "pgd_at", {"eps": 0.1, "steps": 2}, 1, seed=0),
                    TeacherSpec("WideCNN PGD-AT seed 1", tiny, "pgd_at", {"eps": 0.1, "steps": 2}, 1, seed=1),
                    TeacherSpec("SmallCNN IBP", {"name": "small_cnn", "kwargs": {}}, "ibp", {"eps": 0.1}, 1),
                    TeacherSpec("WideCNN Gaussian", tiny, "gaussian", {"sigma": 0.3}, 1)]
        return cls(teacher_train_samples=512, train_samples=256, test_samples=64, teachers=teachers,
                   student_model={"name": "resnet_small", "kwargs": {"width": 4}},
                   epochs={name: 1 for name in STUDENTS}, pgd_at_steps=2, darht_attack_steps=2, curve_samples=32,
                   curve_steps=2, matrix_steps=3, eval_steps=3, auto_steps=5, min_relative_robustness=0.0)


def _config(settings: DARHTDemoSettings, epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=settings.batch_size, optimizer=settings.optimizer, lr=settings.lr,
                       weight_decay=0.0, schedule=settings.schedule, seed=seed, eval_samples=settings.curve_samples,
                       eval_steps=settings.curve_steps, eval_eps=settings.eps, progress=False)


def teacher_key(spec: TeacherSpec, settings: DARHTDemoSettings) -> Dict[str, Any]:
    """Everything a teacher's weights depend on. A PGD-AT WideCNN gets the RRM demo's key, so the
    two demos share that teacher's cache file."""
    common = {"model": spec.model, "epochs": spec.epochs, "train_samples": settings.teacher_train_samples,
              "seed": spec.seed, "optimizer": settings.optimizer, "lr": settings.lr, "schedule": settings.schedule,
              "batch_size": settings.batch_size}
    if spec.recipe == "pgd_at":
        return {**common, "recipe": "pgd_at", "eps": spec.settings["eps"], "steps": spec.settings["steps"]}
    return {**common, "recipe": spec.recipe, "settings": spec.settings}


def _teacher_recipe(spec: TeacherSpec):
    return {"pgd_at": PGDAT, "fast_at": FastAT, "ibp": IBP, "gaussian": Gaussian}[spec.recipe](**spec.settings)


def candidate_teachers(settings: DARHTDemoSettings, train, held_out, log=print, retrain: bool = False):
    """[(spec, model, info)]: each candidate from the cache, or trained and cached."""
    found = []
    for spec in settings.teachers:
        config = _config(settings, spec.epochs, spec.seed)
        # the RRM demo's teacher was cached with its own per-epoch curve settings: the same key
        # must mean the same weights, and the curve does not change them
        model, info = cached_teacher(teacher_key(spec, settings), spec.model, _teacher_recipe(spec), train, held_out,
                                     config, log=log, retrain=retrain, what=f"{spec.recipe} {spec.settings}")
        info["name"] = spec.name
        found.append((spec, model.eval(), info))
    return found


def teacher_matrix(settings: DARHTDemoSettings, specs: Sequence[TeacherSpec], teachers, test, log=print,
                   retrain: bool = False) -> Dict[str, Any]:
    """The candidates' transferability matrix on the test images, cached beside the teachers (it
    depends only on them and on the attack): computing it is PGD-20 on every candidate."""
    key = {"teachers": [teacher_key(spec, settings) for spec in specs], "names": [spec.name for spec in specs],
           "eps": settings.eps, "steps": settings.matrix_steps, "test_samples": settings.test_samples,
           "seed": settings.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"demo_darht_matrix_{digest}.json")
    if os.path.isfile(path) and not retrain:
        log(f"transferability: cached {path}")
        with open(path, encoding="utf-8") as f:
            return {**json.load(f), "cached": True}
    log(f"transferability of {len(teachers)} candidate teachers on {test[0].shape[0]} test images")
    start = time.perf_counter()
    matrix = transferability(teachers, *test, eps=settings.eps, steps=settings.matrix_steps,
                             names=[spec.name for spec in specs], seed=settings.seed)
    matrix["time_s"] = time.perf_counter() - start
    os.makedirs(cache_dir(), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(matrix, f)
    os.replace(path + ".tmp", path)
    return {**matrix, "cached": False}


def heterogeneous_set(matrix: Dict[str, Any], specs: Sequence[TeacherSpec], size: int,
                      min_relative_robustness: float = 0.5) -> Tuple[List[int], Dict[str, Any]]:
    """Indices of `size` teachers picked by the measured matrix, and why: first the most robust
    (PGD accuracy on its own examples), then each time, among candidates at least
    min_relative_robustness of its robust accuracy and of an (architecture, method) not yet in
    the set, the one whose examples transfer least, both ways, to and from those picked."""
    robust = matrix["robust_acc"]
    best = max(range(len(robust)), key=lambda i: robust[i])
    picked, notes = [best], [f"{specs[best].name}: the most robust ({robust[best]:.1%})"]
    kinds = {(json.dumps(specs[best].model, sort_keys=True), specs[best].recipe)}
    while len(picked) < size:
        candidates = [i for i in range(len(specs)) if i not in picked
                      and robust[i] >= min_relative_robustness * robust[best]
                      and (json.dumps(specs[i].model, sort_keys=True), specs[i].recipe) not in kinds]
        if not candidates:
            raise ValueError(f"demo darht: only {len(picked)} teachers of distinct kinds are at least "
                             f"{min_relative_robustness:.0%} as robust as the best: no heterogeneous set of {size}")
        scores = {i: statistics.fmean(mean_transfer(matrix, i, j) for j in picked) for i in candidates}
        chosen = min(candidates, key=lambda i: scores[i])
        picked.append(chosen)
        kinds.add((json.dumps(specs[chosen].model, sort_keys=True), specs[chosen].recipe))
        notes.append(f"{specs[chosen].name}: mean transfer rate {scores[chosen]:.2f} with the set "
                     f"(candidates: " + ", ".join(f"{specs[i].name} {s:.2f}" for i, s in scores.items()) + ")")
    return picked, {"rule": "most robust first, then the least mutual transfer, distinct (architecture, method)",
                    "steps": notes}


def _student(settings: DARHTDemoSettings, seed: int, num_teachers: Optional[int]):
    """The student of one seed: the same backbone weights for every recipe; DARHT's map head on top
    (its own weights seeded alike for every DARHT student)."""
    torch.manual_seed(seed)
    backbone = build_model(settings.student_model["name"], **settings.student_model["kwargs"])
    if num_teachers is None:
        return backbone
    torch.manual_seed(seed + 1_000_003)
    return TeacherMapStudent(backbone, num_teachers)


def _recipe(name: str, settings: DARHTDemoSettings, sets: Dict[str, List[int]], teachers, paths):
    if name == "pgd_at":
        return PGDAT(eps=settings.eps, steps=settings.pgd_at_steps)
    if name == "ard":
        best = sets["heterogeneous"][0]
        return ARD(teachers[best], eps=settings.eps, steps=settings.pgd_at_steps,
                   temperature=settings.ard_temperature, teacher_path=paths[best])
    chosen = sets[name[len("darht_"):]]
    return DARHT([teachers[i] for i in chosen], eps=settings.eps, attack_steps=settings.darht_attack_steps,
                 adversarial_fraction=settings.darht_adversarial_fraction, weights=settings.darht_weights,
                 head=settings.darht_head, teacher_paths=[paths[i] for i in chosen])


def _evaluate(model, test, settings: DARHTDemoSettings, seed: int) -> Dict[str, Any]:
    pgd20 = evaluate(model, *test, eps=settings.eps, steps=settings.eval_steps, seed=seed)
    auto = evaluate(model, *test, eps=settings.eps, steps=settings.auto_steps, attack="auto",
                    auto_attacks=settings.auto_attacks, seed=seed + 2)
    return {"clean_acc": pgd20["clean_acc"], "robust_acc": pgd20["robust_acc"], "robust_acc_auto": auto["robust_acc"],
            "eval_time_s": pgd20["time_s"] + auto["time_s"]}


def step_breakdown(student: TeacherMapStudent, recipe: DARHT, x: torch.Tensor, y: torch.Tensor,
                   repeats: int = 5, pgd_at_steps: int = 7) -> Dict[str, float]:
    """Milliseconds per DARHT step, median of `repeats`, by part: the PGD attack on the student
    (when the batch is adversarial), each teacher's forward, the student's forward and backward,
    the loss (multi_teacher_loss forward + backward on the (B, K, C) map, and the weights); the
    step with and without the attack, the expected step at the recipe's adversarial fraction,
    and a PGD-AT step (PGD-pgd_at_steps + the backbone's forward and backward) for the ratio."""
    from robust_fast.attacks import pgd

    def median_ms(work) -> float:
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            work()
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times[1:])   # the first call warms up
    parts: Dict[str, float] = {}
    parts["attack"] = median_ms(lambda: pgd(student, x, y, eps=recipe.eps, alpha=recipe.attack_step_size,
                                            steps=recipe.attack_steps, random_start=False))
    for k, teacher in enumerate(recipe.teachers):
        def forward(teacher=teacher):
            with torch.no_grad():
                teacher(x)
        parts[f"teacher {k}"] = median_ms(forward)

    def student_pass():
        teacher_map, logits = student(x, return_map=True)
        (teacher_map.sum() + logits.sum()).backward()
    parts["student forward + backward"] = median_ms(student_pass)
    teacher_logits = recipe.teacher_logits(x)
    teacher_map = student(x, return_map=True)[0].detach().requires_grad_(True)

    def loss():
        recipe.distillation(teacher_map, teacher_logits, y).backward()
    parts["loss (weights, forward + backward)"] = median_ms(loss)
    student.zero_grad(set_to_none=True)
    parts["step, adversarial batch"] = sum(parts.values())
    parts["step, clean batch"] = parts["step, adversarial batch"] - parts["attack"]
    fraction = recipe.adversarial_fraction
    parts["step, expected"] = parts["step, clean batch"] + fraction * parts["attack"]
    if pgd_at_steps:  # PGD-AT's step on the same student, timed back to back: the cost ratio under one load
        backbone = student.backbone

        def pgd_at_step():
            x_adv = pgd(backbone, x, y, eps=recipe.eps, alpha=recipe.eps / 4, steps=pgd_at_steps, random_start=True)
            torch.nn.functional.cross_entropy(backbone(x_adv), y).backward()
        parts["PGD-AT step"] = median_ms(pgd_at_step)
        backbone.zero_grad(set_to_none=True)
        parts["expected step / PGD-AT step"] = parts["step, expected"] / parts["PGD-AT step"]
    return parts


METRICS = ("clean_acc", "robust_acc", "robust_acc_auto", "train_time_s", "mean_slices_clean_acc",
           "mean_slices_robust_acc")


def run(settings: DARHTDemoSettings, out: str, log=print, retrain_teachers: bool = False,
        data_root: Optional[str] = None) -> Dict[str, Any]:
    """Runs the demo into the folder `out` and returns what results.json holds."""
    os.makedirs(out, exist_ok=True)
    started = time.time()
    teacher_train = load_fashion_mnist("train", root=data_root, limit=settings.teacher_train_samples)
    train = (teacher_train[0][:settings.train_samples], teacher_train[1][:settings.train_samples])
    test = load_fashion_mnist("test", root=data_root, limit=settings.test_samples)
    held_out = (test[0][:settings.curve_samples], test[1][:settings.curve_samples])
    found = candidate_teachers(settings, teacher_train, held_out, log=log, retrain=retrain_teachers)
    specs = [spec for spec, _, _ in found]
    teachers = [model for _, model, _ in found]
    paths = [info["path"] for _, _, info in found]
    matrix = teacher_matrix(settings, specs, teachers, test, log=log, retrain=retrain_teachers)
    plot_transferability(matrix, os.path.join(out, "transferability.png"),
                         title=f"Candidate teachers: PGD-{settings.matrix_steps} examples at L-inf eps "
                               f"{settings.eps:g}, {matrix['n']} Fashion-MNIST test images")
    names = [s.name for s in specs]
    homogeneous = [names.index(n) for n in settings.homogeneous]
    if len(homogeneous) != settings.set_size:
        raise ValueError(f"demo darht: the homogeneous set has {len(homogeneous)} teachers, set_size is "
                         f"{settings.set_size}")
    heterogeneous, why = heterogeneous_set(matrix, specs, settings.set_size, settings.min_relative_robustness)
    sets = {"heterogeneous": heterogeneous, "homogeneous": homogeneous}
    log("heterogeneous set: " + ", ".join(names[i] for i in heterogeneous) + "; homogeneous set: "
        + ", ".join(names[i] for i in homogeneous))
    teacher_rows = [{"name": s.name, "model": s.model, "recipe": s.recipe, "settings": s.settings,
                     "epochs": s.epochs, "seed": s.seed, "path": info["path"], "cached": info["cached"],
                     "train_time_s": info["train_time_s"], "clean_acc": matrix["clean_acc"][k],
                     "robust_acc": matrix["robust_acc"][k]} for k, (s, _, info) in enumerate(found)]
    runs: List[Dict[str, Any]] = []
    for offset in range(settings.seeds):
        seed = settings.seed + offset
        for name in STUDENTS:
            darht = name.startswith("darht")
            student = _student(settings, seed, settings.set_size if darht else None)
            log(f"student: {LABELS[name]}, seed {seed} ({settings.epochs[name]} epochs)")
            result = fit(_recipe(name, settings, sets, teachers, paths), student, train,
                         _config(settings, settings.epochs[name], seed), eval_data=held_out,
                         out_dir=os.path.join(out, f"{name}-seed{seed}"))
            row = {"recipe": name, "student": LABELS[name], "seed": seed, "epochs": settings.epochs[name],
                   "train_time_s": result.train_time_s, "history": result.history,
                   **_evaluate(student, test, settings, seed)}
            if darht:  # the same student read off the mean of its map's slices
                student.prediction = "mean"
                mean = evaluate(student, *test, eps=settings.eps, steps=settings.eval_steps, seed=seed)
                row.update(mean_slices_clean_acc=mean["clean_acc"], mean_slices_robust_acc=mean["robust_acc"])
                student.prediction = "head"
            runs.append(row)
    rows = []
    for name in STUDENTS:
        mine = [r for r in runs if r["recipe"] == name]
        rows.append({"recipe": name, "student": LABELS[name], "epochs": settings.epochs[name], "seeds": len(mine),
                     **summarize(mine, METRICS)})
    by_name = {row["recipe"]: row for row in rows}
    for row in rows:
        row["time_vs_pgd_at"] = row["train_time_s"] / by_name["pgd_at"]["train_time_s"]
    het, hom, ard = by_name["darht_heterogeneous"], by_name["darht_homogeneous"], by_name["ard"]
    claim = {"above_homogeneous_auto": het["robust_acc_auto"] > hom["robust_acc_auto"],
             "above_ard_auto": het["robust_acc_auto"] > ard["robust_acc_auto"],
             "clean_not_worse": het["clean_acc"] >= max(hom["clean_acc"], ard["clean_acc"]),
             "faster_than_pgd_at": het["time_vs_pgd_at"] < 1.0}
    claim["holds"] = all(claim.values())
    log("timing one DARHT step by part")
    torch.manual_seed(settings.seed)
    probe = _student(settings, settings.seed, settings.set_size)
    breakdown = step_breakdown(probe, _recipe("darht_heterogeneous", settings, sets, teachers, paths),
                               train[0][:settings.batch_size], train[1][:settings.batch_size],
                               pgd_at_steps=settings.pgd_at_steps)
    plot(rows, runs, settings, os.path.join(out, "darht.png"))
    results = {"settings": dataclasses.asdict(settings), "machine": _machine(), "teachers": teacher_rows,
               "transferability": matrix, "sets": {k: [names[i] for i in v] for k, v in sets.items()},
               "heterogeneous_choice": why, "students": rows, "runs": runs, "claim": claim,
               "step_ms": breakdown, "total_time_s": time.time() - started}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


def plot(rows, runs, settings: DARHTDemoSettings, path: str) -> None:
    """Robust accuracy (AutoAttack-style) against training time: each seed a dot, the mean a star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for row in rows:
        mine = [r for r in runs if r["recipe"] == row["recipe"]]
        dots = axes.scatter([r["train_time_s"] for r in mine], [100 * r["robust_acc_auto"] for r in mine], alpha=0.5)
        axes.scatter([row["train_time_s"]], [100 * row["robust_acc_auto"]], marker="*", s=180,
                     color=dots.get_facecolor()[0], label=row["student"], zorder=3)
    axes.set_xlabel("training time (s)")
    axes.set_ylabel(f"AutoAttack-style robust accuracy (%), eps {settings.eps:g}")
    axes.set_title(f"Student {settings.student_model['name']}: DARHT against ARD and PGD-AT\n"
                   f"{settings.test_samples} test images; dots: seeds, stars: mean", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _cell(row: Dict[str, Any], key: str, percent: bool = True) -> str:
    if row.get(key) is None:
        return "-"
    value, spread = row[key], row.get(f"{key}_sd", 0.0)
    if percent:
        return f"{value:.1%}" + (f" ± {spread:.1%}" if row["seeds"] > 1 else "")
    return f"{value:.1f}" + (f" ± {spread:.1f}" if row["seeds"] > 1 else "")


def table(results: Dict[str, Any]) -> str:
    s = results["settings"]
    header = (f"Fashion-MNIST, L-inf eps {s['eps']:g}, {s['train_samples']} training images for the students "
              f"({s['teacher_train_samples']} for the teachers), {s['test_samples']} test images; student {s['student_model']['name']}; {s['seeds']} seed(s) per student "
              f"(mean ± standard deviation)")
    teachers = ["| teacher | method | epochs | clean | PGD-20 | training time s |", "|---|---|---|---|---|---|"]
    for t in results["teachers"]:
        teachers.append(f"| {t['name']} | {t['recipe']} | {t['epochs']} | {t['clean_acc']:.1%} | {t['robust_acc']:.1%} "
                        f"| {t['train_time_s']:.0f}{' (cached)' if t['cached'] else ''} |")
    auto = " + ".join(a.upper() for a in s["auto_attacks"])
    lines = [f"| student | epochs | clean acc | PGD-{s['eval_steps']} acc | AutoAttack-style ({auto}) | "
             f"PGD-{s['eval_steps']}, mean of map slices | training time s | time / PGD-AT |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["students"]:
        lines.append(f"| {row['student']} | {row['epochs']} | {_cell(row, 'clean_acc')} | {_cell(row, 'robust_acc')} "
                     f"| {_cell(row, 'robust_acc_auto')} | {_cell(row, 'mean_slices_robust_acc')} "
                     f"| {_cell(row, 'train_time_s', False)} | {row['time_vs_pgd_at']:.2f} |")
    c = results["claim"]
    verdict = "holds" if c["holds"] else "does not hold"
    claim = (f"The claim {verdict} here: heterogeneous-set DARHT above the homogeneous set "
             f"{'yes' if c['above_homogeneous_auto'] else 'no'}, above single-teacher ARD "
             f"{'yes' if c['above_ard_auto'] else 'no'} (AutoAttack-style), clean accuracy no worse "
             f"{'yes' if c['clean_not_worse'] else 'no'}, less time than PGD-AT "
             f"{'yes' if c['faster_than_pgd_at'] else 'no'}.")
    sets = results["sets"]
    chosen = (f"sets: heterogeneous {', '.join(sets['heterogeneous'])}; homogeneous {', '.join(sets['homogeneous'])}")
    step = results["step_ms"]
    breakdown = "one DARHT step (ms, batch of " + str(s["batch_size"]) + ", medians): " + ", ".join(
        f"{k} {v:.1f}" for k, v in step.items() if not k.startswith("expected step /")) + (
        f"; the expected DARHT step costs {step['expected step / PGD-AT step']:.2f} of a PGD-AT step"
        if "expected step / PGD-AT step" in step else "")
    from robust_fast.transferability import table as matrix_table
    return "\n".join([header, "", *teachers, "", matrix_table(results["transferability"]), "", chosen, "",
                      *lines, "", claim, breakdown])


def add_darht_demo_options(p) -> None:
    """`robust-fast demo darht`'s own options, on the demo command's parser."""
    group = p.add_argument_group("demo darht")
    group.add_argument("--seeds", type=int, default=None,
                       help="darht and rrm: seeds per student (default 1 for darht, 3 for rrm)")
    group.add_argument("--darht-epochs", type=int, default=None, help="darht: the DARHT students' epochs")
    group.add_argument("--darht-weights", choices=("batch", "sample", "none"), default=None,
                       help="darht: teacher weights per batch (default), per sample, or none")
    group.add_argument("--darht-head", choices=("follow", "frozen"), default=None,
                       help="darht: the head in the distillation-only phase (default follow)")
    group.add_argument("--adversarial-fraction", type=float, default=None,
                       help="darht: share of batches replaced by PGD examples (default 0.5)")
    group.add_argument("--test-samples", type=int, default=None,
                       help="darht and transfer: test images (default 1000)")


# --seeds is the RRM section's too; --test-samples the transfer section's (its target test images)
DARHT_SECTION_OPTIONS = {"seeds": ("rrm", "darht"), "test_samples": ("darht", "transfer"),
                         **{option: ("darht",) for option in ("darht_epochs", "darht_weights", "darht_head",
                                                              "adversarial_fraction")}}


def run_darht_demo(args) -> int:
    """The `robust-fast demo darht` command."""
    with demo_threads(args.threads):
        return _run_darht_demo(args)


def _run_darht_demo(args) -> int:
    settings = DARHTDemoSettings.quick() if args.quick else DARHTDemoSettings()
    settings.seed = args.seed
    if args.seeds is not None:
        if args.seeds < 1:
            print(f"robust-fast demo darht: error: --seeds must be >= 1, got {args.seeds}")
            return 2
        settings.seeds = args.seeds
    if args.darht_epochs is not None:
        for name in ("darht_heterogeneous", "darht_homogeneous"):
            settings.epochs[name] = args.darht_epochs
    for option, field_name in (("darht_weights", "darht_weights"), ("darht_head", "darht_head"),
                               ("adversarial_fraction", "darht_adversarial_fraction"),
                               ("test_samples", "test_samples")):
        if getattr(args, option) is not None:
            setattr(settings, field_name, getattr(args, option))
    out = output_folder(args, "darht")
    results = run(settings, out, retrain_teachers=args.retrain_teacher, data_root=args.data)
    report(out, table(results), "results.json, table.md, transferability.png, darht.png, one folder per run; "
                                f"{results['total_time_s']:.0f} s")
    return 0
