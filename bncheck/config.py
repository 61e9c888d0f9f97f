"""Project configuration: ``[tool.bncheck]`` in pyproject.toml or a ``bncheck.toml``, found upward from a folder.

As ruff and pytest do: the nearest folder holding either file wins, and in one folder ``bncheck.toml`` wins
over ``pyproject.toml``. A pyproject.toml without a ``[tool.bncheck]`` table does not count. Command-line
options override the file (the CLI merges; this module only reads and validates).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bncheck.errors import BncheckError, UsageError
from bncheck.findings import FAIL_ON_LEVELS, Finding

KNOWN_KEYS = ("select", "ignore", "fail-on", "batch-sizes", "per-layer-ignores", "per-model")
MODEL_KEYS = ("input-shape", "data", "batch-sizes")

#: every TOML spelling of a [tool.bncheck] table: "tool" then "bncheck" as dotted key parts (a table header
#: or a dotted key, quotes and spaces allowed), or a [tool] table or a root `tool =` that may hold the key.
#: A project that only lists bncheck (a dependency, a script) has none of them and is not parsed.
_MAY_HOLD_TABLE = (
    rb"""tool["']?\s*\.\s*["']?bncheck|^[ \t]*\[[ \t]*["']?tool["']?[ \t]*\]|^[ \t]*["']?tool["']?[ \t]*="""
)


@dataclass(frozen=True)
class ModelSettings:
    """Settings for the models whose path matches ``pattern`` (a glob, relative to the config's folder)."""

    pattern: str
    input_shapes: tuple[str, ...] = ()
    data: str | None = None
    batch_sizes: str | None = None


@dataclass(frozen=True)
class Config:
    """What a configuration file sets; None / empty means "not set" (the CLI's default applies)."""

    path: str | None = None
    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    fail_on: str | None = None
    batch_sizes: str | None = None
    per_layer_ignores: dict[str, tuple[str, ...]] = field(default_factory=dict)
    models: tuple[ModelSettings, ...] = ()

    def for_model(self, model: str) -> ModelSettings | None:
        """The first per-model entry whose glob matches ``model`` (as given, or relative to the config)."""
        candidates = {model.replace(os.sep, "/"), os.path.basename(model)}
        if self.path is not None:
            base = os.path.dirname(os.path.abspath(self.path))
            rel = os.path.relpath(os.path.abspath(model), base)
            candidates.add(rel.replace(os.sep, "/"))
        for entry in self.models:
            if any(fnmatch.fnmatch(c, entry.pattern) for c in candidates):
                return entry
        return None

    def ignored(self, finding: Finding, codes_of: Any) -> bool:
        """True when a per-layer ignore (glob on the layer name) lists the finding's code or slug."""
        for pattern, names in self.per_layer_ignores.items():
            if fnmatch.fnmatchcase(finding.layer, pattern) and finding.code in codes_of(names):
                return True
        return False


def find(start: str | os.PathLike[str] = ".") -> Path | None:
    """The configuration file that applies in ``start``: nearest folder upward with bncheck.toml or a
    pyproject.toml holding [tool.bncheck]."""
    folder = Path(start).resolve()
    for candidate in (folder, *folder.parents):
        own = candidate / "bncheck.toml"
        if own.is_file():
            return own
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file():
            raw = _bytes(pyproject)
            # a project's pyproject.toml without the table needs no TOML parser (importing tomllib and
            # parsing cost more than the rest of finding the file)
            if _may_hold_table(raw) and "bncheck" in _parse(pyproject, raw).get("tool", {}):
                return pyproject
    return None


def _may_hold_table(raw: bytes) -> bool:
    # compiled (re's cache) only for a file that mentions bncheck
    return b"bncheck" in raw and re.search(_MAY_HOLD_TABLE, raw, re.MULTILINE) is not None


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate one configuration file. Raises UsageError naming the file and the problem."""
    path = Path(path)
    data = _read(path)
    # a bncheck.toml may hold the table as pyproject.toml does (the README's example copied as it is)
    nested = path.name == "pyproject.toml" or (set(data) == {"tool"} and isinstance(data["tool"], dict))
    table = data.get("tool", {}).get("bncheck") if nested else data
    if not isinstance(table, dict):
        raise UsageError(f"{path}: no [tool.bncheck] table")
    where = f"{path}: " + ("[tool.bncheck]" if nested else "")
    _no_unknown(table, KNOWN_KEYS, where.rstrip(": ") or str(path))
    fail_on = table.get("fail-on")
    if fail_on is not None and fail_on not in FAIL_ON_LEVELS:
        raise UsageError(f"{where} fail-on = {fail_on!r}: expected one of {', '.join(FAIL_ON_LEVELS)}")
    per_layer = table.get("per-layer-ignores", {})
    if not isinstance(per_layer, dict):
        raise UsageError(f"{where} per-layer-ignores must be a table of glob = [codes]")
    models = []
    for pattern, entry in (table.get("per-model") or {}).items():
        if not isinstance(entry, dict):
            raise UsageError(f"{where} per-model.{pattern!r} must be a table")
        _no_unknown(entry, MODEL_KEYS, f"{where} per-model.{pattern!r}")
        data_path = entry.get("data")
        if isinstance(data_path, str) and not os.path.isabs(data_path):
            data_path = str(path.parent / data_path)  # relative to the configuration file, as ruff does
        models.append(
            ModelSettings(
                pattern=pattern,
                input_shapes=tuple(_strings(entry.get("input-shape"), f"{where} per-model.{pattern!r}.input-shape")),
                data=data_path,
                batch_sizes=_sizes(entry.get("batch-sizes"), where),
            )
        )
    found = Config(
        path=str(path),
        select=tuple(_strings(table.get("select"), f"{where} select")),
        ignore=tuple(_strings(table.get("ignore"), f"{where} ignore")),
        fail_on=fail_on,
        batch_sizes=_sizes(table.get("batch-sizes"), where),
        per_layer_ignores={
            str(k): tuple(_strings(v, f"{where} per-layer-ignores.{k!r}")) for k, v in per_layer.items()
        },
        models=tuple(models),
    )
    _check_values(found, where)
    return found


def _check_values(cfg: Config, where: str) -> None:
    """Check names and sizes as the command line's parsers do, naming this file and key (a value the CLI would
    refuse was refused by a later command only, as if given on the command line, or never)."""
    from bncheck.checks import resolve
    from bncheck.probe_data import parse_batch_sizes, parse_input_shape

    def sizes(text: str | None) -> object:
        return text is None or parse_batch_sizes(text)

    def shapes(specs: tuple[str, ...]) -> object:
        return [parse_input_shape(spec) for spec in specs]

    checks: list[tuple[str, Callable[[], object]]] = [
        ("select", partial(resolve, cfg.select)),
        ("ignore", partial(resolve, cfg.ignore)),
        ("batch-sizes", partial(sizes, cfg.batch_sizes)),
    ]
    checks += [(f"per-layer-ignores.{k!r}", partial(resolve, v)) for k, v in cfg.per_layer_ignores.items()]
    for m in cfg.models:
        checks.append((f"per-model.{m.pattern!r}.batch-sizes", partial(sizes, m.batch_sizes)))
        checks.append((f"per-model.{m.pattern!r}.input-shape", partial(shapes, m.input_shapes)))
    for key, check in checks:
        try:
            check()
        except BncheckError as exc:
            message = str(exc).removeprefix("--batch-sizes: ").removeprefix("--batch-sizes ")
            raise UsageError(f"{where.rstrip()} {key}: {message}") from None


def discover(explicit: str | None, start: str = ".") -> Config:
    """``--config FILE`` when given, else the file found upward from ``start``, else no configuration."""
    if explicit is not None:
        if not os.path.isfile(explicit):
            raise UsageError(f"{explicit}: no such configuration file")
        return load(explicit)
    found = find(start)
    return load(found) if found is not None else Config()


def _read(path: Path) -> dict[str, Any]:
    return _parse(path, _bytes(path))


def _bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    import tomllib  # imported here: most runs find no configuration file and never parse TOML

    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None


def _no_unknown(table: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise UsageError(f"{where}: unknown key(s) {shown} (known: {', '.join(known)})")


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(f"{where}: expected a string or a list of strings")


def _sizes(value: Any, where: str) -> str | None:
    """batch-sizes as the CLI spells it ("1,2,32"); the CLI's own parser validates it."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)
    raise UsageError(f'{where} batch-sizes: expected a list of integers or a string like "1,2,32"')
