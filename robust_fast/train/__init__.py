"""Training recipes."""
from robust_fast.train.adversarial import accuracy, adversarial_train, robust_accuracy

__all__ = ["accuracy", "adversarial_train", "robust_accuracy"]
