"""Run the augmented model in onnxruntime: sessions, decoding the measured statistics, the probe entry points."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.backends.base import BackendError, ProbeSettings
from bncheck.backends.onnx import custom_ops, memory
from bncheck.backends.onnx.cancel import run_options
from bncheck.backends.onnx.graph import ONNX_DOMAINS, TRANSPARENT, copy_messages, unpaid_packing_bytes, upstream_nodes
from bncheck.backends.onnx.instrument import (
    EMBED_BYTES,
    PREFIX,
    Augmenter,
    LayerPlan,
    Measure,
    keep_only,
    release,
)
from bncheck.backends.onnx.probe_copy import OutputsRefuse, keep_fixed_batch, prepare, relaxes
from bncheck.backends.onnx.providers import CPU, fallback_note, ran_note, resolve
from bncheck.backends.onnx.runtime_errors import runtime_message
from bncheck.backends.onnx.runtime_ir import runnable_ir_version
from bncheck.backends.onnx.scratch import Scratch
from bncheck.backends.onnx.splice import Decomposition, Splice
from bncheck.errors import one_line
from bncheck.model import (
    DEFAULT_BATCH_SIZES,
    EFFECT_STAGE,
    BatchOp,
    Dim,
    InputSpec,
    LayerProbe,
    ModelView,
    NormLayer,
    ProbeResult,
    TensorStats,
    announce,
    default_batch_sizes,
    fixed_batch,
    largest_batch,
)
from bncheck.probe_plan import (
    Observed,
    Runner,
    drifting_layers,
    first_samples,
    leave_unmeasured,
    merge_stats,
    needs_statistics,
    outputs_clear,
    preflight,
    run_plan,
    tensor_stats,
)
from bncheck.share import runtime_threads

if TYPE_CHECKING:
    import onnx

    from bncheck.backends.onnx.conformance import RuntimeNode
    from bncheck.backends.onnx.load import OnnxHandle
    from bncheck.backends.onnx.probe_copy import ProbeCopy


#: why a layer has no statistics: neither of its tensors could be instrumented.
UNMEASURABLE = (
    "its tensors are not in the main graph, or have no static rank and a channel axis other than 1 "
    "(a flattened view cannot keep it)"
)


def unmeasurable(layer: NormLayer) -> str:
    """Why neither of ``layer``'s tensors could be instrumented."""
    where = layer.extra.get("in_body")
    return f"its tensors are inside {where}, a control-flow body, not in the main graph" if where else UNMEASURABLE


#: The statistics-first session (see _session_statistics_first) lowers the peak by about one activation of
#: the largest batch and costs a second session build, writing the weights and reading them back: used where
#: that activation is at least this share of the weights (ResNet-50 at batch 32: 1.5; a 2.6 GB MLP: 0.0004).
REORDER_MIN_ACTIVATION_SHARE = 0.25
#: Below these weight bytes the session is always used: rewriting small weights costs little, and on small
#: models the busiest activation does not bound what the session takes off the peak (its re-numbering also
#: orders the model's own nodes: handnorm_batch, 12.6 MB busiest, peaks 17 MB lower with it).
REORDER_WEIGHTS_FLOOR = 256 * 10**6


#: From this many bytes of packing that a probe's runs cannot pay back (graph.unpaid_packing_bytes: the copies of
#: a shared weight, the weights of one-row-per-sample products), bncheck's sessions of the graph do not prepack:
#: packing costs more session build than a probe's few runs win back (docs/architecture.md has the numbers).
PREPACK_MAX_UNPAID = 64 * 2**20


def prepacks(graph: Any, shapes: Mapping[str, tuple[Dim, ...]]) -> bool:
    """Whether a probe's session of ``graph`` (its tensors' ``shapes``) packs its weights (see PREPACK_MAX_UNPAID)."""
    return unpaid_packing_bytes(graph, shapes) < PREPACK_MAX_UNPAID


#: sessions that the process's exit frees (_Engine.close's ``leave_session``)
_LEFT_TO_EXIT: list[Any] = []


def worth_reordering(activations: int | None, weights: int) -> bool:
    """Whether the statistics-first session pays (see REORDER_MIN_ACTIVATION_SHARE); ``activations``: the
    busiest node's bytes at the largest batch (memory.estimate), None when unknown (then it is used)."""
    return (
        weights < REORDER_WEIGHTS_FLOOR or activations is None or activations >= REORDER_MIN_ACTIVATION_SHARE * weights
    )


# --------------------------------------------------------------------------- session and decoding


def quiet_onnxruntime() -> None:
    """onnxruntime logs its errors (ANSI-coloured, several lines) to stderr, which belongs to the CLI's one
    line; the same errors reach bncheck as exceptions, so only fatal messages may still be logged. Process-wide:
    called before any session is built (the probe copy's, the probe's, the fix's and the effect's)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)


def session_options(level: Any, folder: str, prepack: bool = True) -> Any:
    """``prepack``: False skips onnxruntime's packing of constant weights into kernel-owned copies."""
    import onnxruntime as ort

    quiet_onnxruntime()
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.graph_optimization_level = level
    so.intra_op_num_threads = runtime_threads()  # one of several --jobs workers: its share of the cores
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    # CPU arena on (onnxruntime's default, as in plain inference): without it every activation is a fresh
    # mmap whose pages fault in again (docs/architecture.md has the numbers)
    so.enable_cpu_mem_arena = True
    # No memory patterns: a pattern is kept per input shape and, from a shape's second run on, allocates its
    # whole plan as one block that stays in the arena. The probe alternates a few runs at each of several
    # sizes, so the blocks pile up.
    so.enable_mem_pattern = False
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


#: onnxruntime rewrites that bncheck's sessions skip: MatMul + BatchNormalization folds each BN into new MatMul
#: weights when the session is built, which pays back over many runs, not the few of a probe (most of a large
#: MLP's session build: docs/architecture.md). Conv + BN is cheap to fold and is kept.
SKIPPED_REWRITES = ["MatMul_BatchNormalization_Fusion"]


def new_session(
    model: onnx.ModelProto | str,
    so: Any,
    providers: list[str] | None = None,
    libraries: tuple[str, ...] | None = None,
) -> Any:
    """An onnxruntime session of ``model`` (a ModelProto, or a file's path) without :data:`SKIPPED_REWRITES`,
    with the custom-op ``libraries`` it needs (custom_ops.libraries; by default, a ModelProto's own)."""
    import onnxruntime as ort

    if libraries is None:
        libraries = () if isinstance(model, str) else custom_ops.libraries(model)
    custom_ops.register(so, libraries)
    source = model if isinstance(model, str) else _serialized_runnable(model)
    return ort.InferenceSession(source, so, providers=providers or [CPU], disabled_optimizers=SKIPPED_REWRITES)


def _serialized_runnable(model: onnx.ModelProto) -> bytes:
    """``model``'s bytes at an IR version the installed onnxruntime reads (runtime_ir); ``model`` itself is left
    as it was (it may be the file's, which fix writes)."""
    written = int(model.ir_version)
    runnable = runnable_ir_version(written)
    if runnable == written:
        return model.SerializeToString()
    model.ir_version = runnable  # not a copy: the weights may be gigabytes
    try:
        return model.SerializeToString()
    finally:
        model.ir_version = written


def _file_refused(path: str, model: onnx.ModelProto) -> str | None:
    """Why onnxruntime refuses the file as written (a session without optimizations), or None where it loads:
    asked only once the probe's own graph has failed. ``model``: the file's, for the custom ops it imports."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    custom_ops.register(options, custom_ops.libraries(model))
    source: str | bytes = path
    if runnable_ir_version(int(model.ir_version)) < model.ir_version:
        # the IR version alone would answer, which the probe's copy lowers: ask about the graph
        folder = os.path.dirname(os.path.abspath(path))
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        source = _serialized_runnable(model)
    try:
        ort.InferenceSession(source, options, providers=[CPU])
    except Exception as exc:
        message = runtime_message(exc)
        if custom_ops.imports_extensions(model) and not custom_ops.extensions_library():
            message += f"; {custom_ops.INSTALL_HINT}"
        return message
    return None


def _session(
    model: onnx.ModelProto, folder: str, exact: bool, providers: list[str] | None = None, prepack: bool = True
):
    """One session on the augmented stub: ORT_ENABLE_ALL (fast form) or ORT_ENABLE_EXTENDED (exact form)."""
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if exact else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return new_session(model, session_options(level, folder, prepack), providers)


def _statistics_first(graph: Any, main_outputs: set[str]) -> None:
    """Order ``graph.node`` so that every added node runs as soon as its inputs exist, before the next
    node of the model itself; the model's own nodes keep their (topological) order."""
    import heapq
    import re

    nodes = list(graph.node)
    main = upstream_nodes(nodes, main_outputs, reads=lambda node: node.input)

    def key(i: int) -> tuple[int, int]:
        found = re.search(rf"{PREFIX}_(\d+)_", nodes[i].name)
        return (int(found.group(1)) if found else 1 << 40, i)

    # Kahn's algorithm for the added nodes, smallest construction number first, drained after each
    # model node (linear in the graph size: large transformers have thousands of nodes)
    available = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {""}
    missing: dict[int, int] = {}
    waiting: dict[str, list[int]] = {}
    ready: list[tuple[tuple[int, int], int]] = []
    for i in range(len(nodes)):
        if i in main:
            continue
        needed = {t for t in nodes[i].input if t not in available}
        missing[i] = len(needed)
        for t in needed:
            waiting.setdefault(t, []).append(i)
        if not needed:
            heapq.heappush(ready, (key(i), i))
    order: list[int] = []

    def produce(i: int) -> None:
        order.append(i)
        for out in nodes[i].output:
            if out and out not in available:
                available.add(out)
                for j in waiting.pop(out, []):
                    missing[j] -= 1
                    if missing[j] == 0:
                        heapq.heappush(ready, (key(j), j))

    def drain() -> None:
        while ready:
            produce(heapq.heappop(ready)[1])

    drain()
    for i in range(len(nodes)):
        if i in main:
            produce(i)
            drain()
    if len(order) != len(nodes):
        raise ValueError("added nodes depend on tensors no node produces")
    del graph.node[:]
    copy_messages(graph.node, (nodes[i] for i in order))


def _shrink_arena() -> Any:
    """Run options that return the CPU arena's unused chunks to the system at the end of the run."""
    options = run_options()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _session_statistics_first(
    model: onnx.ModelProto,
    folder: str,
    tmp: Scratch,
    main_outputs: set[str],
    decompositions: list[Decomposition] | None = None,
    prepack: bool = True,
) -> tuple[Any, bool]:
    """Fast-form session whose added nodes run right after their producers, even after NCHWc rewriting.

    onnxruntime breaks PRIORITY_BASED ties by node index, and the nodes its layout transformer creates
    (NCHWc pools for our statistics) get new, higher indices than the model's own untouched nodes (its
    Relu, Add), which then run first and keep an extra activation alive. So: optimize once at
    ORT_ENABLE_ALL and save the optimized graph (weights to the temporary folder), put every added node
    right after its producer, and run that graph with optimizations off: a lower peak for a second
    session build (docs/architecture.md). ``decompositions``: train-mode BNs whose decomposition is spliced
    into the optimized graph rather than optimized (splice.py); whether that was done is returned with the
    session, and ``model`` is left as it came. ``prepack``: whether the running session packs its weights.
    """
    import onnx
    import onnxruntime as ort

    optimized = os.path.join(tmp.path, "optimized.onnx")
    # this session only writes the optimized graph and never runs: packing weights for its kernels is waste
    so = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, folder, prepack=False)
    so.optimized_model_filepath = optimized
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.bin")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(EMBED_BYTES))

    def optimize() -> Any:
        first = new_session(model, so)
        del first
        # no malloc_trim here: the running session's creation reuses these freed pages without faulting them
        # in again, and run_probe trims once the view's weights are released (same peak)
        return onnx.load(optimized, load_external_data=False)

    splice = Splice(model, decompositions) if decompositions else None
    try:
        graph_only = optimize()
        if splice is not None and not splice.apply(graph_only.graph):
            # the optimizer rewrote a BN node: the whole decomposed graph is optimized instead
            splice.apply(model.graph)
            splice = None
            graph_only = optimize()
        _statistics_first(graph_only.graph, main_outputs)
        running = session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL, tmp.path, prepack)
        return new_session(graph_only, running), splice is not None
    except BaseException:
        if splice is not None:
            # onnxruntime refused a BN node as the model wrote it, or a later step failed: the caller's
            # fallback session builds ``model`` as it came
            splice.apply(model.graph)
        raise


def _without_extremes(
    batch: int, count: int, mean: np.ndarray, sq: np.ndarray, nonfinite: np.ndarray | None = None, derived: bool = False
) -> TensorStats:
    """Statistics whose min, max and zero counts were not measured (TensorStats.minmax_measured): NaN extremes,
    zeros a lower bound of 0; NaN/Inf none unless given (a non-finite batch is re-run exact, _needs_exact)."""
    c = mean.shape[1]
    return TensorStats(
        batch,
        count,
        mean,
        sq,
        np.full(c, np.nan),
        np.full(c, np.nan),
        np.zeros(c, np.int64),
        np.zeros(c, np.int64) if nonfinite is None else nonfinite.copy(),
        derived=derived,
        zeros_exact=False,
        minmax_measured=False,
    )


def _refuse_empty(m: Measure, values: dict[str, np.ndarray], layer: str) -> None:
    """A measured tensor without elements (onnxruntime runs a BatchNormalization whose parameters are empty
    and returns an empty output for a 1-channel input) has no statistics: the model is malformed there."""
    for key, name in m.outputs.items():
        if key in ("shape", "source_shape"):  # the measured tensor's dims, empty for a scalar
            continue
        shape = np.shape(values[name])
        if 0 in shape:
            raise BackendError(
                f"onnxruntime computed an empty tensor (shape {shape}) where layer {layer!r} is measured "
                f"({m.tensor!r}): nothing to measure; check that its parameters match its input's channels"
            )


def _decode(m: Measure, values: dict[str, np.ndarray]) -> TensorStats:
    stats = _decode_view(m, values)
    if "source_shape" in m.outputs:  # measured through a flat view: the tensor's own dims beside
        return replace(stats, runtime_shape=tuple(int(d) for d in values[m.outputs["source_shape"]]))
    return stats


def _decode_view(m: Measure, values: dict[str, np.ndarray]) -> TensorStats:
    if "full" in m.outputs:
        return tensor_stats(values[m.outputs["full"]], m.channel_axis, m.batch_axis)
    if m.mode == "spec":
        return _decode_spec(m, values)
    if m.mode == "fast":
        mean = np.asarray(values[m.outputs["mean"]], np.float64)
        n, c = mean.shape[0], mean.shape[1]
        return _pooled(m, values, mean.reshape(n, c), np.asarray(values[m.outputs["sq"]], np.float64).reshape(n, c))

    # generic: reductions keep batch and channel axes in their original order
    def nc(name: str) -> np.ndarray:
        arr = np.asarray(values[m.outputs[name]], np.float64)
        if m.batch_axis is None and m.channel_axis is None:
            return arr.reshape(1, 1)
        if m.batch_axis is None:
            return arr.reshape(1, -1)
        if m.channel_axis is None:
            return arr.reshape(-1, 1)
        return arr.T if m.channel_axis < m.batch_axis else arr

    shape = [int(d) for d in values[m.outputs["shape"]]]
    length = 1
    for axis, dim in enumerate(shape):
        if axis not in (m.batch_axis, m.channel_axis):
            length *= dim
    mean = nc("mean")
    n = mean.shape[0]
    sq = nc("sumsq") / max(length, 1)
    if not m.minmax:  # a layer that cannot collapse (Augmenter._plan)
        return _without_extremes(n, n * length, mean, sq)
    mn = np.fmin.reduce(nc("min"), axis=0)
    mx = np.fmax.reduce(nc("max"), axis=0)
    mn = np.where(np.isposinf(mn) & (nc("nonfinite").sum(axis=0) > 0), np.nan, mn)
    mx = np.where(np.isneginf(mx) & (nc("nonfinite").sum(axis=0) > 0), np.nan, mx)
    zeros = np.rint(nc("zeros").sum(axis=0)).astype(np.int64)
    nonfinite = np.rint(nc("nonfinite").sum(axis=0)).astype(np.int64)
    return TensorStats(n, n * length, mean, sq, mn, mx, zeros, nonfinite)


def _pooled(m: Measure, values: dict[str, np.ndarray], mean: np.ndarray, sq: np.ndarray) -> TensorStats:
    """Statistics of a tensor measured by per-sample pools ([N, C] means and mean squares), with its max and
    max of -t where measured (the fast and spec forms)."""
    n, c = mean.shape
    length = _length(m, values)
    if not m.minmax:  # an inference BN's output, or a layer that cannot collapse
        return _without_extremes(n, n * length, mean, sq)
    lo = -np.asarray(values[m.outputs["negmin"]], np.float64).reshape(n, c).max(axis=0)
    hi = np.asarray(values[m.outputs["max"]], np.float64).reshape(n, c).max(axis=0)
    # zeros are not counted (it would cost a full-size temporary per tensor): exact where min/max decide it,
    # else 0 (a lower bound), flagged by zeros_exact=False
    zeros = np.where((lo == 0) & (hi == 0), n * length, 0).astype(np.int64)
    # NaN/Inf: none here; a non-finite element makes its sample's mean non-finite, and such a batch is re-run
    # in the exact form, which counts them (_needs_exact)
    return TensorStats(n, n * length, mean, sq, lo, hi, zeros, np.zeros(c, np.int64), zeros_exact=False)


def _length(m: Measure, values: dict[str, np.ndarray]) -> int:
    """Elements per (sample, channel) of a pooled tensor: static, or (symbolic spatial dims) from the runtime
    shape the graph returns."""
    if m.length is not None:
        return m.length
    return math.prod(int(d) for d in values[m.outputs["shape"]][2:])


def _decode_spec(m: Measure, values: dict[str, np.ndarray]) -> TensorStats:
    """A train-mode BN's input from its decomposition's pools: per-sample means, and per-sample mean squares as
    E[(x - mu)^2] + 2 mu E[x] - mu^2 with mu the batch mean the decomposition subtracted."""
    mean = np.asarray(values[m.outputs["mean"]], np.float64)
    n, c = mean.shape[0], mean.shape[1]
    mean = mean.reshape(n, c)
    centered_sq = np.asarray(values[m.outputs["centered_sq"]], np.float64).reshape(n, c)
    mu = np.asarray(values[m.outputs["batch_mean"]], np.float64).reshape(1, c)
    return _pooled(m, values, mean, _uncentred(centered_sq, mu, mean))


def _uncentred(centered_sq: np.ndarray, mu: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Per-sample mean squares E[x^2] from the pools of (x - mu)^2 and x: E[(x - mu)^2] + 2 mu E[x] - mu^2."""
    return centered_sq + 2.0 * mu * mean - mu * mu


def _affine(
    x: TensorStats, gain: np.ndarray, center: np.ndarray, offset: np.ndarray, nonfinite: np.ndarray
) -> TensorStats:
    """Statistics of y = gain * (x - center) + offset per channel, from x's (``derived``; zeros known only
    where min and max decide them). Centring first keeps y exactly ``offset`` where x equals ``center``."""
    with np.errstate(all="ignore"):
        shift = x.sample_mean - center
        centered_sq = x.sample_sq - 2.0 * center * x.sample_mean + center * center
        mean = gain * shift + offset
        sq = gain * gain * centered_sq + 2.0 * gain * offset * shift + offset * offset
    if not x.minmax_measured:  # nothing to map (the usual case: 53 layers x 7 runs on ResNet-50)
        return _without_extremes(x.batch_size, x.count, mean, sq, nonfinite, derived=True)
    with np.errstate(all="ignore"):
        a, b = gain * (x.min - center) + offset, gain * (x.max - center) + offset
    lo, hi = np.where(gain >= 0, a, b), np.where(gain >= 0, b, a)
    zeros = np.where((lo == 0) & (hi == 0), x.count, 0).astype(np.int64)  # count is per channel
    return TensorStats(
        x.batch_size, x.count, mean, sq, lo, hi, zeros, nonfinite.copy(), derived=True, zeros_exact=False
    )


def _derive_spec_output(
    inp: TensorStats, m: Measure, values: dict[str, np.ndarray], scale: np.ndarray, bias: np.ndarray, eps: float
) -> TensorStats:
    """The spec's train-mode output from its input's statistics: within one batch it is the affine map
    y = (x - mu) * g + bias per channel, g = scale / sqrt(var + eps), mu and var the batch's own (the
    decomposition's numbers). A one-element set gives x = mu, so exactly the bias (BN001)."""
    c = inp.channels
    mu = np.asarray(values[m.outputs["batch_mean"]], np.float64).reshape(c)
    var = np.asarray(values[m.outputs["batch_var"]], np.float64).reshape(c)
    return _spec_output(inp, mu, var, scale, bias, eps, inp.count)


def _spec_output(
    inp: TensorStats,
    mu: np.ndarray,
    var: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    eps: float | np.ndarray,
    count: int | np.ndarray,
) -> TensorStats:
    """:func:`_derive_spec_output` from the batch's mean and variance per channel; ``eps`` is the layer's (or one
    per channel) and ``count`` its elements per channel (the NaN/Inf count of a channel that turns non-finite)."""
    with np.errstate(all="ignore"):  # eps as the runtime reads the float32 attribute
        gain = scale / np.sqrt(var + np.asarray(eps, np.float32).astype(np.float64))
    # a non-finite input, or a non-finite gain, reaches every element of its channel through the batch's mean
    # and variance
    bad = ~np.isfinite(mu) | ~np.isfinite(gain) | (inp.nonfinite > 0)
    return _affine(inp, gain, mu, bias, np.where(bad, count, 0).astype(np.int64))


#: the outputs of a train-mode BN's decomposition that :func:`_spec_layers` decodes (no extremes)
_SPEC_POOLS = {"mean", "centered_sq", "batch_mean", "batch_var", "shape"}


def _side_by_side(plan: LayerPlan) -> bool:
    """A train-mode BN measured by its decomposition's pools without extremes, its output derived (the usual
    case): decoded with the others of its kind by :func:`_spec_layers`."""
    m = plan.input
    return (
        plan.spec_affine is not None
        and m is not None
        and m.mode == "spec"
        and not m.minmax
        and plan.output is None
        and plan.runtime is None
        and set(m.outputs) <= _SPEC_POOLS
    )


def _spec_layers(plans: list[LayerPlan], values: dict[str, np.ndarray]) -> dict[int, tuple[TensorStats, TensorStats]]:
    """Input and output statistics of :func:`_side_by_side` layers by ``id(plan)``: the numbers of
    :func:`_decode_spec` and :func:`_derive_spec_output`, computed on the channels of all the layers at once
    (the same elementwise arithmetic, one set of numpy calls instead of one per layer). Empty where a tensor
    is empty or a number is not finite: the per-layer path decides those (an error, or the exact form)."""
    measures: list[Measure] = []
    scales: list[np.ndarray] = []
    biases: list[np.ndarray] = []
    for plan in plans:
        assert plan.input is not None and plan.spec_affine is not None  # _side_by_side
        measures.append(plan.input)
        scales.append(plan.spec_affine[0])
        biases.append(plan.spec_affine[1])
    pools = {
        key: [np.asarray(values[m.outputs[key]]) for m in measures]
        for key in ("mean", "centered_sq", "batch_mean", "batch_var")
    }
    if not measures or any(a.size == 0 for arrays in pools.values() for a in arrays):
        return {}
    n = pools["mean"][0].shape[0]
    widths = [a.shape[1] for a in pools["mean"]]

    def joined(key: str, rows: int) -> np.ndarray:
        return np.concatenate([a.reshape(rows, -1) for a in pools[key]], axis=1).astype(np.float64)

    mean, mu = joined("mean", n), joined("batch_mean", 1)
    sq = _uncentred(joined("centered_sq", n), mu, mean)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(sq))):
        return {}
    eps = np.repeat([p.layer.epsilon or 0.0 for p in plans], widths)
    counts = [n * _length(m, values) for m in measures]
    # all the layers as one tensor (its count is each layer's own, set on its slice)
    inp = _without_extremes(n, 0, mean, sq)
    var = joined("batch_var", 1).reshape(-1)
    out = _spec_output(
        inp, mu.reshape(-1), var, np.concatenate(scales), np.concatenate(biases), eps, np.repeat(counts, widths)
    )
    found: dict[int, tuple[TensorStats, TensorStats]] = {}
    end = 0
    for plan, width, count in zip(plans, widths, counts):
        part = slice(end, end + width)
        end += width
        found[id(plan)] = (_channels(inp, part, count), _channels(out, part, count))
    return found


def _channels(stats: TensorStats, part: slice, count: int) -> TensorStats:
    """One layer's channels (``part``) of statistics computed for several layers side by side (views: nothing
    writes into a TensorStats' arrays), with that layer's element count."""
    return TensorStats(
        stats.batch_size,
        count,
        stats.sample_mean[:, part],
        stats.sample_sq[:, part],
        stats.min[part],
        stats.max[part],
        stats.zeros[part],
        stats.nonfinite[part],
        derived=stats.derived,
        zeros_exact=stats.zeros_exact,
        minmax_measured=stats.minmax_measured,
    )


def _needs_exact(m: Measure, stats: TensorStats) -> bool:
    """A tensor measured without its counts (the fast form, or the generic one without extremes) whose
    numbers are not finite: NaN/Inf counts need the exact form.

    The per-sample means alone decide it (also where min/max are not measured): a NaN or Inf element makes
    its sample's mean (a sum) non-finite; so does a finite square overflowing float32, which the exact
    form then measures correctly."""
    return (m.mode in ("fast", "spec") or not m.minmax) and not (
        np.all(np.isfinite(stats.sample_mean)) and np.all(np.isfinite(stats.sample_sq))
    )


def _derive_input(out: TensorStats, a: np.ndarray, b: np.ndarray) -> TensorStats:
    """Input statistics of y = a*x + b from the output's: x = (y - b) / a per channel."""
    with np.errstate(all="ignore"):
        inverse = 1.0 / a
    return _affine(out, inverse, b, np.zeros_like(inverse), out.nonfinite)


def _derive_output(inp: TensorStats, a: np.ndarray, b: np.ndarray) -> TensorStats:
    """Output statistics of y = a*x + b from the input's."""
    return _affine(inp, a, np.zeros_like(a), b, inp.nonfinite)


def _deviation(runtime: TensorStats, spec: TensorStats) -> float:
    from bncheck.backends.onnx.conformance import largest_difference

    pairs = ((runtime.sample_mean, spec.sample_mean), (runtime.min, spec.min), (runtime.max, spec.max))
    return largest_difference(pairs)


class _Engine:
    """Owns the augmented session(s) for one model; turns feeds into per-layer statistics."""

    def __init__(
        self,
        handle: OnnxHandle,
        layers: list[NormLayer],
        inputs_only: bool = False,
        copy: ProbeCopy | None = None,
        tmp: Scratch | None = None,
        providers: list[str] | None = None,
        reorder: bool = True,
        deferred: list[NormLayer] | None = None,
        fed: Iterable[str] = (),
        cut: bool = False,
    ) -> None:
        """``copy``: the prepared probe copy (probe_copy.prepare), whose files live in ``tmp`` (then owned
        and removed by this engine). ``providers``: onnxruntime's list (providers.resolve); CPU alone when
        None. ``reorder``: run the statistics-first graph (see :func:`_session_statistics_first`).
        ``deferred``: layers measured only once the model's outputs hold NaN/Inf (probe_plan.needs_statistics),
        from that batch on, so that the first non-finite layer can be named. ``fed``: BatchNormalization
        outputs whose running statistics are graph inputs (instrument.feed_statistics), their values taken
        from :attr:`fed_values` at each run. ``cut``: the graph keeps only the nodes its measuring outputs need
        (no model output is fetched), and runs in the order onnxruntime gives it."""
        self.handle = handle
        # nothing added to the graph: nothing to schedule first; a cut graph has no model outputs to order by
        self.reorder = reorder and bool(layers) and not cut
        self.cut = cut
        self.providers = providers or [CPU]
        self.layers = layers
        self.deferred = list(deferred or [])
        self.inputs_only = inputs_only
        self.copy = copy
        self.tmp = tmp or Scratch(handle.size_bytes)
        self.exact = False
        self.decomposed: dict[str, str] = {}
        self.runtime_nodes: list[RuntimeNode] = []
        self.largest_feed = 0  # bytes of the largest feeds run so far (see _run)
        self.initializer_stubs: list[Any] | None = None  # the weights this engine wrote, as external stubs
        self.notes: list[str] = []
        self.fed = tuple(fed)
        self.fed_inputs: dict[str, tuple[str, str]] = {}  # BN output -> its (mean, variance) graph inputs
        self.fed_values: dict[str, np.ndarray] = {}  # graph input -> the values fed at each run
        # runs the relaxed copy's proof already made on this engine's graph (see _take_proof)
        self.proven: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        try:
            self._open(exact=False)
        except BaseException:
            self.close()  # no temporary weights left behind when the model cannot run
            raise

    def _open(self, exact: bool) -> None:
        self.session = None  # free the previous session (and its weights) first
        # a train-mode BN runs by the spec's decomposition alone; its runtime deviation is measured on a
        # small model of its own (conformance.py), not beside the decomposition in every batch
        try:
            self._build(exact, keep_runtime=False)
        except BackendError:
            if not self.decomposed:
                raise
            # an output only the runtime's node writes (an old opset's saved mean) is read: keep the node
            self._build(exact, keep_runtime=True)
        self.exact = exact
        for plan in self.plans:
            if plan.input is None and plan.output is None:
                plan.note = f"{plan.layer.name}: not measured ({unmeasurable(plan.layer)})"
            if plan.note and plan.note not in self.notes:
                self.notes.append(plan.note)

    def _build(self, exact: bool, keep_runtime: bool) -> None:
        self.session = None
        try:
            aug = Augmenter(
                self.handle, self.layers, self.tmp, exact, self.inputs_only, keep_runtime, base=self.copy, fed=self.fed
            )
            self.fed_inputs = dict(aug.fed_inputs)
            if self.initializer_stubs is None:
                self.initializer_stubs = aug.initializer_stubs
            self.decomposed = dict(aug.decomposed)
            self.runtime_nodes = []
            if aug.runtime_protos:  # train-mode BNs only: conformance.py is imported for them alone
                from bncheck.backends.onnx.conformance import RuntimeNode

                self.runtime_nodes = [
                    RuntimeNode(p.layer, aug.runtime_protos[p.layer.output], aug.opset, int(aug.model.ir_version))
                    for p in aug.plans
                    if p.spec and p.layer.output in aug.runtime_protos
                ]
            model = aug.finish()
            if self.cut:
                keep_only(model.graph, aug.outputs)
            proof = self._take_proof(model, exact)
            self.plans = aug.plans
            # the model's own outputs too: the batch-dependence test compares them (probe_plan)
            self.model_outputs = [] if self.cut else [o.name for o in self.handle.model.graph.output]
            self.output_names = list(aug.outputs) + [o for o in self.model_outputs if o not in aug.outputs]
            main_outputs = {o.name for o in self.handle.model.graph.output}
            prepack = prepacks(model.graph, self._shapes())
            decompositions = aug.decompositions
            folder = aug.folder
            del aug
            self.session = None
            self.statistics_first = False
            self.spliced = False  # train-mode decompositions spliced into the optimized graph (splice.py)
            if self.providers != [CPU]:
                # the statistics-first re-ordering works on the CPU provider's optimized (NCHWc) graph
                try:
                    self.session = _session(model, folder, exact, self.providers, prepack)
                except Exception as exc:
                    self._to_cpu(runtime_message(exc))
                else:
                    if self.providers[0] not in self.session.get_providers():
                        # onnxruntime drops a provider it cannot start (no device, missing CUDA libraries)
                        # with a log line only: what runs is what the session reports
                        self._to_cpu("onnxruntime did not enable it")
            if proof is not None:
                self.session = proof.session
            if self.session is None and not exact and self.reorder:
                try:
                    self.session, self.spliced = _session_statistics_first(
                        model, folder, self.tmp, main_outputs, decompositions, prepack
                    )
                    self.statistics_first = True
                except Exception:
                    self.session = None
            if self.session is None:
                self.session = _session(model, folder, exact, prepack=prepack)
            del model
        except BackendError:
            raise
        except Exception as exc:
            as_written = _file_refused(self.handle.path, self.handle.model)
            if as_written is not None:  # the model itself, not what the probe added (custom ops, say)
                raise BackendError(
                    f"{self.handle.path}: onnxruntime cannot run the model (the file as written fails too): "
                    f"{as_written}"
                ) from exc
            raise BackendError(
                f"{self.handle.path}: onnxruntime cannot run the instrumented model: {runtime_message(exc)}"
            ) from exc

    def _shapes(self) -> Mapping[str, tuple[Dim, ...]]:
        """The shapes of this engine's graph (the probe copy's, or the file's)."""
        return self.handle.value_shapes if self.copy is None else self.copy.graph_shapes()

    def _take_proof(self, model: Any, exact: bool) -> Any:
        """The relaxed copy's proof (probe_copy.Proof) when this engine's graph is the proven one (nothing
        added: no layer measured, no train-mode BN replaced) on the CPU in the fast form; else None. Either
        way the copy lets go of it, so that an unused proof session is freed before this engine's is built."""
        copy = self.copy
        self.proven = []
        if copy is None or copy.proof is None:
            return None
        proof, copy.proof = copy.proof, None
        if exact or self.providers != [CPU] or model != copy.model:
            return None
        self.proven = list(proof.runs)
        return proof

    def _repeated(self, feeds: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray] | None:
        """The outputs of a run the proof already made on these very feeds (used once), or None."""
        for index, (fed, outputs) in enumerate(self.proven):
            same = fed.keys() == feeds.keys() and all(
                np.asarray(feeds[k]).dtype == fed[k].dtype and np.array_equal(fed[k], feeds[k]) for k in fed
            )
            if same and all(name in outputs for name in wanted):
                del self.proven[index]
                return {name: outputs[name] for name in wanted}
        return None

    def release_session(self) -> None:
        """Let go of the session and its arena; the engine's files stay (the locator's sessions read them)."""
        self.session = None

    def close(self, leave_session: bool = False) -> None:
        """Free the session and remove the engine's files; ``leave_session``: the process ends next
        (ProbeSettings.process_ends_after), its exit frees the session (destroying one takes 10-20 ms)."""
        if leave_session and self.session is not None:
            _LEFT_TO_EXIT.append(self.session)
        self.session = None
        self.proven = []
        self.tmp.remove()

    def _to_cpu(self, reason: str) -> None:
        """The GPU provider refused the instrumented model: the CPU provider alone from now on, said in a note."""
        self.notes.append(fallback_note(self.providers[0], reason))
        self.providers = [CPU]
        self.session = None

    def _run(self, feeds: dict[str, np.ndarray], layers: bool = True) -> dict[str, np.ndarray]:
        """The fetched tensors by name: every measuring output and the model's, or (``layers=False``) the
        model's own outputs alone."""
        if self.copy is not None and self.copy.fixed_feeds:
            feeds = {**feeds, **self.copy.fixed_feeds}
        if self.fed_values:
            feeds = {**feeds, **self.fed_values}
        assert self.session is not None  # built before any batch runs
        wanted = self.output_names if layers else self.model_outputs
        repeated = self._repeated(feeds, wanted) if self.proven else None
        if repeated is not None:
            return repeated
        size = sum(int(np.asarray(a).nbytes) for a in feeds.values())
        options = run_options()
        if size > self.largest_feed:
            # the largest batch so far grew the arena: hand back what the run no longer uses before the
            # statistics are decoded, which would otherwise add to the peak
            self.largest_feed = size
            options = _shrink_arena()
        try:
            values = self.session.run(wanted, feeds, options)
        except Exception as exc:
            if self.providers == [CPU]:
                raise BackendError(f"{self.handle.path}: onnxruntime failed: {runtime_message(exc)}") from exc
            # e.g. a kernel the GPU provider registers but rejects at run time: the same batch on the CPU
            self._to_cpu(runtime_message(exc))
            self._open(self.exact)
            return self._run(feeds, layers)
        return dict(zip(wanted, values))

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, LayerProbe]:
        return self.observe(feeds).layers

    def observe(self, feeds: dict[str, np.ndarray], layers: bool = True, *, inputs_only: bool = False) -> Observed:
        """Per-layer statistics of one batch, and the model's own outputs (those alone with ``layers=False``).
        ``inputs_only`` changes nothing here: the graph measures the outputs in the same kernels' pass."""
        values = self._run(feeds, layers)
        if not layers:
            return Observed({}, values)
        if self.deferred and not outputs_clear(values[name] for name in self.model_outputs):
            self.notes.append(
                "NaN/Inf in the model's outputs: every normalization layer measured from then on, with exact counts"
            )
            self.layers = [*self.layers, *self.deferred]
            self.deferred = []
            self._open(exact=True)
            return self.observe(feeds)
        spec = _spec_layers([plan for plan in self.plans if _side_by_side(plan)], values)
        decoded: dict[int, TensorStats] = {}
        for plan in self.plans:
            if id(plan) in spec:
                continue
            for m in (plan.input, plan.output, plan.runtime):
                if m is not None and id(m) not in decoded:
                    _refuse_empty(m, values, plan.layer.name)
                    stats = _decode(m, values)
                    if not self.exact and _needs_exact(m, stats):
                        self.notes.append("NaN/Inf seen: statistics measured with exact counts (slower)")
                        self._open(exact=True)
                        return self.observe(feeds)
                    decoded[id(m)] = stats
        probes: dict[str, LayerProbe] = {}
        for plan in self.plans:
            get = lambda m: decoded.get(id(m)) if m is not None else None
            inp: TensorStats | None
            out: TensorStats | None
            if id(plan) in spec:
                inp, out = spec[id(plan)]
            else:
                inp, out = get(plan.input), get(plan.output)
                if plan.affine is not None and out is not None:
                    inp = _derive_input(out, *plan.affine)
                elif plan.affine is not None and inp is not None:  # measured at its input (Augmenter._plan)
                    out = _derive_output(inp, *plan.affine)
                if plan.spec_affine is not None and inp is not None and plan.input is not None:
                    scale, bias = plan.spec_affine
                    eps = float(plan.layer.epsilon or 0.0)
                    out = _derive_spec_output(inp, plan.input, values, scale, bias, eps)
            source = out or inp
            batch = source.batch_size if source is not None else 0
            if plan.spec and out is not None:
                runtime = get(plan.runtime)
                dev = _deviation(runtime, out) if runtime is not None else None
                probes[plan.layer.name] = LayerProbe(plan.layer.name, batch, inp, out, "spec", dev)
            elif inp is not None or out is not None:
                probes[plan.layer.name] = LayerProbe(plan.layer.name, batch, inp, out)
        return Observed(probes, {name: values[name] for name in self.model_outputs})


#: ONNX element types whose values can be NaN/Inf: FLOAT, FLOAT16, DOUBLE, BFLOAT16, the FLOAT8 kinds
_FLOAT_TYPES = frozenset({1, 10, 11, 16, 17, 18, 19, 20})


def _gather_tables(handle: OnnxHandle) -> dict[str, int]:
    """Rows of the table each integer graph input indexes through a Gather (its valid range), the input read
    directly or through graph.TRANSPARENT ops (onnx.compose's merge_models puts an Identity after each input,
    tf2onnx a Cast); the table an initializer or a Constant node."""
    graph = handle.model.graph
    gathers = [n for n in graph.node if n.op_type == "Gather" and len(n.input) >= 2 and n.domain in ONNX_DOMAINS]
    if not gathers:
        return {}
    tables = {t.name: list(t.dims) for t in graph.initializer}
    source: dict[str, str] = {}  # a tensor -> the tensor whose values it holds
    for node in graph.node:
        if node.op_type in TRANSPARENT and node.input and node.output and node.domain in ONNX_DOMAINS:
            source[node.output[0]] = node.input[0]
        elif node.op_type == "Constant" and node.output:
            tables.update((node.output[0], list(a.t.dims)) for a in node.attribute if a.name == "value")
    highs: dict[str, int] = {}
    for node in gathers:
        dims = tables.get(node.input[0])
        if not dims:
            continue
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
        rows = int(dims[axis % len(dims)])
        name, seen = node.input[1], set()
        while name in source and name not in seen:  # back to the graph input (a cycle cannot be, but bounds it)
            seen.add(name)
            name = source[name]
        highs[name] = min(highs.get(name, rows), rows)
    return highs


def run_probe(view: ModelView, settings: ProbeSettings, release_weights: bool = True) -> ProbeResult:
    """Probe every normalization layer of an ONNX model (see the module docstring).

    With ``release_weights`` (default), ``view.handle.model`` is a weight-less skeleton while the batches
    run and is reloaded from ``view.handle.path`` when next read (see :func:`release`); pass False when
    the handle's model carries in-memory edits that are not in the file.
    """
    handle = view.handle
    fixed = fixed_batch(view.inputs)
    if settings.default_sizes:
        settings = replace(settings, batch_sizes=default_batch_sizes(fixed))
    # without normalization layers too: the model's outputs are still tested for batch dependence
    preflight(view, settings)  # --input-shape names, sizes, a shared batch: before any session
    estimate: memory.Estimate | None = None  # the memory check of the file itself, where it runs as it is

    def check_file() -> None:
        nonlocal estimate
        largest = largest_batch(view.inputs, settings.batch_sizes)
        skeleton, handle.spare_skeleton = handle.spare_skeleton, None
        estimate = memory.check_probe(
            handle.model, handle.value_shapes, handle.value_types, view.inputs, settings, largest, skeleton
        )

    # a fixed batch that prepare tries to relax is checked there, on the relaxed copy, at the file's size too
    relaxing = relaxes(view.inputs, settings.batch_sizes)
    if settings.batch_sizes and not relaxing:
        check_file()
    providers = resolve(settings.provider)
    int_high = _gather_tables(handle)
    # a NaN/Inf that would name the deferred layers shows only in a floating-point output (not in an ArgMax's)
    float_outputs = any(handle.value_types.get(o.name) in _FLOAT_TYPES for o in handle.model.graph.output)
    deferred = [layer for layer in view.layers if float_outputs and not needs_statistics(layer, settings)]
    # the engine measures a layer, so builds its own graph: a relaxed batch is proven by its runs
    measures = len(deferred) < len(view.layers) or providers != [CPU]
    engines: list[_Engine] = []
    restorers: list[Any] = []

    def stubbed(stubs: list[Any] | None) -> None:
        if release_weights:  # the weights are in files now: no second copy while sessions hold theirs
            restorers.append(release(handle, stubs))

    def discard(folder: Scratch, last: bool = False) -> None:
        """The copy in ``folder`` given up: its engines closed, its weights removed, and the handle's own
        weights back (lazily: reloaded when handle.model is next read). ``last``: no session follows."""
        # a session left to the exit keeps its memory: only where no other session is built after it
        leave = last and settings.process_ends_after and settings.data is None
        for engine in engines:
            engine.close(leave_session=leave)
        engines.clear()
        folder.remove()
        for restore in restorers:
            restore()
        restorers.clear()

    def prepared(folder: Scratch, proof_by_probe: bool, refused: OutputsRefuse | None = None) -> ProbeCopy:
        copy = prepare(handle, view, settings, folder, int_high, stubbed, proof_by_probe, refused, not measures)
        # a fixed batch relaxed runs every size now, its copy checked before its proof; else the file's own
        if copy.inputs == view.inputs:
            if relaxing:  # not relaxed after all: the file's own size runs
                check_file()
            copy.estimate = estimate
        handle.spare_skeleton = None  # the file's own check has run, or a relaxed copy runs instead
        return copy

    def open_engine() -> Runner:
        # built inside run_plan, while it draws the synthetic inputs in a worker thread
        engine = _Engine(
            handle,
            [layer for layer in view.layers if layer not in deferred],
            copy=copy,
            tmp=tmp,
            providers=providers,
            reorder=worth_reordering(copy.estimate.busiest if copy.estimate else None, handle.size_bytes),
            deferred=deferred,
        )
        engines.append(engine)
        trim_heap()
        return engine.observe

    def locate(batch: dict[str, np.ndarray], copies: dict[str, np.ndarray], row: int, size: int):
        from bncheck.backends.onnx.locate import locate_dependence

        # the last thing the plan does: the probe's session and its arena go before the bisection's sessions
        for engine in engines:
            engine.release_session()
        trim_heap()
        suspects = [op.output for op in _tested_ops(view, copy)]
        return locate_dependence(handle, engines[0].tmp, batch, copies, row, size, base=copy, suspects=suspects)

    effect_data, effect_note = _effect_data(view, settings)
    tmp = Scratch(handle.size_bytes)
    try:  # from here on every way out (an error, the memory check's refusal, SIGTERM) removes the folder
        copy = prepared(tmp, measures)
        runner = _proven_by_probe(copy, open_engine, engines, view.inputs) if copy.pending is not None else None
        if copy.pending is not None:  # the relaxed copy failed on the probe's graph: proven on its own now
            discard(tmp)  # its folder removed; the copy proven on its own makes a new one if it writes
            copy = prepared(tmp, False, copy.refused)
        try:
            result = run_plan(
                replace(view, inputs=copy.inputs, batch_ops=_tested_ops(view, copy)),
                settings,
                runner,
                open_runner=None if runner is not None else open_engine,
                int_high=int_high,
                locate=locate,
                drawn=copy.drawn,
                keep_outputs=_effect_samples(effect_data),
            )
        except BackendError as exc:
            if not copy.unconverted:
                raise
            # the converter failed and onnxruntime has no kernel for the old opset: the static findings stand
            return ProbeResult(
                batch_sizes=(),
                layers={},
                data_source=settings.data_source,
                seed=settings.seed,
                requested_batch_sizes=tuple(settings.batch_sizes),
                notes=[*copy.notes, f"not probed: {one_line(exc)}"],
            )
        _add_runtime_deviations(result, engines[0].runtime_nodes, settings.seed)
        result.notes[:0] = [n for n in copy.notes if n not in result.notes]
        ran = ran_note(engines[0].providers, settings.provider)
        result.notes.extend(n for n in [*engines[0].notes, *([ran] if ran else [])] if n not in result.notes)
        result.batch_handling = copy.batch
        if fixed is not None and fixed_batch(copy.inputs) is None and settings.default_sizes:
            result.notes.append(_default_sizes_note(settings.batch_sizes, fixed))
        for plan in engines[0].plans:
            if plan.input is None and plan.output is None:
                result.unmeasured[plan.layer.name] = unmeasurable(plan.layer)
        leave_unmeasured(result, [layer.name for layer in engines[0].deferred])
    finally:
        discard(tmp, last=True)
    flagged = drifting_layers(view, result)
    stored, result.data_outputs = result.data_outputs, None
    if flagged and effect_data is not None:
        from bncheck.backends.onnx.effect import recalibration

        announce(settings.progress, EFFECT_STAGE)
        found = recalibration(handle.path, effect_data, flagged, handle.fix_passes, stored, result)
        if isinstance(found, str):
            result.notes.append(f"output effect of the drifting statistics not measured: {found}")
        else:
            result.recalibration = found
            if effect_note:
                result.notes.append(effect_note)
    return result


def _tested_ops(view: ModelView, copy: ProbeCopy) -> list[BatchOp]:
    """The reductions over the batch axis the dependence test judges: the file's, or, where the probe relaxed a
    batch the file fixes to 1, those the relaxed batch reaches (a re-export with a free batch would mix them)."""
    return view.batch_ops or (view.relaxed_batch_ops if copy.relaxed_shapes is not None else [])


def _effect_data(view: ModelView, settings: ProbeSettings) -> tuple[Mapping[str, np.ndarray] | None, str | None]:
    """What BN003's output effect recomputes the statistics from (probe_data.recalibration_data), and the
    probe's note when that is not all the data; (None, None) without data."""
    from bncheck.probe_data import recalibration_data

    if settings.data is None:
        return None, None
    if settings.recalibrate_all:
        return settings.data, None
    return recalibration_data(settings.data, [spec.name for spec in view.inputs if spec.batched])


def _effect_samples(data: Mapping[str, np.ndarray] | None) -> int:
    """The samples whose outputs the effect compares (effect.MAX_SAMPLES at most): the plan keeps the stored
    model's outputs on them from its own runs over the data."""
    if not data:  # without data there is no effect to measure: effect.py and its imports are not needed
        return 0
    from bncheck.backends.onnx.effect import MAX_SAMPLES
    from bncheck.probe_data import sample_count

    return min(sample_count(data), MAX_SAMPLES)


def _proven_by_probe(
    copy: ProbeCopy, open_engine: Callable[[], Runner], engines: list[_Engine], inputs: list[InputSpec]
) -> Runner | None:
    """The engine built on the relaxed copy, whose first runs proved the relaxation (ProbeCopy.pending) and are
    kept for the plan's runs of the same feeds. Where the outputs refuse it and no constant was rewritten,
    the same engine runs the file's own size (``inputs``: the file's), where the relaxed copy is the file's
    graph, starting with the proof's run there: no second engine of the file. None when the engine cannot
    be built or its runs fail the proof otherwise (``copy.pending`` is then left set)."""
    assert copy.pending is not None
    try:
        observe = open_engine()
    except BackendError:
        return None
    engine = engines[-1]
    found = copy.pending(engine._run)  # every output it fetches: the measuring ones and the model's
    if isinstance(found, OutputsRefuse) and found.at_fixed is not None and not copy.batch_constants:
        keep_fixed_batch(copy, inputs, found)
        engine.proven, copy.drawn = [found.at_fixed], found.drawn
        copy.pending = None
        return observe
    if isinstance(found, str):
        copy.refused = found if isinstance(found, OutputsRefuse) else None
        return None
    engine.proven, copy.drawn = found
    copy.pending = None
    return observe


def _add_runtime_deviations(result: ProbeResult, nodes: list[RuntimeNode], seed: int) -> None:
    """Each spec-computed layer's runtime deviation (conformance.py) where its batches did not measure one."""
    if not nodes or not result.batch_sizes:
        return
    from bncheck.backends.onnx.conformance import runtime_deviations

    found, note = runtime_deviations(nodes, tuple(result.batch_sizes), seed)
    if note is not None and note not in result.notes:
        result.notes.append(note)
    for batch, layers in result.layers.items():
        for name, by_batch in found.items():
            seen = layers.get(name)
            if seen is not None and seen.source == "spec" and seen.runtime_deviation is None and batch in by_batch:
                layers[name] = replace(seen, runtime_deviation=by_batch[batch])


def _default_sizes_note(sizes: tuple[int, ...], fixed: int) -> str:
    """Why the default sizes ran for a file whose fixed batch was relaxed."""
    text = f"batch sizes {','.join(map(str, sizes))}: the file fixes the batch to {fixed} (relaxed for the dependence test)"
    if sizes != DEFAULT_BATCH_SIZES:
        text += f"; pass --batch-sizes to probe {'larger' if fixed < max(DEFAULT_BATCH_SIZES) else 'other'} batches"
    return text


def measure_inputs(
    handle: OnnxHandle,
    layers: list[NormLayer],
    batches: Iterable[dict[str, np.ndarray] | tuple[dict[str, np.ndarray], int]],
    activations: int | None = None,
) -> dict[str, TensorStats]:
    """Each layer's input statistics accumulated over all ``batches`` (inference mode, model as is).

    A batch may come as (feeds, n): only its first n samples count (a fixed-batch model's last batch
    completed with repeats, see bncheck.fix_result.calibration_batches). ``activations``: the busiest
    node's bytes at the batch size (memory.estimate), for :func:`worth_reordering`."""
    engine = inputs_engine(handle, layers, activations)
    try:
        return measure_with(engine, batches)
    finally:
        engine.close()


def inputs_engine(
    handle: OnnxHandle,
    layers: list[NormLayer],
    activations: int | None = None,
    fed: Iterable[str] = (),
    cut: bool = False,
) -> _Engine:
    """The engine that measures ``layers``' inputs (see :func:`measure_inputs`); ``fed``, ``cut``: see
    :class:`_Engine`."""
    engine = _Engine(
        handle,
        layers,
        inputs_only=True,
        reorder=worth_reordering(activations, handle.size_bytes),
        fed=fed,
        cut=cut,
    )
    trim_heap()  # the optimizing session's freed heap back to the OS
    return engine


def measure_with(
    engine: _Engine, batches: Iterable[dict[str, np.ndarray] | tuple[dict[str, np.ndarray], int]]
) -> dict[str, TensorStats]:
    """Each of ``engine``'s layers' input statistics accumulated over all ``batches`` (see :func:`measure_inputs`)."""
    parts: dict[str, list[TensorStats]] = {}
    for batch in batches:
        feeds, real = batch if isinstance(batch, tuple) else (batch, None)
        fed = len(next(iter(feeds.values()))) if feeds else None  # the data hold their samples on axis 0
        for name, probe in engine(feeds).items():
            if probe.input is not None:
                parts.setdefault(name, []).append(
                    probe.input if real is None else first_samples(probe.input, real, fed)
                )
    return {name: merge_stats(items) for name, items in parts.items()}
