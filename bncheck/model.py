"""The framework-neutral view of a model: its normalization layers and what a probe measured in them.

Backends (ONNX, Keras) build these objects; checks, the report and the renderers read them and never touch a
framework. Everything here is plain data: numpy arrays, tuples, strings, numbers.

Conventions
- Axes are non-negative indices into the *normalized input* tensor of the layer (for a layer that normalizes
  a reshaped copy of its input, such as a lowered InstanceNorm, into that reshaped tensor).
- A dimension is an ``int`` when known, a ``str`` when symbolic (its name, e.g. ``"batch"``), ``None`` when
  unknown.
- A parameter array is ``None`` when it is unknown (a graph input, computed at run time, or absent): it is
  never guessed.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

#: what np.sum and np.mean reduce with: called directly, the same numbers bit for bit without their Python
#: wrappers (a report of a hundred layers reads these statistics thousands of times)
_SUM = np.add.reduce

Dim = int | str | None


class Kind(str, enum.Enum):
    """What a normalization layer normalizes over; drives which checks apply."""

    BATCH = "batch"  # BatchNormalization: per channel, over batch and spatial axes
    INSTANCE = "instance"  # per sample and channel, over spatial axes
    LAYER = "layer"  # per sample, over the trailing axes
    GROUP = "group"  # per sample and group of channels
    RMS = "rms"  # root-mean-square: scales, does not centre
    MEAN_VARIANCE = "mean-variance"  # ONNX MeanVarianceNormalization over explicit axes
    MOMENTS = "moments"  # a decomposed mean/variance chain whose axes fit none of the above
    UNIT = "unit"  # L2 normalization (Keras UnitNormalization)

    def __str__(self) -> str:  # rich tables and messages show the value, not "Kind.BATCH"
        return self.value


@dataclass(frozen=True, eq=False)
class NormLayer:
    """One normalization layer, as a backend found it.

    ``axes`` are the axes the layer's statistics are (or, for inference-mode BatchNormalization, were)
    computed over. ``uses_running_stats`` says the output at inference is computed from the stored ``mean``
    and ``var`` instead of from the input; ``batch_statistics`` says the statistics computed at inference mix
    the samples of a batch (the train-mode defect). ``training`` is the layer's own flag as written in the
    file, which can be set without batch statistics (the lowered-InstanceNorm trap; see ``notes``).
    ``running_stats_used_by`` names the call styles that use the stored statistics although the layer as
    written computes batch statistics (Keras 3: ``model.predict(x)`` overrides a baked ``training=True``).
    """

    name: str
    kind: Kind
    op_type: str
    nodes: tuple[str, ...]
    input: str
    output: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    domain: str = ""
    axes: tuple[int, ...] | None = None
    channel_axis: int | None = 1
    channels: int | None = None
    groups: int | None = None
    epsilon: float | None = None
    momentum: float | None = None
    training: bool = False
    batch_statistics: bool = False
    uses_running_stats: bool = False
    running_stats_used_by: tuple[str, ...] = ()
    centered: bool = True
    scale: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    mean: np.ndarray | None = field(default=None, repr=False)
    var: np.ndarray | None = field(default=None, repr=False)
    input_shape: tuple[Dim, ...] | None = None
    batch_axis: int | None = 0
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # why the parameters stored in the file could not be read (None: read, or the layer stores none); the
    # static checks cannot judge such a layer, so it is reported "unknown", never "ok"
    unreadable: str | None = None

    @property
    def computes_statistics(self) -> bool:
        """True when the layer computes its mean/variance from its input at inference."""
        return not self.uses_running_stats


#: the call style of Keras 3's predict(), named in ``NormLayer.running_stats_used_by`` where it overrides a baked
#: training=True, and the probe's run of it (``ProbeResult.call_style`` "predict")
PREDICT_CALL = "model.predict(x)"


#: ops that quantize with a scale taken from the min and max of the whole tensor, every sample included
#: (onnxruntime's dynamic quantization: the standard op and the com.microsoft kernels that fuse it)
DYNAMIC_QUANT_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul"})


@dataclass(frozen=True)
class BatchOp:
    """An op outside every recognised normalization layer that reduces over the batch axis (``axes`` include
    0): a sample's result depends on its batch companions. Only the first such op on a path is recorded."""

    name: str
    op_type: str
    axes: tuple[int, ...]
    input: str
    output: str
    input_shape: tuple[Dim, ...] | None = None
    keepdims: bool = True


@dataclass(frozen=True)
class BrokenWeights:
    """Stored weights holding NaN or Inf outside the layers the view describes: an op's (a batch norm with a NaN or
    negative variance folded into the convolution before it leaves them there), or a Keras norm layer's that no
    config describes. ``name``: the layer they belong to as the file names it; ``tensors``: each bad weight's name
    -> (NaN count, Inf count, values); ``what``: what those tensors are ("weights", the "constant operands" of an
    elementwise op, a Keras layer's "variables")."""

    name: str
    node: str
    op_type: str
    tensors: dict[str, tuple[int, int, int]]
    what: str = "weights"


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (symbolic dims as names), numpy dtype name and where its samples sit.

    ``batch_axis`` is the axis that carries the batch (0 for most inputs; 1 for a recurrent state shaped
    [layers, batch, hidden]); None for an input fed the same tensor in every batch (a scalar sample rate, a
    parameter-like input). Probe data always holds samples on its first axis; the batch axis is where they
    go when fed. ``fill`` is the value a synthetic unbatched input gets (a constant the model compares it
    with, say); None: drawn like any other input. ``fill_made_up``: the file does not give that value (0 for an
    axis a node takes), so the probe's note names it.
    """

    name: str
    shape: tuple[Dim, ...] | None
    dtype: str
    batch_axis: int | None = 0
    fill: float | None = None
    fill_made_up: bool = False

    @property
    def batched(self) -> bool:
        """True when the input carries samples (rank 0 never does; an unknown rank is taken as batched)."""
        return self.batch_axis is not None and (self.shape is None or self.batch_axis < len(self.shape))

    @property
    def batch_dim(self) -> Dim:
        """The declared size of the batch axis (None: unknown, or the input has no batch axis)."""
        if not self.batched or self.shape is None:
            return None
        return self.shape[self.batch_axis]  # type: ignore[index]

    @property
    def sample_shape(self) -> tuple[Dim, ...] | None:
        """The declared dims without the batch axis (all of them for an unbatched input)."""
        if self.shape is None or not self.batched:
            return self.shape
        return self.shape[: self.batch_axis] + self.shape[self.batch_axis + 1 :]  # type: ignore[operator]

    def with_batch_dim(self, dim: Dim) -> InputSpec:
        """This input with ``dim`` declared at its batch axis."""
        if self.shape is None or not self.batched:
            return self
        axis = int(self.batch_axis)  # type: ignore[arg-type]
        return replace(self, shape=(*self.shape[:axis], dim, *self.shape[axis + 1 :]))


@dataclass(frozen=True)
class ModelInfo:
    """What the report says about the file itself."""

    path: str
    format: str  # "onnx" | "keras" | "h5"
    sha256: str
    opset: dict[str, int] | None = None
    producer: str | None = None
    ir_version: int | None = None
    framework_version: str | None = None


@dataclass(frozen=True)
class Note:
    """A model-level remark that is not a finding (checker failure, no norm layers, folded BN, ...)."""

    level: str  # "info" | "warning"
    message: str


#: the note of a model without normalization layers (``where``: graph or model); the probe still tests its outputs
NO_LAYERS_NOTE = (
    "no normalization layer found in the {where}; a probe still tests whether the outputs depend on a "
    "sample's batch companions (BN002)"
)


@dataclass(eq=False)
class ModelView:
    """A loaded model as bncheck sees it. ``handle`` is backend-private state, never read by checks."""

    info: ModelInfo
    layers: list[NormLayer]
    inputs: list[InputSpec]
    notes: list[Note] = field(default_factory=list)
    handle: Any = field(default=None, repr=False)
    batch_ops: list[BatchOp] = field(default_factory=list)
    # in a file that fixes the batch to 1: the reductions over axis 0 a batch would reach once the probe relaxes
    # that batch (no finding as shipped: a sample has no companions); the relaxed probe tests them as batch_ops
    relaxed_batch_ops: list[BatchOp] = field(default_factory=list)
    broken_weights: list[BrokenWeights] = field(default_factory=list)  # NaN/Inf outside the layers (BN005)
    # the model outputs' declared dims by name (None: rank unknown), which tell class scores from other
    # outputs (probe_plan.scores_over_last_axis); a Keras file's config declares none: its probe's runner
    # fills them from the built model
    output_shapes: dict[str, tuple[Dim, ...] | None] = field(default_factory=dict)
    # waits for the file's sha256 where the backend computes it in the background (info.sha256 is "" until
    # final_info): the report needs it, nothing before the report does
    pending_sha256: Callable[[], str] | None = field(default=None, repr=False)

    def final_info(self) -> ModelInfo:
        """``info`` with the file's sha256 (waiting for it if it is still being computed)."""
        if self.pending_sha256 is not None:
            self.info = replace(self.info, sha256=self.pending_sha256())
            self.pending_sha256 = None
        return self.info

    def layer(self, name: str) -> NormLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def fixed_batch(inputs: list[InputSpec]) -> int | None:
    """The batch size every batched input fixes in its declared shape, or None when the batch dimension is
    free (or the inputs disagree)."""
    batched = [spec for spec in inputs if spec.batched]
    # a batch dim of 0 or -1 is how some exporters write a dynamic one (onnxruntime treats it so)
    fixed = {spec.batch_dim for spec in batched if isinstance(spec.batch_dim, int) and spec.batch_dim > 0}
    free = any(not isinstance(spec.batch_dim, int) or spec.batch_dim < 1 for spec in batched)
    return int(fixed.pop()) if len(fixed) == 1 and not free else None


def without_batch_axis(inputs: list[InputSpec]) -> bool:
    """The model takes inputs and none of them has a batch axis: each run is one sample."""
    return bool(inputs) and not any(spec.batched for spec in inputs)


def largest_batch(inputs: list[InputSpec], batch_sizes: Iterable[int]) -> int:
    """The largest batch a probe of these inputs runs: the fixed batch, else the largest of ``batch_sizes``."""
    fixed = fixed_batch(inputs)
    return fixed if fixed is not None else max(batch_sizes)


#: probe batch sizes when nobody chose them (command line, configuration, API)
DEFAULT_BATCH_SIZES = (1, 2, 32)


def default_batch_sizes(fixed: int | None) -> tuple[int, ...]:
    """The default probe batch sizes for a file whose batch dim is ``fixed`` (None: free). A file that fixes
    its batch to B never runs a larger one: 1 and 2 test collapse and batch dependence, B is what it runs."""
    return DEFAULT_BATCH_SIZES if fixed is None else tuple(sorted({1, 2, fixed}))


# --------------------------------------------------------------------------- probe statistics


@dataclass(frozen=True, eq=False)
class TensorStats:
    """Per-channel summary of one tensor in one probe batch; small arrays only, never the activation.

    ``sample_mean`` and ``sample_sq`` are [N, C]: the mean and the mean of squares of each sample's channel
    over the remaining (spatial) axes. They are float64 (aggregated in numpy: a float32 sum of squares over
    the whole batch loses 3e-4). ``count`` is elements per channel in the whole batch.
    """

    batch_size: int
    count: int
    sample_mean: np.ndarray
    sample_sq: np.ndarray
    min: np.ndarray
    max: np.ndarray
    zeros: np.ndarray
    nonfinite: np.ndarray
    # True when computed from the other side of a per-channel affine map (inference BatchNormalization:
    # the probe measures the output and derives the input).
    derived: bool = False
    # False when ``zeros`` was not counted element by element (derived side, or the ONNX probe's fast
    # form): it is then exact only for channels whose range excludes 0 (0) or is exactly 0 (all), and
    # elsewhere 0, a lower bound.
    zeros_exact: bool = True
    # False when ``min`` and ``max`` were not measured (NaN): the ONNX probe skips them for inference-mode
    # BatchNormalization, an affine map per channel that cannot collapse (BN001 judges layers that compute
    # statistics). ``nonfinite`` still holds: a NaN/Inf element makes its sample's mean non-finite.
    minmax_measured: bool = True
    # the tensor's dims at this batch, where no static rank was known (measured through a flat view)
    runtime_shape: tuple[int, ...] | None = None

    @property
    def channels(self) -> int:
        return int(self.sample_mean.shape[1])

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean over the batch (every sample has the same element count)."""
        return _SUM(self.sample_mean, axis=0) / self.sample_mean.shape[0]

    @property
    def var(self) -> np.ndarray:
        """Per-channel population variance over the batch, E[x^2] - E[x]^2 clipped at 0."""
        return np.maximum(_SUM(self.sample_sq, axis=0) / self.sample_sq.shape[0] - self.mean**2, 0.0)

    @property
    def total_nonfinite(self) -> int:
        return int(_SUM(self.nonfinite, axis=None))

    @property
    def total_zeros(self) -> int:
        return int(_SUM(self.zeros, axis=None))


@dataclass(frozen=True, eq=False)
class LayerProbe:
    """What one layer saw in one probe batch.

    ``source`` is "runtime" when the numbers come from the runtime, "spec" when they were computed by the
    reference implementation because the runtime does not follow the spec for this node (train-mode
    BatchNormalization in onnxruntime); then ``runtime_deviation`` is the largest |runtime - spec| seen.
    """

    layer: str
    batch_size: int
    input: TensorStats | None
    output: TensorStats | None
    source: str = "runtime"
    runtime_deviation: float | None = None


@dataclass(frozen=True)
class BatchDependence:
    """How much a layer's per-sample statistics move when a sample's batch companions change.

    Each change is the largest absolute difference, over the probed samples, companions and batch sizes, of
    a sample's per-channel mean (and mean of squares) against the same sample probed alone, divided by
    ``scale`` (the layer's per-channel spread, so the number is in units of standard deviations).
    """

    layer: str
    input_change: float
    output_change: float
    samples: int
    batch_sizes: tuple[int, ...]
    worst_batch_size: int | None = None


@dataclass(frozen=True)
class OutputComparison:
    """How far one model output moves between two ways of running the same samples.

    ``shift`` is the root mean square, over the compared samples and the output's elements, of the change
    in units of ``scale`` (the output's spread across samples: the root mean over positions of each
    position's variance across samples), so "1.0" means outputs moved by one output standard deviation;
    ``max_shift`` is the largest per-sample value. ``agreement`` is the fraction of samples whose arg-max
    over the last axis is unchanged, for outputs that hold class scores there (probe_plan.scores_over_last_axis);
    None otherwise. A sequence's scores ([samples, positions, classes]) agree per position: ``positions`` is
    how many of each sample's were compared (1 for [samples, classes]). ``changed`` (integer and boolean
    outputs: labels, ids, masks, whose values have no spread to measure in) is the share of elements that
    differ, and ``changed_samples`` how many samples have one; None for floating-point outputs.
    """

    output: str
    shift: float
    max_shift: float
    samples: int
    scale: float
    agreement: float | None = None
    changed: float | None = None
    changed_samples: int | None = None
    positions: int = 1

    def numbers(self) -> dict[str, float | int | None]:
        """The comparison as the report's numbers (a finding's evidence, the probe section of the JSON)."""
        numbers: dict[str, float | int | None] = {
            "shift_sd": self.shift,
            "max_shift_sd": self.max_shift,
            "top1_agreement": self.agreement,
            "samples": self.samples,
            "output_sd": self.scale,
        }
        if self.agreement is not None and self.positions > 1:  # a sequence's class scores only
            numbers["top1_positions"] = self.positions
        if self.changed is not None:  # integer and boolean outputs only
            numbers.update(changed_share=self.changed, changed_samples=self.changed_samples)
        return numbers


@dataclass(frozen=True)
class LocatedDependence:
    """The first tensor (in topological order) that depends on a sample's batch companions, found by
    bisection when the model's outputs depend on the batch and no normalization layer explains it."""

    node: str  # the producing node's name (its first output's name when unnamed)
    op_type: str
    tensor: str
    axes: tuple[int, ...] | None  # the op's reduction axes, when it has any
    change: float  # the tensor's largest per-sample change, in its standard deviations
    runs: int  # extra runs the search made
    batch_size: int | None = None  # the size of the batch the sample was compared in (the smallest that moves it)
    # a single value (a quantizer's scale) has no spread to be a unit: its change relative to its value
    relative_change: float | None = None
    # dynamic quantizers upstream of the node, in graph order: they take their scale from the whole batch
    # too, but with the companions the search ran they left the node's inputs unchanged
    upstream_quantizers: tuple[str, ...] = ()
    # integer inputs of the node whose values for the sample moved with its companions (lengths sorted across
    # the batch): the dependence came in through them, from upstream
    moved_integer_inputs: tuple[str, ...] = ()
    integer_origin: str | None = None  # the op that computed the first of them ("TopK 'TopK_16'")
    # ops drawing random numbers at the node or upstream of it (dropout exported in training mode, a sampler's
    # noise), "RandomUniformLike 'n1'": the outputs change from run to run, alone or in a batch
    random_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recalibration:
    """The model run with statistics recomputed from the data (what `fix` computes) against the stored ones."""

    layers: tuple[str, ...]  # the layers whose statistics were recomputed
    outputs: dict[str, OutputComparison]
    samples: int
    # layer name -> the model outputs it reaches (a two-headed model's branch reaches one); None: not known
    reaches: dict[str, frozenset[str]] | None = None
    # layer name -> its drift numbers (verdicts.Drift.evidence) once the layers above it are recomputed, for the
    # layers the probe found drifting that those bring within the thresholds (fix recomputes them all the same)
    settled_by_upstream: dict[str, dict[str, float | int]] = field(default_factory=dict)


@dataclass(eq=False)
class ProbeResult:
    """Everything a probe measured, per batch size and per layer."""

    batch_sizes: tuple[int, ...]
    layers: dict[int, dict[str, LayerProbe]]  # batch size -> layer name -> stats
    dependence: dict[str, BatchDependence] = field(default_factory=dict)
    data: dict[str, TensorStats] | None = None  # with --data: each layer's input over all samples
    data_source: str = "synthetic"
    data_samples: int = 0
    data_batch: int | None = None  # with --data: the most samples a run over the data took (its consecutive batches)
    seed: int = 0
    call_style: str | None = None  # Keras: "as-written" or "predict"; None for ONNX
    notes: list[str] = field(default_factory=list)
    # the model's outputs, solo against in a batch: output name -> batch size -> comparison (empty when
    # not tested); ``located``: where an unexplained dependence starts
    output_dependence: dict[str, dict[int, OutputComparison]] = field(default_factory=dict)
    # when a sample's outputs differ between alone and in a batch: the largest change (output sd) of the
    # same sample at the same row of a batch of the same size whose companions are copies of it (None: not
    # run). Only batch composition differs, so batch-invariant models give exactly 0 (same kernels).
    companion_change: float | None = None
    located: LocatedDependence | None = None
    # output_dependence compares each sample in its row of a batch with the same row beside other companions,
    # not alone: a batch fixed in the file, or a model no sample of which runs alone
    companions_replaced: bool = False
    # every model output kept its shape from a run of one sample to a run of several (None: not run so): no
    # output holds a row per sample, so axis 0 of the inputs is no batch of separate samples to the model
    outputs_unbatched: bool | None = None
    # with --data and drifting statistics: the outputs with recomputed statistics against the stored ones
    recalibration: Recalibration | None = None
    # with --data: the model's outputs on the data's first samples, samples first (run_plan's keep_outputs),
    # which that comparison takes as the stored model's; not reported, let go once it has run
    data_outputs: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)
    # model outputs holding NaN/Inf in every sample of the probe's largest batch: output name -> samples
    nonfinite_outputs: dict[str, int] = field(default_factory=dict)
    # layers the probe could not measure, with the reason (shown as "not measured", never "ok")
    unmeasured: dict[str, str] = field(default_factory=dict)
    # layers the probe left unmeasured because no check needs their numbers, with the reason
    # (probe_plan.needs_statistics): judged by the static checks and the model's outputs alone
    not_needed: dict[str, str] = field(default_factory=dict)
    requested_batch_sizes: tuple[int, ...] = ()  # what the user asked for; ``batch_sizes`` are those that ran
    batch_handling: str | None = None  # how a batch dim fixed in the file was handled (None: free)

    def at(self, batch_size: int, layer: str) -> LayerProbe | None:
        return self.layers.get(batch_size, {}).get(layer)


def median(values: Any) -> float:
    """np.median's number (NaN when any element is NaN or there is none), without np.median: its NaN check
    imports numpy.ma, 7 ms of every process that renders a report."""
    flat = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if flat.size == 0 or np.isnan(flat[-1]):  # np.sort puts NaN last
        return math.nan
    half = flat.size // 2
    return float(flat[half]) if flat.size % 2 else float((flat[half - 1] + flat[half]) / 2)


def summarize(values: np.ndarray | None) -> dict[str, float | int | None] | None:
    """min/median/max/count of a parameter array, or None when the parameter is unknown."""
    if values is None:
        return None
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        return {"count": 0, "min": None, "median": None, "max": None}
    finite = flat[np.isfinite(flat)]
    if not finite.size:
        return {"count": int(flat.size), "min": None, "median": None, "max": None, "nonfinite": int(flat.size)}
    return {
        "count": int(flat.size),
        "min": float(np.minimum.reduce(finite)),  # np.min's and np.max's reductions (see _SUM)
        "median": median(finite),
        "max": float(np.maximum.reduce(finite)),
        "nonfinite": int(flat.size - finite.size),
    }


def normalized_set_size(layer: NormLayer, batch: int | None = None) -> tuple[int | None, tuple[str, ...]]:
    """Elements in one normalized set of ``layer`` and the symbolic dims it depends on.

    Returns ``(known_product, symbolic_dim_names)``: the product of the known dims (times channels per group
    for GroupNorm), and the names of the symbolic dims that also enter it. ``batch`` substitutes a batch
    size for the batch axis. ``(None, ())`` when the shape or axes are unknown.
    """
    if layer.axes is None or layer.input_shape is None:
        return None, ()
    product = 1
    symbolic: list[str] = []
    for axis in layer.axes:
        if axis >= len(layer.input_shape):
            return None, ()
        if layer.kind is Kind.GROUP and axis == layer.channel_axis:
            continue
        dim = layer.input_shape[axis]
        if batch is not None and axis == layer.batch_axis:
            dim = batch
            frames = layer.extra.get("frames")  # a layer TimeDistributed runs on each frame: batch x frames
            if isinstance(frames, int):
                product *= frames
            elif isinstance(frames, str):
                symbolic.append(frames)
        if isinstance(dim, int):
            product *= dim
        elif isinstance(dim, str):
            symbolic.append(dim)
        else:
            return None, ()
    if layer.kind is Kind.GROUP:
        if not layer.groups or not layer.channels:
            return None, ()
        product *= max(layer.channels // layer.groups, 1)
    return product, tuple(symbolic)


def set_variance(layer: NormLayer, seen: LayerProbe | None) -> float | None:
    """The median variance of ``layer``'s normalized sets in one probe batch, from its measured input: per
    sample and channel (instance norm), per sample and group of channels (group norm), per channel over the
    batch (a batch norm that computes its statistics); None for other layers or without a measured input."""
    stats = None if seen is None else seen.input
    if stats is None or stats.derived or not stats.sample_mean.size:
        return None
    mean, squares = stats.sample_mean, stats.sample_sq
    if layer.kind is Kind.GROUP and layer.groups and stats.channels % layer.groups == 0:
        shape = (mean.shape[0], layer.groups, -1)
        mean, squares = mean.reshape(shape).mean(axis=2), squares.reshape(shape).mean(axis=2)
    elif layer.kind is Kind.BATCH and layer.computes_statistics:
        return median(stats.var)
    elif layer.kind is not Kind.INSTANCE:
        return None
    return median(np.maximum(squares - mean**2, 0.0))


def observed_set_size(layer: NormLayer, seen: LayerProbe | None) -> int | None:
    """Elements in one normalized set of ``layer`` at the shapes a probe ran, from its measured counts.

    A probe records ``count`` (elements per channel over the batch), the batch size and the channel count;
    ``count / batch`` is the product of the other dims at run time. The static shape says which of those
    are fixed, so the symbolic ones multiply to the rest. None when the axes or shape are unknown, or when
    the layer's set takes some symbolic dims and not others (their sizes cannot be told apart).
    """
    stats = None if seen is None else (seen.input if seen.input is not None else seen.output)
    if stats is None or stats.batch_size <= 0:
        return None
    if (
        layer.kind is Kind.BATCH
        and layer.axes is None
        and layer.channel_axis is not None
        and layer.extra.get("spatial", 1) != 0
    ):
        return stats.count  # every axis but the channel's, whatever the rank: the count per channel
    if layer.kind is Kind.INSTANCE and layer.axes is None and layer.channel_axis is not None:
        # every axis but the batch's and the channel's, whatever the rank (a shape lost after an If)
        return stats.count // stats.batch_size if stats.count % stats.batch_size == 0 else None
    if layer.axes is not None and layer.input_shape is None and stats.runtime_shape is not None:
        dims = stats.runtime_shape
        return math.prod(dims[a] for a in layer.axes) if all(a < len(dims) for a in layer.axes) else None
    if layer.axes is None or layer.input_shape is None:
        return None
    shape, axes = layer.input_shape, set(layer.axes)
    if any(axis >= len(shape) for axis in axes) or stats.count % stats.batch_size:
        return None
    channel_axis = None if layer.channel_axis is None else layer.channel_axis % len(shape)
    others = [a for a in range(len(shape)) if a not in (layer.batch_axis, channel_axis)]
    fixed = 1
    free: list[int] = []
    for axis in others:
        dim = shape[axis]
        if isinstance(dim, int) and dim >= 0:
            fixed *= dim
        else:
            free.append(axis)
    per_sample = stats.count // stats.batch_size
    if fixed == 0 or per_sample % fixed:
        return None
    free_in = [a for a in free if a in axes]
    if free_in and len(free_in) != len(free):
        return None
    size = per_sample // fixed if free_in else 1
    for axis in axes:
        dim = shape[axis]
        if axis == layer.batch_axis:
            size *= stats.batch_size
        elif axis == channel_axis:
            if layer.kind is Kind.GROUP:
                if not layer.groups:
                    return None
                size *= max(stats.channels // layer.groups, 1)
            else:
                size *= stats.channels
        elif isinstance(dim, int) and dim >= 0:
            size *= dim
    return size


def runnable_batch(probe: ProbeResult, batch_size: int) -> int:
    """``batch_size``, or the largest batch ``probe`` ran where a size the probe could not run is at most
    ``batch_size`` (a model that declares a free batch but takes only 1, say): what a pass over the data feeds."""
    refused = [b for b in probe.requested_batch_sizes if b not in probe.batch_sizes]
    below = [b for b in probe.batch_sizes if refused and b < min(refused)]
    return max(below) if below and min(refused) <= batch_size else batch_size


class Progress(Protocol):
    """Where a long command shows how far it is (render.progress.Bar at a terminal): ``(done, total)`` steps
    of the current stage, and each new stage by name."""

    def __call__(self, done: int, total: int) -> None: ...

    def stage(self, description: str) -> None: ...


#: the stage a probe with data reports while it measures BN003's output effect (the statistics recomputed)
EFFECT_STAGE = "measuring the effect of the drifting statistics"


def announce(progress: Callable[[int, int], None] | None, description: str) -> None:
    """Tell ``progress`` a new stage where it takes stages (a :class:`Progress`; a plain ``(done, total)``
    callback, as the Python API takes, counts steps only)."""
    stage = getattr(progress, "stage", None)
    if stage is not None:
        stage(description)


@dataclass(frozen=True)
class ProbeSettings:
    """What `bncheck probe` asks of a backend.

    ``data`` maps input name to an array whose first axis is samples (None: synthetic inputs from ``seed``).
    ``input_shapes`` fixes symbolic non-batch dims per input. ``samples`` is K, the number of samples whose
    batch dependence is tested. ``progress`` is called with (done, total) steps, or None.
    """

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    # True when ``batch_sizes`` is the default, not the user's choice: a backend that relaxes a batch dim
    # fixed in the file probes default_batch_sizes(B) instead
    default_sizes: bool = False
    seed: int = 0
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    data: dict[str, np.ndarray] | None = None
    data_path: str | None = None  # --data; the engine reads it into ``data`` once the model's inputs are known
    data_source: str = "synthetic"
    samples: int = 4
    progress: Callable[[int, int], None] | None = None
    provider: str = "cpu"  # cpu | cuda | tensorrt | auto: onnxruntime execution provider (ONNX models)
    # measure every normalization layer, also those no check needs (probe_plan.needs_statistics)
    all_layers: bool = False
    # the process ends once this probe's report is written (the console's one model): a backend may leave
    # what it would free last to the exit, which frees it anyway
    process_ends_after: bool = False
    # the output effect of drifting statistics recomputes them from all the data rather than its first samples
    # (probe_data.RECALIBRATION_ELEMENTS): fix's probe of the original, whose repair then makes the same
    # passes over all of it and replays them (ONNX)
    recalibrate_all: bool = False
