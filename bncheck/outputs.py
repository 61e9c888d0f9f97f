"""Where commands write: never over a file they read (the model, its external data, the --data file)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from bncheck.errors import UsageError


def same_file(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` name one file (also through links), existing or not."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwrite(target: str | None, option: str, reads: Iterable[tuple[str, str | None]]) -> None:
    """Raise a one-line UsageError when ``target`` (given with ``option``) is one of ``reads``
    ((what, path) pairs: "model", "--data", ...); nothing has been written yet when this runs."""
    if not target:
        return
    for what, path in reads:
        if path and same_file(target, path):
            raise UsageError(f"{target}: refusing to overwrite the input {what} with {option}: "
                             "give another file name")
