"""The training loop every recipe uses: fit(recipe, model, train_data, config).

Per epoch: this rank's shard of a seeded shuffle (DistributedSampler: the permutation depends
only on seed and epoch), batches of batch_size / world_size, recipe.batch_loss, one optimiser
step (the gradient's norm clipped to config.max_grad_norm, else to the recipe's max_grad_norm
when it has one) and one schedule step per batch, a tqdm bar (loss, accuracy, samples/s) on
rank 0. After each epoch, rank 0 evaluates on the held-out slice, appends a JSON line to out_dir/log.jsonl
and writes out_dir/checkpoint.pt. resume= continues a checkpoint to exactly the parameters an
uninterrupted run reaches (same shuffles, same random starts, same optimiser and schedule).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from robust_fast._progress import shown as bars_shown
from robust_fast.train import distributed as dist_util
from robust_fast.train.checkpoint import load_checkpoint, resume_changes, save_checkpoint
from robust_fast.train.config import TrainConfig, lr_factor
from robust_fast.train.evaluate import evaluate
from robust_fast.train.recipes import Batch, Recipe

Data = Tuple[torch.Tensor, torch.Tensor]
CHECKPOINT_NAME = "checkpoint.pt"
POSTFIX_INTERVAL_S = 1.0  # how often the bar's loss and accuracy are read back from the device
LOG_NAME = "log.jsonl"


@dataclass
class TrainResult:
    model: nn.Module
    history: List[Dict[str, Any]] = field(default_factory=list)
    train_time_s: float = 0.0           # time in training batches only (no evaluation, no I/O)
    checkpoint: Optional[str] = None


def _make_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)


def _check_data(name: str, data) -> Data:
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise TypeError(f"fit: {name} must be a pair (images, labels) of tensors")
    images, labels = data
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"fit: {name} images and labels differ in length: {images.shape[0]} != {labels.shape[0]}")
    if labels.dtype != torch.int64:
        raise TypeError(f"fit: {name} labels must be int64, got {labels.dtype}")
    return images, labels


def _append_log(path: str, recipe_name: str, record: Dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"recipe": recipe_name, **record}) + "\n")


def _write_log(path: str, recipe_name: str, history: List[Dict[str, Any]]) -> None:
    """log.jsonl holding exactly the records of history (through a temporary, renamed over it)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        for record in history:
            f.write(json.dumps({"recipe": recipe_name, **record}) + "\n")
    os.replace(temporary, path)


def _shard_batches(sampler: DistributedSampler, per_rank: int) -> List[torch.Tensor]:
    order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
    return list(order.split(per_rank))


def fit(recipe: Recipe, model: nn.Module, train_data: Data, config: Optional[TrainConfig] = None, *,
        eval_data: Optional[Data] = None, out_dir: Optional[str] = None, resume: Optional[str] = None,
        device: Optional[torch.device] = None, max_steps: Optional[int] = None,
        until_epoch: Optional[int] = None) -> TrainResult:
    """Trains `model` in place with `recipe` and returns a TrainResult.

    train_data / eval_data: (images in [0, 1], int64 labels) on the CPU; batches move to the
    device (the model's, else cuda:LOCAL_RANK or the CPU). eval_data: the held-out slice of the
    per-epoch record (its first config.eval_samples examples). out_dir: where rank 0 writes
    log.jsonl and checkpoint.pt (nothing is written without it). resume: a checkpoint path;
    the run continues from its epoch to config.epochs. max_steps: stop after this many batches
    in all (a test's single step); the epoch is then not checkpointed. until_epoch: stop, as an
    interrupted run would, after this many epochs of the config.epochs schedule.

    Under torchrun (a process group initialised, see distributed.init_from_env) the trainable
    module is wrapped in DistributedDataParallel and each rank trains on its shard of every
    global batch of config.batch_size.
    """
    config = config if config is not None else TrainConfig()
    if not isinstance(recipe, Recipe):
        raise TypeError(f"fit: recipe must be a robust_fast.train.Recipe, got {type(recipe).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit: model must be an nn.Module, got {type(model).__name__}")
    images, labels = _check_data("train_data", train_data)
    if eval_data is not None:
        eval_data = _check_data("eval_data", eval_data)
    world, rank = dist_util.world_size(), dist_util.rank()
    if config.batch_size % world:
        raise ValueError(f"fit: batch_size {config.batch_size} must divide evenly over {world} ranks")
    per_rank = config.batch_size // world
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None and first.device.type != "cpu" else dist_util.default_device()
    model.to(device)
    with torch.random.fork_rng(devices=[]):  # extra trained parts start from the seed alone
        torch.manual_seed(config.seed)
        trainable = recipe.trainable(model).to(device)
    net = trainable
    if dist_util.is_distributed():
        net = DistributedDataParallel(trainable, device_ids=[device] if device.type == "cuda" else None)
    optimizer = _make_optimizer(config, [p for p in trainable.parameters() if p.requires_grad])
    sampler = DistributedSampler(range(images.shape[0]), num_replicas=world, rank=rank,
                                 shuffle=True, seed=config.seed)
    steps_per_epoch = -(-len(sampler) // per_rank)
    total_steps = steps_per_epoch * config.epochs
    decay_steps = [(e - 1) * steps_per_epoch for e in config.lr_decay_epochs]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config.schedule, step, total_steps, decay_steps))
    max_grad_norm = config.max_grad_norm if config.max_grad_norm is not None else recipe.max_grad_norm
    generator = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + rank)

    history: List[Dict[str, Any]] = []
    start_epoch, train_time = 0, 0.0
    if resume is not None:
        state = load_checkpoint(resume, map_location=device)
        changes = resume_changes(state, os.fspath(resume), recipe.name, recipe.settings(), config.to_dict(),
                                 getattr(model, "spec", None))
        if changes and dist_util.is_main():
            warnings.warn(f"fit: resuming {os.fspath(resume)} with changed settings: " + "; ".join(changes),
                          stacklevel=2)
        try:
            trainable.load_state_dict(state["trainable_state"])
        except RuntimeError as error:
            raise ValueError(f"fit: resume={os.fspath(resume)} holds another model's parameters: "
                             f"{str(error).splitlines()[0]}") from None
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        rng = state["rng"]
        if len(rng["generators"]) != world:
            raise ValueError(f"fit: resume= was written by {len(rng['generators'])} processes, this run has "
                             f"{world}: resume with as many processes to continue the same run")
        torch.set_rng_state(rng["torch"].cpu())
        generator.set_state(rng["generators"][rank].to(generator.get_state().device))
        start_epoch, train_time = int(state["epoch"]), float(state["train_time_s"])
        history = list(state["history"])

    main = dist_util.is_main()
    log_path = checkpoint_path = None
    if out_dir is not None and main:
        os.makedirs(out_dir, exist_ok=True)
        log_path = os.path.join(out_dir, LOG_NAME)
        checkpoint_path = os.path.join(out_dir, CHECKPOINT_NAME)
        if resume is None:
            if os.path.exists(log_path):
                os.remove(log_path)  # a fresh run starts a fresh record
        else:
            # The checkpoint's history is the record of the epochs it holds: a crash after an
            # epoch's checkpoint and before its log line (or a log from another run) is mended.
            _write_log(log_path, recipe.name, history)

    from tqdm.auto import tqdm

    if start_epoch < config.epochs:
        prepare_start = time.perf_counter()
        recipe.prepare(images, device)
        train_time += time.perf_counter() - prepare_start

    steps_done = 0
    last_epoch = config.epochs if until_epoch is None else min(until_epoch, config.epochs)
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        shards = _shard_batches(sampler, per_rank)
        trainable.train()
        # Running sums stay on the device: reading them is a host sync, done only when the bar
        # shows them (at most every POSTFIX_INTERVAL_S) and at the end of the epoch.
        loss_sum_t = torch.zeros((), dtype=torch.float64, device=device)
        correct_t = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        shown_at = -POSTFIX_INTERVAL_S
        bar = tqdm(total=len(shards), desc=f"{recipe.name} {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not (config.progress and main and bars_shown(None)), leave=False, dynamic_ncols=True)
        epoch_start = time.perf_counter()
        for position, index in enumerate(shards):
            x = images[index].to(device, non_blocking=True)
            y = labels[index].to(device, non_blocking=True)
            loss, logits = recipe.batch_loss(Batch(net=net, model=model, x=x, y=y, epoch=epoch,
                                                   generator=generator, backend=config.backend, index=index,
                                                   step=epoch * steps_per_epoch + position,
                                                   steps_per_epoch=steps_per_epoch, epochs=config.epochs))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:  # after DDP's all-reduce: every rank clips alike
                torch.nn.utils.clip_grad_norm_(trainable.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            n = y.shape[0]
            loss_sum_t += loss.detach().to(torch.float64) * n
            correct_t += (logits.detach().argmax(dim=1) == y).sum()
            seen += n
            elapsed = time.perf_counter() - epoch_start
            if not bar.disable and elapsed - shown_at >= POSTFIX_INTERVAL_S:
                shown_at = elapsed
                bar.set_postfix(loss=f"{float(loss_sum_t) / seen:.4f}", acc=f"{int(correct_t) / seen:.3f}",
                                samples_per_s=f"{seen * world / max(elapsed, 1e-9):.0f}", refresh=False)
            bar.update(1)
            steps_done += 1
            if max_steps is not None and steps_done >= max_steps:
                break
        recipe.end_epoch(model, images, labels, device, last=epoch + 1 == config.epochs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - epoch_start
        bar.close()
        train_time += epoch_time
        if max_steps is not None and steps_done >= max_steps:
            break
        loss_sum, correct, seen = dist_util.sum_across_ranks([float(loss_sum_t), float(correct_t), float(seen)])
        record: Dict[str, Any] = {
            "epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": epoch_time, "train_time_s": train_time,
            "samples_per_s": seen / max(epoch_time, 1e-9), **recipe.epoch_record()}
        if main and eval_data is not None and config.eval_samples:
            eval_start = time.perf_counter()
            held_out = (eval_data[0][:config.eval_samples], eval_data[1][:config.eval_samples])
            numbers = evaluate(model, *held_out, eps=config.eval_eps, steps=config.eval_steps,
                               seed=config.seed + epoch, backend=config.backend, robust=config.eval_steps > 0,
                               progress=False)
            record.update(clean_acc=numbers["clean_acc"], robust_acc=numbers.get("robust_acc"),
                          eval_steps=config.eval_steps, eval_eps=config.eval_eps)
            record.update(recipe.held_out_metrics(model, *held_out, config.eval_eps, config.backend))
            record["eval_time_s"] = time.perf_counter() - eval_start
        history.append(record)
        generator_states = dist_util.all_gather_objects(generator.get_state().cpu())
        if main and log_path is not None:
            # The checkpoint first: a crash before the log line loses a line that resume writes
            # back from the checkpoint's history, never repeats an epoch.
            save_checkpoint(checkpoint_path, {
                "recipe": recipe.name, "recipe_settings": recipe.settings(), "config": config.to_dict(),
                "model_spec": getattr(model, "spec", None), "model_state": model.state_dict(),
                "trainable_state": trainable.state_dict(), "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(), "epoch": epoch + 1,
                "rng": {"torch": torch.get_rng_state(), "generators": generator_states},
                "history": history, "train_time_s": train_time})
            _append_log(log_path, recipe.name, record)
        if main and config.progress:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                              if isinstance(v, float) and k not in ("lr", "eval_eps"))
            tqdm.write(f"{recipe.name} epoch {epoch + 1}/{config.epochs}: {shown}")
        dist_util.barrier()
    model.eval()
    return TrainResult(model=model, history=history, train_time_s=train_time, checkpoint=checkpoint_path)
