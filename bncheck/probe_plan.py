"""The probe plan: which batches to run, and what to derive from their statistics. Framework-neutral.

A backend supplies a *runner* (feeds -> per-layer statistics of that batch); this module decides the
batches, runs each exactly once, and turns the results into a :class:`~bncheck.model.ProbeResult`:

- one batch per requested batch size (``ProbeResult.layers``);
- the batch-dependence test: K samples (at most half the largest batch size), each run alone and inside batches
  of every requested size with other samples as companions (``ProbeResult.dependence``);
- with ``--data``: every data sample once, in inference mode, for each layer's input statistics
  (``ProbeResult.data``).

Runs are shared between these uses to keep runtime calls few: the batch of size b that holds probe
samples 0..b-1 *is* the probe batch for b, the first sample's solo run *is* the batch-1 probe, and a
batch holds as many of the K samples as fit (each sample's companions are the other samples of its
batch). With batch sizes 1,2,32 and K=4 that is 4 solo runs, 2 runs of 2 and 1 run of 32: 40 samples
of compute for the 35 a plain run at 1, 2 and 32 needs.

Batch dependence is measured per layer and per tensor (input, output) as the largest change of a probe
sample's per-channel mean and mean of squares between its solo run and any batch, in units of the
layer's per-channel standard deviation (pooled over every row of every dependence run). A mean-of-squares
change is divided by ``2 * rms * std`` (the first-order change of E[x^2] for a shift of one std), so both
numbers are in the same unit. A channel whose spread is below ``SCALE_FLOOR`` times its rms uses that floor
(float32 rounding of a nearly constant channel would otherwise look like a huge relative change).
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import numpy as np

from bncheck.errors import BncheckError, ErrorKind, few, one_line
from bncheck.model import (
    BatchDependence,
    Dim,
    InputSpec,
    LayerProbe,
    LocatedDependence,
    ModelView,
    NormLayer,
    OutputComparison,
    ProbeResult,
    ProbeSettings,
    Recalibration,
    TensorStats,
    fixed_batch,
    without_batch_axis,
)
from bncheck.probe_data import (
    MAX_BATCH_SIZE,
    ProbeDataError,
    check_sizes,
    described_inputs,
    made_up_settings,
    refuse_unshared_batch,
    release_mapped,
    synthetic_inputs,
    synthetic_shapes,
)

T = TypeVar("T")


@dataclass
class Observed:
    """What one run gave: per-layer statistics and the model's own outputs (name -> array, batch first)."""

    layers: dict[str, LayerProbe]
    outputs: dict[str, np.ndarray]


class Runner(Protocol):
    """Runs one batch: an :class:`Observed`, or the per-layer statistics alone (the outputs then go untested).
    With ``layers=False`` only the model's outputs are read (the effect runs and the companion check): the
    backend may leave the statistics out. With ``inputs_only=True`` (a run over the data that only
    ``ProbeResult.data`` reads) the backend may leave the layers' output statistics out (None)."""

    def __call__(
        self, feeds: dict[str, np.ndarray], layers: bool = True, *, inputs_only: bool = False
    ) -> Observed | dict[str, LayerProbe]: ...


#: Finds where an unexplained batch dependence starts: (feeds of a batch holding a sample, feeds of the same
#: size whose other rows are copies of it, its row, the batch size) -> the located tensor, or None.
Locator = Callable[[dict[str, np.ndarray], dict[str, np.ndarray], int, int], "LocatedDependence | None"]
#: Most samples whose solo outputs are compared when the outputs depend on the batch (extra solo runs for
#: the rows of the largest batch: the arg-max agreement is then a fraction of that many samples).
EFFECT_SAMPLES = 32
#: elements per sample of a model output kept for the batch-dependence comparison (see _thin)
OUTPUT_ELEMENTS = 1 << 16

#: per-channel std floor for the batch-dependence unit, relative to the channel's rms.
SCALE_FLOOR = 1e-4
_TINY = 1e-30


# --------------------------------------------------------------------------- numpy statistics


def tensor_stats(x: np.ndarray, channel_axis: int | None, batch_axis: int | None = 0) -> TensorStats:
    """Per-channel statistics of a full tensor, in float64: the reference the in-graph numbers must equal.

    ``batch_axis=None`` treats the whole tensor as one sample; ``channel_axis=None`` as one channel.
    ``min``/``max`` ignore NaN (they are NaN only for a channel without a number); Inf counts.
    """
    a = np.asarray(x)
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    rank = a.ndim
    if batch_axis is not None:
        batch_axis %= max(rank, 1)
    if channel_axis is not None:
        channel_axis %= max(rank, 1)
    if batch_axis is None:
        a = a[np.newaxis]
        channel_axis = None if channel_axis is None else channel_axis + 1
        batch_axis = 0
    if channel_axis is None:
        a = np.expand_dims(a, batch_axis + 1)
        channel_axis = batch_axis + 1
    laid = a  # the extremes and counts are read from the tensor as laid out (_over_channels)
    a = np.moveaxis(a, (batch_axis, channel_axis), (0, 1))
    n, c = a.shape[0], a.shape[1]
    flat = a.reshape(n, c, -1)
    wide = flat.astype(np.float64)
    length = flat.shape[2]
    with np.errstate(invalid="ignore", over="ignore"):
        sample_mean = wide.mean(axis=2) if length else np.zeros((n, c))
        sample_sq = (wide * wide).mean(axis=2) if length else np.zeros((n, c))
    if n * length:
        cmin = _over_channels(np.fmin, laid, channel_axis)  # NaN only where a channel holds nothing else
        cmax = _over_channels(np.fmax, laid, channel_axis)
        zeros = _over_channels(np.add, laid == 0, channel_axis)
        nonfinite = n * length - _over_channels(np.add, np.isfinite(laid), channel_axis)
    else:
        cmin = cmax = np.full(c, np.nan)
        zeros = nonfinite = np.zeros(c, np.int64)
    return TensorStats(
        batch_size=int(n),
        count=int(n * length),
        sample_mean=sample_mean,
        sample_sq=sample_sq,
        min=cmin.astype(np.float64),
        max=cmax.astype(np.float64),
        zeros=np.asarray(zeros, np.int64),
        nonfinite=np.asarray(nonfinite, np.int64),
    )


#: the longest row (elements) that _over_channels folds a channels-last tensor's samples into
_FOLD = 1024


def _over_channels(reduce: np.ufunc, laid: np.ndarray, channel_axis: int) -> np.ndarray:
    """``reduce`` (fmin, fmax, or add of booleans: exact, so any order gives the same numbers) over every axis
    of ``laid`` but ``channel_axis``. Folded so that numpy's loops run along long contiguous rows: over a
    channels-last tensor of 8 channels a plain reduce over the other axes took 20x as long."""
    c = laid.shape[channel_axis]
    pre, post = math.prod(laid.shape[:channel_axis]), math.prod(laid.shape[channel_axis + 1 :])
    kind = np.int64 if laid.dtype == np.bool_ else None  # counts in 64 bits wherever numpy's int is 32
    whole = laid.reshape(pre, c, post)
    rows = reduce.reduce(whole, axis=2, dtype=kind) if post > 1 else whole.reshape(pre, c)
    # m rows side by side (m a power of two dividing pre): one row of m * c, then the m copies of each channel
    m = math.gcd(pre, 1 << max((_FOLD // max(c, 1)).bit_length() - 1, 0))
    folded = reduce.reduce(rows.reshape(pre // m, m * c), axis=0, dtype=kind)
    return np.asarray(reduce.reduce(folded.reshape(m, c), axis=0, dtype=kind))


def merge_stats(parts: Iterable[TensorStats]) -> TensorStats:
    """Statistics of the concatenation of several batches of the same tensor (samples appended)."""
    items = list(parts)
    if not items:
        raise ValueError("merge_stats needs at least one batch")
    if len(items) == 1:
        return items[0]
    return TensorStats(
        batch_size=sum(p.batch_size for p in items),
        count=sum(p.count for p in items),
        sample_mean=np.concatenate([p.sample_mean for p in items], axis=0),
        sample_sq=np.concatenate([p.sample_sq for p in items], axis=0),
        min=np.fmin.reduce([p.min for p in items]),
        max=np.fmax.reduce([p.max for p in items]),
        zeros=np.sum([p.zeros for p in items], axis=0),
        nonfinite=np.sum([p.nonfinite for p in items], axis=0),
        derived=any(p.derived for p in items),
        zeros_exact=all(p.zeros_exact for p in items),
        minmax_measured=all(p.minmax_measured for p in items),
    )


def kept_rows(rows: int, real: int, fed: int | None) -> int:
    """Rows of a tensor of ``rows`` rows (its axis 0) that hold the first ``real`` of the ``fed`` samples of
    its run: ``real``, or ``real`` times the rows per sample where each sample has several (LeViT's
    BatchNorm1d over [B*N, C], N tokens a sample, laid out sample by sample)."""
    if fed and rows != fed and rows % fed == 0:
        return real * (rows // fed)
    return real


def first_samples(stats: TensorStats, n: int, fed: int | None = None) -> TensorStats:
    """``stats`` without the rows past those of its first ``n`` samples (:func:`kept_rows`; ``fed``: the
    samples its run was fed): a fixed-batch model's last batch completed with repeated samples counts only
    its real ones. min/max/zeros/nonfinite keep the repeats, copies of samples already counted (min/max
    unchanged; the counts may be high, their presence is what is read)."""
    n = kept_rows(stats.batch_size, n, fed)
    if n >= stats.batch_size:
        return stats
    per_sample = stats.count // max(stats.batch_size, 1)
    return TensorStats(
        batch_size=n,
        count=per_sample * n,
        sample_mean=stats.sample_mean[:n],
        sample_sq=stats.sample_sq[:n],
        min=stats.min,
        max=stats.max,
        zeros=stats.zeros,
        nonfinite=stats.nonfinite,
        derived=stats.derived,
        zeros_exact=False,
        minmax_measured=stats.minmax_measured,
    )


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Which runs to make. Each run is a tuple of pool indices (one per batch row)."""

    runs: tuple[tuple[int, ...], ...]
    probe_runs: dict[int, tuple[int, ...]]  # requested batch size -> its probe run
    solo_runs: tuple[tuple[int, ...], ...]  # one per probe sample (empty: no dependence test)
    group_runs: dict[int, tuple[tuple[int, ...], ...]]  # batch size > 1 -> runs holding probe samples
    data_runs: tuple[tuple[int, ...], ...]
    samples: int  # K
    pool_needed: int  # distinct indices used before wrapping


def make_plan(
    batch_sizes: tuple[int, ...],
    samples: int,
    pool_size: int | None,
    with_data: bool,
    dependence: bool = True,
    fixed_batch: bool = False,
) -> Plan:
    """The runs for these batch sizes and K; ``pool_size`` (data) wraps indices modulo the sample count.

    ``dependence=False`` (a model whose batch dimension is fixed) plans no solo runs and no groups.
    """
    k = max(1, int(samples))
    if pool_size is not None:
        k = min(k, pool_size)
    big = tuple(b for b in batch_sizes if b > 1) if dependence else ()
    if big:
        # at most half the largest batch in probe samples: their solo runs are the test's extra compute. At 1,2
        # one sample makes the runs (0,) and (0, 1), plain inference's 3 samples (two made 4; a relaxed
        # batch-1 file's proof runs exactly these two, so its probe adds no run)
        k = min(k, max(1, max(big) // 2))
    wrap = (lambda i: i % pool_size) if pool_size else (lambda i: i)
    solo = tuple((i,) for i in range(k)) if big else ()
    groups: dict[int, tuple[tuple[int, ...], ...]] = {}
    for b in big:
        count = -(-k // b)
        groups[b] = tuple(tuple(wrap(g * b + j) for j in range(b)) for g in range(count))
    probe_runs: dict[int, tuple[int, ...]] = {}
    for b in batch_sizes:
        probe_runs[b] = tuple(wrap(i) for i in range(b)) if b not in groups else groups[b][0]
    data_runs: tuple[tuple[int, ...], ...] = ()
    if with_data and pool_size:
        chunk = max(batch_sizes)
        # a model with a fixed batch dimension takes only full batches: the last one is completed with
        # repeats (wrapped indices), which run_plan leaves out of the data statistics (real_rows)
        stop = (lambda s: s + chunk) if fixed_batch else (lambda s: min(s + chunk, pool_size))
        data_runs = tuple(tuple(wrap(i) for i in range(s, stop(s))) for s in range(0, pool_size, chunk))
    ordered: list[tuple[int, ...]] = []
    for run in [*solo, *(probe_runs[b] for b in batch_sizes), *(r for b in big for r in groups[b]), *data_runs]:
        if run not in ordered:
            ordered.append(run)
    needed = max([max(r) + 1 for r in ordered] + ([k] if solo else []))
    return Plan(tuple(ordered), probe_runs, solo, groups, data_runs, k, needed)


def make_fixed_plan(fixed: int, samples: int, pool_size: int | None, with_data: bool) -> Plan:
    """The runs for a model whose batch dimension is fixed to ``fixed`` (>= 2): the dependence test keeps K
    probe samples in their rows and replaces their companions (a second run of the same size)."""
    k = max(1, min(int(samples), fixed - 1, pool_size or fixed))
    wrap = (lambda i: i % pool_size) if pool_size else (lambda i: i)
    first = tuple(wrap(i) for i in range(fixed))
    second = tuple(wrap(i) for i in range(k)) + tuple(wrap(fixed + j) for j in range(fixed - k))
    dependence = second != first
    solo = (first,) * k if dependence else ()  # each probe sample's reference is its row of the first run
    groups: dict[int, tuple[tuple[int, ...], ...]] = {fixed: (second,)} if dependence else {}
    data_runs: tuple[tuple[int, ...], ...] = ()
    if with_data and pool_size:
        # whole batches only: the last one is completed with repeats that run_plan leaves out (real_rows)
        data_runs = tuple(tuple(wrap(i) for i in range(s, s + fixed)) for s in range(0, pool_size, fixed))
    ordered = list(dict.fromkeys([first, *(groups[fixed] if groups else ()), *data_runs]))
    needed = max(max(r) + 1 for r in ordered)
    return Plan(tuple(ordered), {fixed: first}, solo, groups, data_runs, k, needed)


def real_rows(run: tuple[int, ...]) -> int:
    """Rows of a data run before its indices wrap around (the rest repeat samples to fill a fixed batch)."""
    for i in range(1, len(run)):
        if run[i] != run[i - 1] + 1:
            return i
    return len(run)


#: why a probe without --data leaves an inference-mode normalization layer unmeasured (ProbeResult.not_needed)
NOT_NEEDED = (
    "in inference mode: an affine map per channel, which cannot collapse or depend on the batch by itself; "
    "measured with --data or --all-layers, or once the model's outputs hold NaN/Inf"
)


def needs_statistics(layer: NormLayer, settings: ProbeSettings) -> bool:
    """Whether a probe measures ``layer`` from its first batch on.

    A layer that computes statistics from its input can collapse (BN001) or mix a batch (BN002): always. One
    that normalizes with its stored statistics is an affine map per channel: only --data gives its numbers a
    use (BN003 compares them with the stored ones); without it nothing needs them but the naming of the first
    NaN/Inf (BN005), and the engine measures such layers once the model's outputs hold NaN/Inf. Measuring an
    inference BN's output keeps onnxruntime from fusing it and the next Relu/Add into its convolution and
    reads the whole tensor twice (benchmarks/HISTORY.md). ``--all-layers`` measures them all the same.
    """
    return settings.all_layers or settings.data is not None or layer.computes_statistics


def outputs_clear(outputs: Iterable[np.ndarray]) -> bool:
    """True when a NaN/Inf from inside the model would show in these outputs and none does: some output is
    floating-point and every floating-point output is finite. While it holds, the layers that
    :func:`needs_statistics` leaves out may stay unmeasured."""
    floating = [a for a in (np.asarray(o) for o in outputs) if a.dtype.kind in "fc"]
    return bool(floating) and all(bool(np.isfinite(a).all()) for a in floating)


def leave_unmeasured(result: ProbeResult, names: Iterable[str]) -> None:
    """Record ``names`` as left out by :func:`needs_statistics` (``ProbeResult.not_needed``); without statistics
    they have no dependence numbers either (not "unknown")."""
    result.not_needed = dict.fromkeys(names, NOT_NEEDED)
    for name in result.not_needed:
        result.dependence.pop(name, None)


def preflight(view: ModelView, settings: ProbeSettings) -> None:
    """Refuse, before a runtime loads the model, a probe that cannot run: --input-shape for an unknown input,
    inputs that share no batch dimension, dims that do not resolve or are not positive, a fixed batch above MAX_BATCH_SIZE, synthetic inputs over
    the memory budget. Backends call it first; :func:`run_plan` meets the same conditions again later."""
    names = [spec.name for spec in view.inputs]
    for name in settings.input_shapes:
        if name not in names:
            raise ProbeDataError(f"--input-shape {name}: the model has no input of that name (inputs: {few(names)})")
    if settings.data is None:
        check_sizes(view.inputs, settings.input_shapes)  # one message for every unsized dim
    else:
        refuse_unshared_batch(view.inputs)  # data given as arrays (a file's were checked as it was read)
    fixed = fixed_batch(view.inputs)
    _refuse_huge_batch(view, fixed)
    if settings.data is None and settings.batch_sizes:
        batch_sizes = (fixed,) if fixed is not None else tuple(settings.batch_sizes)
        plan = _plan_for(batch_sizes, settings.samples, None, False, fixed != 1, fixed)
        specs = view.inputs
        if fixed is not None:  # as run_plan draws them: along a free batch axis
            specs = [s.with_batch_dim(None) for s in specs]
        synthetic_shapes(specs, plan.pool_needed, settings.input_shapes)


def _refuse_huge_batch(view: ModelView, fixed: int | None) -> None:
    """A fixed batch above MAX_BATCH_SIZE is refused before any plan is made (planning it would not end)."""
    if fixed is not None and fixed > MAX_BATCH_SIZE:
        name = next(spec.name for spec in view.inputs if spec.batched and spec.batch_dim == fixed)
        raise ProbeDataError(
            f"input {name!r} declares a fixed batch dimension of {fixed}, above the largest probe batch size "
            f"{MAX_BATCH_SIZE}: this model cannot be probed or fixed as it is; export it again with a free batch "
            "dimension (torch.onnx.export(..., dynamic_axes={name: {0: 'batch'}}) for each input and output); "
            "bncheck inspect checks it without running it"
        )


def _plan_for(
    batch_sizes: tuple[int, ...],
    samples: int,
    pool_size: int | None,
    with_data: bool,
    dependence: bool,
    fixed: int | None,
) -> Plan:
    if fixed is not None and fixed >= 2 and dependence:
        return make_fixed_plan(fixed, samples, pool_size, with_data)
    return make_plan(batch_sizes, samples, pool_size, with_data, dependence, fixed is not None)


def _ran(plan: Plan, results: Mapping[tuple[int, ...], object]) -> Plan:
    """``plan`` without the runs that could not run: no dependence test without every reference run."""
    groups = {b: runs for b, runs in plan.group_runs.items() if all(r in results for r in runs)}
    solo = plan.solo_runs if all(r in results for r in plan.solo_runs) and groups else ()
    return replace(plan, solo_runs=solo, group_runs=groups if solo else {})


def _pool_samples(pool: Mapping[str, np.ndarray], axes: Mapping[str, int | None]) -> int | None:
    """How many samples the pool holds (samples first on every batched input); None where they disagree."""
    counts = {int(np.shape(array)[0]) for name, array in pool.items() if axes.get(name, 0) is not None}
    return counts.pop() if len(counts) == 1 else None


def _inside_a_batch(
    plan: Plan,
    batch_sizes: tuple[int, ...],
    pool: Mapping[str, np.ndarray],
    axes: Mapping[str, int | None],
    outputs: Mapping[tuple[int, ...], object],
) -> tuple[tuple[int, ...], tuple[int, ...], int] | None:
    """For a model no sample of which ran alone: the smallest probe batch that ran (its outputs kept), and
    the same batch with its first K samples in their rows and other samples of the pool as their companions
    (make_fixed_plan's test); None where no such batch or too few other samples exist."""
    sizes = [b for b in batch_sizes if b >= 2 and plan.probe_runs.get(b) in outputs]
    count = _pool_samples(pool, axes)
    if not sizes or count is None:
        return None
    first = plan.probe_runs[min(sizes)]
    k = max(1, min(plan.samples, len(first) - 1))
    spare = [i for i in range(count) if i not in first][: len(first) - k]
    if first[:k] != tuple(range(k)) or len(spare) < len(first) - k:
        return None
    return first, first[:k] + tuple(spare), k


def one_sample_note(inputs: Sequence[InputSpec]) -> str:
    """The note for a model none of whose inputs has a batch axis: every run is one sample."""
    return (
        f"no input has a batch axis ({described_inputs(inputs)}): each run holds one sample, so the probe ran once "
        "and batch dependence between samples cannot be tested"
    )


def batch_axes(view: ModelView) -> dict[str, int | None]:
    """Input name -> the axis its samples go to when fed (None: fed as is, the same in every batch)."""
    return {spec.name: spec.batch_axis if spec.batched else None for spec in view.inputs}


def _take(
    pool: Mapping[str, np.ndarray], rows: tuple[int, ...], axes: Mapping[str, int | None] | None = None
) -> dict[str, np.ndarray]:
    """The pool's ``rows`` (samples first) as one batch, each input's samples moved to its batch axis
    (``axes``, default 0); an input whose axis is None is passed as is. Consecutive rows are a slice of a
    C-contiguous array, itself contiguous: no copy into fresh pages."""
    axes = axes or {}
    start = rows[0] if rows else 0
    consecutive = rows == tuple(range(start, start + len(rows)))
    index = np.asarray(rows, dtype=np.int64)
    feeds: dict[str, np.ndarray] = {}
    for name, array in pool.items():
        axis = axes.get(name, 0)
        if axis is None:
            feeds[name] = array
            continue
        part = array[start : start + len(rows)] if consecutive else np.take(array, index, axis=0)
        feeds[name] = np.ascontiguousarray(np.moveaxis(part, 0, axis) if axis else part)
    return feeds


# --------------------------------------------------------------------------- batch dependence


def _rows(stats: TensorStats, row: int) -> tuple[np.ndarray, np.ndarray]:
    return stats.sample_mean[row], stats.sample_sq[row]


@dataclass
class _SideRows:
    """One side of a layer as the dependence test compares it: each probed sample alone (``solo``), the same
    samples among companions (``batched``: sample, batch size, mean row, mean-square row), and every run's
    statistics, which size the channels' spread (``pooled``)."""

    solo: list[tuple[np.ndarray, np.ndarray]]
    batched: list[tuple[int, int, np.ndarray, np.ndarray]]
    pooled: list[TensorStats]

    def layout(self) -> tuple[int, int]:
        """Compared rows and pooled rows: layers alike in both are computed side by side (_changes)."""
        return len(self.batched), sum(p.sample_mean.shape[0] for p in self.pooled)

    @property
    def channels(self) -> int:
        return len(self.solo[0][0])


def _side_rows(
    plan: Plan, results: dict[tuple[int, ...], dict[str, LayerProbe]], layer: str, side: str
) -> _SideRows | None:
    """A layer's rows on one side, or None where a solo run has no per-sample rows of it."""
    rows = _SideRows([], [], [])
    for k, run in enumerate(plan.solo_runs):  # sample k alone, or in its reference run (fixed batch)
        probe = results[run].get(layer)
        stats = getattr(probe, side) if probe else None
        if stats is None or stats.sample_mean.shape[0] != len(run):
            return None
        rows.solo.append(_rows(stats, run.index(k)))
        if run not in plan.solo_runs[:k]:
            rows.pooled.append(stats)
    for b in sorted(plan.group_runs):
        for run in plan.group_runs[b]:
            probe = results[run].get(layer)
            stats = getattr(probe, side) if probe else None
            if stats is None or stats.sample_mean.shape[0] != len(run):
                continue  # no per-sample rows (a layer without a batch axis)
            rows.pooled.append(stats)
            for row, index in enumerate(run):
                if index < len(plan.solo_runs) and run != plan.solo_runs[index] and run.index(index) == row:
                    rows.batched.append((index, b, *_rows(stats, row)))
    return rows


def _finite_mean(rows: np.ndarray) -> np.ndarray:
    """Per column, the mean of its finite values (NaN where it has none). Where every value is finite, the
    same sum and division as np.nanmean's, without its copies of the rows (wide layers: 40 x 8192 each)."""
    finite = np.isfinite(rows)
    if finite.all():
        return np.add.reduce(rows, axis=0) / rows.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN channels: no scale, no comparison
        return np.nanmean(np.where(finite, rows, np.nan), axis=0)


def _changes(sides: list[_SideRows]) -> list[tuple[float, int | None]]:
    """Per layer (all of one ``layout``): the largest solo-vs-batch change in std units, and the batch size
    where it happened. Every number is per channel, so the layers are computed side by side on the channel
    axis: one set of numpy calls for them all instead of one per layer."""
    if not sides[0].batched or not sides[0].pooled:
        return [(math.nan, None)] * len(sides)
    starts = np.cumsum([0, *(s.channels for s in sides[:-1])])

    def pooled(field: str) -> np.ndarray:
        """[pooled rows, channels of all the layers], every run's rows one under the other."""
        columns = [np.concatenate([getattr(p, field) for p in s.pooled]) for s in sides]
        return columns[0] if len(columns) == 1 else np.concatenate(columns, axis=1)

    def batched(part: int, alone: bool) -> np.ndarray:
        """[rows, channels]: the compared means (``part`` 0) or mean squares (1), among companions or alone;
        row by row (a handful), each the layers' rows joined: fewer numpy calls than layer by layer."""
        return np.stack(
            [
                np.concatenate([s.solo[s.batched[r][0]][part] if alone else s.batched[r][2 + part] for s in sides])
                for r in range(len(sides[0].batched))
            ]
        )

    mean_c, sq_c = _finite_mean(pooled("sample_mean")), _finite_mean(pooled("sample_sq"))
    with np.errstate(invalid="ignore", over="ignore"):
        rms = np.sqrt(np.maximum(sq_c, 0.0))
        std = np.sqrt(np.maximum(sq_c - mean_c**2, 0.0))
    rms = np.nan_to_num(rms, nan=0.0)
    scale = np.maximum(np.nan_to_num(std, nan=0.0), SCALE_FLOOR * rms) + _TINY
    # every (sample, batch) row at once: [rows, channels of all the layers]
    largest = np.full((len(sides[0].batched), len(sides)), -1.0)  # -1: nothing comparable in that row
    mismatch = np.zeros(largest.shape, bool)
    for part, denominator in ((0, scale), (1, 2.0 * rms * scale + _TINY)):  # the means, then the mean squares
        both, solo = batched(part, alone=False), batched(part, alone=True)
        with np.errstate(invalid="ignore", over="ignore"):
            change = np.abs(both - solo) / denominator
        finite_a, finite_b = np.isfinite(both), np.isfinite(solo)
        comparable = finite_a & finite_b & np.isfinite(change)
        largest = np.maximum(largest, np.maximum.reduceat(np.where(comparable, change, -1.0), starts, axis=1))
        # NaN/Inf only with (or only without) companions: dependence
        mismatch |= np.logical_or.reduceat(finite_a != finite_b, starts, axis=1)
    values = np.where(mismatch, math.inf, largest)
    worst = np.argmax(values, axis=0)  # per layer, the first row holding the largest change
    return [
        (math.nan, None) if values[w, j] < 0 else (float(values[w, j]), side.batched[w][1])
        for j, (w, side) in enumerate(zip(worst, sides))
    ]


#: pooled rows x channels that _changes computes side by side at a time: narrow layers share one set of numpy
#: calls, while the temporaries of wide ones (8192-channel MLP layers, 40 rows each) stay small enough to
#: be reused from the allocator's heap, where whole-width ones are fresh mappings whose pages fault in
CHANGE_ELEMENTS = 1 << 19


def _blocks(group: list[tuple[str, _SideRows]], elements: int) -> Iterable[list[tuple[str, _SideRows]]]:
    """``group``'s layers (one layout) in consecutive blocks of at most ``elements`` pooled rows x channels, a
    wider layer alone: each layer's changes are its own channels', whatever shares its block."""
    rows = group[0][1].layout()[1]
    block: list[tuple[str, _SideRows]] = []
    width = 0
    for layer, side in group:
        if block and (width + side.channels) * rows > elements:
            yield block
            block, width = [], 0
        block.append((layer, side))
        width += side.channels
    yield block


def _dependences(
    plan: Plan,
    results: dict[tuple[int, ...], dict[str, LayerProbe]],
    layers: list[str],
    elements: int = CHANGE_ELEMENTS,
) -> dict[str, BatchDependence]:
    sizes = tuple(sorted(plan.group_runs))
    if not plan.solo_runs or not sizes:
        return {}
    changes: dict[str, dict[str, tuple[float, int | None]]] = {"input": {}, "output": {}}
    for side, found in changes.items():
        alike: dict[tuple[int, int], list[tuple[str, _SideRows]]] = {}
        for layer in layers:
            rows = _side_rows(plan, results, layer, side)
            if rows is None:
                found[layer] = (math.nan, None)
            else:
                alike.setdefault(rows.layout(), []).append((layer, rows))
        for group in alike.values():
            for block in _blocks(group, elements):
                found.update(zip((layer for layer, _ in block), _changes([rows for _, rows in block])))
    return {
        layer: BatchDependence(
            layer=layer,
            input_change=changes["input"][layer][0],
            output_change=changes["output"][layer][0],
            samples=plan.samples,
            batch_sizes=sizes,
            worst_batch_size=changes["output"][layer][1],
        )
        for layer in layers
    }


# --------------------------------------------------------------------------- the model's outputs


#: float64 elements per temporary of the output comparisons: blocks this small stay in the allocator's heap.
#: Whole-array temporaries are fresh mmaps whose pages fault in on first touch.
_BLOCK_ELEMENTS = 1 << 17


def _column_blocks(*arrays: np.ndarray) -> Iterable[tuple[np.ndarray, ...]]:
    """The same columns of 2-D ``arrays`` (rows alike), a block at a time, as float64."""
    rows = max(1, arrays[0].shape[0])
    step = max(1, _BLOCK_ELEMENTS // rows)
    for start in range(0, arrays[0].shape[1], step):
        yield tuple(np.asarray(a[:, start : start + step], np.float64) for a in arrays)


def output_scale(rows: np.ndarray) -> float:
    """An output's spread across samples (``rows``: samples first): the root of the mean over positions of
    each position's variance across the samples, floored at ``SCALE_FLOOR`` times its rms (a near-constant
    output would otherwise turn float32 rounding into a large relative change)."""
    flat = np.asarray(rows).reshape(rows.shape[0], -1)
    spread = rms = 0.0
    if flat.size:
        var_sum = sq_sum = 0.0
        for (block,) in _column_blocks(flat):
            if not np.isfinite(block).all():
                spread, rms = _masked_spread(flat)
                break
            var_sum += float(np.var(block, axis=0).sum())
            sq_sum += float(np.einsum("ij,ij->", block, block))  # not np.vdot: BLAS starts its threads (15 ms)
        else:  # the common case, without nanvar's copies (9x faster on 36 x 65536)
            spread, rms = math.sqrt(var_sum / flat.shape[1]), math.sqrt(sq_sum / flat.size)
    spread = spread if math.isfinite(spread) else 0.0
    rms = rms if math.isfinite(rms) else 0.0
    return max(spread, SCALE_FLOOR * rms) + _TINY


def _masked_spread(flat: np.ndarray) -> tuple[float, float]:
    """output_scale's spread and rms over the finite elements only."""
    values = np.asarray(flat, np.float64)
    masked = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN positions: no spread, no comparison
        return float(np.sqrt(np.nanmean(np.nanvar(masked, axis=0)))), float(np.sqrt(np.nanmean(masked * masked)))


def sample_shifts(reference: np.ndarray, other: np.ndarray, scale: float) -> np.ndarray:
    """Per sample (first axis): the rms over elements of ``other - reference``, in units of ``scale``;
    inf for a sample whose NaN/Inf elements are not the same in both."""
    a = np.asarray(reference).reshape(reference.shape[0], -1)
    b = np.asarray(other).reshape(other.shape[0], -1)
    sums = np.zeros(a.shape[0])
    counts = np.zeros(a.shape[0], np.int64)
    mismatch = np.zeros(a.shape[0], bool)
    for block_a, block_b in _column_blocks(a, b):
        finite_a, finite_b = np.isfinite(block_a), np.isfinite(block_b)
        both = finite_a & finite_b
        with np.errstate(all="ignore"):
            diff = np.where(both, (block_b - block_a) / scale, 0.0)
        sums += (diff * diff).sum(axis=1)
        counts += both.sum(axis=1)
        mismatch |= (finite_a != finite_b).any(axis=1)
    with np.errstate(all="ignore"):
        shifts = np.sqrt(sums / np.maximum(counts, 1))
    return np.where(mismatch, math.inf, shifts)


def scores_over_last_axis(array: np.ndarray, declared: tuple[Dim, ...] | None) -> bool:
    """Whether the arg-max over the last axis of ``array`` (an output, samples first) is a prediction to agree
    on: floating-point class scores with more than one column. ``declared`` is the output's declared dims
    without its sample axis (None: unknown). A declared last axis that is not a fixed size is a sequence or
    an image axis, never classes ([batch, seq] logits, one per position). Rows that are probability
    distributions (a softmax over the last axis) are classes; values all within [0, 1] otherwise are
    independent scores (a mask, multi-label sigmoids), which have no top-1. Other values (logits) are
    classes at rank 2, and per position at rank 3 when the axis before the last is free (a sequence model's
    [batch, seq, classes]), but not on a fixed grid ([frames, notes], an anchor map), nor rows of unit length (an
    L2-normalized embedding, compared by cosine: efficientword-net's 2048-d one), nor signed values all within
    [-1, 1] (a bounded regression: tanh outputs, normalized coordinates such as insightface's 106 landmarks;
    a trained classifier's logits leave that range). Integer and boolean outputs (masks, token ids) have no
    arg-max to agree on."""
    if array.dtype.kind != "f" or array.ndim < 2 or array.shape[-1] < 2 or not array.shape[0]:
        return False
    known = declared is not None and len(declared) == array.ndim - 1
    if known and not _fixed(declared[-1]):  # type: ignore[index]
        return False
    if _unit_range(array) is not None:
        return _softmax_rows(array)  # else independent scores in [0, 1]: not classes
    if _unit_rows(array) or _signed_unit_range(array):
        return False
    return array.ndim == 2 or (array.ndim == 3 and known and not _fixed(declared[0]))  # type: ignore[index]


def _unit_range(array: np.ndarray) -> tuple[float, float] | None:
    """The smallest and largest values of ``array`` when all lie in [0, 1] (probability-like), else None."""
    with np.errstate(all="ignore"):
        low, high = float(np.min(array)), float(np.max(array))
    return (low, high) if low >= 0.0 and high <= 1.0 else None


def _signed_unit_range(array: np.ndarray) -> bool:
    """Values all within [-1, 1], some of them negative."""
    with np.errstate(all="ignore"):
        low, high = float(np.min(array)), float(np.max(array))
    return -1.0 <= low < 0.0 and high <= 1.0


def _softmax_rows(array: np.ndarray) -> bool:
    """Rows over the last axis (of values in [0, 1]) that sum to 1, float16 rounding allowed: a softmax."""
    with np.errstate(all="ignore"):
        return bool(np.all(np.abs(np.sum(array, axis=-1, dtype=np.float64) - 1.0) <= 1e-2))


def _unit_rows(array: np.ndarray) -> bool:
    """Rows over the last axis of L2 norm 1 (float16 rounding allowed): an embedding normalized for cosines."""
    with np.errstate(all="ignore"):
        norms = np.sqrt(np.sum(np.square(array, dtype=np.float64), axis=-1))
    return bool(np.all(np.abs(norms - 1.0) <= 1e-3))


def _fixed(dim: Dim) -> bool:
    """A declared dim of a fixed size (0 and -1 are how some exporters write a free one)."""
    return isinstance(dim, int) and dim > 0


def per_sample_dims(declared: tuple[Dim, ...] | None, shape: tuple[int, ...]) -> tuple[Dim, ...] | None:
    """An output's ``declared`` dims without the axis of its samples, for the output as ``shape`` (its samples
    moved first): the first axis that is free or of the samples' count, whose removal leaves dims that the
    other sizes match. None when nothing is declared or no axis fits (a fixed batch the probe relaxed)."""
    if declared is None or len(declared) != len(shape):
        return None
    for k, dim in enumerate(declared):
        rest = declared[:k] + declared[k + 1 :]
        if (not _fixed(dim) or dim == shape[0]) and all(not _fixed(d) or d == n for d, n in zip(rest, shape[1:])):
            return rest
    return None


def compare_outputs(
    name: str, reference: np.ndarray, other: np.ndarray, scale: float, classes: bool = False
) -> OutputComparison:
    """``other`` against ``reference`` (the same samples, first axis): shift in sd; with ``classes`` (see
    :func:`scores_over_last_axis`), the arg-max agreement over the last axis, per position where the output
    has positions between the samples and the classes."""
    shifts = sample_shifts(reference, other, scale)
    with np.errstate(over="ignore"):
        shift = float(np.sqrt(np.mean(shifts * shifts))) if shifts.size else math.nan
    agreement = None
    positions = 1
    if classes and reference.shape[0]:
        columns = reference.shape[-1]
        a, b = (
            np.reshape(reference, (reference.shape[0], -1, columns)),
            np.reshape(other, (other.shape[0], -1, columns)),
        )
        positions = a.shape[1]
        agreement = float(np.mean(np.argmax(a, axis=2) == np.argmax(b, axis=2)))
    changed = changed_samples = None
    if reference.dtype.kind in "iub" and reference.size:
        differ = (np.asarray(reference) != np.asarray(other)).reshape(reference.shape[0], -1)
        changed, changed_samples = float(np.mean(differ)), int(np.count_nonzero(differ.any(axis=1)))
    return OutputComparison(
        name,
        shift,
        float(np.max(shifts)) if shifts.size else math.nan,
        int(shifts.size),
        scale,
        agreement,
        changed,
        changed_samples,
        positions,
    )


def _per_sample(array: np.ndarray, batch: int) -> bool:
    """A numeric output with one row per sample of the batch (not, e.g., a running mean of shape [C])."""
    return array.ndim >= 1 and array.shape[0] == batch and array.dtype.kind in "fiub"


def compare_recalibrated(
    layers: tuple[str, ...],
    stored: Mapping[str, np.ndarray],
    recomputed: Mapping[str, np.ndarray],
    declared: Mapping[str, tuple[Dim, ...] | None],
) -> Recalibration:
    """The model's outputs with its stored statistics against the same samples with statistics recomputed
    from the data (the reference). The unit is the larger of the two models' output spreads: statistics
    recomputed from narrow data can shrink the outputs' spread (PP-OCRv3's recognizer on 32 rendered lines:
    0.0022 against the stored model's 0.0101), and in its units any change looked large (5.97 sd where it was
    1.27 of the stored model's). ``declared``: the outputs' declared dims (ModelView.output_shapes)."""
    outputs: dict[str, OutputComparison] = {}
    samples = 0
    for name, reference in recomputed.items():
        other = stored.get(name)
        if other is None or other.shape != reference.shape or not _per_sample(reference, reference.shape[0]):
            continue
        classes = scores_over_last_axis(reference, per_sample_dims(declared.get(name), reference.shape))
        scale = max(output_scale(reference), output_scale(other))
        outputs[name] = compare_outputs(name, reference, other, scale, classes)
        samples = max(samples, int(reference.shape[0]))
    return Recalibration(layers, outputs, samples)


def first_outputs(outputs: Mapping[str, np.ndarray] | None, samples: int) -> dict[str, np.ndarray] | None:
    """Model outputs (samples first) on their first ``samples`` samples, or None when they hold fewer or none
    are given: the stored side of :func:`compare_recalibrated`, where the probe's runs over the data kept it."""
    if not outputs or any(len(value) < samples for value in outputs.values()):
        return None
    return {name: value[:samples] for name, value in outputs.items()}


def drifting_layers(view: ModelView, result: ProbeResult) -> dict[str, dict[str, float | int]]:
    """Layers whose running statistics BN003 finds never updated or far from the data's (with --data):
    name -> drift numbers. These are what `fix` recomputes."""
    from bncheck.verdicts import drift, drifts, folded_stats, has_default_stats, judged_running_stats

    found: dict[str, dict[str, float | int]] = {}
    if result.data is None:
        return found
    for layer in view.layers:
        seen = result.data.get(layer.name)
        if not judged_running_stats(layer) or layer.mean is None or layer.var is None or seen is None:
            continue
        if folded_stats(layer) or seen.total_nonfinite or seen.channels != layer.mean.size:
            continue
        found_drift = drift(layer, seen.mean, seen.var)
        if has_default_stats(layer) or drifts(found_drift):
            found[layer.name] = found_drift.evidence()
    return found


def _output_dependence(
    solo: dict[int, dict[str, np.ndarray]],
    groups: list[tuple[int, tuple[int, ...], dict[str, np.ndarray]]],
    dims: Mapping[str, tuple[Dim, ...] | None],
    rescaled: Collection[tuple[int, ...]] = (),
) -> tuple[dict[str, dict[int, OutputComparison]], tuple[float, int, tuple[int, ...], int] | None]:
    """Each output of each sample alone against the same sample inside every batch that holds it (``dims``:
    each output's declared dims without its sample axis, see _SampleAxes). The runs in ``rescaled`` hold
    companions of another scale (:func:`_rescaled_companions`): compared, but left out of the outputs' spread.

    Returns output -> batch size -> comparison, and the worst (change, sample, batch run, row)."""
    if not solo or not groups:
        return {}, None
    names = [n for n in next(iter(solo.values())) if all(n in outs for outs in solo.values())]
    found: dict[str, dict[int, OutputComparison]] = {}
    worst: tuple[float, int, tuple[int, ...], int] | None = None
    for name in names:
        if not all(_per_sample(outs[name], 1) for outs in solo.values()):
            continue
        if len({outs[name].shape[1:] for outs in solo.values()}) > 1:
            continue  # each sample alone gives its own length (a TTS model's audio): no element to compare
        usable = [
            (b, run, outs[name])
            for b, run, outs in groups
            if name in outs
            and _per_sample(outs[name], len(run))
            and outs[name].shape[1:] == next(iter(solo.values()))[name].shape[1:]
        ]
        if not usable:
            continue
        together = np.concatenate([array for _, run, array in usable if run not in rescaled] or [usable[0][2]])
        scale = output_scale(together)
        classes = scores_over_last_axis(together, dims.get(name))
        by_size: dict[int, tuple[list[np.ndarray], list[np.ndarray], list[tuple[int, tuple[int, ...], int]]]] = {}
        for b, run, array in usable:
            refs, others, where = by_size.setdefault(b, ([], [], []))
            for row, index in enumerate(run):
                if index in solo and run.index(index) == row:
                    refs.append(solo[index][name][0])
                    others.append(array[row])
                    where.append((index, run, row))
        found[name] = {}
        for b, (refs, others, where) in sorted(by_size.items()):
            if not refs:
                continue
            reference, other = np.stack(refs), np.stack(others)
            found[name][b] = compare_outputs(name, reference, other, scale, classes)
            shifts = sample_shifts(reference, other, scale)
            top = int(np.argmax(shifts))
            if worst is None or shifts[top] > worst[0]:
                worst = (float(shifts[top]), *where[top])
    return found, worst


# --------------------------------------------------------------------------- entry point


def in_background(work: Callable[[], T]) -> Callable[[], T]:
    """Start ``work`` in a worker thread; the function returned waits for it and returns its result, or
    raises its exception in the caller's thread (as Future.result() does).

    Why a thread: numpy's generators release the GIL, so synthetic inputs are drawn on the other core while
    this one builds a session or infers shapes. A plain thread, not concurrent.futures: one task needs no
    pool, and importing it costs every run.
    """
    done: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(work())
        except BaseException as exc:
            failed.append(exc)

    worker = threading.Thread(target=run, name="bncheck-draw", daemon=True)
    worker.start()

    def result() -> T:
        worker.join()
        if failed:
            raise failed[0]
        return done[0]

    return result


def _overlapped(open_runner: Callable[[], Runner], draw: Callable[[], dict[str, np.ndarray]]):
    """Build the runner while a worker thread draws the synthetic inputs (on ResNet-50 the 32 images, 0.05 s,
    are drawn for free while the session is built); return both."""
    drawn = in_background(draw)
    try:
        runner = open_runner()
    except BaseException:
        with contextlib.suppress(BaseException):  # wait for the worker: the runner's error is the one to report
            drawn()
        raise
    return runner, drawn()


def run_plan(
    view: ModelView,
    settings: ProbeSettings,
    runner: Runner | None,
    *,
    call_style: str | None = None,
    int_high: Mapping[str, int] | None = None,
    open_runner: Callable[[], Runner] | None = None,
    locate: Locator | None = None,
    drawn: Mapping[str, np.ndarray] | None = None,
    keep_outputs: int = 0,
) -> ProbeResult:
    """Run every batch of the plan once through ``runner`` and assemble the :class:`ProbeResult`.

    ``int_high`` bounds synthetic integer inputs per input name (the backend knows which feed a Gather).
    ``open_runner`` (with ``runner`` None) builds the runner once the plan is known, while synthetic
    inputs are drawn (:func:`_overlapped`); the caller closes what it built, also on errors.
    ``locate`` finds where an unexplained batch dependence of the outputs starts (see :data:`Locator`).
    ``drawn``: synthetic inputs the backend already drew with this seed and ``int_high`` for these inputs
    (a fixed batch's proof); taken instead of a new draw when they hold exactly the samples the plan needs.
    ``keep_outputs``: with data, the model's outputs on its first that many samples are kept whole
    (:attr:`ProbeResult.data_outputs`): the stored model's side of BN003's output effect, run already.

    The model's outputs come from the dependence test's own runs. Only when they depend on the batch are
    more runs made: each remaining sample of the group runs alone (up to :data:`EFFECT_SAMPLES` in all), for
    the effect numbers, and the locator's, when no recognised layer explains the dependence.
    """
    if (runner is None) == (open_runner is None):
        raise ValueError("run_plan needs exactly one of runner and open_runner")
    batch_sizes = tuple(settings.batch_sizes)
    if not batch_sizes:
        raise ProbeDataError("no batch sizes to probe")
    notes: list[str] = []
    requested = batch_sizes
    test_dependence = True
    axes = batch_axes(view)
    fixed = fixed_batch(view.inputs)
    _refuse_huge_batch(view, fixed)
    if fixed is not None:
        skipped = ",".join(str(b) for b in batch_sizes if b != fixed)
        untested = " and batch dependence cannot be tested" if fixed == 1 else ""  # one note for both
        if skipped:
            notes.append(f"batch size(s) {skipped} not run{untested}: the model's batch dimension is fixed to {fixed}")
        elif untested:
            notes.append("the model's batch dimension is fixed to 1: batch dependence cannot be tested")
        batch_sizes = (fixed,)
        test_dependence = fixed != 1
    elif without_batch_axis(view.inputs):
        notes.append(one_sample_note(view.inputs))
        batch_sizes = (1,)
        test_dependence = False
    if settings.data is not None:
        pool = dict(settings.data)
        samples = _pool_samples(pool, axes)
        if samples is None:
            raise ProbeDataError("the data arrays have different numbers of samples")
        pool_size = samples
        if pool_size == 1 and test_dependence and any(b > 1 for b in batch_sizes):
            test_dependence = False
            notes.append("batch dependence not tested: the data holds one sample, so every batch repeats it")
        plan = _plan_for(batch_sizes, settings.samples, pool_size, True, test_dependence, fixed)
        if open_runner is not None:
            runner = open_runner()
        if max(batch_sizes) > pool_size:
            notes.append(
                f"the data holds {pool_size} sample{'' if pool_size == 1 else 's'}; batches larger than that repeat samples"
            )
        data_samples = pool_size
    else:
        plan = _plan_for(batch_sizes, settings.samples, None, False, test_dependence, fixed)
        needed = plan.pool_needed
        made_up = made_up_settings(view.inputs, int_high)
        if made_up is not None:
            notes.append(made_up)

        specs = view.inputs
        if fixed is not None:  # the pool holds more samples than one batch: drawn along a free batch axis
            specs = [s.with_batch_dim(None) for s in specs]

        def draw() -> dict[str, np.ndarray]:
            if drawn is not None:  # the same seed and inputs draw the same values: only the count may differ
                shapes = synthetic_shapes(specs, needed, settings.input_shapes)
                if {name: np.shape(a) for name, a in drawn.items()} == shapes:
                    return dict(drawn)
            return synthetic_inputs(specs, needed, settings.seed, settings.input_shapes, int_high)

        if open_runner is not None:
            runner, pool = _overlapped(open_runner, draw)
        else:
            pool = draw()
        data_samples = 0
    assert runner is not None
    results: dict[tuple[int, ...], dict[str, LayerProbe]] = {}
    # the model's outputs of the dependence test's runs only (data runs can be many)
    outputs: dict[tuple[int, ...], dict[str, np.ndarray]] = {}
    output_axes = _SampleAxes(view.output_shapes)
    keep = set(plan.solo_runs) | {run for runs in plan.group_runs.values() for run in runs}
    # runs over the data whose layer inputs alone are read (ProbeResult.data): not a probe or dependence run
    inputs_only = set(plan.data_runs) - keep - set(plan.probe_runs.values())
    wanted = _first_runs(plan.data_runs, keep_outputs)
    whole: dict[tuple[int, ...], Mapping[str, np.ndarray]] = {}  # those runs' outputs as the runner gave them
    total = len(plan.runs)
    if settings.progress:
        settings.progress(0, total)
    failed: dict[int, BncheckError] = {}
    data_runs = list(plan.data_runs)  # a run of the data the model cannot take is replaced by smaller pieces
    piece_sizes: set[int] = set()

    def in_pieces(run: tuple[int, ...], error: BncheckError) -> None:
        """The data of ``run``, which the model refused, in runs of the largest smaller size that ran."""
        ran = [len(r) for r in results if len(r) < len(run)]
        if not ran:
            raise error
        size = max(ran)
        pieces = [run[i : i + size] for i in range(0, len(run), size)]
        for piece in pieces:
            if piece in results and (run not in wanted or piece in whole):
                continue  # a probe run of the same samples measured them already
            observed, _, given = _observe(runner, _take(pool, piece, axes), len(piece), output_axes, inputs_only=True)
            results.setdefault(piece, observed)  # a probe run's own measurements stay
            if run in wanted:
                whole[piece] = given
        at = data_runs.index(run)
        data_runs[at : at + 1] = pieces
        if run in wanted:
            wanted.discard(run)
            wanted.update(pieces)
        piece_sizes.add(size)

    for done, run in enumerate(plan.runs, start=1):
        if run in plan.data_runs and len(run) in failed:
            in_pieces(run, failed[len(run)])  # a size the model refused already: its data goes to the pieces
            release_mapped(pool)
        elif len(run) not in failed or run in plan.data_runs:
            try:
                feeds = _take(pool, run, axes)
                results[run], seen, given = _observe(
                    runner, feeds, len(run), output_axes, inputs_only=run in inputs_only
                )
                if run in wanted:
                    whole[run] = given
            except BncheckError as exc:
                # a size the model cannot run (memory, a shape it rejects) is a note while another size ran
                if exc.kind not in (ErrorKind.MODEL, ErrorKind.RUNTIME):
                    raise
                if run not in plan.data_runs or len(run) in batch_sizes:  # a data run's last, shorter part: no size
                    failed[len(run)] = exc
                if run in plan.data_runs:
                    in_pieces(run, exc)
            else:
                if run in keep:
                    outputs[run] = seen
            if run in plan.data_runs:
                # the pages of a memory-mapped .npy this run read leave the process (the page cache keeps them):
                # over the runs its resident part stays about one batch, not the whole file
                release_mapped(pool)
        if settings.progress:
            settings.progress(done, total)
    if piece_sizes:
        plan = replace(plan, data_runs=tuple(data_runs))
        sizes = ",".join(map(str, sorted(piece_sizes)))
        notes.append(f"the data ran in batches of {sizes}: the model could not take its larger batches")
    if failed:
        if all(b in failed for b in batch_sizes):
            raise failed[batch_sizes[0]]
        for b, error in failed.items():
            notes.append(f"batch size {b} could not run: {one_line(error)}")
        batch_sizes = tuple(b for b in batch_sizes if b not in failed)
        plan = _ran(plan, results)
        inside = _inside_a_batch(plan, batch_sizes, pool, axes, outputs) if 1 in failed else None
        if test_dependence and not plan.solo_runs and fixed is None and inside is not None:
            # no sample runs alone (a model that splits its batch into groups, say): tested as in a fixed
            # batch instead, the smallest batch again with the probe samples in their rows, other companions
            first, second, k = inside
            try:
                results[second], outputs[second], _ = _observe(
                    runner, _take(pool, second, axes), len(second), output_axes
                )
            except BncheckError as exc:
                if exc.kind not in (ErrorKind.MODEL, ErrorKind.RUNTIME):
                    raise
            else:
                plan = replace(plan, solo_runs=(first,) * k, group_runs={len(first): (second,)}, samples=k)
                notes.append(
                    f"batch dependence tested inside the batch of {len(first)}: {k} sample(s) kept in their rows "
                    "while their companions were replaced"
                )
        if test_dependence and not plan.solo_runs and fixed is None:
            why = "batch size 1 could not run" if 1 in failed else "no batch size above 1 could run"
            notes.append(f"batch dependence not tested: {why}")
    if fixed is not None and plan.solo_runs:
        notes.append(
            f"batch dependence tested inside the fixed batch of {fixed}: {plan.samples} sample(s) kept in "
            "their rows while their companions were replaced"
        )
    layers = {b: dict(results[plan.probe_runs[b]]) for b in batch_sizes}
    names = [layer.name for layer in view.layers]
    dependence = _dependences(plan, results, names)
    data: dict[str, TensorStats] | None = None
    if plan.data_runs:
        data = {}
        for name in names:
            parts = [(results[run][name].input, run) for run in plan.data_runs if name in results[run]]
            if parts and all(p is not None for p, _ in parts):
                data[name] = merge_stats(first_samples(p, real_rows(run), len(run)) for p, run in parts)  # type: ignore[arg-type]
    if test_dependence and not plan.solo_runs and not failed:
        notes.append("batch dependence not tested: it needs a batch size above 1")
    output_dependence, companion_change, located = _outputs_test(
        view, plan, pool, runner, outputs, output_axes, dependence, locate, notes, bool(data_samples)
    )
    saturated = _saturated(outputs) if not data_samples and BLIND_NOTE not in notes else None
    if saturated:
        notes.append(saturated)
    data_outputs = None
    if wanted and len(whole) == len(wanted):
        runs = [run for run in plan.data_runs if run in wanted]
        joined = {
            name: joined_samples([whole[run][name] for run in runs], map(len, runs), map(real_rows, runs))
            for name in whole[runs[0]]
        }
        data_outputs = {name: value[:keep_outputs] for name, value in joined.items() if value is not None}
    return ProbeResult(
        requested_batch_sizes=requested,
        batch_sizes=batch_sizes,
        layers=layers,
        dependence=dependence,
        data=data,
        data_source=settings.data_source,
        data_samples=data_samples,
        data_batch=max(map(len, plan.data_runs)) if plan.data_runs else None,
        seed=settings.seed,
        call_style=call_style,
        notes=notes,
        output_dependence=output_dependence,
        companion_change=companion_change,
        located=located,
        companions_replaced=any(len(run) != 1 for run in plan.solo_runs),
        outputs_unbatched=output_axes.unbatched(),
        data_outputs=data_outputs,
        nonfinite_outputs=_all_nonfinite(outputs.get(plan.probe_runs[max(batch_sizes)], {})),
    )


def _all_nonfinite(outputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The floating outputs (samples first) in which every sample holds a NaN or an Inf, with the count."""
    found = {}
    for name, value in outputs.items():
        array = np.asarray(value)
        if array.dtype.kind != "f" or array.ndim == 0 or not array.shape[0]:
            continue
        finite = np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
        if not finite.any():
            found[name] = int(array.shape[0])
    return found


def _first_runs(data_runs: tuple[tuple[int, ...], ...], samples: int) -> set[tuple[int, ...]]:
    """The data runs that hold the data's first ``samples`` samples (all of them when it has fewer)."""
    found: set[tuple[int, ...]] = set()
    covered = 0
    for run in data_runs:
        if covered >= samples:
            break
        found.add(run)
        covered += real_rows(run)
    return found


def _observe(
    runner: Runner,
    feeds: dict[str, np.ndarray],
    size: int,
    kept: _SampleAxes,
    layers: bool = True,
    inputs_only: bool = False,
) -> tuple[dict[str, LayerProbe], dict[str, np.ndarray], Mapping[str, np.ndarray]]:
    """One run of ``size`` samples: the layers' statistics, the model's outputs samples first (``kept``) and
    thinned, and the outputs as the runner gave them."""
    got = runner(feeds, layers, inputs_only=True) if inputs_only else runner(feeds, layers)
    if isinstance(got, Observed):
        return got.layers, kept.take(got.outputs, size), got.outputs
    return got, {}, {}


class _SampleAxes:
    """Which axis of each model output holds the samples: axis 0 mostly, axis 1 in a CTC head's [T, N, C] or an
    RNN's time-major state. Found at the first run of several samples, against the shape of a run of one: the
    axis that follows the batch, every other dim unchanged. From then on each output is kept samples first and
    thinned (_thin); runs of one sample before it are kept whole until then (a few samples' outputs).
    ``declared``: the outputs' declared dims (ModelView.output_shapes); ``dims`` keeps each one's without its
    sample axis, which with the values tells class scores (scores_over_last_axis) where they are compared."""

    def __init__(self, declared: Mapping[str, tuple[Dim, ...] | None]) -> None:
        self.axis: dict[str, int | None] = {}  # None: the output does not follow the batch
        self.single: dict[str, tuple[int, ...]] = {}
        self.waiting: list[dict[str, np.ndarray]] = []  # runs of one sample kept whole
        self.declared = declared
        self.dims: dict[str, tuple[Dim, ...] | None] = {}
        # whether each output had the same shape in a run of several samples as in a run of one
        self.same_shape: dict[str, bool] = {}

    def unbatched(self) -> bool | None:
        """Whether no model output changed its shape with the batch size (None: not run at two sizes)."""
        if not self.same_shape:
            return None
        return all(self.same_shape.values())

    def take(self, outputs: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
        kept: dict[str, np.ndarray] = {}
        for name, array in outputs.items():
            array = np.asarray(array)
            if name not in self.axis:
                if size == 1:
                    self.single.setdefault(name, array.shape)
                    kept[name] = array
                    continue
                self.axis[name] = sample_axis(array.shape, self.single.get(name), size)
                if name in self.single:
                    self.same_shape[name] = self.single[name] == array.shape
                for earlier in self.waiting:
                    if name in earlier:
                        earlier[name] = self._samples_first(name, earlier[name])
            kept[name] = self._samples_first(name, array)
        if size == 1 and any(name not in self.axis for name in kept):
            self.waiting.append(kept)
        return kept

    def _samples_first(self, name: str, array: np.ndarray) -> np.ndarray:
        axis = self.axis[name]
        if axis is not None and array.ndim == 0:
            array = array.reshape(1)  # a run of one sample whose output was squeezed to a scalar (sample_axis)
        array = array if axis is None else np.moveaxis(array, axis, 0)
        if name not in self.dims:
            self.dims[name] = per_sample_dims(self.declared.get(name), array.shape) if axis is not None else None
        dims = self.dims[name]
        # thinned by whole rows of its last axis where that may hold classes, so that an arg-max stays possible
        return _thin(array, rows=dims is None or (bool(dims) and _fixed(dims[-1])))


def joined_samples(chunks: Iterable[np.ndarray], rows: Iterable[int], real: Iterable[int]) -> np.ndarray | None:
    """A model output over several batches as one array, samples first: each chunk (a batch of ``rows``
    samples, its first ``real`` of them kept) with its samples moved to axis 0 (see :func:`sample_axis`: axis 0
    when it has that many, else the only axis that has; a CTC head's [T, N, C] too). None when some chunk has
    no axis per sample."""
    kept = []
    for chunk, size, count in zip(chunks, rows, real):
        axis = sample_axis(np.shape(chunk), None, size)
        if axis is None:
            return None
        kept.append(np.moveaxis(np.asarray(chunk), axis, 0)[:count])
    if len({k.shape[1:] for k in kept}) > 1:
        return None  # a sample's length depends on its batch (a TTS model's audio, padded to the longest)
    return np.concatenate(kept) if kept else None


def sample_axis(shape: tuple[int, ...], single: tuple[int, ...] | None, size: int) -> int | None:
    """The axis of an output of ``shape`` (a run of ``size`` samples) that holds the samples: of that size, 1 in
    the run of one sample (``single``, None when there was none) with every other dim the same; axis 0 first.
    None when no axis, or more than one other than 0, qualifies (not a per-sample output)."""
    found = [k for k, n in enumerate(shape) if n == size]
    if single == () and shape == (size,):
        return 0  # squeezed to a scalar at one sample (speechmos's PLCMOS score: declared a scalar, [N] at N > 1)
    if single is not None:
        if len(single) != len(shape):
            return None
        found = [
            k for k in found if single[k] == 1 and all(a == b for j, (a, b) in enumerate(zip(shape, single)) if j != k)
        ]
    if 0 in found:
        return 0
    return found[0] if len(found) == 1 else None


def _thin(array: np.ndarray, rows: bool = False) -> np.ndarray:
    """An output kept for the comparison: at most OUTPUT_ELEMENTS elements per sample for outputs of rank
    > 2 (a segmentation map at batch 32 would otherwise hold GBs; rms shifts and spreads are estimated as well
    from a regular subset). With ``rows`` (the last axis may hold class scores) whole rows of the last axis
    at evenly spaced positions, as [samples, positions, classes], so that an arg-max over it stays possible;
    else evenly spaced elements, as [samples, 1, elements]. Rank <= 2 stays whole."""
    a = np.asarray(array)
    if a.ndim <= 2 or a[:1].size <= OUTPUT_ELEMENTS:
        return a
    if rows:
        kept = a.reshape(a.shape[0], -1, a.shape[-1])
        step = -(-kept.shape[1] // max(1, OUTPUT_ELEMENTS // a.shape[-1]))
        return np.ascontiguousarray(kept[:, ::step])
    flat = a.reshape(a.shape[0], -1)
    step = -(-flat.shape[1] // OUTPUT_ELEMENTS)
    return np.ascontiguousarray(flat[:, None, ::step])


def _outputs_test(
    view: ModelView,
    plan: Plan,
    pool: Mapping[str, np.ndarray],
    runner: Runner,
    outputs: dict[tuple[int, ...], dict[str, np.ndarray]],
    output_axes: _SampleAxes,
    dependence: Mapping[str, BatchDependence],
    locate: Locator | None,
    notes: list[str],
    from_data: bool = False,
) -> tuple[dict[str, dict[int, OutputComparison]], float | None, LocatedDependence | None]:
    """The batch-dependence test on the model's outputs (see :func:`run_plan`): the comparisons, the
    companion change (None: not run) and the located start of an unexplained dependence. ``from_data``: the
    samples are the user's (--data), not drawn."""
    from bncheck.verdicts import OUTPUT_DEPENDENCE_TOLERANCE, explains_dependence, outputs_depend

    axes = batch_axes(view)

    # sample k's reference: its run alone, or its row of the reference run (a fixed batch, make_fixed_plan)
    solo = {
        k: {
            n: a[run.index(k) : run.index(k) + 1] if np.ndim(a) and len(a) == len(run) else a
            for n, a in outputs[run].items()
        }
        for k, run in enumerate(plan.solo_runs)
        if run in outputs
    }
    groups = [(b, run, outputs[run]) for b in sorted(plan.group_runs) for run in plan.group_runs[b] if run in outputs]
    found, worst = _output_dependence(solo, groups, output_axes.dims)
    if solo and groups and not found:
        notes.append(NO_ROWS_NOTE)
    rescaled: list[tuple[int, ...]] = []
    if (worst is None or not worst[0] > OUTPUT_DEPENDENCE_TOLERANCE) and view.batch_ops and groups and solo:
        # companions drawn like the sample leave an order statistic over the batch where it was (a max, a
        # floor clamped to it): a reduction over the batch axis is judged with companions of other scales too
        pool, more = _rescaled_companions(pool, groups, axes, runner, output_axes)
        if more:
            groups = [*groups, *more]
            rescaled = [run for _, run, _ in more]
            outputs = {**outputs, **{run: outs for _, run, outs in more}}
            found, worst = _output_dependence(solo, groups, output_axes.dims, rescaled)
            if worst is not None and worst[0] > OUTPUT_DEPENDENCE_TOLERANCE:
                factors = " and ".join(f"{f:g}" for f in COMPANION_SCALES)
                notes.append(
                    "companions drawn like the sample moved no output, companions scaled by "
                    f"{factors} did: the batch dependence shows when a batch mixes inputs of other scales"
                )
    if worst is None or not worst[0] > OUTPUT_DEPENDENCE_TOLERANCE:
        if groups and _same_for_every_sample([g for g in groups if g[1] not in rescaled]):
            notes.append(BLIND_NOTE_DATA if from_data else BLIND_NOTE)
            return {}, None, None  # not measured: equal numbers would read as outputs that do not depend
        return found, None, None
    if any(len(run) != 1 for run in plan.solo_runs):
        # a fixed batch: the reference and group runs already differ in companions only; no sample can run
        # alone for the effect or the locator
        return found, None, None
    # alone and in a batch run different kernels: whether the companions matter is told by one more run,
    # the same sample at the same row with copies of itself as companions (bit-identical when they do not).
    # Tried first in the smallest batch that moves the outputs, where the locator then bisects too (batch
    # 2 rather than 32: each of its runs and fetched tensors 16x smaller); the largest change second.
    candidates = [
        w
        for b in sorted({size for size, _, _ in groups})
        for w in [_output_dependence(solo, [g for g in groups if g[0] == b], output_axes.dims, rescaled)[1]]
        if w is not None and w[0] > OUTPUT_DEPENDENCE_TOLERANCE
    ][:1]
    candidates += [worst] if not candidates or candidates[0][2] != worst[2] else []
    for _, index, run, row in candidates:
        copies = tuple(index for _ in run)
        swapped = _observe(runner, _take(pool, copies, axes), len(copies), output_axes, layers=False)[1]
        companion = _companion_change(outputs[run], swapped, row, len(run))
        if outputs_depend(found, companion):
            break
    else:
        notes.append(
            f"the model's outputs differ by up to {worst[0]:.2g} output sd between a sample alone and "
            f"in a batch of {len(run)}, and by {companion:.2g} when only its companions change: float32 "
            "rounding of batch-size-dependent kernels, not a batch dependence"
        )
        return found, companion, None
    extra: list[int] = []
    for _, group, _ in groups:
        extra.extend(i for i in group if i not in solo and i not in extra)
    extra = extra[: max(EFFECT_SAMPLES - len(solo), 0)]
    for sample in extra:
        solo[sample] = _observe(runner, _take(pool, (sample,), axes), 1, output_axes, layers=False)[1]
    if extra:
        found, _ = _output_dependence(solo, groups, output_axes.dims, rescaled)
        notes.append(
            f"the model's outputs depend on the batch: {len(extra)} more sample(s) run alone to measure the effect"
        )
    if locate is None or explains_dependence(view.layers, dependence):
        return found, companion, None
    located = locate(_take(pool, run, axes), _take(pool, copies, axes), row, len(run))
    if located is None:
        notes.append("the model's outputs depend on the batch, but no tensor was found where it starts")
    return found, companion, located


#: the note of a probe none of whose model outputs holds one row per sample of the batch (a model that averages
#: groups of its inputs: N samples in, N/4 rows out): the output-level test had nothing to compare
NO_ROWS_NOTE = (
    "no model output holds a row per sample of the batch, so the batch-dependence test of the model's outputs "
    "compared nothing"
)


#: what the companions of a sample are multiplied by (one batch each) where companions drawn like it moved
#: no output of a model that reduces over its batch axis: 1e4 is 80 dB, the floor a spectrogram's top-dB clamp
#: takes from the loudest sample of the batch
COMPANION_SCALES = (1e4, 1e-4)


def _rescaled_companions(
    pool: Mapping[str, np.ndarray],
    groups: list[tuple[int, tuple[int, ...], dict[str, np.ndarray]]],
    axes: Mapping[str, int | None],
    runner: Runner,
    output_axes: _SampleAxes,
) -> tuple[Mapping[str, np.ndarray], list[tuple[int, tuple[int, ...], dict[str, np.ndarray]]]]:
    """The smallest batch run again with its companions' floating-point inputs scaled by each of
    :data:`COMPANION_SCALES`: the pool with those companions added as new samples, and the new runs (its
    first sample, which ran alone, at row 0)."""
    size, run, _ = min(groups, key=lambda group: len(group[1]))
    floats = [name for name, array in pool.items() if axes.get(name, 0) is not None and array.dtype.kind == "f"]
    count = _pool_samples(pool, axes)
    if len(run) < 2 or not floats or count is None:
        return pool, []
    companions = list(run[1:])
    extended = dict(pool)
    for name, array in pool.items():
        if axes.get(name, 0) is None:
            continue
        added = [
            array[companions] * np.asarray(f, array.dtype) if name in floats else array[companions]
            for f in COMPANION_SCALES
        ]
        extended[name] = np.concatenate([array, *added])
    more = []
    for k in range(len(COMPANION_SCALES)):
        new = (run[0], *range(count + k * len(companions), count + (k + 1) * len(companions)))
        outs = _observe(runner, _take(extended, new, axes), len(new), output_axes, layers=False)[1]
        more.append((size, new, outs))
    return extended, more


#: the note of a probe whose synthetic samples all gave the same outputs (integer ids the model maps to one
#: padding value, say): the test then compares equal numbers, and its silence says nothing
BLIND_NOTE = (
    "the model's outputs were the same for every sample the probe drew, so the batch-dependence test could not "
    "see one: probe with --data (inputs the model really gets)"
)


#: the same, where the samples were the data's: copies of one input, say
BLIND_NOTE_DATA = (
    "the model's outputs were the same for every sample of the data, so the batch-dependence test could not "
    "see one: give samples that differ (not copies of one input)"
)


def _same_for_every_sample(groups: list[tuple[int, tuple[int, ...], dict[str, np.ndarray]]]) -> bool:
    """Whether every per-sample output of the largest batch run holds the same values in each of its rows."""
    _, run, outputs = max(groups, key=lambda group: len(group[1]))
    arrays = [a for a in map(np.asarray, outputs.values()) if _per_sample(a, len(run))]
    if len(run) < 2 or not arrays:
        return False
    # rows 0 and 1 first: on a model that works they differ, and the whole comparison is never made
    return all(np.array_equal(a[0], a[1]) for a in arrays) and all(bool((a == a[0]).all()) for a in arrays)


#: a probability-like output (values in [0, 1], rows not summing to 1) within this of 0 or of 1 for every
#: sample finds nothing (or everything) in the probe's inputs
SATURATED = 1e-3


def _saturated(outputs: Mapping[tuple[int, ...], Mapping[str, np.ndarray]]) -> str | None:
    """A note when the largest run's probability-like outputs (a detector's map, a mask, sigmoid scores)
    stayed within SATURATED of 0 or of 1 for every sample: the synthetic inputs are then likely unlike the
    model's data (a text detector's map on noise), which the clean verdicts on them do not show."""
    if not outputs:
        return None
    run = max(outputs, key=len)
    found = []
    for name, array in outputs[run].items():
        a = np.asarray(array)
        if a.dtype.kind != "f" or not a.size or not _per_sample(a, len(run)):
            continue
        bounds = _unit_range(a)
        if bounds is None or (a.ndim >= 2 and a.shape[-1] > 1 and _softmax_rows(a)):
            continue  # not probability-like; or softmax rows, which over many classes may all be small
        low, high = bounds
        if high <= SATURATED:
            found.append(f"'{name}' was exactly 0" if high == 0.0 else f"'{name}' stayed within {high:.2g} of 0")
        elif low >= 1.0 - SATURATED:
            found.append(f"'{name}' was exactly 1" if low == 1.0 else f"'{name}' stayed within {1.0 - low:.2g} of 1")
    if not found:
        return None
    return (
        f"for every sample the probe drew, the model's output {' and '.join(found)} (a map or scores that "
        "find nothing in them, or everything; or a head whose weights give a constant): the synthetic inputs "
        "are likely unlike the model's data, and so the statistics measured on them; probe with --data (inputs "
        "the model really gets)"
    )


def _companion_change(a: dict[str, np.ndarray], b: dict[str, np.ndarray], row: int, batch: int) -> float:
    """Largest change (output sd, spread of ``a``'s rows) of any output's ``row`` between two runs of
    ``batch`` samples."""
    worst = 0.0
    for name, array in a.items():
        other = b.get(name)
        if other is None or other.shape != array.shape or not _per_sample(array, batch):
            continue
        shift = float(sample_shifts(array[row : row + 1], other[row : row + 1], output_scale(array))[0])
        worst = max(worst, shift)
    return worst
