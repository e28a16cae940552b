"""Adversarial attacks: one module per family and the torchattacks-compatible classes.

  pgd.py         fgsm, pgd (L-inf and L2) on the fused PGD step, and input_gradient
  apgd.py        apgd, apgdt on the fused APGD step
  fab.py         fab_t, the targeted Fast Adaptive Boundary attack
  square.py      square, the gradient-free random search
  autoattack.py  auto_attack: the attacks in turn on the samples still robust
  classes.py     FGSM, PGD, PGDL2, APGD, APGDT, FAB, Square with torchattacks' arguments

Every name is exported here: `from robust_fast import attacks` then attacks.pgd(...), or
`from robust_fast import attacks as torchattacks` then torchattacks.PGD(model, ...). The names
pgd, apgd and square are the functions; their modules are robust_fast.attacks.pgd etc. in
sys.modules (`from robust_fast.attacks.apgd import dlr_loss`).
"""
from robust_fast.attacks.apgd import apgd, apgdt
from robust_fast.attacks.autoattack import AutoAttackResult, auto_attack
from robust_fast.attacks.classes import APGD, APGDT, FAB, FGSM, PGD, PGDL2, Square
from robust_fast.attacks.fab import fab_t
from robust_fast.attacks.pgd import Clip, LossFn, Radius, fgsm, input_gradient, pgd
from robust_fast.attacks.square import square

__all__ = [
    "fgsm", "pgd", "input_gradient", "apgd", "apgdt", "fab_t", "square", "auto_attack", "AutoAttackResult",
    "FGSM", "PGD", "PGDL2", "APGD", "APGDT", "FAB", "Square", "Clip", "LossFn", "Radius",
]
