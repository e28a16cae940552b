"""How adversarial examples transfer between models: the matrix DARHT picks its teachers by.

    result = transferability([model_a, model_b, ...], images, labels, eps=0.1, steps=20)
    result["accuracy"][i][j]       accuracy of model j on the PGD examples made on model i
    result["transfer_rate"][i][j]  of the images model i classifies right and its example fools
                                   (i's successful examples), the share that also fool model j,
                                   counted where j classifies the clean image right
    table(result), plot_transferability(result, "matrix.png")

The examples are L-inf PGD-`steps` (step eps/4, a uniform random start, no early stop: each
keeps climbing the source's loss), one generator seeded with `seed` for every source, so two
identical models get identical examples. A diagonal entry of "accuracy" is the model's own
robust accuracy under that PGD; of "transfer_rate" it is 1 by definition.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from robust_fast._modes import modules_in_mode
from robust_fast._progress import Stage, check_progress
from robust_fast.attacks import pgd


def _predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with modules_in_mode(model, False), torch.no_grad():
        return model(x).argmax(1)


def transferability(models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, *, eps: float = 0.1,
                    steps: int = 20, alpha: Optional[float] = None, names: Optional[Sequence[str]] = None,
                    seed: int = 0, batch_size: int = 500, backend: Optional[str] = None,
                    progress=False) -> Dict[str, Any]:
    """The transferability matrices of `models` on (images in [0, 1], labels): see the module.
    progress: False (the default) nothing; True a bar over the attacks (source model, batch, time
    left); None a bar when stderr is a terminal; "log" one line per batch."""
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)) or len(models) < 1:
        raise TypeError(f"transferability: models must be a non-empty list of models, got {type(models).__name__}")
    for k, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"transferability: models[{k}] must be an nn.Module, got {type(model).__name__}")
    if names is None:
        names = [f"model {k}" for k in range(len(models))]
    names = [str(n) for n in names]
    if len(names) != len(models):
        raise ValueError(f"transferability: {len(names)} names for {len(models)} models")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"transferability: eps must be a float > 0, got {eps!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"transferability: steps must be an int >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"transferability: batch_size must be an int >= 1, got {batch_size!r}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"transferability: images and labels differ in length: {images.shape[0]} != "
                         f"{labels.shape[0]}")
    progress = check_progress(progress, "transferability")
    alpha = eps / 4 if alpha is None else float(alpha)
    count, n = len(models), images.shape[0]
    device = next(iter(models[0].parameters())).device
    correct_adv = torch.zeros(count, count, dtype=torch.int64)   # [i, j]: j right on i's examples
    fools_both = torch.zeros(count, count, dtype=torch.int64)    # i's successes that fool j (j right on clean)
    successes = torch.zeros(count, count, dtype=torch.int64)     # i's successes where j is right on clean
    clean_correct = torch.zeros(count, dtype=torch.int64)
    stage = Stage(n * count, f"transferability: PGD-{steps} on {count} models", "image", progress,
                  log_lines=math.ceil(n / batch_size))
    for first in range(0, n, batch_size):
        x = images[first:first + batch_size].to(device)
        y = labels[first:first + batch_size].to(device)
        right = torch.stack([_predictions(m, x) == y for m in models])           # (count, b)
        clean_correct += right.sum(1).cpu()
        for i, source in enumerate(models):
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + first)
            x_adv = pgd(source, x, y, eps=eps, alpha=alpha, steps=steps, random_start=True, early_stop=False,
                        generator=generator, backend=backend)
            right_adv = torch.stack([_predictions(m, x_adv) == y for m in models])  # (count, b)
            success = right[i] & ~right_adv[i]
            correct_adv[i] += right_adv.sum(1).cpu()
            eligible = success.unsqueeze(0) & right                                   # (count, b)
            successes[i] += eligible.sum(1).cpu()
            fools_both[i] += (eligible & ~right_adv).sum(1).cpu()
            stage.update(x.shape[0], source=names[i], batch=f"{first // batch_size + 1}/{math.ceil(n / batch_size)}")
    stage.close()
    accuracy = (correct_adv.double() / max(n, 1)).tolist()
    rate = [[fools_both[i, j].item() / successes[i, j].item() if successes[i, j] else math.nan
             for j in range(count)] for i in range(count)]
    return {"names": names, "eps": float(eps), "steps": steps, "alpha": alpha, "seed": seed, "n": n,
            "clean_acc": (clean_correct.double() / max(n, 1)).tolist(), "accuracy": accuracy,
            "transfer_rate": rate, "successes": successes.tolist(),
            "robust_acc": [accuracy[i][i] for i in range(count)]}


def mean_transfer(result: Dict[str, Any], i: int, j: int) -> float:
    """The transfer rate between models i and j, both ways, averaged (NaN entries left out)."""
    values = [v for v in (result["transfer_rate"][i][j], result["transfer_rate"][j][i]) if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def table(result: Dict[str, Any]) -> str:
    """Two Markdown tables: accuracy of each target (column) on each source's examples (row),
    and the transfer rate."""
    names = result["names"]

    def matrix(key: str, title: str) -> List[str]:
        lines = [f"| {title} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, row in zip(names, result[key]):
            lines.append(f"| {name} | " + " | ".join("-" if math.isnan(v) else f"{v:.1%}" for v in row) + " |")
        return lines
    header = (f"PGD-{result['steps']} (L-inf eps {result['eps']:g}) examples made on the row's model, "
              f"{result['n']} test images; clean accuracy: "
              + ", ".join(f"{n} {a:.1%}" for n, a in zip(names, result["clean_acc"])))
    return "\n".join([header, ""] + matrix("accuracy", "made on \\ accuracy of") + [""]
                     + matrix("transfer_rate", "made on \\ transfer rate to"))


def plot_transferability(result: Dict[str, Any], path: str, title: Optional[str] = None) -> None:
    """Two heatmaps side by side (accuracy on the examples, transfer rate), written to path (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["names"]
    size = max(3.2, 0.9 * len(names) + 1.6)
    figure, axes = plt.subplots(1, 2, figsize=(2 * size + 1.0, size))
    for axis, key, label in ((axes[0], "accuracy", "accuracy of the column's model"),
                             (axes[1], "transfer_rate", "transfer rate (row's successes fooling column)")):
        values = torch.tensor(result[key], dtype=torch.float64)
        image = axis.imshow(values.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axis.set_yticks(range(len(names)), names, fontsize=8)
        axis.set_xlabel("target")
        axis.set_ylabel("examples made on")
        axis.set_title(label, fontsize=9)
        for i in range(len(names)):
            for j in range(len(names)):
                v = values[i, j].item()
                axis.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if not math.isnan(v) and v < 0.6 else "black")
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.suptitle(title or f"PGD-{result['steps']} at L-inf eps {result['eps']:g}, {result['n']} images",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_transferability_parser(commands) -> None:
    p = commands.add_parser("transferability", help="how PGD examples made on each checkpoint's model fool the "
                                                    "others (Fashion-MNIST test images): a table, JSON and a heatmap")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    p.add_argument("--names", nargs="+", default=None, help="a label per checkpoint (default: the file names)")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf radius (default 0.1)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (default 20, step eps/4)")
    p.add_argument("--samples", type=int, default=1000, help="the first N test images (default 1000)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="seeds the random starts (the same for every model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (default: a bar on a terminal, one line per batch in a log file)")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default $ROBUST_FAST_DATA or Debian's)")
    p.add_argument("--out", default=None, help="folder for transferability.json / .md / .png (default runs/transferability)")
    p.add_argument("--backend", default=None)


def run_transferability(args) -> int:
    """The `robust-fast transferability` command."""
    import json
    import os
    import sys

    from robust_fast._progress import command_progress
    from robust_fast.data import load_fashion_mnist
    from robust_fast.train.checkpoint import model_from_checkpoint

    if args.names is not None and len(args.names) != len(args.checkpoints):
        print(f"robust-fast transferability: error: --names gives {len(args.names)} names for "
              f"{len(args.checkpoints)} checkpoints", file=sys.stderr)
        return 2
    if args.samples < 1:
        print(f"robust-fast transferability: error: --samples must be >= 1, got {args.samples}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [model_from_checkpoint(path, map_location=device) for path in args.checkpoints]
    names = args.names or [os.path.splitext(os.path.basename(p))[0] if os.path.basename(p) != "checkpoint.pt"
                           else os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.checkpoints]
    images, labels = load_fashion_mnist("test", root=args.data, limit=args.samples)
    try:
        result = transferability(models, images, labels, eps=args.eps, steps=args.steps, names=names, seed=args.seed,
                                 batch_size=args.batch_size, backend=args.backend,
                                 progress=command_progress(not args.no_progress))
    except (TypeError, ValueError) as error:
        print(f"robust-fast transferability: error: {error}", file=sys.stderr)
        return 2
    result["checkpoints"] = list(args.checkpoints)
    out = args.out or os.path.join("runs", "transferability")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "transferability.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "transferability.md"), "w", encoding="utf-8") as f:
        f.write(table(result) + "\n")
    plot_transferability(result, os.path.join(out, "transferability.png"))
    print(table(result))
    print(f"\nwritten: {out}/transferability.json, .md, .png")
    return 0


__all__ = ["add_transferability_parser", "mean_transfer", "run_transferability", "plot_transferability", "table", "transferability"]
