"""IBP certified training (Gowal et al. 2018): the step for one batch, and a minimal trainer.

Each step minimises ibp_loss = kappa * CE(f(x), y) + (1 - kappa) * CE(-margin bounds, y) at the
step's training radius eps; eps and kappa come from robust_fast.certify.schedules (a clean
warm-up, then eps ramps from 0 to TRAIN_EPS_FACTOR * eps_test while kappa falls from 1 to 0.5).

    python -m robust_fast.certify.training --epochs 10 --eps 0.1 [--out curve.json]

trains robust_fast.models.SmallCNN on Fashion-MNIST and prints, per epoch, the loss, the eps and
kappa reached, and the clean and IBP-certified accuracy on the test set.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from robust_fast._modes import modules_in_mode
from robust_fast.certify.ibp import certified_accuracy, ibp_loss
from robust_fast.certify.schedules import eps_schedule, kappa_schedule, training_eps


def ibp_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   *, eps: float, kappa: float, clip=(0.0, 1.0), max_grad_norm: Optional[float] = 10.0,
                   backend: Optional[str] = None) -> float:
    """One optimiser step on ibp_loss(model, x, y, eps, kappa); returns the loss. The model is
    used in the mode it is in. max_grad_norm: the gradient's norm is clipped to it (None: not),
    which keeps the first steps of the eps ramp from diverging."""
    loss = ibp_loss(model, x, y, eps, kappa, clip=clip, backend=backend)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def clean_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    correct = 0
    with modules_in_mode(model, False), torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            correct += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    return correct / max(1, images.shape[0])


def ibp_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, eps_test: float,
              batch_size: int = 100, lr: float = 1e-3, warmup_epochs: float = 1.0, ramp_epochs: float = 4.0,
              kappa_end: float = 0.5, schedule: str = "smoothed", lr_decay_epochs: Tuple[int, ...] = (),
              test_data: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
              generator: Optional[torch.Generator] = None,
              log: Optional[Callable[[str], None]] = print, backend: Optional[str] = None) -> List[Dict[str, float]]:
    """Trains `model` in place with IBP at TRAIN_EPS_FACTOR * eps_test; returns one record per
    epoch (loss, eps, kappa, seconds, and with test_data the clean and certified test accuracy).

    Steps are counted in batches: the warm-up lasts warmup_epochs, the ramp ramp_epochs.
    Adam with learning rate lr, times 0.1 at each epoch listed in lr_decay_epochs.
    """
    steps_per_epoch = math.ceil(images.shape[0] / batch_size)
    warmup, ramp = int(warmup_epochs * steps_per_epoch), int(ramp_epochs * steps_per_epoch)
    eps_train = training_eps(eps_test)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history, step = [], 0
    for epoch in range(epochs):
        if epoch in lr_decay_epochs:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        start = time.perf_counter()
        order = torch.randperm(images.shape[0], generator=generator)
        loss_sum, seen = 0.0, 0
        eps = kappa = 0.0
        with modules_in_mode(model, True):
            for i in range(0, images.shape[0], batch_size):
                index = order[i:i + batch_size]
                eps = eps_schedule(step, eps_train=eps_train, warmup_steps=warmup, ramp_steps=ramp, kind=schedule)
                kappa = kappa_schedule(step, warmup_steps=warmup, ramp_steps=ramp, kappa_end=kappa_end)
                loss = ibp_train_step(model, optimizer, images[index], labels[index], eps=eps, kappa=kappa,
                                      backend=backend)
                loss_sum += loss * index.numel()
                seen += index.numel()
                step += 1
        record = {"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "eps": eps, "kappa": kappa,
                  "train_seconds": time.perf_counter() - start}
        if test_data is not None:
            record["clean_accuracy"] = clean_accuracy(model, *test_data)
            record["certified_accuracy"] = certified_accuracy(model, test_data, eps_test, batch_size=1000,
                                                              backend=backend)
        history.append(record)
        if log is not None:
            line = (f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, eps {eps:.4f}, kappa {kappa:.3f}, "
                    f"{record['train_seconds']:.1f} s")
            if test_data is not None:
                line += (f"; test clean {record['clean_accuracy']:.2%}, IBP-certified at {eps_test} "
                         f"{record['certified_accuracy']:.2%}")
            log(line)
    return history


def main(argv: Optional[List[str]] = None) -> int:
    from robust_fast.data import load_fashion_mnist
    from robust_fast.models import SmallCNN

    parser = argparse.ArgumentParser(prog="python -m robust_fast.certify.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.1, help="the test radius (L-inf)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--ramp-epochs", type=float, default=4.0)
    parser.add_argument("--lr-decay-epochs", type=int, nargs="*", default=[])
    parser.add_argument("--limit", type=int, default=None, help="train on the first LIMIT images")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--out", default=None, help="write the per-epoch curve here (JSON)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = load_fashion_mnist("train", limit=args.limit)
    test = load_fashion_mnist("test")
    model = SmallCNN(in_channels=1, num_classes=10, input_size=28)
    start = time.perf_counter()
    history = ibp_train(model, *train, epochs=args.epochs, eps_test=args.eps, batch_size=args.batch_size,
                        lr=args.lr, warmup_epochs=args.warmup_epochs, ramp_epochs=args.ramp_epochs,
                        lr_decay_epochs=tuple(e - 1 for e in args.lr_decay_epochs), test_data=test,
                        generator=torch.Generator().manual_seed(args.seed), backend=args.backend)
    total = time.perf_counter() - start
    print(f"total {total:.0f} s (training and the per-epoch evaluations)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "total_seconds": total, "history": history}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
