"""Model-local functions: calls inlined into the main graph, as onnxruntime runs them.

torch's ``export_modules_as_functions`` and onnxscript write a module's nodes (a BatchNorm2d's
BatchNormalization among them) inside functions the main graph calls, nested as the modules are. The walk,
the probe's instrumentation and ``fix`` read the main graph, so the calls are inlined at load with
``onnx.inliner``, which renames the functions' values apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from bncheck.backends.onnx.graph import bodies, copy_fields, copy_messages, nested_bodies

if TYPE_CHECKING:  # onnx is imported lazily: `bncheck --help` must not pay for it
    import onnx


def inline_calls(model: onnx.ModelProto) -> bool:
    """Replace ``model``'s calls of its local functions by their nodes, in place; True if it did.

    The model is left as it is where a function calls an op its opset does not define (the probe refuses
    those: :func:`undefined_function_op`) or where a call would stay (onnx's inliner leaves those of a
    function whose opset differs from the model's, which onnx.checker refuses). The inliner gets a copy
    without the weights: the initializers as empty stand-ins of the same names (which keep its new names
    apart from theirs), and the call nodes without the attributes their function never reads (torch writes
    each module's weights there too, as a record)."""
    if not model.functions or undefined_function_op(model) is not None:
        return False
    import onnx
    from onnx import inliner

    read = _attributes_read(model.functions)
    bare = onnx.ModelProto()
    copy_fields(model, bare, skip={"graph", "functions"})
    copy_fields(model.graph, bare.graph, skip={"initializer", "node"})
    _copy_nodes(model.graph.node, bare.graph.node, read)
    for tensor in model.graph.initializer:
        bare.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    for function in model.functions:
        copy = bare.functions.add()
        copy_fields(function, copy, skip={"node"})
        _copy_nodes(function.node, copy.node, read)
    try:
        flat = inliner.inline_local_functions(bare)
    except Exception:  # a model the inliner refuses is read as written; the walk counts its norms
        return False
    if any((node.domain, node.op_type) in read for node in _all_nodes(flat.graph)):
        return False
    del model.graph.node[:]
    copy_messages(model.graph.node, flat.graph.node)
    del model.functions[:]
    del model.opset_import[:]
    copy_messages(model.opset_import, flat.opset_import)
    return True


def _attributes_read(functions: Iterable[onnx.FunctionProto]) -> dict[tuple[str, str], set[str]]:
    """Per function, the names of the attributes its calls pass that it reads: those an op of its body
    refers to, and those it passes on to a call that reads them (torch's scopes pass a module's weights down
    to its Conv2d, whose Conv reads its inputs instead)."""
    bodies = {(f.domain, f.name): f for f in functions}
    read: dict[tuple[str, str], set[str]] = {key: set() for key in bodies}
    changed = True
    while changed:  # until no call passes on an attribute its callee was found to read
        changed = False
        for key, function in bodies.items():
            for node in function.node:
                for attr in _node_attributes(node):
                    callee = read.get((node.domain, node.op_type))
                    if not attr.ref_attr_name or attr.ref_attr_name in read[key]:
                        continue
                    if callee is None or attr.name in callee:
                        read[key].add(attr.ref_attr_name)
                        changed = True
    return read


def _node_attributes(node: onnx.NodeProto) -> Iterator[onnx.AttributeProto]:
    """``node``'s attributes and those of the nodes of its If/Loop/Scan bodies (read as ``node``'s own)."""
    yield from node.attribute
    for body in bodies(node):
        for inner in _all_nodes(body):
            yield from inner.attribute


def _copy_nodes(nodes: Iterable[onnx.NodeProto], target: Any, read: dict[tuple[str, str], set[str]]) -> None:
    """Copy ``nodes`` into ``target``, each call of a local function without the attributes it does not read."""
    for node in nodes:
        kept = read.get((node.domain, node.op_type))
        if kept is None or all(a.name in kept for a in node.attribute):
            target.add().CopyFrom(node)
            continue
        copy = target.add()
        copy_fields(node, copy, skip={"attribute"})
        copy_messages(copy.attribute, (a for a in node.attribute if a.name in kept))


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The nodes of ``graph`` and of the If/Loop/Scan bodies inside it."""
    yield from graph.node
    for body in nested_bodies(graph):
        yield from body.node


def undefined_function_op(model: onnx.ModelProto) -> str | None:
    """Why onnxruntime cannot build a session, when a model-local function calls a standard op its opset
    does not define (None otherwise): onnxruntime crashes the process on those instead of raising."""
    from onnx import defs

    model_versions = {(o.domain or ""): int(o.version) for o in model.opset_import}
    for function in model.functions:
        versions = {**model_versions, **{(o.domain or ""): int(o.version) for o in function.opset_import}}
        for node in function.node:
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            if domain not in ("", "ai.onnx.ml") or domain not in versions:
                continue  # other domains are local functions or custom ops: onnxruntime reports those itself
            if not defs.has(node.op_type, versions[domain], domain):
                return (
                    f"model-local function {function.name[:80]!r} calls {node.op_type[:80]!r}, "
                    f"which {domain or 'ai.onnx'} opset {versions[domain]} does not define"
                )
    return None
