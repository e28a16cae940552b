"""Certified robustness: interval bound propagation (bounds, margins, certificates, certified
accuracy, the IBP training loss and its schedules) and Gaussian randomized smoothing (the module
`smoothing`: predict, certify, certified accuracy against radius, ACR)."""
from robust_fast.certify.ibp import (LAYER_RULES, certified_accuracy, certify, ibp_loss, interval_bounds,
                                     layer_rule, margin_bounds, supported_layers)
from robust_fast.certify import smoothing
from robust_fast.certify.smoothing import SmoothedCertificate, SmoothedPrediction, average_certified_radius
from robust_fast.certify.schedules import (TRAIN_EPS_FACTOR, eps_schedule, kappa_schedule, ramp_fraction,
                                           training_eps)

__all__ = [
    "LAYER_RULES", "certified_accuracy", "certify", "ibp_loss", "interval_bounds", "layer_rule",
    "margin_bounds", "supported_layers", "TRAIN_EPS_FACTOR", "eps_schedule", "kappa_schedule",
    "ramp_fraction", "training_eps", "smoothing", "SmoothedCertificate", "SmoothedPrediction",
    "average_certified_radius",
]
