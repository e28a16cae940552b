"""robust_fast.transferability: the matrix on hand-made cases, the table, the figure and the command."""
import copy
import json
import math

import pytest
import torch

from robust_fast import cli
from robust_fast.attacks import pgd
from robust_fast.models import build_model
from robust_fast.transferability import mean_transfer, table, transferability
from toy_models import write_checkpoint


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _trained(seed=0, steps=30):
    """A small model fitted to the random labels, so it classifies most clean images right."""
    torch.manual_seed(seed)
    model = build_model("small_cnn")
    x, y = _data()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def test_two_identical_models_give_their_own_robust_accuracy_everywhere():
    model = _trained()
    twin = copy.deepcopy(model)
    x, y = _data()
    result = transferability([model, twin], x, y, eps=0.3, steps=5, seed=3, batch_size=10)
    # the model's own robust accuracy under the same PGD (same seed per batch, no early stop)
    correct = 0
    for first in range(0, 24, 10):
        g = torch.Generator().manual_seed(3 * 1_000_003 + first)
        x_adv = pgd(model, x[first:first + 10], y[first:first + 10], eps=0.3, alpha=0.075, steps=5,
                    random_start=True, early_stop=False, generator=g)
        correct += int((model(x_adv).argmax(1) == y[first:first + 10]).sum())
    own = correct / 24
    assert result["accuracy"][0][0] == own == result["accuracy"][1][1]
    assert result["accuracy"][0][1] == result["accuracy"][1][0] == own
    assert result["robust_acc"] == [own, own]
    assert result["successes"][0][0] > 0                      # the attack fools the model on some images
    assert result["transfer_rate"] == [[1.0, 1.0], [1.0, 1.0]] and mean_transfer(result, 0, 1) == 1.0


def test_a_constant_model_is_never_fooled_and_fools_nobody():
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(10))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 10) + 0 * x.flatten(1)[:, :10]
    model = _trained()
    x, y = _data()
    y = torch.zeros_like(y)                      # the constant model predicts class 0: right everywhere
    result = transferability([Constant(), model], x, y, eps=0.05, steps=3, names=["constant", "cnn"])
    assert result["clean_acc"][0] == 1.0 and result["accuracy"][0][0] == 1.0
    assert result["accuracy"][1][0] == 1.0       # cnn's examples do not fool the constant model
    assert result["successes"][0][1] == 0 and math.isnan(result["transfer_rate"][0][1])
    assert "| constant |" in table(result)


def test_bad_arguments():
    model = _trained(steps=1)
    x, y = _data(4)
    with pytest.raises(TypeError, match="non-empty list"):
        transferability(model, x, y)
    with pytest.raises(ValueError, match="names"):
        transferability([model], x, y, names=["a", "b"])
    with pytest.raises(ValueError, match="eps"):
        transferability([model], x, y, eps=0)
    with pytest.raises(ValueError, match="differ in length"):
        transferability([model], x, y[:3])


def test_cli_writes_table_json_and_heatmap(tmp_path, monkeypatch, capsys):
    import robust_fast.data as data
    x, y = _data(12)
    monkeypatch.setattr(data, "load_fashion_mnist", lambda split, root=None, limit=None: (x[:limit], y[:limit]))
    paths = []
    for name, model in (("a", _trained(0, steps=2)), ("b", build_model("wide_cnn", width=4))):
        paths.append(write_checkpoint(tmp_path / f"{name}.pt", model))
    out = tmp_path / "out"
    assert cli.main(["transferability", *paths, "--samples", "12", "--steps", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "made on \\ accuracy of" in printed and "| a |" in printed and "| b |" in printed
    # stderr is no terminal here: the run's progress is one plain line (one batch)
    assert captured.err.startswith("transferability: PGD-2 on 2 models: 24/24 images, source b, batch 1/1, ")
    assert "\r" not in captured.err and captured.err.count("\n") == 1
    result = json.loads((out / "transferability.json").read_text())
    assert result["names"] == ["a", "b"] and len(result["accuracy"]) == 2 and result["n"] == 12
    assert (out / "transferability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["transferability", *paths, "--names", "only-one", "--out", str(out)]) == 2
