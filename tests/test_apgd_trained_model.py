"""APGD and APGD-T on a PGD-trained SmallCNN (Fashion-MNIST, eps 0.1), against PGD-20 and
torchattacks at the same steps on the same 256 test images. The model is the one the PGD and
APGD benchmarks train and cache (robust-fast bench pgd / apgd); without it the test trains
it once (about a minute on 2 cores) and caches it."""
import pytest
import torch

from robust_fast import attacks, data
from robust_fast.benchmarks import bench_apgd, bench_pgd

torchattacks = pytest.importorskip("torchattacks")


@pytest.fixture(scope="module")
def trained():
    if not data.available():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    model, _ = bench_pgd.trained_model(bench_apgd.MODEL, "cpu")
    x, y = data.load_fashion_mnist("test", limit=256)
    return model.eval(), x, y


def robust(model, x_adv, y):
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def test_apgd_and_apgdt_are_at_least_as_strong_as_pgd20_and_torchattacks(trained):
    model, x, y = trained
    eps, steps = 0.1, 50
    pgd20 = robust(model, attacks.pgd(model, x, y, eps=eps, alpha=eps / 4, steps=20,
                                      generator=torch.Generator().manual_seed(0)), y)
    ours_ce = robust(model, attacks.apgd(model, x, y, eps=eps, steps=steps,
                                         generator=torch.Generator().manual_seed(0)), y)
    theirs_ce = robust(model, torchattacks.APGD(model, eps=eps, steps=steps, seed=0)(x, y), y)
    ours_t = robust(model, attacks.apgdt(model, x, y, eps=eps, steps=steps,
                                         generator=torch.Generator().manual_seed(0)), y)
    theirs_t = robust(model, torchattacks.APGDT(model, eps=eps, steps=steps, seed=0, n_classes=10)(x, y), y)
    assert ours_ce <= pgd20 and ours_t <= pgd20
    assert ours_ce <= theirs_ce + 0.005
    assert ours_t <= theirs_t + 0.005
