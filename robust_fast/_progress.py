"""Progress bars for long work, drawn on a terminal only: a log file gets the commands' own
lines (one per stage or epoch), not a carriage return per update."""
from __future__ import annotations

import sys
from typing import Optional


def shown(progress: Optional[bool]) -> bool:
    """progress=None: a bar when stderr is a terminal; True or False: as asked."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def progress_bar(total: int, desc: str, unit: str, progress: Optional[bool] = None, **options):
    """A tqdm bar (rate and time left) that leaves no line behind when it closes."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not shown(progress), leave=False,
                dynamic_ncols=True, **options)
