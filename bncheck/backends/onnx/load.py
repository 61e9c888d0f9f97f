"""Load an ONNX file safely: clear one-line errors, external data confined to the model's folder.

Order matters for safety: the graph is parsed with ``load_external_data=False``, every external-data
location is validated (relative, no ``..``, resolving inside the model's folder with symlinks followed, a
regular file that exists), and only then are weights read, by onnx's own loader. A model whose graph fails
``onnx.checker`` or strict shape inference is still returned; the failure becomes a warning
:class:`~bncheck.model.Note`, because a diagnostic tool must say what it can about a broken file.

Models above 2 GB are checked and shape-inferred by path: serializing a ModelProto with its weights loaded
would exceed protobuf's 2 GB limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import threading
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bncheck.backends.base import BackendError, sha256_of
from bncheck.backends.onnx.graph import copy_fields, copy_messages, nested_bodies, tensor_nbytes, topological_order
from bncheck.errors import few, one_line
from bncheck.model import Dim, ModelInfo, Note

if TYPE_CHECKING:  # onnx is imported lazily: `bncheck --help` must not pay for it
    import onnx

#: protobuf cannot serialize a message above 2 GiB; beyond this, onnx works from paths.
PROTOBUF_LIMIT = 2**31 - 1
_TEXT_PROBE = 4096


@dataclass(eq=False)
class OnnxHandle:
    """A loaded ONNX model and what the walk and the probe need to know about its tensors.

    ``value_shapes`` holds every tensor whose rank is known (graph inputs/outputs, value_info after onnx
    shape inference, initializers); each dim is an int, a symbolic name, or None. ``info`` and ``notes``
    are what the report shows about the file and about load-time problems (checker, shape inference).

    ``model`` may be reloaded lazily (:meth:`defer_model`): the probe swaps it for a weight-less skeleton
    while it runs, and the weights come back from the file only when someone reads ``model`` again (the
    fix path does; ``bncheck probe`` never does, and saves the reload).
    """

    path: str
    model: onnx.ModelProto  # a property (below): assigning it cancels a pending reload
    external_data: bool
    value_shapes: dict[str, tuple[Dim, ...]]
    value_types: dict[str, int]
    size_bytes: int
    info: ModelInfo | None = None
    notes: list[Note] = field(default_factory=list)
    # initializers edited in memory (fix): their bytes in the file are stale, so a stub keeps them inline
    edited: set[str] = field(default_factory=set)
    # True: a probe keeps the weights in ``model`` instead of releasing and re-reading them afterwards (`fix`
    # reads the model again after probing it; it sets this when the file is small enough to hold twice)
    keep_weights: bool = False
    # the weight-less, sorted copy that load inferred the shapes on (see _skeleton), left for the first
    # concrete_shapes of the file as loaded (the probe's memory check, before any edit), which edits it: one
    # skeleton built instead of two
    spare_skeleton: onnx.ModelProto | None = field(default=None, repr=False, compare=False)
    # fix's measuring passes on this model (replay.PassLog), which a later repair of it with the same data
    # replays: `fix --data` repairs once as the probe's dry run, then for real (set by OnnxBackend.check_fix)
    fix_passes: Any = None
    # waits for the file's sha256 while a thread computes it and completes ``info`` with it (``info.sha256``
    # is "" until then; see load_onnx's ``weights``); ModelView.final_info calls it
    pending_sha256: Callable[[], str] | None = None

    def defer_model(self, placeholder: onnx.ModelProto, reload: Callable[[], onnx.ModelProto]) -> None:
        """Hold ``placeholder`` until ``model`` is next read, then replace it by ``reload()`` (called once;
        if it raises, the next read calls it again)."""
        self.__dict__["_model"] = placeholder
        self.__dict__["_reload"] = reload

    @property
    def model_pending(self) -> bool:
        """True while ``model`` is a placeholder waiting for its lazy reload."""
        return self.__dict__.get("_reload") is not None


def _get_model(handle: OnnxHandle) -> onnx.ModelProto:
    reload = handle.__dict__.get("_reload")
    if reload is not None:
        handle.__dict__["_model"] = reload()
        handle.__dict__["_reload"] = None
    return handle.__dict__["_model"]


def _set_model(handle: OnnxHandle, value: onnx.ModelProto) -> None:
    handle.__dict__["_reload"] = None
    handle.__dict__["_model"] = value


# after @dataclass, so that its generated __init__ (model=...) goes through the setter
OnnxHandle.model = property(_get_model, _set_model, doc="The ModelProto, reloaded on first read if deferred.")  # type: ignore[assignment]


def _fail(path: str, reason: str) -> BackendError:
    """A BackendError whose message is one line naming the file."""
    reason = " ".join(str(reason).split())
    return BackendError(f"{path}: {reason}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__


def _not_a_model(model: onnx.ModelProto) -> str:
    """Why a parsed protobuf is no ONNX model: what it lacks, and the ops of a graph that has nodes (pnnx's
    ``*.pnnx.onnx`` holds a graph of PyTorch ops, ``nn.Conv2d``, and no IR version or opset)."""
    lacks = [
        what
        for what, missing in (
            ("IR version", model.ir_version <= 0),
            ("graph", not model.HasField("graph")),
            ("opset", not model.opset_import),
        )
        if missing
    ]
    text = f"not an ONNX model (no {' and no '.join(lacks)}"
    ops = sorted({node.op_type for node in model.graph.node}) if model.HasField("graph") else []
    if ops:
        shown = ", ".join(ops[:4]) + (", ..." if len(ops) > 4 else "")
        return text + f"; its graph's ops: {shown}; another tool's format, e.g. pnnx's intermediate graph)"
    return text + "; truncated or not a protobuf)"


def _what_else(path: str, head: bytes) -> str | None:
    """What a file that is no ONNX model is instead (another framework's file, a text file), or None."""
    from bncheck.backends.file_kinds import describe

    return describe(path, head) or _looks_like_text(head)


def _looks_like_text(head: bytes) -> str | None:
    """A more useful reason than 'parse error' for the text files people pass by mistake."""
    if head.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer file, not the model (run `git lfs pull`)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        if len(head) == _TEXT_PROBE:  # maybe a multi-byte character cut at the probe boundary
            try:
                text = head[:-4].decode("utf-8")
            except UnicodeDecodeError:
                return None
        else:
            return None
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    if text and printable / len(text) > 0.97:
        return "is a text file, not an ONNX protobuf"
    return None


def _check_file(path: str) -> int:
    """Existence, type and size of the model file; returns its size."""
    if not os.path.lexists(path):
        raise _fail(path, "no such file")
    if os.path.isdir(path):
        from bncheck.backends.file_kinds import saved_model_folder

        raise _fail(path, saved_model_folder(path) or "is a directory, not an ONNX file")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise _fail(path, "is not a regular file")
    if st.st_size == 0:
        raise _fail(path, "is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise _fail(path, "cannot be read (permission denied)")
    return st.st_size


def _parse(path: str, digest: hashlib._Hash | None = None) -> onnx.ModelProto:
    """Parse the protobuf without external data; one-line errors for everything that is not a model.

    The file is mapped, not read: protobuf parses straight from the page cache (reading it into a bytes
    object first faulted in a fresh copy). With ``digest``, it is hashed in
    a thread while protobuf parses (hashlib releases the GIL on large buffers), which on a 100 MB model saves
    a second read and the hashing time.
    """
    mapped, data = _mapped(path)
    head = bytes(data[:_TEXT_PROBE])
    hasher = None
    if digest is not None:
        hasher = threading.Thread(target=digest.update, args=(data,), daemon=True)
        hasher.start()
    try:
        return _decoded(path, data, head)
    finally:
        if hasher is not None:
            hasher.join()  # never leave a thread reading a buffer we are about to drop
        data.release()
        if mapped is not None:
            mapped.close()


def _mapped(path: str) -> tuple[Any, memoryview]:
    """The file's bytes: its mapping (and the mmap to close), or where it cannot be mapped its content."""
    import mmap

    try:
        with open(path, "rb") as fh:
            try:
                mapped: mmap.mmap | None = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # a file system without mmap: read it
                mapped = None
            return mapped, memoryview(mapped) if mapped is not None else memoryview(fh.read())
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or exc})") from exc


def _decoded(path: str, data: Any, head: bytes) -> onnx.ModelProto:
    """``data`` parsed as the ModelProto of ``path`` (``head``: the file's first bytes, which tell a text file
    given by mistake); one-line errors for everything that is not a model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        # what onnx.load(path, load_external_data=False) does (protobuf copies what it keeps)
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError, TypeError, UnicodeDecodeError) as exc:
        reason = _what_else(path, head)
        if reason:
            raise _fail(path, reason) from exc
        raise _fail(path, f"not a valid ONNX protobuf (truncated or corrupt): {_first_line(exc)}") from exc
    # protobuf parses many byte strings without complaint: an ONNX model has an IR version and a graph.
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        reason = _what_else(path, head)
        if reason:
            raise _fail(path, reason)
        raise _fail(path, _not_a_model(model))
    if not model.graph.node and not model.graph.output:
        raise _fail(path, "not an ONNX model (the graph has no nodes and no outputs; truncated?)")
    bad = _non_utf8_name(model)
    if bad is not None:
        raise _fail(path, f"not a valid ONNX model: the name {bad!r} is not UTF-8 text (corrupt file?)")
    return model


def _non_utf8_name(model: onnx.ModelProto) -> bytes | None:
    """The first name (tensor, node, op, domain, producer) that protobuf could not decode as UTF-8, which it
    then hands back as bytes: ONNX requires UTF-8, and every later stage (matching, reports) needs text."""
    texts: list[object] = [model.producer_name, model.producer_version, model.domain]
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        texts += [v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)]
        texts += [
            d.dim_param
            for v in (*graph.input, *graph.output, *graph.value_info)
            if v.type.HasField("tensor_type")
            for d in v.type.tensor_type.shape.dim
        ]
        for node in graph.node:
            texts += [node.name, node.op_type, node.domain, *node.input, *node.output]
            for attribute in node.attribute:
                graphs += [attribute.g] if attribute.HasField("g") else []
                graphs += list(attribute.graphs)
    return next((t for t in texts if isinstance(t, bytes)), None)


#: files from this size on are loaded without their large weights where the caller allows it (smaller
#: ones hold too few to pay for the scan)
LEAVE_WEIGHTS_MIN_BYTES = 8 << 20
#: element types of the weights a load without weights leaves in the file (floating point): integer tensors
#: are shapes, indices and tables the walk and the probe copy read
_WEIGHT_TYPES = frozenset({1, 10, 11, 16})


def _parse_without_large_weights(path: str) -> tuple[onnx.ModelProto, set[str]] | None:
    """The model with its floating-point initializers over VIEW_LOAD_BYTES left in the file
    (protobuf.without_large_weights) but for normalization ops' parameters (read as _load_view_weights reads
    them from external data), and the names of those left; None when the file has none, or another layout,
    or anything _parse would refuse (then _parse reads the file whole and says why)."""
    from bncheck.backends.onnx.protobuf import without_large_weights

    try:
        mapped, data = _mapped(path)
    except BackendError:
        return None
    try:
        cut = without_large_weights(data, len(data), os.path.basename(path), VIEW_LOAD_BYTES, _WEIGHT_TYPES)
        head = bytes(data[:_TEXT_PROBE])
    finally:
        with contextlib.suppress(BufferError):  # a slice still held: the mapping goes with the last reference
            data.release()
            if mapped is not None:
                mapped.close()
    if cut is None:
        return None
    rebuilt, offsets = cut
    try:
        model = _decoded(path, rebuilt, head)
    except BackendError:
        return None
    del rebuilt
    left = [t for t in model.graph.initializer if t.name in offsets]
    if any(tensor_nbytes(t) != offsets[t.name][1] for t in left):
        return None  # raw_data of the wrong length: _parse keeps it, and onnxruntime says so
    _load_view_weights(path, model)  # the norm parameters among them
    return model, {t.name for t in left if t.data_location == t.EXTERNAL}


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor (initializers and attribute tensors, subgraphs included) stored outside the file."""
    import onnx
    from onnx import external_data_helper

    # onnx's own enumeration (initializers, Constant/attribute tensors, subgraphs); private but stable
    # since onnx 1.5 and exactly what its loader iterates, so both see the same set.
    tensors = external_data_helper._get_all_tensors(model)
    return [t for t in tensors if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL]


def input_files(path: str) -> list[str]:
    """The model file and the external-data files its tensors name (just the model when it cannot be parsed:
    then loading fails before any data file is read)."""
    try:
        model = _parse(path)
    except BackendError:
        return [path]
    base = os.path.dirname(os.path.abspath(path))
    locations = {e.value: None for t in external_tensors(model) for e in t.external_data if e.key == "location"}
    return [path, *(os.path.join(base, location) for location in locations if "\x00" not in location)]


def location_of(tensor: onnx.TensorProto) -> str:
    """An external tensor's ``location`` entry ("" when it has none)."""
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


def relocate(tensor: onnx.TensorProto, location: str) -> None:
    """Point an external tensor's ``location`` entry at ``location``; its offset and length stay."""
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location


def _validate_external(path: str, model: onnx.ModelProto, in_file: Collection[str] = ()) -> tuple[bool, int]:
    """Refuse unsafe or missing external-data locations before any weight byte is read; ``in_file``: the
    initializers the loader itself left in the model file (_parse_without_large_weights).

    Returns (uses external data, total bytes of the distinct external files).
    """
    tensors = [t for t in external_tensors(model) if t.name not in in_file]
    if not tensors:
        return False, 0
    base = os.path.dirname(os.path.abspath(path))
    # the folder the path names, or the one its file is in: a model linked from a Hugging Face cache's
    # snapshot reads its data through links into the cache's blob store, as onnxruntime allows
    folders = {os.path.realpath(base), os.path.dirname(os.path.realpath(path))}
    seen: dict[str, int] = {}
    for tensor in tensors:
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        if not location:
            raise _fail(path, f"external data of tensor {tensor.name!r} has no location")
        if "\x00" in location:
            raise _fail(path, f"refused external data location {location!r}: contains a NUL byte")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
            raise _fail(path, f"refused external data location {location!r}: absolute path")
        parts = location.replace("\\", "/").split("/")
        if ".." in parts:
            raise _fail(path, f"refused external data location {location!r}: contains '..'")
        target = os.path.realpath(os.path.join(base, location))
        if not any(os.path.commonpath([target, folder]) == folder for folder in folders):
            raise _fail(path, f"refused external data location {location!r}: resolves outside the model's folder")
        if target in seen:
            continue
        if not os.path.lexists(os.path.join(base, location)) or not os.path.exists(target):
            raise _fail(path, f"missing external data file {location!r} (tensor {tensor.name!r})")
        st = os.stat(target)
        if not stat.S_ISREG(st.st_mode):
            raise _fail(path, f"refused external data location {location!r}: not a regular file")
        seen[target] = st.st_size
    return True, sum(seen.values())


#: the external_data keys onnx's loader reads; others are ignored by it (with a Python warning)
EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})


def _unknown_key_notes(model: onnx.ModelProto) -> list[Note]:
    """One note naming (a few of) the external_data keys onnx's loader ignores, and the tensors with them."""
    unknown: dict[str, None] = {}  # ordered set
    tensors: list[str] = []
    for tensor in external_tensors(model):
        keys = [e.key for e in tensor.external_data if e.key not in EXTERNAL_DATA_KEYS]
        if keys:
            tensors.append(tensor.name)
            unknown.update(dict.fromkeys(keys))
    if not unknown:
        return []
    return [Note("warning", f"external data of tensor(s) {few(tensors)}: unknown key(s) {few(unknown)} (ignored)")]


def _warning_notes(caught: list[warnings.WarningMessage]) -> list[Note]:
    """onnx's Python warnings while reading weights, as notes: stderr belongs to the CLI's one-line errors."""
    texts = dict.fromkeys(" ".join(str(w.message).split())[:300] for w in caught)
    notes = [
        Note("warning", f"onnx: {text}") for text in texts if not text.startswith("Ignoring unknown external data key")
    ]  # _unknown_key_notes says it shorter
    return notes[:10]  # one per distinct warning; a hostile file could raise thousands


#: external tensors up to this size are read at load (norm parameters, biases, shapes); larger ones stay
#: references to their file, which every session (the probe's, fix's) reads them from.
VIEW_LOAD_BYTES = 1 << 20
#: ops whose parameter inputs are read at load whatever their size (the checks judge them)
_NORM_OP = re.compile(r"Norm", re.IGNORECASE)


def _load_view_weights(path: str, model: onnx.ModelProto) -> list[Note]:
    """Read only the external tensors the view needs: small ones and normalization ops' parameters.

    The probe's onnxruntime session reads the weights from their files itself, so reading every weight
    here would hold a second copy during the probe (twice plain inference's peak on a large model) and make
    ``inspect`` read the whole data file; ``fix`` edits only small tensors and reads none of the rest.
    """
    import onnx
    from onnx import external_data_helper

    base = os.path.dirname(os.path.abspath(path))
    norm_inputs = {name for node in model.graph.node if _NORM_OP.search(node.op_type) for name in node.input[1:]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for tensor in external_tensors(model):
                if tensor_nbytes(tensor) <= VIEW_LOAD_BYTES or tensor.name in norm_inputs:
                    # what load_external_data_for_model does, tensor by tensor, from the real file: onnx
                    # refuses to read through a symbolic link, and _validate_external accepted this one
                    target = os.path.realpath(os.path.join(base, location_of(tensor)))
                    relocate(tensor, os.path.basename(target))
                    external_data_helper.load_external_data_for_tensor(tensor, os.path.dirname(target))
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    del tensor.external_data[:]
        except Exception as exc:
            raise _fail(path, f"cannot read external data: {_first_line(exc)}") from exc
    return _warning_notes(caught)


def _sha256_or_fail(path: str) -> str:
    try:
        return sha256_of(path)
    except OSError as exc:  # the file went away or changed type since it was parsed
        raise _fail(path, f"cannot be read ({exc.strerror or exc})") from exc


_GENERATED_DIM = re.compile(r"unk__\d+")
#: off: reports (and their golden files) show onnx's unk__N names as symbolic dims.
UNKNOWN_GENERATED_DIMS = False


def _dims(tensor_type: onnx.TypeProto.Tensor, declared: frozenset[str] = frozenset()) -> tuple[Dim, ...] | None:
    """Dims of a tensor type as int / symbolic name / None. The ``unk__N`` names onnx's inference invents for dims
    it cannot compute become None only when UNKNOWN_GENERATED_DIMS is on (and the file does not declare them)."""
    if not tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        # dim_value first: one protobuf read for the usual concrete dim (thousands of values per graph); it
        # reads 0 when the dim holds a name, and -1/0 is how some exporters write an unknown dim (free_unset_dims)
        value = dim.dim_value
        if value > 0:
            dims.append(value)
            continue
        name = dim.dim_param  # "" when the dim holds a value or nothing
        if not name:
            dims.append(None)
            continue
        # the unk__N names onnx invents are kept as symbolic names (golden reports depend on it);
        # UNKNOWN_GENERATED_DIMS turns them into None
        generated = UNKNOWN_GENERATED_DIMS and _GENERATED_DIM.fullmatch(name) and name not in declared
        dims.append(None if generated else name)
    return tuple(dims)


def _declared_dim_names(model: onnx.ModelProto) -> frozenset[str]:
    graph = model.graph
    names: set[str] = set()
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        if info.type.HasField("tensor_type"):
            names.update(d.dim_param for d in info.type.tensor_type.shape.dim if d.dim_param)
    return frozenset(names)


def _collect_shapes(
    inferred: onnx.ModelProto, model: onnx.ModelProto
) -> tuple[dict[str, tuple[Dim, ...]], dict[str, int]]:
    shapes: dict[str, tuple[Dim, ...]] = {}
    types: dict[str, int] = {}
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)  # protobuf hands back ints
        types[init.name] = init.data_type
    stored = set(shapes)  # an initializer's own dims beat a graph input's declaration of it
    declared = _declared_dim_names(model) if UNKNOWN_GENERATED_DIMS else frozenset()
    graph = inferred.graph
    # the bodies' values too (names are unique across scopes): control_flow.py reads the norms inside them
    scopes = [graph.input, graph.value_info, graph.output]
    if any(node.op_type in _CONTROL_FLOW for node in graph.node):
        scopes += [values for body in nested_bodies(graph) for values in (body.input, body.value_info, body.output)]
    for values in scopes:
        for info in values:
            name = info.name
            type_proto = info.type
            # WhichOneof: one protobuf call where HasField would take two or three
            if name in stored or type_proto.WhichOneof("value") != "tensor_type":
                continue
            tensor_type = type_proto.tensor_type
            elem = tensor_type.elem_type
            if elem:
                types[name] = elem
            dims = _dims(tensor_type, declared)
            if dims is not None:
                shapes[name] = dims
    return shapes, types


#: Initializers up to this size stay in the skeleton that onnx.checker and shape inference see: shape,
#: axes and index tensors live there, and shape inference's data propagation needs their values.
SKELETON_KEEP_BYTES = 4096


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large weights: each large initializer, and each Constant node holding a large
    tensor (older paddle2onnx writes every weight so; silero-vad's shipped model keeps each If branch's weights
    in the branch), becomes a typed graph input.

    onnx.checker and shape inference serialize the whole ModelProto (time, and a copy of the weights in
    memory) yet need only the graph, the types and shapes of the weights and the
    values of small shape-like tensors. The checker then does not look inside large weights; their dims and
    types, the part a graph depends on, are still checked through the inputs they become (a subgraph reads
    an outer scope's values, so a branch's weight can be a main-graph input too).
    """
    import onnx

    graph = model.graph
    constants, nested = _large_constants(graph)
    if not constants and not nested and all(tensor_nbytes(t) <= SKELETON_KEEP_BYTES for t in graph.initializer):
        return model
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, skip={"graph"})
    out = skeleton.graph
    copy_fields(graph, out, skip={"initializer", "node"} if constants or nested else {"initializer"})
    declared = {i.name for i in graph.input}
    for tensor in graph.initializer:
        if tensor_nbytes(tensor) <= SKELETON_KEEP_BYTES:
            out.initializer.append(tensor)
        elif tensor.name not in declared:  # IR >= 4: initializers need not be inputs
            out.input.append(_typed_input(tensor.name, tensor))
    if constants or nested:
        hoisted: list[Any] = []
        _copy_nodes_without(graph, constants, nested, out.node, hoisted)
        names = [v.name for v in hoisted]
        taken = {v.name for v in out.input} | {t.name for t in out.initializer}
        if nested and (len(set(names)) < len(names) or taken.intersection(names)):
            # two branches naming their weights alike would share one input: their weights stay in place
            del out.node[:]
            hoisted.clear()
            _copy_nodes_without(graph, constants, {}, out.node, hoisted)
        out.input.extend(hoisted)
    return skeleton


def _typed_input(name: str, tensor: Any) -> Any:
    from onnx import helper

    return helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))


#: where a graph's large Constant nodes are, at any depth: the indices of its own, and by node index and
#: attribute index those of the subgraphs that hold some
Nested = dict[int, dict[int, tuple[set[int], "Nested"]]]


def _copy_nodes_without(graph: Any, constants: set[int], nested: Nested, target: Any, hoisted: list[Any]) -> None:
    """Copy ``graph``'s nodes into ``target`` but the large Constant nodes at ``constants``, whose outputs
    become typed inputs in ``hoisted``; a node in ``nested`` gets copies of its subgraphs treated alike."""
    add = target.add
    for i, node in enumerate(graph.node):
        if i in constants:
            hoisted.append(_typed_input(node.output[0], node.attribute[0].t))
            continue
        copy = add()
        subgraphs = nested.get(i)
        if subgraphs is None:
            copy.CopyFrom(node)
            continue
        copy_fields(node, copy, skip={"attribute"})
        for j, attribute in enumerate(node.attribute):
            if j not in subgraphs:
                copy.attribute.add().CopyFrom(attribute)
                continue
            attr = copy.attribute.add()
            copy_fields(attribute, attr, skip={"g"})
            copy_fields(attribute.g, attr.g, skip={"node"})
            _copy_nodes_without(attribute.g, *subgraphs[j], attr.g.node, hoisted)


def _large_constants(graph: Any) -> tuple[set[int], Nested]:
    """Indices of ``graph``'s Constant nodes whose one ``value`` tensor is larger than SKELETON_KEEP_BYTES (one
    that writes an output of the graph stays a node: the graph's outputs keep their producer), and the same of
    the subgraphs of its If, Loop and Scan nodes, at any depth."""
    outputs = {o.name for o in graph.output}
    found: set[int] = set()
    nested: Nested = {}
    for i, node in enumerate(graph.node):
        op = node.op_type
        if op in _CONTROL_FLOW:
            for j, attribute in enumerate(node.attribute):
                if attribute.HasField("g"):
                    inner = _large_constants(attribute.g)
                    if any(inner):
                        nested.setdefault(i, {})[j] = inner
            continue
        if op != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        if len(node.attribute) != 1 or node.attribute[0].name != "value" or node.output[0] in outputs:
            continue
        if tensor_nbytes(node.attribute[0].t) > SKELETON_KEEP_BYTES:
            found.add(i)
    return found, nested


#: the ONNX ops whose attributes hold subgraphs; tested by op name, not graph.has_subgraphs, which reads every
#: node's attributes (2.3 against 0.5 ms a scan of layout_cdla's 1,493 nodes)
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


#: the name a batch dim written as -1 or 0 gets (axis 0 of a graph input).
FREE_BATCH_DIM = "batch"


def _unset(dim: Any) -> bool:
    return dim.HasField("dim_value") and dim.dim_value <= 0


def _has_unset_dims(model: onnx.ModelProto) -> bool:
    graph = model.graph
    return any(
        _unset(d)
        for v in (*graph.input, *graph.output, *graph.value_info)
        if v.type.HasField("tensor_type")
        for d in v.type.tensor_type.shape.dim
    )


def concrete_shapes(
    model: onnx.ModelProto, feeds: Mapping[str, tuple[int, ...]], skeleton: onnx.ModelProto | None = None
) -> tuple[dict[str, tuple[Dim, ...]], dict[str, int]]:
    """Shapes and types inferred with the graph inputs fixed to ``feeds`` (input name -> shape as fed).

    Where a model leaves dims other than the batch open (a detector's H and W), onnx's symbolic inference
    names every Conv or Resize output dim anew, and nothing binds those names to sizes; with the inputs
    concrete, it computes them. On the weight-less skeleton (see _skeleton); ``model`` is not edited.
    ``skeleton``: that skeleton of ``model`` already built and sorted (:attr:`OnnxHandle.spare_skeleton`),
    edited here.
    """
    skeleton = own_skeleton(model) if skeleton is None else skeleton
    del skeleton.graph.value_info[:]  # the file's symbolic intermediate shapes would be merged in
    for value in skeleton.graph.input:
        shape = feeds.get(value.name)
        if shape is None or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(size)
    return _inferred_shapes(skeleton, skeleton)


def inferred_shapes(
    model: onnx.ModelProto, skeleton: onnx.ModelProto | None = None
) -> tuple[dict[str, tuple[Dim, ...]], dict[str, int]]:
    """Shapes and types of ``model`` by onnx shape inference (lenient) on its weight-less skeleton (see
    _skeleton; ``skeleton`` when built already, not edited), its declared ones where inference fails; ``model``
    itself is not edited."""
    return _inferred_shapes(_skeleton(model) if skeleton is None else skeleton, model)


def own_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A weight-less copy of ``model`` (see _skeleton) in topological order, never ``model`` itself."""
    return _sorted(_own(_skeleton(model), model))


def _inferred_shapes(
    skeleton: onnx.ModelProto, model: onnx.ModelProto
) -> tuple[dict[str, tuple[Dim, ...]], dict[str, int]]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:
        inferred = model
    return _collect_shapes(inferred, model)


def _own(skeleton: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """``skeleton`` to edit: itself when _skeleton made a new one, else a copy of ``model`` (only small
    initializers, so a cheap one)."""
    if skeleton is not model:
        return skeleton
    copy = type(model)()
    copy.CopyFrom(model)
    return copy


def free_unset_dims(graph: Any) -> None:
    """Dims written as -1 or 0 become symbolic (older paddle2onnx and tf2onnx mark unknown dims so, and
    onnxruntime treats them as dynamic): axis 0 of a graph input is named :data:`FREE_BATCH_DIM`, any
    other is cleared (unknown). Edits ``graph`` in place: pass a copy."""
    for values, is_input in ((graph.input, True), (graph.output, False), (graph.value_info, False)):
        for value in values:
            if not value.type.HasField("tensor_type"):
                continue
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if _unset(dim):
                    dim.Clear()
                    if is_input and axis == 0:
                        dim.dim_param = FREE_BATCH_DIM


def _check_and_infer(path: str, model: onnx.ModelProto, large: bool) -> tuple[onnx.ModelProto, list[Note]]:
    """Run onnx.checker and strict shape inference; failures become notes, never errors.

    Both run on the weight-less skeleton (see _skeleton), in memory. Only a skeleton that itself exceeds
    protobuf's 2 GB (a graph with huge small-tensor payloads) falls back to onnx's path-based variants.
    Returns the model carrying inferred value_info (without the large weights) and the notes.
    """
    import onnx

    skeleton = _skeleton(model)
    if _has_unset_dims(skeleton):  # never edit the caller's model (fix writes it back)
        skeleton = _own(skeleton, model)
        free_unset_dims(skeleton.graph)
    if skeleton is not model:  # the skeleton is small unless the graph itself is huge
        large = skeleton.ByteSize() > PROTOBUF_LIMIT
    notes: list[Note] = []
    try:
        if large:
            onnx.checker.check_model(os.path.abspath(path))
        else:
            onnx.checker.check_model(skeleton)
    except Exception as exc:
        # the whole message: onnx.checker names the node on the lines after its first
        notes.append(Note("warning", f"onnx.checker rejects the model: {one_line(exc, 500)}"))

    def infer(strict: bool) -> onnx.ModelProto:
        if large:
            import tempfile  # only a graph over protobuf's limit is inferred through files

            with tempfile.TemporaryDirectory(prefix="bncheck-") as tmp:
                out = os.path.join(tmp, "inferred.onnx")
                onnx.shape_inference.infer_shapes_path(os.path.abspath(path), out, strict_mode=strict, data_prop=True)
                return onnx.load(out, load_external_data=False)
        return onnx.shape_inference.infer_shapes(_sorted(skeleton), strict_mode=strict, data_prop=True)

    try:
        inferred = _through_contrib(_through_ort_layouts(infer(strict=True), large), large)
        return _through_newer_opset(inferred, skeleton, large), notes
    except Exception as exc:
        notes.append(Note("warning", f"onnx shape inference (strict) fails: {_first_line(exc)}"))
    try:
        inferred = _through_contrib(_through_ort_layouts(infer(strict=False), large), large)
        return _through_newer_opset(inferred, skeleton, large), notes
    except Exception as exc:
        notes.append(Note("warning", f"onnx shape inference fails; shapes are unknown: {_first_line(exc)}"))
        return model, notes


#: the domain of onnxruntime's NCHWc layout ops, which its optimizer writes at ORT_ENABLE_ALL
_NCHWC = "com.microsoft.nchwc"
#: onnxruntime's NCHWc ops that are an ONNX op of the same name on blocked channels
_NCHWC_AS_ONNX = frozenset({"Conv", "GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool"})


def _through_ort_layouts(inferred: onnx.ModelProto, large: bool) -> onnx.ModelProto:
    """Shapes past the convolutions onnxruntime's optimizer fuses (com.microsoft FusedConv at EXTENDED, the
    NCHWc ops at ALL), which onnx's inference does not know: inferred on a stand-in graph where each is the
    ONNX op it computes (a Conv, a pool; ReorderOutput a Slice of its channels, ReorderInput an Identity) and
    copied back for the tensors the file's own inference left without a shape. A saved optimized model
    (SessionOptions.optimized_model_filepath) otherwise has no shape after its first convolution, and a
    collapse that inspect should see (an instance norm after global pooling) is missed."""
    import onnx
    from onnx import helper

    graph = inferred.graph
    if large or not any(
        (node.domain == "com.microsoft" and node.op_type in ("FusedConv", *_QLINEAR_AS_ONNX)) or node.domain == _NCHWC
        for node in graph.node
    ):
        return inferred
    stand_in = onnx.ModelProto()
    stand_in.CopyFrom(inferred)
    # inferred afresh where the file's inference made dims up past an op it does not know ("unk__3"); the
    # shapes it found whole, and those the exporter declared, stay for the ops the stand-in does not know either
    whole = [v for v in stand_in.graph.value_info if _made_up_dims(v) == 0]
    del stand_in.graph.value_info[:]
    copy_messages(stand_in.graph.value_info, whole)
    extra = []
    for node in stand_in.graph.node:
        if node.domain == "com.microsoft" and node.op_type in _QLINEAR_AS_ONNX:
            op, operands = _QLINEAR_AS_ONNX[node.op_type]
            inputs = list(node.input)[operands]
            kept = [a for a in node.attribute if a.name != "channels_last"]
            if len(kept) < len(node.attribute):
                continue  # NHWC: no ONNX op of that layout
            del node.input[:]
            node.input.extend(inputs)
            del node.attribute[:]
            node.attribute.extend(kept)
            node.op_type, node.domain = op, ""
        elif (node.domain == "com.microsoft" and node.op_type == "FusedConv") or (
            node.domain == _NCHWC and node.op_type in _NCHWC_AS_ONNX
        ):
            kept = [a for a in node.attribute if a.name not in ("activation", "activation_params")]
            inputs = list(node.input[:3]) if node.op_type in ("FusedConv", "Conv") else list(node.input[:1])
            del node.input[:]
            node.input.extend(inputs)
            del node.attribute[:]
            node.attribute.extend(kept)
            node.op_type, node.domain = ("Conv" if node.op_type == "FusedConv" else node.op_type), ""
        elif node.domain == _NCHWC and node.op_type == "ReorderInput":
            node.op_type, node.domain = "Identity", ""
            del node.attribute[:]
        elif node.domain == _NCHWC and node.op_type == "ReorderOutput":
            channels = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "channels"), None)
            last = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "channels_last"), 0)
            if channels is None or last:
                continue
            ends = f"{node.output[0]}:channels"
            extra += [
                helper.make_tensor(ends, onnx.TensorProto.INT64, [1], [int(channels)]),
                helper.make_tensor(f"{ends}:start", onnx.TensorProto.INT64, [1], [0]),
                helper.make_tensor(f"{ends}:axis", onnx.TensorProto.INT64, [1], [1]),
            ]
            node.op_type, node.domain = "Slice", ""
            node.input.extend([f"{ends}:start", ends, f"{ends}:axis"])
            del node.attribute[:]
    stand_in.graph.initializer.extend(extra)
    try:
        shaped = onnx.shape_inference.infer_shapes(stand_in, strict_mode=False, data_prop=True)
    except Exception:
        return inferred
    # the stand-in's inference went through the whole graph: what it found for the rest is the file's too
    produced = {out for node in graph.node for out in node.output if out}
    _adopt_shapes(graph, [info for info in shaped.graph.value_info if info.name in produced])
    return inferred


def _adopt_shapes(graph: Any, found: list[Any]) -> None:
    """Add to ``graph``'s value_info the shapes of ``found`` (another inference's value infos) for the values it
    has none of, and for those whose dims it has fewer of than onnx made up there (``unk__N``)."""
    known = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output] if _ranked(v)}
    better = {
        info.name: info
        for info in found
        if _ranked(info) and (info.name not in known or _made_up_dims(info) < _made_up_dims(known[info.name]))
    }
    kept = [v for v in graph.value_info if v.name not in better]
    del graph.value_info[:]
    copy_messages(graph.value_info, [*kept, *better.values()])


#: onnxruntime's quantized ops (QOperator format, com.microsoft) as the ONNX op of the same shapes, and the
#: slice of their inputs that op takes: QLinearAdd(A, A_scale, A_zero, B, ...) adds A and B, QLinearConcat's
#: inputs after its scale and zero point are (tensor, scale, zero) triples, QGemm multiplies A and B
_QLINEAR_AS_ONNX: dict[str, tuple[str, slice]] = {
    "QLinearAdd": ("Add", slice(0, 4, 3)),
    "QLinearMul": ("Mul", slice(0, 4, 3)),
    "QLinearConcat": ("Concat", slice(2, None, 3)),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", slice(0, 1)),
    "QLinearAveragePool": ("AveragePool", slice(0, 1)),
    "QLinearLeakyRelu": ("Identity", slice(0, 1)),
    "QLinearSigmoid": ("Identity", slice(0, 1)),
    "QLinearSoftmax": ("Identity", slice(0, 1)),
    "QGemm": ("Gemm", slice(0, 4, 3)),
}


def _made_up_dims(info: Any) -> int:
    """The dims of a value's shape that onnx's inference named itself (unk__N) or left blank."""
    dims = info.type.tensor_type.shape.dim
    return sum(1 for d in dims if not d.HasField("dim_value") and (not d.dim_param or d.dim_param.startswith("unk__")))


#: onnxruntime contrib ops onnx cannot infer, whose first output has the shape of their first input.
_SHAPE_PRESERVING_CONTRIB = frozenset(
    {
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "SimplifiedLayerNormalization",
        "GroupNorm",
        "SkipGroupNorm",
        "BiasGelu",
        "FastGelu",
        "Gelu",
        "QuickGelu",
    }
)


def _through_contrib(inferred: onnx.ModelProto, large: bool, rounds: int = 8) -> onnx.ModelProto:
    """Carry shapes across contrib norm ops (unknown to onnx) and re-infer what follows them.

    onnx stops at ops it has no schema for; a transformer exported with SkipLayerNormalization would
    otherwise have no shapes after its first block. Only in memory (small models).
    """
    import onnx

    if large:
        return inferred
    for _ in range(rounds):
        graph = inferred.graph
        known = {
            v.name: v
            for v in list(graph.input) + list(graph.value_info) + list(graph.output)
            if v.type.tensor_type.HasField("shape")
        }
        added = False
        for node in graph.node:
            if node.op_type not in _SHAPE_PRESERVING_CONTRIB or not node.input or not node.output:
                continue
            src, out = node.input[0], node.output[0]
            if src in known and out and out not in known:
                info = onnx.ValueInfoProto()
                info.CopyFrom(known[src])
                info.name = out
                graph.value_info.append(info)
                known[out] = info
                added = True
        if not added:
            break
        inferred = onnx.shape_inference.infer_shapes(inferred, strict_mode=False, data_prop=True)
    return inferred


#: the opset a file is converted to where onnx's inference leaves a reduction's input without a rank
_INFERENCE_OPSET = 17


def _through_newer_opset(inferred: onnx.ModelProto, skeleton: onnx.ModelProto, large: bool) -> onnx.ModelProto:
    """Shapes onnx infers only at a newer opset, added where a reduction's input has none or a norm's has dims
    onnx made up.

    At opsets below 13 onnx's data propagation does not follow Shape -> Gather -> Concat into a Reshape's
    target, so a transformer that splits its heads so leaves every later tensor without even a rank, and the
    walk cannot resolve ``ReduceMean(axes=[-1])`` (lineless-table-rec's lore_process: 14 of its 16 LayerNorms).
    onnx's version converter takes a copy of the skeleton to opset 17, whose inference follows them; its shapes
    fill the tensors of the same name that have none (the converter keeps the names of the values it carries).
    Only then, in memory, and best effort: a model the converter refuses keeps the shapes it had."""
    import onnx
    from onnx import version_converter

    opset = next((o.version for o in inferred.opset_import if o.domain in ("", "ai.onnx")), 0)
    if large or opset >= _INFERENCE_OPSET or not (_rankless_reductions(inferred) or _norms_of_guessed_shape(inferred)):
        return inferred
    try:
        # the converter, as inference, follows the file's node order: a misplaced node loses every shape after it
        converted = version_converter.convert_version(_sorted(skeleton), _INFERENCE_OPSET)
        newer = onnx.shape_inference.infer_shapes(converted, strict_mode=False, data_prop=True)
    except Exception:  # the converter has no adapter for many ops and versions: the shapes as they were
        return inferred
    _adopt_shapes(inferred.graph, list(newer.graph.value_info))
    return inferred


def _ranked(value: Any) -> bool:
    return value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")


def _rankless_reductions(model: onnx.ModelProto) -> bool:
    """Some ReduceMean/ReduceSum/GlobalAveragePool (tf2onnx's mean over the last axis) reads a tensor whose rank the
    inferred model does not know."""
    ranked = {v.name for v in list(model.graph.input) + list(model.graph.value_info) if _ranked(v)}
    ranked |= {init.name for init in model.graph.initializer}
    return any(
        node.op_type in ("ReduceMean", "ReduceSum", "GlobalAveragePool") and node.input and node.input[0] not in ranked
        for node in model.graph.node
    )


#: the norm ops whose input's dims size the set they normalize (BN001 reads them)
_SIZED_NORM_OPS = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"})


def _norms_of_guessed_shape(model: onnx.ModelProto) -> bool:
    """Some norm op reads a tensor whose rank onnx's inference did not find, or, in a model whose inputs fix
    every dim but the batch, one whose other dims it made up (unk__N): a lowered GroupNorm's Reshape back to
    the input's Shape below opset 13 leaves every later map so. (Where an input leaves its height open, made-up
    dims downstream are the file's own.)"""
    shaped = {v.name: v for v in list(model.graph.input) + list(model.graph.value_info) if _ranked(v)}
    stored = {t.name for t in model.graph.initializer}
    inputs = [shaped.get(v.name) for v in model.graph.input if v.name not in stored]
    fixed = all(
        v is not None and all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim[1:]) for v in inputs
    )
    for node in model.graph.node:
        if node.op_type not in _SIZED_NORM_OPS or not node.input:
            continue
        value = shaped.get(node.input[0])
        if value is None:
            return True
        if fixed and any(not d.HasField("dim_value") for d in value.type.tensor_type.shape.dim[1:]):
            return True
    return False


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself when its nodes are in topological order (as ONNX requires), else a sorted copy:
    onnx's shape inference visits nodes in file order and would infer nothing after a misplaced one."""

    nodes = list(model.graph.node)
    order = topological_order(nodes)
    if order == list(range(len(nodes))):
        return model
    copy = type(model)()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy_messages(copy.graph.node, (nodes[i] for i in order))
    return copy


def model_info(path: str, model: onnx.ModelProto, sha256: str | None = None) -> ModelInfo:
    """The report's model section: path as the user gave it, sha256 (streamed when None; "" while a thread
    computes it), opsets, producer."""
    opset = {(op.domain or "ai.onnx"): int(op.version) for op in model.opset_import}
    producer = " ".join(x for x in (model.producer_name, model.producer_version) if x) or None
    return ModelInfo(
        path=path,
        format="onnx",
        sha256=_sha256_or_fail(path) if sha256 is None else sha256,
        opset=opset,
        producer=producer,
        ir_version=int(model.ir_version),
    )


def load_onnx(path: str, weights: bool = True) -> OnnxHandle:
    """Load ``path`` with its weights, validating external data first; BackendError on any user error.

    ``weights=False``: the weights over VIEW_LOAD_BYTES stored in the file itself stay there (the model
    names the file as their external data, as for a file with external data), and the file's sha256 is
    computed in a thread (``pending_sha256``)."""
    try:
        return _load_onnx(path, weights)
    except UnicodeDecodeError as exc:  # a string field protobuf cannot decode (graph name, doc string, ...)
        raise _fail(path, f"not a valid ONNX model: text that is not UTF-8 ({_first_line(exc)})") from exc


def _load_onnx(path: str, weights: bool) -> OnnxHandle:
    size = _check_file(path)
    pending: Callable[[], str] | None = None
    in_file: set[str] = set()
    if weights or size < LEAVE_WEIGHTS_MIN_BYTES:
        digest = hashlib.sha256()
        model = _parse(path, digest)
        sha256 = digest.hexdigest()
    else:
        from bncheck.probe_plan import in_background

        # bytes protobuf does not read are hashed in a thread that the report waits for (final_info)
        pending, sha256 = in_background(lambda: _sha256_or_fail(path)), ""
        model, in_file = _parse_without_large_weights(path) or (_parse(path), set())
    external, external_size = _validate_external(path, model, in_file)
    total = size + external_size
    large = total > PROTOBUF_LIMIT
    weight_notes = _unknown_key_notes(model) + _load_view_weights(path, model) if external else []
    weight_notes += _inlined(model) + _unfolded(model)
    inferred, notes = _check_and_infer(path, model, large)
    notes = weight_notes + notes
    shapes, types = _collect_shapes(inferred, model)
    handle = OnnxHandle(
        path=os.path.abspath(path),
        model=model,
        external_data=external,
        value_shapes=shapes,
        value_types=types,
        size_bytes=total,
        info=model_info(path, model, sha256),
        notes=notes,
    )
    if inferred is not model and not large:  # a copy of its own (on a failed inference, the model itself)
        handle.spare_skeleton = inferred
    if pending is not None:
        handle.pending_sha256 = _completing(handle, pending)
    return handle


def _inlined(model: onnx.ModelProto) -> list[Note]:
    """Inline the calls of ``model``'s local functions (:mod:`functions`), with the note that says so."""
    from bncheck.backends.onnx.functions import inline_calls

    count = len(model.functions)
    if not inline_calls(model):
        return []
    return [
        Note(
            "info",
            f"the file's {count} model-local function(s) are inlined, as onnxruntime runs them (onnx.inliner): "
            "the norm layers inside them are checked, and a model `fix` writes keeps them inlined",
        )
    ]


def _unfolded(model: onnx.ModelProto) -> list[Note]:
    """Read back the batch norms onnxoptimizer folded into convolutions as ops (:mod:`folded_bn`), with the note
    that says so."""
    from bncheck.backends.onnx.folded_bn import unfold_conv_batch_norms

    convs = unfold_conv_batch_norms(model)
    if not convs:
        return []
    return [
        Note(
            "info",
            f"{len(convs)} batch norm(s) folded into convolutions as ops (onnxoptimizer's fuse_bn_into_conv: "
            f"{few(convs)}) are read as a BatchNormalization after each convolution, the same function: their stored "
            "statistics are checked, and a model `fix` writes keeps them as BatchNormalization nodes",
        )
    ]


def _completing(handle: OnnxHandle, hashing: Callable[[], str]) -> Callable[[], str]:
    """``hashing`` (waits for the file's sha256), which also completes ``handle.info`` with it."""

    def done() -> str:
        sha256 = hashing()
        assert handle.info is not None  # load_onnx sets it
        handle.info = replace(handle.info, sha256=sha256)
        return sha256

    return done
