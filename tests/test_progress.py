"""Progress bars go to a terminal only."""
import io

import pytest
import torch
from torch import nn

from robust_fast import _progress, attacks
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


# --------------------------------------------------------------------------------------------
# stages: bars on a terminal, one line per stage in a log, nothing unless asked

class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def _tiny_problem(n=8, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(n, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _lines(text):
    assert "\r" not in text  # a log never gets a carriage return
    return [line for line in text.split("\n") if line]


def test_a_logged_stage_writes_one_line_or_the_lines_asked(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(_progress.sys, "stderr", log)
    with _progress.Stage(100, "work", "step", "log") as stage:
        for _ in range(100):
            stage.update(1, left=3)
    assert _lines(log.getvalue()) == [_lines(log.getvalue())[0]]
    assert log.getvalue().startswith("work: 100/100 steps, left 3, ")
    log.truncate(0), log.seek(0)
    with _progress.Stage(8, "spread", "query", "log", log_lines=4) as stage:
        for _ in range(8):
            stage.update(1)
    lines = _lines(log.getvalue())
    assert [line.split(",")[0] for line in lines] == [f"spread: {k}/8 queries" for k in (2, 4, 6, 8)]
    assert "left" in lines[0] and "left" not in lines[-1]  # an estimate while unfinished


def test_commands_get_bars_on_a_terminal_and_lines_in_a_log(monkeypatch):
    monkeypatch.setattr(_progress.sys, "stderr", FakeTerminal())
    assert _progress.command_progress() is True and _progress.command_progress(False) is False
    monkeypatch.setattr(_progress.sys, "stderr", io.StringIO())
    assert _progress.command_progress() == "log"


def _auto(model, x, y, **options):
    return attacks.auto_attack(model, x, y, eps=0.1, steps=4, n_queries=30, generator=torch.Generator().manual_seed(3),
                               **options)


def test_auto_attack_logs_one_line_per_attack_and_the_same_result(monkeypatch):
    model, x, y = _tiny_problem()
    quiet = _auto(model, x, y)
    log = io.StringIO()
    monkeypatch.setattr(_progress.sys, "stderr", log)
    logged = _auto(model, x, y, progress="log")
    assert torch.equal(quiet.x_adv, logged.x_adv) and torch.equal(quiet.fooled_by, logged.fooled_by)
    lines = _lines(log.getvalue())
    assert [line.split(": ")[0] for line in lines] == ["auto_attack 1/3", "auto_attack 2/3", "auto_attack 3/3"]
    counts = logged.breakdown()
    for line, name, planned in zip(lines, logged.attacks, ("4/4 steps", "36/36 steps", "30/30 queries")):
        assert line.startswith(f"auto_attack {logged.attacks.index(name) + 1}/3: {name}: {planned}, ")
        assert f"fooled {counts[name]}," in line
    assert f"robust {counts['robust']}/{len(y)}" in lines[-1]


def test_auto_attack_draws_its_bars_on_a_terminal(monkeypatch):
    model, x, y = _tiny_problem()
    terminal = FakeTerminal()
    monkeypatch.setattr(_progress.sys, "stderr", terminal)
    _auto(model, x, y, progress=None, version="standard", fab_steps=3, fab_n_target_classes=2)
    drawn = terminal.getvalue()
    assert "\r" in drawn
    for k, name in enumerate(("apgd-ce", "apgd-t", "fab-t", "square"), start=1):
        assert f"auto_attack {k}/4: {name}" in drawn
    assert "target=" in drawn and "left=" in drawn


def test_library_calls_are_quiet_unless_asked(monkeypatch, capsys):
    model, x, y = _tiny_problem()
    terminal = FakeTerminal()
    monkeypatch.setattr(_progress.sys, "stderr", terminal)
    _auto(model, x, y, version="standard", fab_steps=2, fab_n_target_classes=2)
    attacks.apgd(model, x, y, eps=0.1, steps=2)
    attacks.apgdt(model, x, y, eps=0.1, steps=2, n_target_classes=2)
    attacks.fab_t(model, x, y, eps=0.1, steps=2, n_target_classes=2)
    attacks.square(model, x, y, eps=0.1, n_queries=5)
    assert terminal.getvalue() == ""
    monkeypatch.undo()
    _auto(model, x, y, progress=None)  # stderr is no terminal here: nothing either
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("attack, options, planned", [
    ("apgd", dict(steps=3, restarts=2, batch_size=3), "18/18 steps"),            # 3 chunks x 2 restarts x 3
    ("apgdt", dict(steps=2, n_target_classes=3, batch_size=4), "12/12 steps"),  # 2 chunks x 3 targets x 2
    ("fab_t", dict(steps=2, n_target_classes=2, restarts=2), "8/8 steps"),      # 2 targets x 2 restarts x 2
    ("square", dict(n_queries=7, restarts=2, batch_size=5), "28/28 queries"),   # 2 chunks x 2 restarts x 7
])
def test_each_attack_counts_the_work_it_planned(monkeypatch, attack, options, planned):
    """The count reaches the plan also where samples were fooled early and runs were cut short."""
    model, x, y = _tiny_problem(n=8)
    log = io.StringIO()
    monkeypatch.setattr(_progress.sys, "stderr", log)
    run = getattr(attacks, attack)
    quiet = run(model, x, y, eps=0.3, generator=torch.Generator().manual_seed(1), **options)
    shown = run(model, x, y, eps=0.3, generator=torch.Generator().manual_seed(1), progress="log", **options)
    assert torch.equal(quiet, shown)
    (line,) = _lines(log.getvalue())
    assert line.split(": ")[1].startswith(planned)


def test_a_bad_progress_names_itself():
    model, x, y = _tiny_problem()
    with pytest.raises(ValueError, match="auto_attack: progress must be"):
        _auto(model, x, y, progress="yes")
    with pytest.raises(ValueError, match="apgd: progress must be"):
        attacks.apgd(model, x, y, progress=1.5)
    with pytest.raises(ValueError, match="evaluate: progress must be"):
        evaluate(model, x, y, progress="bar")


def test_evaluate_auto_logs_each_attack_and_each_batch(monkeypatch):
    model, x, y = _tiny_problem(n=8)
    log = io.StringIO()
    monkeypatch.setattr(_progress.sys, "stderr", log)
    numbers = evaluate(model, x, y, eps=0.1, steps=2, batch_size=4, attack="auto", auto_attacks=("apgd-ce", "apgd-t"),
                       progress="log")
    lines = _lines(log.getvalue())
    assert [line.split(": ")[0] for line in lines] == ["auto_attack 1/2", "auto_attack 2/2", "evaluate"] * 2
    assert lines[2].startswith("evaluate: AutoAttack fast: 4/8 images, batch 1/2, ") and "left" in lines[2]
    assert lines[5].startswith("evaluate: AutoAttack fast: 8/8 images, batch 2/2, robust ")
    assert f"robust {numbers['robust_acc']:.3f}" in lines[5]


def test_smoothing_certification_logs_a_few_lines(monkeypatch):
    from robust_fast.certify.smoothing import certify
    model, x, _ = _tiny_problem(n=3)
    log = io.StringIO()
    monkeypatch.setattr(_progress.sys, "stderr", log)
    certify(model, x, 0.25, n0=4, n=20, batch_size=7, progress="log")
    lines = _lines(log.getvalue())
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("certify (3 images): 72/72 samples, image 3/3")


def test_benchmark_cases_log_one_line_each_inside_a_run_only(monkeypatch, capsys):
    from robust_fast.benchmarks import harness
    candidates = {"a": lambda: 1, "b": lambda: 2}
    timing = dict(rounds=2, min_run_time=0.0, min_runs=1, warmup_time=0.0, warmup_runs=1)
    harness.compare(candidates, **timing)
    assert capsys.readouterr() == ("", "")  # a benchmark's function called from Python: quiet
    monkeypatch.setattr(harness, "_PROGRESS", "log")
    harness.compare(candidates, label="two constants", **timing)
    harness.compare(candidates, **timing)
    lines = _lines(capsys.readouterr().err)
    assert [line.split(", candidates")[0] for line in lines] == ["bench: two constants: 6/6 passes", "bench: a, b: 6/6 passes"]


def test_a_bar_opened_before_its_size_counts_right(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(_progress.sys, "stderr", terminal)
    stage = _progress.Stage(0, "later", "step", None)
    stage.set_postfix(left=5)
    assert terminal.getvalue() == ""  # nothing drawn before the size is known
    stage.update(2)
    stage.set_total(10)
    stage.update(3)
    assert stage._bar.n == stage.n == 5 and stage._bar.total == 10
    stage.close()
    assert "later" in terminal.getvalue() and "left=5" in terminal.getvalue()
