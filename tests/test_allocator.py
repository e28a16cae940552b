"""The CPU allocator setting of the CLI: applied on glibc, left alone when asked, every reason given."""
import sys

import pytest

from robust_fast import _allocator


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(_allocator.ENV, "system")
    assert _allocator.tune_cpu_allocator() == {"applied": False, "reason": f"{_allocator.ENV}=system"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_applied_on_linux_and_the_cli_applies_it_for_eval(monkeypatch):
    monkeypatch.delenv(_allocator.ENV, raising=False)
    result = _allocator.tune_cpu_allocator()
    assert isinstance(result["applied"], bool) and result["reason"]
    from robust_fast import cli
    calls = []
    monkeypatch.setattr(cli, "tune_cpu_allocator", lambda: calls.append(1))
    monkeypatch.setattr(cli, "run_eval", lambda args: 0)
    assert cli.main(["eval", "missing.pt"]) == 0 and calls == [1]
    monkeypatch.setattr(cli, "_run_benchmark", lambda name, argv: 0)
    assert cli.main(["bench", "eval"]) == 0 and calls == [1]  # benchmarks keep glibc's defaults
