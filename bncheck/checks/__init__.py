"""The check registry: one module per check, stable codes and slugs, select/ignore by either.

Each check module defines ``CODE``, ``SLUG``, ``SEVERITY`` (default severity), a docstring with the headings
What it does / Why is this bad? / Example / Fix, and a pure ``check(view, probe) -> Iterator[Finding]``:
no I/O, no printing, no framework imports. ``probe`` is None for `inspect` (static part only).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import ModuleType

from bncheck.checks import (
    bn001_collapse,
    bn002_train_mode,
    bn003_stale_stats,
    bn004_epsilon,
    bn005_non_finite,
)
from bncheck.errors import UsageError
from bncheck.findings import Finding
from bncheck.model import ModelView, ProbeResult

ALL_CHECKS: tuple[ModuleType, ...] = (
    bn001_collapse,
    bn002_train_mode,
    bn003_stale_stats,
    bn004_epsilon,
    bn005_non_finite,
)


class UnknownCheckError(UsageError, ValueError):
    """A --select/--ignore entry names no check."""


def resolve(names: Iterable[str]) -> set[str]:
    """Map codes or slugs (any case) to codes; raise UnknownCheckError naming the first unknown entry."""
    by_name = {m.CODE.lower(): m.CODE for m in ALL_CHECKS} | {m.SLUG.lower(): m.CODE for m in ALL_CHECKS}
    codes: set[str] = set()
    for raw in names:
        for name in (part.strip() for part in raw.split(",")):
            if not name:
                continue
            if name.lower() not in by_name:
                known = ", ".join(f"{m.CODE}/{m.SLUG}" for m in ALL_CHECKS)
                raise UnknownCheckError(f"unknown check {name!r} (known: {known})")
            codes.add(by_name[name.lower()])
    return codes


def selected(select: Iterable[str] = (), ignore: Iterable[str] = ()) -> tuple[ModuleType, ...]:
    """The checks to run: all, or only ``select``, minus ``ignore``."""
    chosen = resolve(select) or {m.CODE for m in ALL_CHECKS}
    chosen -= resolve(ignore)
    return tuple(m for m in ALL_CHECKS if m.CODE in chosen)


def run_checks(
    view: ModelView, probe: ProbeResult | None, checks: Iterable[ModuleType] = ALL_CHECKS
) -> Iterator[Finding]:
    for module in checks:
        yield from module.check(view, probe)
