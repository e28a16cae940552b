"""Certified robustness: interval bound propagation (bounds, margins, certificates, certified
accuracy, the IBP training loss and its schedules)."""
from robust_fast.certify.ibp import (LAYER_RULES, certified_accuracy, certify, ibp_loss, interval_bounds,
                                     layer_rule, margin_bounds, supported_layers)
from robust_fast.certify.schedules import (TRAIN_EPS_FACTOR, eps_schedule, kappa_schedule, ramp_fraction,
                                           training_eps)

__all__ = [
    "LAYER_RULES", "certified_accuracy", "certify", "ibp_loss", "interval_bounds", "layer_rule",
    "margin_bounds", "supported_layers", "TRAIN_EPS_FACTOR", "eps_schedule", "kappa_schedule",
    "ramp_fraction", "training_eps",
]
