"""Errors in what a user asked for, and the checks the command line makes before long work.

The command line prints these in one or two lines (the traceback only with --debug or
ROBUST_FAST_DEBUG=1): a mistyped option, a missing checkpoint or an unwritable folder is the
user's to fix, not a bug to debug.
"""
from __future__ import annotations

import os
import pickle
import tempfile

DEBUG_ENV = "ROBUST_FAST_DEBUG"


class UsageError(ValueError):
    """A setting the user gave cannot work; the message names the option as it was typed."""


# What a user's mistake raises on its way out of the library: bad settings (ValueError), files
# that are missing, unreadable or unwritable (OSError), files that are not what they claim to be.
USER_ERRORS = (ValueError, OSError, EOFError, pickle.UnpicklingError)


def writable_folder(path: str, option: str = "--out") -> str:
    """Creates `path` if needed and proves it writable now, before hours of work end in a save
    that fails. Returns the path."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".robust_fast-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise UsageError(f"{option} {path}: cannot write there ({reason})") from error
    return path


def debug_requested(argv) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
