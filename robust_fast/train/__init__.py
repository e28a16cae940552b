"""Training: one loop (fit) and the recipes that plug into it, evaluation, checkpoints.

    fit(recipe, model, (images, labels), TrainConfig(...), eval_data=..., out_dir=..., resume=...)
    recipes: Standard, PGDAT, FastAT, RRM, KD, ARD, IBP, and for randomized smoothing Gaussian,
    SmoothAdv, CRT; DARHT from several teachers (train/darht.py); for robust transfer learning
    TransferHead, FineTune, LwF (train/transfer.py; train_transfer runs them from a source model);
    train_<name> functions for each
    evaluate(model, images, labels, eps=0.1, steps=20, restarts=1)
"""
from robust_fast.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from robust_fast.train.config import TrainConfig
from robust_fast.train.darht import DARHT
from robust_fast.train.evaluate import accuracy, evaluate, robust_accuracy
from robust_fast.train.functions import (train_ard, train_crt, train_darht, train_fast_at, train_gaussian, train_ibp,
                                         train_kd, train_pgd_at, train_rrm, train_smoothadv, train_standard,
                                         train_transfer)
from robust_fast.train.loop import TrainResult, fit
from robust_fast.train.recipes import (ARD, CRT, IBP, KD, PGDAT, RECIPES, RRM, Batch, FastAT, Gaussian, Recipe,
                                       SmoothAdv, Standard)
from robust_fast.train.transfer import FineTune, LwF, TransferHead, transfer_model

__all__ = ["ARD", "Batch", "CRT", "DARHT", "FastAT", "FineTune", "Gaussian", "IBP", "KD", "LwF", "PGDAT", "RECIPES",
           "RRM", "Recipe", "SmoothAdv", "Standard", "TransferHead", "TrainConfig", "TrainResult", "accuracy", "evaluate",
           "fit", "load_checkpoint", "model_from_checkpoint", "robust_accuracy", "save_checkpoint", "train_ard",
           "train_crt", "train_darht", "train_fast_at", "train_gaussian", "train_ibp", "train_kd", "train_pgd_at",
           "train_rrm", "train_smoothadv", "train_standard", "train_transfer", "transfer_model"]
