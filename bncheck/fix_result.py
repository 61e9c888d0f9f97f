"""What `bncheck fix` asks of a backend and what it gets back: plain dataclasses every renderer reads.

Framework-neutral (numpy and bncheck.model only), so that the ONNX and Keras backends return the same types
and the report and renderers never import a backend. The rule for how many calibration samples are enough
and how the uncertainty of the new statistics is estimated lives here, once for both backends.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.model import InputSpec, NormLayer, TensorStats, median, summarize
from bncheck.probe_data import release_mapped, sample_count
from bncheck.verdicts import Drift, drift_text

if TYPE_CHECKING:
    from bncheck.findings import Finding
    from bncheck.report import Report

#: --stats choices: statistics from the file where they are sound, from the data, or stored where sound and
#: data where given and needed.
STATS_MODES: tuple[str, ...] = ("auto", "stored", "data")

#: Actions a layer can get, in the order the summary lists them.
ACTIONS: tuple[str, ...] = ("to-inference", "recalibrated", "replaced-moments", "not-fixed", "unchanged")
CHANGING: frozenset[str] = frozenset(ACTIONS[:3])

#: The floor below which `fix` refuses to estimate statistics (``--min-samples`` overrides it): with fewer
#: than 8 samples the variance of a channel with one value per sample has a relative standard error above
#: sqrt(2/8) = 50%, and the positions of one sample are correlated, so more positions do not replace samples.
MIN_SAMPLES = 8
#: Above these, the new statistics are reported as uncertain (a warning, not a refusal). They are half of
#: BN003's drift thresholds (0.5 sd, x2 variance): an estimate this rough could itself be flagged as drift.
#: 64 samples with one value per channel give 0.125 sd and 18%: below both.
MEAN_SE_WARN = 0.25
VAR_REL_WARN = 0.35


@dataclass(frozen=True)
class StatsSummary:
    """min/median/max of a layer's running mean and variance (``summarize`` dicts; None when unknown)."""

    mean: dict[str, Any] | None
    var: dict[str, Any] | None

    @classmethod
    def of(cls, mean: np.ndarray | None, var: np.ndarray | None) -> StatsSummary:
        return cls(summarize(mean), summarize(var))

    @classmethod
    def stored(cls, layer: NormLayer) -> StatsSummary:
        return cls.of(layer.mean, layer.var)

    def medians(self) -> tuple[float | None, float | None]:
        def median(summary: dict[str, Any] | None) -> float | None:
            return None if summary is None else summary.get("median")

        return median(self.mean), median(self.var)


@dataclass(frozen=True)
class Uncertainty:
    """How well calibration data pin a layer's new statistics (medians and worst over channels).

    Estimated from the spread of the per-sample channel means (a cluster standard error: positions of one
    sample are correlated, samples are not), so a layer on 1x1 maps and one on 32x32 maps are judged alike.
    """

    samples: int
    values_per_channel: int
    mean_se_sd: float  # standard error of the mean, in standard deviations of the channel (median)
    mean_se_sd_max: float
    var_rel_error: float  # relative standard error of the variance (median)
    var_rel_error_max: float

    @property
    def large(self) -> bool:
        return self.mean_se_sd > MEAN_SE_WARN or self.var_rel_error > VAR_REL_WARN

    def text(self) -> str:
        return f"{self.samples} samples: mean +-{self.mean_se_sd:.2g} sd, variance +-{self.var_rel_error:.0%}" + (
            " (uncertain)" if self.large else ""
        )


def uncertainty(stats: TensorStats) -> Uncertainty:
    """Standard errors of the per-channel mean and variance that ``stats`` estimate (see Uncertainty)."""
    m = np.asarray(stats.sample_mean, dtype=np.float64)
    s = np.asarray(stats.sample_sq, dtype=np.float64)
    n = int(m.shape[0])
    mu = m.mean(axis=0)
    var = np.maximum(s.mean(axis=0) - mu**2, 0.0)
    if n < 2:
        inf = math.inf
        return Uncertainty(n, int(stats.count), inf, inf, inf, inf)
    # the variance estimate is the mean of d_i = sq_i - 2 mu m_i (plus mu^2): delta method per sample
    with np.errstate(invalid="ignore", divide="ignore"):
        se_mean = m.std(axis=0, ddof=1) / math.sqrt(n)
        se_var = (s - 2.0 * mu * m).std(axis=0, ddof=1) / math.sqrt(n)
        live = var > 0  # a dead channel (ReLU always 0) is known exactly
        mean_sd = se_mean[live] / np.sqrt(var[live])
        var_rel = se_var[live] / var[live]
    if not mean_sd.size:
        return Uncertainty(n, int(stats.count), 0.0, 0.0, 0.0, 0.0)
    return Uncertainty(
        n,
        int(stats.count),
        median(mean_sd),
        float(np.max(mean_sd)),
        median(var_rel),
        float(np.max(var_rel)),
    )


def calibration_batch(inputs: list[InputSpec], batch_size: int) -> tuple[int, bool]:
    """(batch size to feed, whether the model fixes it): a fixed batch dimension takes only full batches."""
    fixed = {spec.batch_dim for spec in inputs if isinstance(spec.batch_dim, int)}
    if len(fixed) == 1:
        return int(fixed.pop()), True
    return batch_size, False


def calibration_size(batch: int, fixed: bool, samples: int) -> int:
    """The largest calibration batch: a fixed one, else ``batch`` or the data's ``samples`` if fewer."""
    return batch if fixed else min(batch, samples)


def calibration_batches(
    data: dict[str, np.ndarray], batch: int, fixed: bool = False, axes: Mapping[str, int | None] | None = None
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(feeds, real samples) per batch of ``data`` (samples first). With a ``fixed`` batch size the last batch
    is completed with the data's first samples (repeats); the second item says how many rows count. ``axes``:
    each input's batch axis, as the probe feeds them (probe_plan._take): None passes an input whole (a setting
    or an unread input), another axis than 0 gets its samples moved there (a recurrent state)."""
    axes = axes or {}
    whole = {name: array for name, array in data.items() if axes.get(name, 0) is None}
    total = sample_count(data, axes)
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        feeds = {name: array[start:stop] for name, array in data.items() if name not in whole}
        real = stop - start
        if fixed and real < batch:
            fill = np.arange(batch - real) % total
            feeds = {name: np.concatenate([part, data[name][fill]]) for name, part in feeds.items()}
        feeds = {name: _to_axis(part, axes.get(name)) for name, part in feeds.items()}
        yield {**feeds, **whole}, real
        release_mapped(data)  # a mapped .npy's pages this batch read, once the caller is done with it


def _to_axis(part: np.ndarray, axis: int | None) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(part, 0, axis)) if axis else part


@dataclass
class LayerFix:
    """What `fix` did (or would do) to one layer."""

    layer: str
    action: str  # one of ACTIONS
    reason: str
    code: str | None = None
    source: str | None = None  # where the statistics now come from: "stored" | "data" | None
    old: StatsSummary | None = None
    new: StatsSummary | None = None
    uncertainty: Uncertainty | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.action in CHANGING


@dataclass(frozen=True)
class FixRequest:
    """What the orchestration asks of a backend's ``fix``."""

    output: str | None
    data: dict[str, np.ndarray] | None
    repair: frozenset[str]
    stats: str = "auto"
    dry_run: bool = False
    batch_size: int = 32
    min_samples: int = MIN_SAMPLES
    data_label: str = "the data"
    # layers the original model's probe reported as BN003 drift, with that finding's evidence
    flagged: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class FixOutcome:
    """What a backend's ``fix`` did: per layer, the files written, how the data was used."""

    layers: list[LayerFix]
    written: list[str]
    samples: int
    samples_used: int
    batch_size: int
    passes: int
    padded: int = 0  # repeated samples completing a fixed-batch model's last batch (not in the statistics)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(entry.changed for entry in self.layers)


@dataclass
class FixResult:
    """The ``fix`` part of a report: the outcome, and the re-check of the written model (``after``)."""

    outcome: FixOutcome
    output: str | None
    dry_run: bool
    stats: str
    after: Report | None = None  # the written model probed (or inspected) again; None when nothing written
    exit_non_zero_on_fix: bool = False
    min_samples: int = MIN_SAMPLES

    @property
    def changed(self) -> bool:
        return not self.dry_run and bool(self.outcome.written) and self.outcome.changed

    def remaining(self, fail_on: str) -> list[Finding]:
        """The written model's findings at or above ``fail_on`` (what makes fix exit 1)."""
        from bncheck.findings import Severity

        if self.after is None or fail_on == "never":
            return []
        threshold = Severity.parse(fail_on)
        return [f for f in self.after.findings if f.severity >= threshold]

    def summary(self, fail_on: str) -> str:
        names: dict[str, list[str]] = {}
        for entry in self.outcome.layers:
            names.setdefault(entry.action, []).append(entry.layer)
        done = "; ".join(f"{a} {listing(names[a])}" for a in ACTIONS[:4] if names.get(a)) or "nothing to repair"
        if self.dry_run:
            return f"dry run, nothing written; would do: {done}"
        text = f"wrote {self.output}: {done}"
        if self.after is not None:
            left = self.remaining(fail_on)
            if left:
                shown = listing(sorted({f"{f.code} {f.layer}" for f in left}))
                text += f"; the written model still has {len(left)} finding{'' if len(left) == 1 else 's'} at or above {fail_on}: {shown}"
            else:
                text += f"; the written model has no finding at or above {fail_on}"
            # statistics that drifted (not never-updated ones) are recomputed to match the data they are then
            # re-checked on: the re-check cannot tell them from statistics the training data needed
            if any(e.action == "recalibrated" and "median_mean_shift" in e.evidence for e in self.outcome.layers):
                text += (
                    "; its recomputed statistics match the data they were recomputed from by construction: "
                    "compare both models on labelled data before replacing the original"
                )
        return text


def listing(items: list[str], shown: int = 4) -> str:
    """'a, b, c' or 'a, b, c, d and 7 more': a summary stays one readable line on big models."""
    head = ", ".join(items[:shown])
    return head if len(items) <= shown else f"{head} and {len(items) - shown} more"


def drift_after_upstream(original: dict[str, Any], now: str) -> str:
    """Why a layer the probe found drifting is recomputed where its statistics agree with the data once the
    layers upstream are repaired (``now``): the drift was the original model's, which the reason quotes."""
    return (
        f"BN003 drift in the original model ({_drift_text(original)}; {now} once the layers upstream are "
        "repaired): recomputed from the data"
    )


def drift_found_by_probe(original: dict[str, Any], now: str) -> str:
    """Why a layer the probe found drifting is recomputed where this pass, with nothing upstream repaired, puts
    its drift (``now``) under the thresholds: the probe's numbers stand (the same data; a sum in another order,
    or the first samples only where the probe's effect bounds them)."""
    return f"BN003 drift in the original model ({_drift_text(original)}; {now} in this pass): recomputed from the data"


def drift_once_repaired(now: str, original: dict[str, Any] | None) -> str:
    """Why a layer still drifting once the layers upstream are repaired is recomputed: ``now`` is measured
    after those repairs, so the reason says so and quotes the probe's numbers on the original beside it."""
    was = f"; {_drift_text(original)} in the original model" if original is not None else ""
    return (
        f"running statistics drift from the data ({now} once the layers upstream are repaired{was}): "
        "recomputed from the data"
    )


def _drift_text(evidence: dict[str, Any]) -> str:
    found = Drift.from_evidence(evidence)
    return "reported by the probe" if found is None else drift_text(found)
