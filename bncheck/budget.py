"""The memory budget: how many bytes one probe or one read may allocate before bncheck refuses (exit 2).

bncheck estimates what an allocation needs *before* making it (probe inputs from the resolved shapes, a
weight dataset from its declared shape), so a hostile or mistaken shape is a clear error, not a MemoryError
or the machine swapping. The budget is ``BUDGET_FRACTION`` of the memory available when bncheck starts
(MemAvailable, capped by an address-space limit if one is set; divided among the workers of ``--jobs``,
share.py), or the ``BNCHECK_MEMORY_BUDGET`` environment variable: bytes, or a number with a unit (``512MB``, ``16GiB``, ``2TB``).

Standard library only: the CLI, the probe plan and the backends all call it.
"""

from __future__ import annotations

import os
import re

from bncheck import share
from bncheck.errors import BncheckError, ErrorKind, UsageError

ENV = "BNCHECK_MEMORY_BUDGET"
#: how a message says the budget can change
CHANGE = f"set {ENV} (e.g. {ENV}=12GB) to change the budget, within the memory the machine has"
#: Share of the available memory one allocation may take: the rest is for the runtime's own buffers (the
#: activations onnxruntime or Keras allocate while the probe runs) and for the rest of the machine.
BUDGET_FRACTION = 0.5
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """``"16GB"`` -> 16000000000; ``"512MiB"``, ``"1e9"``, ``"1000000"``. Raises ValueError."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"not a size: {text!r}")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if not 1 <= value < 2**63:
        raise ValueError(f"not a size: {text!r}")
    return int(value)


def format_size(size: float, digits: int = 3) -> str:
    """Bytes for people: ``4.0 TB``, ``120 MB`` (decimal units, as disks and --help use them), to
    ``digits`` significant figures."""
    for unit, scale in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.{digits}g} {unit}"
    return f"{int(size)} B"


def format_sizes(larger: int, smaller: int) -> tuple[str, str]:
    """Both sizes with as many figures as it takes for the larger to read larger (a refusal must not say
    "needs 12.3 GB, over the budget of 12.3 GB")."""
    for digits in range(3, 10):
        shown = format_size(larger, digits), format_size(smaller, digits)
        if shown[0] != shown[1]:
            return shown
    return f"{larger} B", f"{smaller} B"


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable from /proc/meminfo (read by hand: psutil is not
    a dependency), else free physical pages, capped by RLIMIT_AS when one is set."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 8 * 10**9  # no way to ask (not Linux, no sysconf): assume a small machine
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            available = min(available, soft)
    except (ImportError, ValueError, OSError):
        pass
    return int(available)


def budget() -> int:
    """The budget in bytes (see the module docstring). A malformed BNCHECK_MEMORY_BUDGET is a usage error."""
    text = os.environ.get(ENV)
    if text:
        try:
            return parse_size(text)
        except ValueError:
            raise UsageError(f"{ENV}={text!r} is not a size (bytes, or a number with a unit such as 16GB)") from None
    return int(available_memory() * BUDGET_FRACTION / share.workers())


def source() -> str:
    """Where the budget comes from, for messages."""
    if os.environ.get(ENV):
        return ENV
    if share.workers() > 1:
        return f"{BUDGET_FRACTION:.0%} of available memory shared by {share.workers()} --jobs workers"
    return f"{BUDGET_FRACTION:.0%} of available memory"


class OverBudgetError(BncheckError):
    """An allocation bncheck was about to make is larger than the memory budget. ``summary``: what needs how
    much against which budget, without the remedy (for a note where the remedy's option does not apply)."""

    kind = ErrorKind.RUNTIME

    def __init__(self, summary: str, remedy: str | None = None) -> None:
        super().__init__(f"{summary}; {remedy}" if remedy else summary)
        self.summary = summary


def check(need: int, what: str, *, remedy: str | None = None, lower_bound: bool = False) -> None:
    """Raise :class:`OverBudgetError` when ``need`` bytes (for ``what``) exceed the budget. ``remedy``: what
    else than the budget the user can change (said before it); ``lower_bound``: ``need`` is a minimum."""
    limit = budget()
    if need > limit:
        needed, allowed = format_sizes(need, limit)
        raise OverBudgetError(
            f"{what} needs {'at least' if lower_bound else 'about'} {needed}, over the memory budget "
            f"of {allowed} ({source()})",
            f"{remedy}, or {CHANGE}" if remedy else CHANGE,
        )
