"""Baselines: record today's findings, then fail only on new ones (as ruff's and bandit's baselines do).

A finding is keyed on (model file name, code, layer): messages carry numbers that move between runs, and
the model's folder differs between a laptop and CI.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

from bncheck.errors import UsageError
from bncheck.findings import Finding
from bncheck.outputs import replace_with

BASELINE_VERSION = 1

Key = tuple[str, str, str]


@dataclass(frozen=True)
class Applied:
    """What a baseline did to one model's findings."""

    kept: list[Finding]  # new findings: these gate
    suppressed: list[Finding]  # findings the baseline lists
    gone: list[Key]  # baseline entries for this model that no longer occur


def key(model: str, finding: Finding) -> Key:
    return (os.path.basename(model), finding.code, finding.layer)


def write(path: str, reports: Iterable[tuple[str, Iterable[Finding]]]) -> int:
    """Write the findings of every (model path, findings) pair; returns how many were recorded."""
    entries = sorted(
        {key(model, f) for model, findings in reports for f in findings},
    )
    document = {
        "bncheck_baseline": BASELINE_VERSION,
        "findings": [{"model": m, "code": c, "layer": layer} for m, c, layer in entries],
    }
    # written whole or not at all: a gate must never read half a baseline
    replace_with(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return len(entries)


def read(path: str) -> set[Key]:
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the baseline ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not a bncheck baseline (invalid JSON: {exc.msg})") from None
    if not isinstance(document, dict) or document.get("bncheck_baseline") != BASELINE_VERSION:
        raise UsageError(f"{path}: not a bncheck baseline (written by --write-baseline)")
    try:
        return {(str(e["model"]), str(e["code"]), str(e["layer"])) for e in document["findings"]}
    except (KeyError, TypeError):
        raise UsageError(f"{path}: damaged bncheck baseline (entries need model, code, layer)") from None


def apply(baseline: set[Key], model: str, findings: Iterable[Finding]) -> Applied:
    kept, suppressed, seen = [], [], set()
    for finding in findings:
        k = key(model, finding)
        if k in baseline:
            suppressed.append(finding)
            seen.add(k)
        else:
            kept.append(finding)
    name = os.path.basename(model)
    gone = sorted(k for k in baseline if k[0] == name and k not in seen)
    return Applied(kept=kept, suppressed=suppressed, gone=gone)
