"""The report: what one command found, plus the pure functions renderers share (verdicts, exit code).

A report is data. Renderers (bncheck.render.*) turn it into text; nothing here prints.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bncheck.findings import Finding, Severity
from bncheck.model import ModelInfo, NormLayer, Note, ProbeResult, normalized_set_size, observed_set_size
from bncheck.verdicts import dependence_verdict, outputs_cleared, ran_on_own_statistics, seen_constant

if TYPE_CHECKING:  # named in annotations only: probe and inspect never load the fix result types
    from bncheck.fix_result import FixResult

SCHEMA_VERSION = 1


class ExitCode(int):
    """An int (what the CLI exits with) that can be called with another threshold: ``code(fail_on="info")``."""

    _findings: list[Finding]
    _minimum: int

    def __new__(cls, value: int, findings: list[Finding], minimum: int = 0) -> ExitCode:
        self = super().__new__(cls, value)
        self._findings = findings
        self._minimum = minimum  # fix --exit-non-zero-on-fix: 1 whatever the threshold
        return self

    def __call__(self, fail_on: str | None = None) -> int:
        return int(self) if fail_on is None else max(self._minimum, exit_code(self._findings, fail_on))


@dataclass(eq=False)
class Report:
    command: str
    model: ModelInfo
    layers: list[NormLayer]
    findings: list[Finding]
    notes: list[Note] = field(default_factory=list)
    probes: list[ProbeResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    fail_on: str = "error"
    sections: dict[str, Any] = field(default_factory=dict)  # later commands' additions
    fix: FixResult | None = None  # `bncheck fix`: what was repaired and the re-check of the written model

    @property
    def max_severity(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    @property
    def exit_code(self) -> ExitCode:
        """The exit code under the report's --fail-on; ``report.exit_code(fail_on="warning")`` asks another.
        A fix report is judged on the written model (:func:`fix_exit_code`)."""
        if self.fix is not None:
            judged = self.fix.after.findings if self.fix.after is not None else self.findings
            forced = 1 if self.fix.exit_non_zero_on_fix and self.fix.changed else 0
            return ExitCode(fix_exit_code(self.fix, self.findings, self.fail_on), judged, forced)
        return ExitCode(exit_code(self.findings, self.fail_on), self.findings)

    def to_json(self) -> str:
        """The CLI's JSON document for this report."""
        from bncheck.render.json import render

        return render(self)

    def counts(self) -> dict[str, int]:
        counts = {s.label: 0 for s in sorted(Severity, reverse=True)}
        for finding in self.findings:
            counts[finding.severity.label] += 1
        return counts

    def findings_for(self, layer: str) -> list[Finding]:
        return [f for f in self.findings if f.layer == layer]


def exit_code(findings: Iterable[Finding], fail_on: str) -> int:
    """0 when no finding is at or above ``fail_on`` (or it is "never"), else 1. Exit 2 is the CLI's."""
    if fail_on == "never":
        return 0
    threshold = Severity.parse(fail_on)
    return 1 if any(f.severity >= threshold for f in findings) else 0


def fix_exit_code(fix: FixResult, original: Iterable[Finding], fail_on: str) -> int:
    """The convention of linters' fix modes (ruff --fix): judged on the WRITTEN model's findings, so a
    successful repair exits 0; with ``--exit-non-zero-on-fix`` any change exits 1. A dry run writes
    nothing: the model stays as it is, judged on its own findings."""
    if fix.exit_non_zero_on_fix and fix.changed:
        return 1
    if fix.after is not None:
        return exit_code(fix.after.findings, fail_on)
    return exit_code(original, fail_on)


def sort_findings(findings: Iterable[Finding], layer_order: list[str]) -> list[Finding]:
    """Graph order of layers, then severity (worst first), then code: stable output for golden files."""
    position = {name: i for i, name in enumerate(layer_order)}
    return sorted(findings, key=lambda f: (position.get(f.layer, len(position)), -int(f.severity), f.code))


def merge_findings(
    static: Iterable[Finding], per_probe: Iterable[tuple[str | None, Iterable[Finding]]]
) -> list[Finding]:
    """One list from the static findings and the findings of each probe run (Keras has two call styles).

    A probe run repeats the static findings (checks report them whenever they hold); those are dropped. A
    finding only a probe produced replaces a static one of the same code on the same layer (the check
    already folded the prediction into it), and one produced in several call styles is kept once, with
    ``call_styles`` listing them in its evidence. A static finding marked ``replaced_by_probe`` (a prediction
    about input sizes the model does not fix) is kept only when a probe run repeats it: the probe measured
    the sizes that ran.
    """
    static = list(static)
    per_probe = [(style, list(findings)) for style, findings in per_probe]
    # a probe's finding with a static one's message that adds the measured effect on the outputs is no repeat (a
    # BN002 on a layer the probe could not measure reads the same; only the probe knows what the batch did)
    static_keys = {(f.code, f.layer, f.message) for f in static}
    repeated = {(f.code, f.layer, f.message) for _, findings in per_probe for f in findings}
    if per_probe:
        static = [
            f for f in static if not f.evidence.get("replaced_by_probe") or (f.code, f.layer, f.message) in repeated
        ]
    dynamic: dict[tuple[str, str, str], Finding] = {}
    styles: dict[tuple[str, str, str], list[str]] = {}
    with_effect: set[tuple[str, str, str]] = set()  # static findings a probe repeated with the effect added
    for call_style, findings in per_probe:
        for finding in findings:
            key3 = (finding.code, finding.layer, finding.message)
            if key3 in static_keys and "output_effect" not in finding.evidence:
                continue
            key = (finding.code, finding.layer, str(finding.evidence.get("kind")))
            if key3 in static_keys:
                with_effect.add(key)
            dynamic.setdefault(key, finding)
            styles.setdefault(key, [])
            if call_style is not None and call_style not in styles[key]:
                styles[key].append(call_style)
    # the effect is the model's, said once per check: on the first such repeat, where no finding the probe made of
    # its own carries it already; and a finding of its own on the same layer (a located reduction) replaces the
    # static one anyway
    said = {
        key[0] for key, finding in dynamic.items() if key not in with_effect and "output_effect" in finding.evidence
    }
    for key in [k for k in dynamic if k in with_effect]:
        if key[0] in said or any(other[:2] == key[:2] for other in dynamic if other not in with_effect):
            del dynamic[key]
        else:
            said.add(key[0])
    replaced = {(code, layer) for code, layer, _ in dynamic}
    merged = [f for f in static if (f.code, f.layer) not in replaced]
    for key, finding in dynamic.items():
        if styles[key]:
            finding = replace(finding, evidence={**finding.evidence, "call_styles": styles[key]})
        merged.append(finding)
    return merged


def layer_status(report: Report, layer: NormLayer) -> str:
    """One word for the layer table: worst finding severity, "not measured" (a probe ran but could not
    measure it), "affected" (downstream of batch dependence), "unknown" (its stored parameters could not be
    read), or "ok"."""
    worst = max((f.severity for f in report.findings_for(layer.name)), default=None)
    if worst is not None:
        return worst.label
    if report.probes and unmeasured_reason(report, layer) is not None:
        return "not measured"
    if any(
        (dep := probe.dependence.get(layer.name)) is not None
        and dependence_verdict(dep, outputs_cleared(probe), layer) == "affected"
        for probe in report.probes
    ):
        return "affected"
    if layer.unreadable:
        return "unknown"
    return "ok"


def not_needed_line(probe: ProbeResult) -> str | None:
    """The one line the table and the HTML report give the layers a probe left unmeasured because no check
    needed their numbers (ProbeResult.not_needed), or None."""
    if not probe.not_needed:
        return None
    return f"{len(probe.not_needed)} layer(s) not measured, each {next(iter(probe.not_needed.values()))}"


def unmeasured_reason(report: Report, layer: NormLayer) -> str | None:
    """Why no probe measured ``layer`` (None when some probe did, when none ran, or when no check needed its
    numbers: ProbeResult.not_needed)."""
    if any(probe.at(b, layer.name) is not None for probe in report.probes for b in probe.batch_sizes):
        return None
    if any(layer.name in probe.not_needed for probe in report.probes):
        return None
    for probe in report.probes:
        if layer.name in probe.unmeasured:
            return probe.unmeasured[layer.name]
    if any(not probe.batch_sizes for probe in report.probes):
        return "no batch size could run"
    return "no statistics came out of the probe runs"


def unknown_layers(report: Report) -> int:
    """Layers whose stored parameters could not be read (the static checks could not judge them)."""
    return sum(1 for layer in report.layers if layer.unreadable)


def set_sizes(layer: NormLayer, batch_sizes: Iterable[int], probes: Iterable[ProbeResult] = ()) -> dict[str, Any]:
    """Elements per normalized set: statically (with the symbolic dims it depends on) and per batch size.

    ``by_batch_size`` holds what a probe measured at the shapes it ran when there is a probe (``observed``
    lists those batch sizes), else the static size when the shape fixes it (None when it does not)."""
    static, symbolic = normalized_set_size(layer)
    probes = list(probes)
    by_batch: dict[str, int | None] = {}
    observed: list[int] = []
    for batch in batch_sizes:
        seen = next((n for p in probes if (n := observed_set_size(layer, p.at(batch, layer.name))) is not None), None)
        if seen is not None:
            by_batch[str(batch)] = seen
            observed.append(batch)
            continue
        size, left = normalized_set_size(layer, batch=batch)
        by_batch[str(batch)] = size if not left else None
    return {
        "static": static if not symbolic else None,
        "known_factor": static,
        "depends_on": list(symbolic),
        "by_batch_size": by_batch,
        "observed": observed,
    }


def probe_cell(probe: ProbeResult, layer: NormLayer, batch_size: int) -> str:
    """Short per-batch-size status of a layer for the table: collapsed / nan / ok / -."""
    seen = probe.at(batch_size, layer.name)
    if seen is None:
        return "-"
    if any(s is not None and s.total_nonfinite for s in (seen.input, seen.output)):
        return "nan/inf"
    return "constant" if seen_constant(layer, seen, ran_on_own_statistics(layer, probe)) else "ok"
