"""The ranges robust_fast::<op>: in torch.profiler traces, and NVTX only when a tool listens."""
import pytest
import torch

import robust_fast
from robust_fast import _profiling
from robust_fast._profiling import op_range, nvtx_for_tools


def test_nvtx_only_when_a_tool_listens():
    assert nvtx_for_tools({}) is None
    assert nvtx_for_tools({"NVTX_INJECTION64_PATH": ""}) is None
    nvtx = pytest.importorskip("nvtx")
    assert nvtx_for_tools({"NVTX_INJECTION64_PATH": "/opt/tool/libinjection.so"}) is nvtx
    assert nvtx_for_tools({"ROBUST_FAST_NVTX": "1"}) is nvtx


def test_range_shows_in_torch_profiler():
    student, teachers = torch.randn(4, 8), torch.randn(2, 4, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        robust_fast.multi_teacher_loss(student, teachers)
    names = {event.name for event in prof.events()}
    assert "robust_fast::multi_teacher_loss" in names


class RecordingNvtx:
    def __init__(self):
        self.calls = []

    def push_range(self, name, domain=None):
        self.calls.append(("push", name, domain))

    def pop_range(self, domain=None):
        self.calls.append(("pop", domain))


def test_a_pushed_range_is_popped_even_when_the_body_raises(monkeypatch):
    recorder = RecordingNvtx()
    monkeypatch.setattr(_profiling, "_nvtx", recorder)
    with pytest.raises(RuntimeError):
        with op_range("pgd_step"):
            raise RuntimeError("inside")
    assert recorder.calls == [("push", "robust_fast::pgd_step", "robust_fast"), ("pop", "robust_fast")]


def test_nothing_is_pushed_when_no_tool_listens(monkeypatch):
    monkeypatch.setattr(_profiling, "_nvtx", None)
    with op_range("pgd_step") as opened:
        pass
    assert opened._record is None and not opened._pushed
