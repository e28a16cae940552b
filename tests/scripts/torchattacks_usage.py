"""A torchattacks user's script. tests/test_torchattacks_script.py runs it as it is and with
its import line changed to robust_fast's, and compares what the two leave in `results`."""
import torch
from torch import nn

import torchattacks

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
    nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
)
model.eval()
mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
pixels = torch.rand(16, 3, 8, 8)
images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
labels = torch.randint(0, 10, (16,))
results = {}

atk = torchattacks.PGD(model, 8 / 255, 2 / 255, 5, True)        # eps, alpha, steps, random_start
atk.set_normalization_used(mean=mean, std=std)
atk.set_device("cpu")
results["pgd_normalized"] = atk(images, labels)
results["logits"] = atk.get_logits(results["pgd_normalized"])
results["mode"] = atk.get_mode()

atk.set_mode_targeted_random()
results["pgd_targeted_random"] = atk(images, labels)
atk.set_mode_targeted_least_likely(kth_min=2)
results["pgd_least_likely"] = atk(images, labels)
atk.set_mode_targeted_by_label(quiet=True)
results["pgd_by_label"] = atk(images, (labels + 1) % 10)
results["mode_targeted"] = atk.get_mode()
atk.set_mode_default()

plain = torchattacks.PGD(model, eps=0.05, alpha=0.01, steps=3, random_start=False)
plain.set_model_training_mode(model_training=True)             # batch norm and dropout stay in eval
results["pgd_training_mode"] = plain(pixels, labels)

l2 = torchattacks.PGDL2(model, 0.5, 0.1, 4, True, eps_for_division=1e-10)
results["pgdl2"] = l2(pixels, labels)
fgsm = torchattacks.FGSM(model, 4 / 255)
fgsm.set_mode_targeted_least_likely()
results["fgsm_least_likely"] = fgsm(pixels, labels)
