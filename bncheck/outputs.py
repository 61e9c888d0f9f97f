"""Where commands write: never over a file they read (the model, its external data, the --data file), and
reports replaced atomically, so a reader (a CI gate, a dashboard) sees the old file or the new one, never half."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable

from bncheck.errors import UsageError


def same_file(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` name one file (also through links), existing or not."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwrite(
    target: str | None,
    option: str,
    reads: Iterable[tuple[str, str | None]],
    more_reads: Callable[[], Iterable[tuple[str, str | None]]] | None = None,
) -> None:
    """Raise a one-line UsageError when ``target`` (given with ``option``) is one of ``reads``
    ((what, path) pairs: "model", "--data", ...); nothing has been written yet when this runs.

    ``more_reads`` lists files that are costly to find (a model's external data: the model is parsed); it is
    called only when ``target`` exists, since a file that does not exist cannot be read."""
    if not target:
        return
    pairs = list(reads)
    if more_reads is not None and os.path.lexists(target):
        pairs += list(more_reads())
    for what, path in pairs:
        if path and same_file(target, path):
            whose = "the" if what.startswith("fixed") else "the input"  # fix's own output is no input
            raise UsageError(f"{target}: refusing to overwrite {whose} {what} with {option}: give another file name")


def replace_with(target: str, data: bytes) -> None:
    """Write ``data`` to a new file next to ``target``, then rename it over ``target``: a reader sees the old
    file or the new one, never half, and a failed write leaves no half file behind. Raises OSError.

    Through a symbolic link, the file it points to is replaced and the link kept. The temporary file is
    created with ``os.open`` rather than ``tempfile``, whose files are mode 0600: the new file gets the usual
    permissions (0666 minus the umask), as ``open(target, "wb")`` would give it; a replaced file keeps its mode.
    """
    final = os.path.realpath(target)
    folder, name = os.path.split(final)
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if os.path.exists(final):
            os.chmod(temporary, os.stat(final).st_mode & 0o7777)
        os.replace(temporary, final)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_atomic(target: str, text: str) -> None:
    """A report written with :func:`replace_with`; failures become a one-line UsageError."""
    try:
        replace_with(target, text.encode("utf-8"))
    except OSError as error:
        raise UsageError(f"{target}: cannot write the report: {error.strerror or error}") from error
