"""Progress bars go to a terminal only."""
import io

import pytest
import torch
from torch import nn

from robust_fast import _progress
from robust_fast.train import evaluate


def test_bars_follow_the_terminal_unless_told(monkeypatch):
    monkeypatch.setattr(_progress.sys, "stderr", io.StringIO())  # a log file
    assert not _progress.shown(None) and _progress.shown(True) and not _progress.shown(False)
    bar = _progress.progress_bar(10, "work", "item")
    assert bar.disable
    bar.update(10)
    bar.close()
    assert _progress.sys.stderr.getvalue() == ""  # not a single carriage return


@pytest.mark.parametrize("progress", [None, True])
def test_evaluate_draws_its_bar_only_where_asked(monkeypatch, progress):
    log = io.StringIO()
    monkeypatch.setattr(_progress.sys, "stderr", log)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    plain = evaluate(model, x, y, eps=0.1, steps=2, batch_size=4, progress=False)
    drawn = evaluate(model, x, y, eps=0.1, steps=2, batch_size=4, progress=progress)
    assert {k: v for k, v in plain.items() if k != "time_s"} == {k: v for k, v in drawn.items() if k != "time_s"}
    assert ("evaluate: PGD-2" in log.getvalue()) == bool(progress)
