"""Progress of long work: bars on a terminal only, plain lines in a log file, nothing unless asked.

Every long-running function takes `progress`:
  None   a bar when stderr is a terminal, else nothing
  True   a bar (tqdm.auto: a terminal or a notebook)
  False  nothing
  "log"  plain lines on stderr, one per stage as it ends (never a carriage return): what ran,
         how far, how long, and an estimate of the time left while it is unfinished
The commands pass command_progress(): a bar on a terminal, "log" when stderr is a file or a pipe.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Dict, Union

LOG = "log"
Progress = Union[None, bool, str]


def check_progress(progress: Any, caller: str) -> Progress:
    """progress as given, or a ValueError naming the argument."""
    if progress is None or isinstance(progress, bool) or (isinstance(progress, str) and progress == LOG):
        return progress
    raise ValueError(f"{caller}: progress must be None, True, False or 'log', got {progress!r}")


def shown(progress: Progress) -> bool:
    """Whether a bar is drawn: progress=None when stderr is a terminal; True always; never for "log"."""
    if isinstance(progress, str):
        return False
    return sys.stderr.isatty() if progress is None else bool(progress)


def logged(progress: Progress) -> bool:
    return isinstance(progress, str) and progress == LOG


def command_progress(enabled: bool = True) -> Progress:
    """What a command passes: a bar on a terminal, lines in a log file, nothing when disabled."""
    if not enabled:
        return False
    return True if sys.stderr.isatty() else LOG


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _plural(unit: str) -> str:
    if unit.endswith("y"):
        return unit[:-1] + "ies"
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


class Stage:
    """One stage of long work, counted in `unit`s up to `total`: a tqdm bar (rate and time left,
    removed when it closes) where bars are shown; with progress="log", `log_lines` lines evenly
    spaced over the total (1: one when the stage ends); otherwise nothing. Fields given to
    update or set_postfix show after the count, on the bar and in the lines."""

    def __init__(self, total: int, desc: str, unit: str, progress: Progress = None, *, log_lines: int = 1,
                 **options):
        self.desc, self.unit, self.total, self.n = desc, unit, int(total), 0
        self.fields: Dict[str, Any] = {}
        self._log = logged(progress)
        self._log_lines = max(1, int(log_lines))
        self._next_line, self._logged_at = 1, None
        self._start = time.perf_counter()
        self._closed = False
        self._bar = None
        # A stage opened before its size is known (total 0) draws its bar from its first count on.
        self._bar_options = dict(options) if shown(progress) else None
        if self.total:
            self._open_bar()

    def _open_bar(self) -> None:
        if self._bar is None and self._bar_options is not None and not self._closed:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, leave=False, dynamic_ncols=True,
                             **self._bar_options)
            if self.n:
                self._bar.update(self.n)
            if self.fields:
                self._bar.set_postfix(dict(self.fields), refresh=False)

    @property
    def active(self) -> bool:
        """Whether anything is drawn or written (callers skip work that only feeds the display)."""
        return self._bar_options is not None or self._log

    @property
    def disable(self) -> bool:
        return not self.active

    def set_total(self, total: int) -> None:
        self.total = int(total)
        self._open_bar()
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def set_postfix(self, refresh: bool = True, **fields) -> None:
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.set_postfix({k: v for k, v in self.fields.items()}, refresh=refresh)

    def update(self, n: int = 1, **fields) -> None:
        if self.total or n:
            self._open_bar()  # before the count moves: the new bar starts from the count so far
        self.n += n
        if fields:
            self.set_postfix(refresh=False, **fields)
        if self._bar is not None:
            self._bar.update(n)
        if self._log and self.total > 0 and self._log_lines > 1:
            due = False
            while self._next_line < self._log_lines and self.n >= math.ceil(self._next_line * self.total / self._log_lines):
                self._next_line, due = self._next_line + 1, True
            if due:
                self._write()

    def advance_to(self, n: int, **fields) -> None:
        """Moves the count up to n (work planned but skipped, as when an attack stops early)."""
        self.update(max(0, int(n) - self.n), **fields)

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        parts = [f"{self.n}/{self.total} {_plural(self.unit)}"] + [f"{k} {v}" for k, v in self.fields.items()]
        parts.append(_duration(elapsed))
        if 0 < self.n < self.total:
            parts.append(f"~{_duration(elapsed * (self.total - self.n) / self.n)} left")
        return f"{self.desc}: " + ", ".join(parts)

    def _write(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)
        self._logged_at = self.n

    def close(self, **fields) -> None:
        """Ends the stage: the bar goes; in a log, its last line (unless the last update wrote it).
        fields: the stage's outcome, shown in that line instead of the running fields."""
        if self._closed:
            return
        self._closed = True
        if fields:
            self.fields = dict(fields)
        if self._bar is not None:
            self._bar.close()
        if self._log and (self._logged_at != self.n or fields):
            self._write()

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str, unit: str, progress: Progress = None, **options) -> Stage:
    """A Stage: a bar where bars are shown, lines with progress="log", else nothing."""
    return Stage(total, desc, unit, progress, **options)
