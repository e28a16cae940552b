"""auto_attack's versions: the standard version's order, settings and survivor bookkeeping (with
stand-in attacks that fool chosen samples), the fast version unchanged, a real standard run."""
import torch
from torch import nn

from robust_fast import attacks
from robust_fast.attacks import autoattack


class CodeModel(nn.Module):
    """The class is the first pixel times 10, rounded down: an attack changes the class by
    writing that pixel."""

    def forward(self, x):
        code = (x[:, 0, 0, 0] * 10).long().clamp(0, 9)
        return nn.functional.one_hot(code, 10).to(x.dtype) * 5.0


def stand_in(stage, calls):
    """An attack that fools the samples whose index (in the pixel at [0, 0, 1]) is stage mod 5."""
    def attack(model, xs, ys, **kwargs):
        calls.append((stage, (xs[:, 0, 0, 1] * 100).round().long().tolist(), kwargs))
        out = xs.clone()
        index = (xs[:, 0, 0, 1] * 100).round().long()
        fool = index % 5 == stage
        out[fool, 0, 0, 0] = ((ys[fool] + 1) % 10).to(xs.dtype) / 10 + 0.05
        return out
    return attack


def code_batch(n=40):
    x = torch.zeros(n, 1, 4, 4)
    y = torch.arange(n) % 10
    x[:, 0, 0, 0] = y.float() / 10 + 0.05
    x[:, 0, 0, 1] = torch.arange(n).float() / 100
    x[::7, 0, 0, 0] = ((y[::7] + 3) % 10).float() / 10 + 0.05  # misclassified from the start
    return x, y


def test_standard_version_order_settings_and_survivors(monkeypatch):
    calls = []
    for stage, name in enumerate(("apgd", "apgdt", "fab_t", "square"), start=1):
        monkeypatch.setattr(autoattack, name, stand_in(stage, calls))
    x, y = code_batch()
    result = attacks.auto_attack(CodeModel(), x, y, eps=0.1, version="standard", generator=torch.Generator())
    assert result.attacks == ("apgd-ce", "apgd-t", "fab-t", "square") and result.version == "standard"
    assert [c[0] for c in calls] == [1, 2, 3, 4]
    index = torch.arange(len(y))
    wrong_clean = index % 7 == 0
    expected = torch.where(wrong_clean, 0, torch.where(index % 5 == 0, -1, index % 5))
    assert torch.equal(result.fooled_by, expected)
    # Each attack saw exactly the samples no earlier stage fooled.
    for stage, seen, _ in calls:
        survivors = ((expected == -1) | (expected >= stage)).nonzero().squeeze(1).tolist()
        assert seen == survivors
    settings = {stage: kwargs for stage, _, kwargs in calls}
    assert settings[1]["steps"] == 100 and settings[1]["loss"] == "ce"
    assert settings[2]["steps"] == 100 and settings[2]["n_target_classes"] == 9
    assert settings[3]["steps"] == 100 and settings[3]["n_target_classes"] == 9
    assert settings[4]["n_queries"] == 5000 and settings[4]["rescale_schedule"] is False
    counts = {name: int((expected == k).sum()) for k, name in enumerate(("misclassified_clean",) + result.attacks)}
    assert result.breakdown() == dict(counts, robust=int((expected == -1).sum()))
    assert min(counts.values()) > 0
    with torch.no_grad():
        assert torch.equal(CodeModel()(result.x_adv).argmax(1) != y, result.fooled_by != -1)


def test_fast_version_is_the_sequence_before_and_changed_settings_say_custom(monkeypatch):
    calls = []
    for stage, name in enumerate(("apgd", "apgdt", "square"), start=1):
        monkeypatch.setattr(autoattack, name, stand_in(stage, calls))
    x, y = code_batch()
    result = attacks.auto_attack(CodeModel(), x, y, eps=0.1)
    assert result.version == "fast" and result.attacks == ("apgd-ce", "apgd-t", "square")
    assert calls[2][2]["rescale_schedule"] is True
    assert attacks.auto_attack(CodeModel(), x, y, eps=0.1, version="standard", steps=10,
                               attacks=("apgd-ce",)).version == "custom"
    assert attacks.auto_attack(CodeModel(), x, y, eps=0.1, n_queries=10).version == "custom"


def test_standard_version_on_a_model_fools_what_it_says():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 10))
    x = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10
    result = attacks.auto_attack(model, x, y, eps=0.02, version="standard", steps=5, n_target_classes=2,
                                 fab_steps=5, fab_n_target_classes=2, n_queries=30,
                                 generator=torch.Generator().manual_seed(0))
    assert result.attacks == ("apgd-ce", "apgd-t", "fab-t", "square") and result.version == "custom"
    assert set(result.seconds) == {"clean", "apgd-ce", "apgd-t", "fab-t", "square"}
    with torch.no_grad():
        assert torch.equal(model(result.x_adv).argmax(1) != y, result.fooled_by != -1)
    assert ((result.x_adv - x).abs().amax(dim=(1, 2, 3)) <= 0.02 + 1e-6).all()
    assert torch.equal(result.fooled_by[:4], torch.zeros(4, dtype=result.fooled_by.dtype))
