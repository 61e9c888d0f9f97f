"""Inference BatchNormalizations written out as a per-channel affine map with their statistics in the graph.

jax2onnx (Keras 3's ``model.export(format="onnx")`` on the JAX backend, flax's BatchNorm in inference) writes
``y = x * k + (beta - mean * k)`` with ``k = gamma / sqrt(var + eps)`` computed from the stored gamma, beta, mean
and variance instead of a BatchNormalization node. Other exporters fold those constants into one scale and shift
(nothing left to read); here they stay, so the layer's statistics can be judged (BN003, BN004, BN005) as a
BatchNormalization's are.
"""

from __future__ import annotations

from bncheck.backends.onnx.graph import ONNX_DOMAINS, GraphIndex, as_float_array, node_input
from bncheck.model import Kind, NormLayer

#: why bncheck's fix leaves such a layer
NOTE = (
    "an inference BatchNormalization written as x * k + (beta - mean * k), k = gamma / sqrt(var + eps), its "
    "statistics stored (jax2onnx, Keras 3 on JAX): judged and repaired as a BatchNormalization"
)


def affine_batch_norms(g: GraphIndex, used: set[int]) -> list[tuple[NormLayer, list[int]]]:
    """Each ``Add(Mul(x, k), shift)`` of data ``x`` with ``k`` and ``shift`` spelled from stored statistics (none
    of its nodes in ``used``), as (layer, node positions)."""
    found: list[tuple[NormLayer, list[int]]] = []
    if not any(node.op_type in ("Sqrt", "Rsqrt") for node in g.nodes):
        return found  # no 1 / sqrt(var + eps) to find (most files)
    taken = set(used)
    for idx, node in enumerate(g.nodes):
        if node.op_type != "Mul" or node.domain not in ONNX_DOMAINS or len(node.input) != 2 or idx in taken:
            continue
        for x, k in (node.input, node.input[::-1]):
            matched = _layer(g, idx, x, k)
            if matched is not None and not taken & set(matched[1]):
                taken |= set(matched[1])
                found.append(matched)
                break
    return found


def _layer(g: GraphIndex, mul: int, x: str, k: str) -> tuple[NormLayer, list[int]] | None:
    if g.data_free(x) or not g.data_free(k):
        return None
    scale = _inv_std_times_gamma(g, k)
    if scale is None:
        return None
    gamma, var, eps, k_nodes = scale
    adds = g.users(g.nodes[mul].output[0], "Add")
    if len(adds) != 1:
        return None
    add = adds[0]
    shift = next((t for t in g.nodes[add].input if t != g.nodes[mul].output[0]), None)
    found = None if shift is None else _shift(g, shift, k)
    if found is None:
        return None
    mean, beta, shift_nodes = found
    values = [as_float_array(g.param(t)) if t is not None else None for t in (gamma, beta, mean, var)]
    if values[2] is None or values[3] is None:
        return None
    channels = values[3].size
    shape = g.shape(x)
    axis = _channel_axis(g.shape(k), shape, channels)
    if axis is None or channels < 1 or any(v is not None and v.size != channels for v in values):
        return None
    rank = len(shape) if shape is not None else None
    axes = None if rank is None else tuple(a for a in range(rank) if a != axis)
    nodes = sorted({mul, add, *k_nodes, *shift_nodes})
    # where the chain reads its statistics: fix gives those inputs new values, the chain stays as written
    stats = {"mean": (mean, values[2].shape), "var": (var, values[3].shape)}
    reads = [
        (which, g.nodes[i].output[0], pos, tuple(shape_read))
        for i in nodes
        for pos, t in enumerate(g.nodes[i].input)
        for which, (tensor, shape_read) in stats.items()
        if t == tensor
    ]
    layer = NormLayer(
        name=g.node_name(mul),
        kind=Kind.BATCH,
        op_type="Mul",
        domain=g.nodes[mul].domain,
        nodes=tuple(g.node_name(i) for i in nodes),
        input=x,
        output=g.nodes[add].output[0],
        inputs=(x,),
        outputs=(g.nodes[add].output[0],),
        axes=axes,
        channel_axis=axis,
        channels=channels,
        epsilon=eps,
        training=False,
        batch_statistics=False,
        uses_running_stats=True,
        scale=None if values[0] is None else values[0].ravel(),
        bias=None if values[1] is None else values[1].ravel(),
        mean=values[2].ravel(),
        var=values[3].ravel(),
        input_shape=shape,
        notes=(NOTE,),
        extra={"affine_batch_norm": True, "stat_reads": reads},
    )
    return layer, nodes


def _stored(g: GraphIndex, t: str) -> bool:
    """``t`` holds stored values (``GraphIndex.param`` reads them through reshapes, casts and expands)."""
    return g.param(t) is not None


def _inv_std_times_gamma(g: GraphIndex, k: str) -> tuple[str | None, str, float, list[int]] | None:
    """``k`` as gamma * 1 / sqrt(var + eps) (or without gamma): (gamma, var, eps, nodes)."""
    idx = g.produced_by(k, "Mul")
    if idx is not None:
        for inv, gamma in (g.nodes[idx].input, g.nodes[idx].input[::-1]):
            found = _inv_std(g, inv) if _stored(g, gamma) else None
            if found is not None:
                return gamma, found[0], found[1], [idx, *found[2]]
    found = _inv_std(g, k)
    return None if found is None else (None, found[0], found[1], found[2])


def _inv_std(g: GraphIndex, t: str) -> tuple[str, float, list[int]] | None:
    """``t`` as 1 / sqrt(var + eps), Reciprocal(Sqrt(...)) or Rsqrt(...): (var, eps, nodes)."""
    idx = g.producer.get(t)
    if idx is None:
        return None
    node, op = g.nodes[idx], g.op(idx)
    if op == "Div" and len(node.input) == 2 and g.scalar(node.input[0]) == 1.0:
        root = g.produced_by(node.input[1], "Sqrt")
    elif op == "Reciprocal":
        root = g.produced_by(node_input(node, 0), "Sqrt")
    elif op == "Rsqrt":
        root = idx
    else:
        return None
    add = g.produced_by(node_input(g.nodes[root], 0), "Add") if root is not None else None
    if root is None or add is None or len(g.nodes[add].input) != 2:
        return None
    for var, eps in (g.nodes[add].input, g.nodes[add].input[::-1]):
        value = g.scalar(eps)
        if value is not None and _stored(g, var):
            return var, value, sorted({idx, root, add})
    return None


def _shift(g: GraphIndex, shift: str, k: str) -> tuple[str, str | None, list[int]] | None:
    """``shift`` as beta - mean * k: Add(Mul(Neg(mean), k), beta), Sub(beta, Mul(mean, k)), Neg(Mul(mean, k)) or
    Mul(Neg(mean), k) without beta: (mean, beta, nodes)."""
    idx = g.producer.get(shift)
    if idx is None:
        return None
    node, op = g.nodes[idx], g.op(idx)
    if op in ("Add", "Sub") and len(node.input) == 2:
        pairs = [(node.input[0], node.input[1])] if op == "Sub" else [tuple(node.input), tuple(node.input[::-1])]
        for a, b in pairs:
            beta, scaled = (a, b) if op == "Sub" else (b, a)
            found = _mean_times_k(g, scaled, k, negated=op == "Add") if _stored(g, beta) else None
            if found is not None:
                return found[0], beta, [idx, *found[1]]
        return None
    found = _mean_times_k(g, shift, k, negated=True)
    return None if found is None else (found[0], None, found[1])


def _mean_times_k(g: GraphIndex, t: str, k: str, negated: bool) -> tuple[str, list[int]] | None:
    """``t`` as mean * k (``negated``: -mean * k or -(mean * k)): (mean, nodes)."""
    idx = g.producer.get(t)
    if idx is None:
        return None
    if negated and g.op(idx) == "Neg":
        found = _mean_times_k(g, node_input(g.nodes[idx], 0), k, negated=False)
        return None if found is None else (found[0], [idx, *found[1]])
    node = g.nodes[idx]
    if g.op(idx) != "Mul" or len(node.input) != 2 or k not in node.input:
        return None
    other = node.input[1] if node.input[0] == k else node.input[0]
    neg = g.produced_by(other, "Neg") if negated else None
    if negated:
        if neg is None:
            return None
        other = node_input(g.nodes[neg], 0)
    if not _stored(g, other):
        return None
    return other, [idx, *([neg] if neg is not None else [])]


def _channel_axis(k_shape, x_shape, channels: int) -> int | None:
    """The axis of x that ``k`` (broadcast against it) varies along: its one dim of ``channels``."""
    if k_shape is None:
        return 1 if x_shape is not None and len(x_shape) >= 2 and x_shape[1] == channels else None
    rank = len(x_shape) if x_shape is not None else len(k_shape)
    if len(k_shape) > rank:
        return None
    dims = [1] * (rank - len(k_shape)) + list(k_shape)
    axes = [a for a, d in enumerate(dims) if d != 1]
    if len(axes) != 1 or dims[axes[0]] != channels:
        return None
    return axes[0]
