"""Run probe batches through a Keras model: the only module of bncheck that imports keras.

Order of business, so that a hostile file never runs: the static reader's list of code-carrying layers
(Lambda, objects from outside Keras) is checked first and the probe is refused, naming the layer, before
keras is even imported; then the file is loaded with ``keras.saving.load_model(path, safe_mode=True)``,
never ``safe_mode=False``, and without custom objects, so anything unknown to Keras fails to load.

Capture: each normalization layer's ``call`` is wrapped on the instance (recursing into nested models), so
every call of the layer, a shared layer's too, hands its input and output to :func:`tensor_stats` and only
the small per-channel summaries are kept (sub-models over ``layer.output`` fail for layers inside nested
models and see only the first call of a shared layer). A layer called several times in one forward pass has
its calls pooled as if they were more positions of the same sample; the probe result notes it.

Call styles: "as-written" calls ``model(x)`` with ``training`` left unset, so a baked ``training=True``
takes effect as it would in the user's code; "predict" calls ``model(x, training=False)``, which is what
``model.predict`` passes in Keras 3. Both are eager calls (``model.predict`` would trace the wrapped calls
under jit on the jax backend).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from bncheck import budget
from bncheck.backends.base import BackendError, ProbeSettings
from bncheck.backends.keras import memory
from bncheck.backends.keras.archive import KerasFile
from bncheck.backends.keras.config import few_reasons
from bncheck.backends.keras.legacy import NAME_SLASH, foreign_classes, load_patched, refusal, semantic_notes
from bncheck.budget import OverBudgetError, format_size
from bncheck.errors import few, one_line
from bncheck.model import (
    EFFECT_STAGE,
    Kind,
    LayerProbe,
    ModelView,
    NormLayer,
    ProbeResult,
    Recalibration,
    TensorStats,
    announce,
    fixed_batch,
    largest_batch,
)
from bncheck.probe_data import probe_feeds, recalibration_data, sample_count
from bncheck.probe_plan import Observed, Runner, leave_unmeasured, needs_statistics, outputs_clear
from bncheck.verdicts import Drift, drift, drifts, folded_stats, frozen_with_stats

#: Oldest Keras accepted for probing: every safe_mode bypass published so far is fixed in 3.11.3.
MIN_KERAS = (3, 11, 3)
#: the keras extra's own packages: `pip install 'bncheck[keras]'` would fetch whatever holds the name
#: bncheck on the package index (no release of this project is published there)
INSTALL_HINT = "pip install 'keras>=3.12' jax"

#: the most bytes the busiest layer (memory.busiest_layer) may read and write in the effect's one batch over the
#: data: Keras's eager pass holds much more than that lower bound (about 11x on fer_emotion_h5's convolutions)
RECALIBRATION_LAYER_BYTES = 64_000_000

AS_WRITTEN = "as-written"
PREDICT = "predict"


def import_keras(path: str) -> Any:
    """Import keras, choosing the numpy backend when the user has not chosen one.

    numpy, not Keras's default tensorflow: the fastest and lightest backend for inference
    (docs/architecture.md), and the default tensorflow backend fails when TensorFlow is not installed, which
    bncheck does not require.
    KERAS_BACKEND must be set before keras is first imported; a user's own setting is respected.
    """
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    try:
        import keras
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing.split(".")[0] == "keras":
            raise BackendError(f"{path}: running a Keras model (probe, fix) needs Keras: {INSTALL_HINT}") from None
        backend = os.environ.get("KERAS_BACKEND", "")
        raise BackendError(
            f"{path}: keras cannot start with KERAS_BACKEND={backend!r} ({missing or exc} is not installed): "
            f"unset KERAS_BACKEND to use the numpy backend, or install it"
        ) from None
    version = tuple(int(p) for p in re.findall(r"\d+", keras.__version__)[:3])
    if version < MIN_KERAS:
        raise BackendError(
            f"{path}: keras {keras.__version__} is older than 3.11.3, whose safe_mode can be bypassed: "
            f"{INSTALL_HINT} --upgrade"
        )
    return keras


def refuse_unsafe(static: KerasFile, command: str = "probe") -> None:
    """Refuse, before anything is imported or loaded, a file whose config carries code, or that holds no model;
    ``command`` names what was asked for ("probe" or "fix")."""
    if static.weights_only:
        raise BackendError(
            f"{static.path}: a weights-only file (model.save_weights) holds no model to run: bncheck inspect checks "
            f"the stored statistics of the BatchNormalization layers it holds ({len(static.layers)}); "
            f"to {command}, save the whole model with model.save()"
        )
    if static.unsafe:
        raise BackendError(
            f"{static.path}: refusing to {command}, nothing was executed: {few_reasons(static.unsafe)} "
            "(bncheck inspect still reads the file)"
        )


def refuse_foreign(static: KerasFile, command: str = "probe") -> Any:
    """Keras, imported; refuses a Keras 1/2 file naming layer classes Keras does not have, before any other
    question (input sizes) and before the load trips over something else first."""
    keras = import_keras(static.path)
    foreign = foreign_classes(keras, static)
    if foreign:
        raise BackendError(
            f"{static.path}: refusing to {command}, nothing was loaded: layer class(es) {few(foreign)} of this Keras "
            f"{static.keras_version} file are not Keras {keras.__version__}'s (custom code the file does not "
            "carry); bncheck inspect still reads the file"
        )
    return keras


def load(keras: Any, path: str, saved_by: str | None = None, h5: bool = False) -> Any:
    """The model, by Keras's safe loader; ``saved_by``: the file's Keras version, named in a refusal where it
    is older than 3 (Keras 3 reads Keras 1/2 files only in part: a Sequential config stored as a list, legacy
    layer classes). ``h5``: the file is HDF5, which Keras 3 picks its loader for by the name alone."""
    import contextlib
    import tempfile

    with contextlib.ExitStack() as stack:
        source = path
        if h5 and not path.lower().endswith((".h5", ".hdf5")):
            source = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="bncheck-keras-")), "model.h5")
            try:
                os.symlink(os.path.abspath(path), source)
            except OSError:  # no symlinks here (Windows without the privilege): a copy
                import shutil

                shutil.copyfile(path, source)
        try:
            # safe_mode=True only: a lambda or any object outside Keras fails to load instead of running.
            # Keras's deprecation warnings would litter stderr, which the CLI keeps for one-line errors.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return keras.saving.load_model(source, compile=False, safe_mode=True)
        except Exception as exc:  # keras raises ValueError/TypeError/KeyError/OSError on what it cannot load
            raise refusal(keras, path, saved_by, exc) from None


def _with_backend_hint(exc: BackendError, static: KerasFile, keras: Any) -> BackendError:
    """``exc``, saying why where the file holds a synchronized BatchNormalization, which Keras 3 builds only on
    its TensorFlow backend (its refusal on the others names neither the layer nor the backend)."""
    backend = keras.backend.backend()
    synchronized = [layer.name for layer in static.layers if layer.extra.get("synchronized")]
    if not synchronized or backend == "tensorflow":
        return exc
    return BackendError(
        f"{exc}; its BatchNormalization(synchronized=True) ({few(synchronized)}) loads only on Keras's TensorFlow "
        f"backend, not {backend}: run bncheck with KERAS_BACKEND=tensorflow (bncheck inspect reads it on any)"
    )


def find_layers(model: Any, names: list[str]) -> dict[str, Any]:
    """Keras layer objects by bncheck path ("inner/bn1"), recursing into nested models."""
    found: dict[str, Any] = {}
    wanted = set(names)

    def walk(container: Any, prefix: str) -> None:
        for layer in getattr(container, "layers", []):
            name = layer.name
            path = f"{prefix}/{name}" if prefix else name
            # a name the loaded copy holds with a division slash for the file's '/' (legacy._without_slash); a
            # Keras 3 file can hold that character itself (a model `fix` wrote from such a copy)
            if NAME_SLASH in name and path not in wanted and not any(n.startswith(path + "/") for n in wanted):
                name = name.replace(NAME_SLASH, "/")
                path = f"{prefix}/{name}" if prefix else name
            if path in names and path not in found:
                found[path] = layer
            if hasattr(layer, "layers"):
                walk(layer, path)
            elif layer.__class__.__name__ == "TimeDistributed":  # its wrapped layer runs on every frame
                walk(_Holder(layer.layer), path)

    walk(model, "")
    return found


class _Holder:
    """One layer as a container's ``layers``, for find_layers."""

    def __init__(self, layer: Any) -> None:
        self.layers = [layer]


def channel_axis_of(norm: NormLayer, layer: Any, rank: int) -> int:
    """The per-channel axis for statistics: the static one, else from the live layer's ``axis``."""
    if norm.channel_axis is not None and norm.input_shape is not None and len(norm.input_shape) == rank:
        return norm.channel_axis
    axis = getattr(layer, "axis", -1)
    if isinstance(axis, (list, tuple)):
        axis = axis[-1] if norm.kind is not Kind.GROUP else axis[0]
    return int(axis) % rank


class _Capture:
    """Per forward pass: every call's input/output statistics of every wrapped layer."""

    def __init__(self, stats: Callable[..., TensorStats]) -> None:
        self.stats = stats
        self.seen: dict[str, list[tuple[TensorStats, TensorStats | None]]] = {}
        # layers whose moving statistics are set, on each call, to the statistics of the batch they receive
        # (see recalibration): True always, False where those drift from the stored ones; and those set
        self.recompute: dict[str, bool] = {}
        self.recomputed: list[str] = []
        # layer -> its drift numbers, for a flagged layer whose input no longer drifts once layers set before it
        # in the pass are recomputed (the pass's order stands for "above": exact in a chain of layers)
        self.settled: dict[str, dict[str, float | int]] = {}
        # layers not measured until the model's outputs hold NaN/Inf (probe_plan.needs_statistics): numpy
        # statistics of every call were half of a probe's time on spliceai's 32 BNs
        self.skip: set[str] = set()
        self.inputs_only = False  # a run over the data: the outputs' statistics are not read (probe_plan.Runner)

    def wrap(self, name: str, norm: NormLayer, layer: Any, to_numpy: Callable[[Any], np.ndarray]) -> None:
        original = layer.call
        capture = self

        def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if name in capture.recompute:
                done, found = _set_moving_stats(layer, norm, to_numpy(inputs), capture.recompute[name])
                if done:
                    if found is not None and capture.recomputed and not drifts(found):
                        capture.settled[name] = found.evidence()
                    capture.recomputed.append(name)
            outputs = original(inputs, *args, **kwargs)
            if name in capture.skip:
                return outputs
            x = to_numpy(inputs)
            axis = channel_axis_of(norm, layer, x.ndim)
            y = None if capture.inputs_only else capture.stats(to_numpy(outputs), axis)
            capture.seen.setdefault(name, []).append((capture.stats(x, axis), y))
            return outputs

        # An instance attribute shadows the class's call; Layer.__call__ looks it up on the instance.
        object.__setattr__(layer, "call", call)


def _set_moving_stats(layer: Any, norm: NormLayer, x: np.ndarray, always: bool = True) -> tuple[bool, Drift | None]:
    """The layer's moving mean and variance := the population statistics of ``x`` per channel, ``always`` or
    where those drift from the stored ones (``norm``'s; BN003's thresholds), as `fix` decides. Returns whether
    set, and the stored statistics' drift from ``x``'s (None where they cannot be compared)."""
    axis = channel_axis_of(norm, layer, x.ndim)
    others = tuple(a for a in range(x.ndim) if a != axis)
    wide = np.asarray(x, np.float64)
    mean, var = wide.mean(axis=others), wide.var(axis=others)
    stored = norm.mean is not None and np.size(norm.mean) == mean.size
    found = drift(norm, mean, var) if stored else None
    if not always and not (found is not None and drifts(found)):
        return False, found
    for variable, value in ((layer.moving_mean, mean), (layer.moving_variance, var)):
        variable.assign(value.astype(np.dtype(str(variable.dtype))))
    return True, found


def pool(calls: list[TensorStats]) -> TensorStats:
    """Several calls of one layer in one pass, as more positions of each sample (counts weight the means)."""
    if len(calls) == 1:
        return calls[0]
    per_sample = [c.count / max(c.batch_size, 1) for c in calls]
    total = sum(per_sample)
    return TensorStats(
        batch_size=calls[0].batch_size,
        count=sum(c.count for c in calls),
        sample_mean=np.sum([w * c.sample_mean for w, c in zip(per_sample, calls)], axis=0) / total,
        sample_sq=np.sum([w * c.sample_sq for w, c in zip(per_sample, calls)], axis=0) / total,
        min=np.minimum.reduce([c.min for c in calls]),
        max=np.maximum.reduce([c.max for c in calls]),
        zeros=np.sum([c.zeros for c in calls], axis=0),
        nonfinite=np.sum([c.nonfinite for c in calls], axis=0),
    )


class KerasRunner:
    """A loaded model with wrapped norm layers; ``runner(style)`` is a probe-plan Runner for that style."""

    def __init__(self, view: ModelView, static: KerasFile) -> None:
        refuse_unsafe(static)  # first: nothing imported, nothing loaded
        from bncheck.probe_plan import tensor_stats

        self.keras = import_keras(static.path)  # its callers refused foreign classes first (refuse_foreign)
        self.path = static.path
        # a Keras 1/2 file that Keras 3 loads can still fail at its first call: the error says who wrote it
        self.written_by = f"Keras {static.keras_version}" if static.keras2 else None
        self.view = view
        patched = load_patched(self.keras, static)
        # how Keras 3 loads and computes this file differently from the Keras that wrote it
        self.loaded_notes: list[str] = ([patched[1]] if patched else []) + semantic_notes(self.keras, static)
        try:
            h5 = static.format == "h5"
            self.model = patched[0] if patched else load(self.keras, static.path, static.keras_version, h5)
        except BackendError as exc:
            raise _with_backend_hint(exc, static, self.keras) from None
        names = [layer.name for layer in view.layers]
        self.layers = find_layers(self.model, names)
        missing = [n for n in names if n not in self.layers]
        if missing:
            raise BackendError(f"{self.path}: keras loaded the model without layer(s) {few(missing)}")
        self.capture = _Capture(tensor_stats)
        convert = self.keras.ops.convert_to_numpy
        # the numpy backend's tensors are arrays already, which its convert_to_numpy copies (np.array); the
        # wrapped calls only read them
        to_numpy = lambda t: t if isinstance(t, np.ndarray) else np.asarray(convert(t))
        for norm in view.layers:
            self.capture.wrap(norm.name, norm, self.layers[norm.name], to_numpy)
        self.input_names = [spec.name for spec in view.inputs]
        # the predict-style probe over --data (its data and result): fix's first pass would measure the same
        self.data_probe: tuple[Mapping[str, np.ndarray], ProbeResult] | None = None
        self.shared: set[str] = set()
        self.notes: list[str] = []
        # a file's config declares no output shapes; the built model's tell class scores (probe_plan) as an
        # ONNX file's declared dims do (None: free)
        shapes = [getattr(t, "shape", None) for t in getattr(self.model, "outputs", None) or []]
        if shapes and all(isinstance(shape, tuple) for shape in shapes):
            view.output_shapes = dict(zip(self._output_names(len(shapes)), shapes))

    def run(self, feeds: dict[str, np.ndarray], style: str) -> dict[str, LayerProbe]:
        return self.observe(feeds, style).layers

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        """The model's outputs by name (Keras's output names, else positions)."""
        convert = self.keras.ops.convert_to_numpy
        if isinstance(result, dict):
            return {str(k): np.asarray(convert(v)) for k, v in result.items()}
        items = list(result) if isinstance(result, (list, tuple)) else [result]
        return {name: np.asarray(convert(item)) for name, item in zip(self._output_names(len(items)), items)}

    def _output_names(self, count: int) -> list[str]:
        """The names of ``count`` outputs: Keras's output names, else positions."""
        names = [str(name) for name in getattr(self.model, "output_names", None) or []]
        return names if len(names) == count else [f"output_{i}" for i in range(count)]

    def observe(
        self, feeds: dict[str, np.ndarray], style: str, layers: bool = True, inputs_only: bool = False
    ) -> Observed:
        """Per-layer statistics of one batch and the model's outputs (those alone with ``layers=False``; the
        layers' input statistics alone with ``inputs_only``)."""
        if inputs_only:
            self.capture.inputs_only = True
            try:
                return self.observe(feeds, style, layers)
            finally:
                self.capture.inputs_only = False
        if not layers:
            kept, self.capture.skip = self.capture.skip, set(self.layers)
            try:
                return Observed({}, self._forward(feeds, style))
            finally:
                self.capture.skip = kept
        outputs = self._forward(feeds, style)
        if self.capture.skip and not outputs_clear(outputs.values()):
            # a NaN/Inf could not show in these outputs, or it does: every layer is measured from now on
            self.capture.skip = set()
            self.notes.append(
                "every normalization layer measured: the model's outputs hold NaN/Inf or are not floating-point"
            )
            return self.observe(feeds, style)
        arrays = [feeds[name] for name in self.input_names]
        batch = int(arrays[0].shape[0]) if arrays and np.ndim(arrays[0]) else 1
        out: dict[str, LayerProbe] = {}
        for name, calls in self.capture.seen.items():
            if len(calls) > 1:
                self.shared.add(name)
            out[name] = LayerProbe(
                layer=name,
                batch_size=batch,
                input=pool([c[0] for c in calls]),
                output=None if self.capture.inputs_only else pool([c[1] for c in calls if c[1] is not None]),
            )
        return Observed(out, outputs)

    def _arguments(self, feeds: dict[str, Any]) -> Any:
        """The model's call argument from values by input name: a dict for a model built with a dict of
        inputs, else the one value or the list."""
        if isinstance(getattr(self.model, "input", None), dict):
            return {key: feeds[tensor.name] for key, tensor in self.model.input.items()}
        arrays = [feeds[name] for name in self.input_names]
        return arrays[0] if len(arrays) == 1 else arrays

    def sample_calls(self, settings: ProbeSettings) -> memory.Calls | None:
        """The layers sized for one sample as the probe feeds it (memory.sample_calls), where the model's inputs
        leave a dim other than the batch open; None otherwise or when Keras cannot size them."""
        if not memory.open_dims(self.model):
            return None
        samples = probe_feeds(self.view.inputs, 1, settings.input_shapes, settings.data)
        values = {
            spec.name: self.keras.KerasTensor(samples[spec.name], dtype=spec.dtype)
            for spec in self.view.inputs
            if spec.name in samples
        }
        if len(values) != len(self.view.inputs):
            return None
        kept, self.capture.skip = self.capture.skip, set(self.layers)  # shapes only: no statistics
        try:
            return memory.sample_calls(self.keras, self.model, self._arguments(values))
        finally:
            self.capture.skip = kept

    def _forward(self, feeds: dict[str, np.ndarray], style: str) -> dict[str, np.ndarray]:
        """One call of the model in ``style``; the wrapped layers record into ``capture.seen``."""
        args = self._arguments(feeds)
        self.capture.seen = {}
        try:
            # NaN/Inf in activations are measured and reported (BN005); numpy's warnings would only litter
            # stderr, which the CLI keeps for one-line errors.
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if style == AS_WRITTEN:
                    # a baked training=True call updates the moving statistics in Keras 3: keep the loaded
                    # ones, which every later run (the predict style, fix) must see as stored
                    kept = [np.array(v) for v in self.model.non_trainable_variables]
                    try:
                        result = self.model(args)
                    finally:
                        for variable, value in zip(self.model.non_trainable_variables, kept):
                            variable.assign(value)
                else:
                    result = self.model(args, training=False)
        except BackendError:
            raise
        except Exception as exc:
            text = one_line(exc)
            written = (
                f"; the file was saved by {self.written_by}, whose configs Keras {self.keras.__version__} reads only "
                "in part"
                if self.written_by
                else ""
            )
            raise BackendError(f"{self.path}: keras failed to run the model ({text}){written}") from None
        return self._outputs(result)

    def runner(self, style: str) -> Runner:
        return lambda feeds, layers=True, *, inputs_only=False: self.observe(feeds, style, layers, inputs_only)


def call_styles(static: KerasFile) -> list[str]:
    """Both styles when a training flag is baked (and can matter), else the inference style only."""
    return [AS_WRITTEN, PREDICT] if static.baked else [PREDICT]


def probe_keras(view: ModelView, static: KerasFile, settings: ProbeSettings) -> list[ProbeResult]:
    refuse_unsafe(static)
    if static.runner is None:
        refuse_foreign(static)
    from bncheck.backends.keras.pieces import likely_over, split_runner
    from bncheck.probe_plan import drifting_layers, preflight, run_plan

    preflight(view, settings)  # before Keras loads the model
    runner = static.runner if static.runner is not None else KerasRunner(view, static)
    static.runner = runner  # fix, after probing the original, runs this same loaded model
    calls = runner.sample_calls(settings)
    if settings.batch_sizes:  # the loaded model's layer shapes, before any batch runs
        largest = largest_batch(view.inputs, settings.batch_sizes)
        inputs = memory.fed_bytes(view.inputs, largest, settings.input_shapes, settings.data)
        memory.check(runner.model, inputs, largest, "give smaller --batch-sizes", calls)
    try:
        bounds = embedding_bounds(static.config, [spec.name for spec in view.inputs])
    except (AttributeError, TypeError, ValueError, KeyError, IndexError):  # a malformed Embedding entry: no bound
        bounds = {}
    effect_data, bounded = None, None
    if settings.data is not None:
        effect_data, bounded = recalibration_data(settings.data, most=_one_batch_bound(runner, calls))
    # the effect's samples: the predict-style runs over the data keep the stored model's outputs on them
    effect_samples = sample_count(effect_data)
    results = []
    for style in call_styles(static):
        runner.capture.skip = {layer.name for layer in view.layers if not needs_statistics(layer, settings)}
        runner.notes = []
        keep = effect_samples if style == PREDICT else 0
        run = runner.runner(style)
        if style == PREDICT and fixed_batch(view.inputs) is None:
            likely = likely_over(runner.model, view.inputs, settings.input_shapes, settings.data, calls)
            run = split_runner(run, likely, runner.notes)
        result = run_plan(view, settings, run, call_style=style, int_high=bounds, keep_outputs=keep)
        leave_unmeasured(result, sorted(runner.capture.skip))
        runner.capture.skip = set()
        result.notes.extend(runner.notes)
        result.notes.extend(runner.loaded_notes)
        result.notes.append(_style_note(style, static))
        if style == PREDICT and settings.data is not None and result.data is not None:
            runner.data_probe = (settings.data, result)
        for name in sorted(runner.shared):
            result.notes.append(f"{name} is called more than once per forward pass: its statistics pool every call")
        results.append(result)
    stored = next((r.data_outputs for r in results if r.call_style == PREDICT), None)
    for result in results:
        result.data_outputs = None
    flagged = {name for r in results for name in drifting_layers(view, r)}
    if effect_data is not None and flagged:
        announce(settings.progress, EFFECT_STAGE)
        found = recalibration(runner, effect_data, stored, flagged)
        for result in results:
            if isinstance(found, str):
                result.notes.append(f"output effect of the drifting statistics not measured: {found}")
            else:
                result.recalibration = found
                if bounded:
                    result.notes.append(bounded)
    return results


def _one_batch_bound(runner: KerasRunner, calls: memory.Calls | None) -> tuple[int, str] | None:
    """The most samples :func:`recalibration`'s one batch takes, from its busiest layer's bytes for one sample
    (memory.busiest_layer, a lower bound), and the note's words; None where Keras cannot size the layers."""
    per_sample, _ = memory.busiest_layer(runner.model, 1, calls)
    if per_sample <= 0:
        return None
    words = f"as many as one batch holds with {format_size(RECALIBRATION_LAYER_BYTES)} at the model's busiest layer"
    return RECALIBRATION_LAYER_BYTES // per_sample, words


def recalibration(
    runner: KerasRunner,
    data: Mapping[str, np.ndarray],
    stored: Mapping[str, np.ndarray] | None = None,
    flagged: Collection[str] = (),
) -> Recalibration | str:
    """``predict`` outputs with the BatchNormalizations' moving statistics `fix` recomputes recomputed from the
    data, against the stored ones: exact population statistics, layer by layer downstream of the recomputed
    ones, here in one pass instead of one per layer. `fix` (fix.py) recomputes the layers the probe ``flagged``
    (drifting, or never updated) and those whose statistics drift once the layers above them are recomputed;
    the others keep theirs.

    One forward pass over the data as a single batch gives exactly that: each layer, on its call, takes the
    statistics of the input it receives, which already went through the recomputed layers upstream (a
    pass per layer would be needed otherwise). The original statistics are restored afterwards. ``data``: all
    of it fed as that one batch (probe_data.recalibration_data bounds it). ``stored``: the model's outputs on
    those samples with its stored statistics, samples first, from the probe's own runs over the data (in
    batches of the probe's size: equal to one batch's up to float rounding); run here when not given."""
    from bncheck.fix_result import MIN_SAMPLES
    from bncheck.probe_plan import compare_recalibrated, first_outputs

    count = sample_count(data)
    if count < MIN_SAMPLES:  # as the ONNX effect, through fix's own refusal: no effect of what fix would not do
        return (
            f"{count} sample(s) are too few to estimate the statistics from: at least {MIN_SAMPLES} needed "
            "(`fix` refuses fewer; --min-samples N overrides it there)"
        )
    need, what = memory.lower_bound(runner.model, memory.fed_bytes(runner.view.inputs, count, None, data), count)
    likely = memory.likely_over_budget(need, count)
    if likely is not None:
        return likely
    try:
        budget.check(need, what, lower_bound=True)
    except OverBudgetError as exc:  # its remedy would name an option a probe does not have
        return exc.summary
    feeds = {name: np.ascontiguousarray(array) for name, array in data.items()}
    batch_norms = [
        n for n in runner.view.layers if n.kind is Kind.BATCH and hasattr(runner.layers[n.name], "moving_mean")
    ]
    if not batch_norms:
        return "no BatchNormalization with moving statistics"
    # fix keeps a frozen layer's statistics (by default): so does the effect
    names = tuple(n.name for n in batch_norms if not frozen_with_stats(n) and not folded_stats(n))
    if not names:
        return Recalibration((), {}, 0)
    saved = {n: (np.array(runner.layers[n].moving_mean), np.array(runner.layers[n].moving_variance)) for n in names}
    stored = first_outputs(stored, count)
    if stored is None:
        stored = runner.observe(feeds, PREDICT, layers=False).outputs
    runner.capture.recompute = {n: n in flagged for n in names}
    runner.capture.recomputed = []
    runner.capture.settled = {}
    try:
        recomputed = runner.observe(feeds, PREDICT, layers=False).outputs
        changed = tuple(dict.fromkeys(runner.capture.recomputed))  # a shared layer's calls: once
        settled = {name: numbers for name, numbers in runner.capture.settled.items() if name in flagged}
    finally:
        runner.capture.recompute = {}
        runner.capture.recomputed = []
        runner.capture.settled = {}
        for n, (mean, var) in saved.items():
            runner.layers[n].moving_mean.assign(mean)
            runner.layers[n].moving_variance.assign(var)
    if not changed:
        return Recalibration((), {}, 0)
    found = compare_recalibrated(changed, stored, recomputed, runner.view.output_shapes)
    return replace(found, settled_by_upstream=settled)


def embedding_bounds(config: dict[str, Any], inputs: list[str]) -> dict[str, int]:
    """Synthetic integer inputs must index every Embedding they feed: input name -> smallest input_dim."""
    from bncheck.backends.keras.config import layer_entries, node_calls

    bounds: dict[str, int] = {}
    for entry in layer_entries(config):
        dim = (entry.get("config") or {}).get("input_dim")
        if entry.get("class_name") != "Embedding" or not isinstance(dim, int):
            continue
        for _, _, refs in node_calls(entry):
            for producer, _ in refs:
                if producer in inputs:
                    bounds[producer] = min(dim, bounds.get(producer, dim))
    if config.get("class_name") == "Sequential":  # a Sequential starting with an Embedding
        first = next((e for e in layer_entries(config) if e.get("class_name") != "InputLayer"), {})
        dim = (first.get("config") or {}).get("input_dim")
        if first.get("class_name") == "Embedding" and isinstance(dim, int) and inputs:
            bounds[inputs[0]] = dim
    return bounds


def _style_note(style: str, static: KerasFile) -> str:
    if style == AS_WRITTEN:
        return "call style as-written: model(x), training left unset, so baked training flags take effect"
    if static.keras2 and static.baked:
        return (
            "call style predict: model(x, training=False) under Keras 3; the file was saved by Keras 2/tf_keras, "
            "where the baked flag wins even in model.predict"
        )
    return "call style predict: model(x, training=False), what model.predict(x) does in Keras 3"
