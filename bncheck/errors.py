"""One exception hierarchy: every failure bncheck reports is a BncheckError with a kind; the CLI maps it to exit 2.

Standard library only, so that every layer (CLI, engine, backends, data loading) can raise it.
"""

from __future__ import annotations

import enum
import re


class ErrorKind(str, enum.Enum):
    """What went wrong, for the JSON error document and for callers of the Python API."""

    USAGE = "usage"  # bad options or arguments
    MODEL = "model"  # the model file cannot be read or is not supported
    DATA = "data"  # the calibration data cannot be read or does not fit the model
    RUNTIME = "runtime"  # the model could not be run
    INTERNAL = "internal"  # a bug in bncheck


class BncheckError(Exception):
    """A failure with a one-line message for the user. ``kind`` says whose side it is on."""

    kind: ErrorKind = ErrorKind.RUNTIME

    def __init__(self, message: str, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class UsageError(BncheckError):
    kind = ErrorKind.USAGE


class ModelError(BncheckError):
    kind = ErrorKind.MODEL


class DataError(BncheckError):
    kind = ErrorKind.DATA


#: a terminal's escape sequences (Keras sets its messages' key phrases in bold)
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: a printed array of numbers (Keras prints the whole input it refuses before saying which shape it expected)
_NUMBERS = re.compile(r"\[[\[\]\s0-9eE.,+\-]{60,}\]")
#: Keras's deserialization errors print the whole layer config before the cause, which is the last
#: "Exception encountered"; its hint on registering custom classes is for the code that saved a model
_DESERIALIZING = re.compile(r"^(Error when deserializing class '[^']*') using config=.*Exception encountered: (.*)$")
_UNLOCATED = re.compile(r"^(Could not locate class '[^']*'|Unknown layer: '[^']*')\. (?:Make sure|Please ensure).*$")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's text on one line (libraries' messages span several), without terminal escapes or long
    printed arrays of numbers ("[...]"), cut to ``limit`` characters."""
    text = _NUMBERS.sub("[...]", _ESCAPES.sub("", " ".join(str(exc).split()))) or type(exc).__name__
    text = _UNLOCATED.sub(r"\1", _DESERIALIZING.sub(r"\1: \2", text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def few(items: object, limit: int = 3) -> str:
    """``'k0', 'k1', 'k2' and 9,997 more``: a message names at most ``limit`` items of a list (each repr'd)."""
    listed = list(items)  # type: ignore[call-overload]
    shown = ", ".join(repr(x) for x in listed[:limit])
    rest = len(listed) - limit
    return f"{shown} and {rest:,} more" if rest > 0 else shown
