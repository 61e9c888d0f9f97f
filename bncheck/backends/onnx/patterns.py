"""Decomposed normalization chains (ReduceMean/Sub/Pow/Sqrt/Div forms) recognized by data flow."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bncheck.backends.onnx.graph import (
    ONNX_DOMAINS,
    GraphIndex,
    as_float_array,
    node_input,
    norm_axis,
    other_input,
    shape_dim,
)
from bncheck.model import Dim, Kind, NormLayer

# ====================================================================== decomposed chains


@dataclass
class _Chain:
    """A matched mean/variance chain; ``nodes`` are graph positions."""

    x: str
    mean: str
    reduce: int
    axes: tuple[int, ...] | None
    centered: bool
    nodes: set[int] = field(default_factory=set)
    epsilon: float | None = None
    eps_after_sqrt: bool = False
    output: str = ""
    scale: str | None = None
    bias: str | None = None
    # the affine multiplies a transposed copy of x (tf2onnx: NCHW moments, NHWC affine): the output is in
    # another layout than the input
    relaid: bool = False
    # the variance times a count or constant before its square root (dataflow.Form.rescaled)
    rescaled: bool = False
    # gamma (and beta) computed in the graph from another input, not stored: a conditional norm
    computed_affine: bool = False
    # the axis of the input that the affine's values run along, where the affine is applied to a transposed
    # copy and transposed back (asteroid's GlobLN); None: the last axis, as broadcasting gives it
    affine_axis: int | None = None
    # the variance and the deviation both transposed by this perm before the division (onnxruntime's
    # transpose optimizer): the output is in another layout than the input
    tail_perm: tuple[int, ...] | None = None


#: ops that take a mean: GlobalAveragePool is ReduceMean over axes 2.. with keepdims (tf2onnx writes a
#: LayerNorm's mean over the last axis of [N, T, D] so)
MEAN_OPS = ("ReduceMean", "GlobalAveragePool")


def _reduce_axes(g: GraphIndex, idx: int) -> tuple[int, ...] | bool | None:
    """Normalized axes of a ReduceMean (or GlobalAveragePool); None if unknown; False if it reduces nothing."""
    node = g.nodes[idx]
    attrs = g.attrs(idx)
    rank = g.rank(node_input(node, 0))
    if node.op_type == "GlobalAveragePool":
        return None if rank is None or rank < 3 else tuple(range(2, rank))
    if g.opset.get("", 0) >= 18 or len(node.input) > 1:
        axes_in = node_input(node, 1)
        if not axes_in:
            if int(attrs.get("noop_with_empty_axes", 0)):
                return False
            return None if rank is None else tuple(range(rank))
        value = g.ints(axes_in)
        if value is None:
            return None
        raw = [int(a) for a in value.ravel()]
    else:
        if "axes" not in attrs:
            return None if rank is None else tuple(range(rank))
        raw = [int(a) for a in attrs["axes"]]
    if any(a < 0 for a in raw) and rank is None:
        return None
    return tuple(sorted({a + rank if a < 0 else a for a in raw}))  # type: ignore[operator]


def _square_of(g: GraphIndex, tensor: str) -> tuple[str, int] | None:
    """If ``tensor`` = t*t or t**2, return (t, node)."""
    idx = g.produced_by(tensor, "Mul", "Pow")
    if idx is None:
        return None
    node = g.nodes[idx]
    if len(node.input) != 2:
        return None
    a, b = node.input
    if node.op_type == "Mul" and g.same(a, b):
        return a, idx
    if node.op_type == "Pow" and g.scalar(b) == 2.0:
        return a, idx
    return None


def _squares(g: GraphIndex, tensor: str) -> list[tuple[str, int]]:
    """Nodes computing tensor*tensor or tensor**2, as (output, node)."""
    out = []
    for u in g.users(tensor, "Mul", "Pow"):
        node = g.nodes[u]
        squared = len(node.input) == 2 and node.output and _square_of(g, node.output[0]) is not None
        if squared and g.same(node.input[0], tensor):
            out.append((node.output[0], u))
    return out


def _mean_users(g: GraphIndex, mean_aliases: dict[str, list[int]], op: str) -> list[tuple[int, list[int]]]:
    found = []
    for alias, passed in mean_aliases.items():
        for u in g.users(alias, op):
            found.append((u, passed))
    return found


def _match_variance(g: GraphIndex, r1: int, x: str, m: str, axes) -> tuple[str, set[int]] | None:
    """The variance tensor computed from mean ``m`` of ``x`` over ``axes`` (same axes), and its nodes."""
    aliases = g.aliases(m)
    # (a) mean((x - m)^2)
    for sub, passed in _mean_users(g, aliases, "Sub"):
        node = g.nodes[sub]
        if len(node.input) != 2 or node.input[1] not in aliases or not g.same(node.input[0], x):
            continue
        for dev, cast in _value_aliases(g, node.output[0]).items():  # exporters may Cast before squaring
            for sq, sq_idx in _squares(g, dev):
                for sq_alias, cast2 in _value_aliases(g, sq).items():
                    for r2 in g.users(sq_alias, *MEAN_OPS):
                        if _reduce_axes(g, r2) == axes:
                            return g.nodes[r2].output[0], {sub, sq_idx, r2, *passed, *cast, *cast2}
    # (b) mean(x^2) - mean(x)^2
    for sq_m, sq_m_idx in ((o, i) for a in aliases for o, i in _squares(g, a)):
        for sub in g.users(sq_m, "Sub"):
            node = g.nodes[sub]
            if node.input[1] != sq_m:
                continue
            mean_of_squares = g.produced_by(node.input[0], *MEAN_OPS)
            if mean_of_squares is None or _reduce_axes(g, mean_of_squares) != axes:
                continue
            squared = _square_of(g, node_input(g.nodes[mean_of_squares], 0))
            if squared is not None and g.same(squared[0], x):
                return node.output[0], {sq_m_idx, sub, mean_of_squares, squared[1]}
    return None


def _value_aliases(g: GraphIndex, tensor: str) -> dict[str, list[int]]:
    """``tensor`` and its copies through Identity/Cast, with the nodes passed."""
    found: dict[str, list[int]] = {tensor: []}
    frontier = [tensor]
    for _ in range(2):
        nxt = []
        for t in frontier:
            for user in g.users(t, "Identity", "Cast"):
                out = g.nodes[user].output[0] if g.nodes[user].output else ""
                if out and out not in found:
                    found[out] = found[t] + [user]
                    nxt.append(out)
        frontier = nxt
    return found


def _single_user(g: GraphIndex, tensor: str, *ops: str) -> int | None:
    users = _value_users(g, tensor, *ops)
    return users[0] if len(users) == 1 else None


def _value_users(g: GraphIndex, tensor: str, *ops: str) -> list[int]:
    """The nodes reading ``tensor``'s values: a CastLike reading it as its second input takes its type only
    (torch's dynamo exporter unoptimized casts each parameter like the tensor it meets)."""
    return [i for i in g.users(tensor, *ops) if g.op(i) != "CastLike" or g.nodes[i].input[0] == tensor]


def _match_tail(g: GraphIndex, chain: _Chain, var: str, deviations: Callable[[], dict[str, tuple[int, ...]]]) -> bool:
    """From the variance: + eps, sqrt, division of the deviation (or x * inv + (beta - mean * inv)).

    ``deviations()`` maps tensors holding the numerator (x - mean, or x for RMS) to the nodes making them.
    Fills chain.epsilon/output/scale/bias and adds nodes. False if no normalization follows.
    """
    std = inv = None
    for alias, passed, perm in _variance_copies(g, var):  # squeezed/cast first (tf.nn.moments), or transposed
        for add in g.users(alias, "Add"):
            eps = g.scalar(other_input(g.nodes[add], alias) or "")
            if eps is None:
                continue
            ve = g.nodes[add].output[0]
            for s in g.users(ve, "Sqrt"):
                std, chain.epsilon = g.nodes[s].output[0], eps
                chain.nodes |= {add, s, *passed}
                break
            if std is None:
                for p in g.users(ve, "Pow"):
                    if g.scalar(node_input(g.nodes[p], 1)) == -0.5:
                        inv, chain.epsilon = g.nodes[p].output[0], eps
                        chain.nodes |= {add, p, *passed}
                        break
            if std is not None or inv is not None:
                chain.tail_perm = perm
                break
        if std is not None or inv is not None:
            break
    if std is None and inv is None:
        for s in g.users(var, "Sqrt"):  # eps added to the standard deviation (MVN) or none at all
            s_out = g.nodes[s].output[0]
            for add in g.users(s_out, "Add"):
                eps = g.scalar(other_input(g.nodes[add], s_out) or "")
                if eps is not None:
                    std, chain.epsilon, chain.eps_after_sqrt = g.nodes[add].output[0], eps, True
                    chain.nodes |= {s, add}
                    break
            if std is None:
                std, chain.epsilon = s_out, 0.0
                chain.nodes.add(s)
            break
    if std is None and inv is None:
        return False
    devs = deviations() if chain.tail_perm is None else _transposed(g, deviations(), chain.tail_perm)
    normalized = None
    if std is not None:
        for d in g.users(std, "Div"):
            node = g.nodes[d]
            if node.input[1] == std and node.input[0] in devs:
                normalized = node.output[0]
                chain.nodes |= {d, *devs[node.input[0]]}
                break
            one = g.scalar(node.input[0])
            if node.input[1] == std and one == 1.0:
                inv = node.output[0]
                chain.nodes.add(d)
                break
        if normalized is None and inv is None:
            for r in g.users(std, "Reciprocal"):
                inv = g.nodes[r].output[0]
                chain.nodes.add(r)
                break
    if normalized is None and inv is not None:
        for mul in g.users(inv, "Mul"):
            other = other_input(g.nodes[mul], inv)
            if other in devs:
                normalized = g.nodes[mul].output[0]
                chain.nodes |= {mul, *devs[other]}
                break
        if normalized is None and _match_tf_form(g, chain, inv):
            return True
        if normalized is None:
            for mul in g.users(inv, "Mul"):  # inv * gamma, then (x - mean) * that
                node = g.nodes[mul]
                gamma = other_input(node, inv)
                if gamma is None:
                    continue
                if not g.is_param_like(gamma):
                    # a gamma computed in the graph (a conditional instance norm: from a style input) holds
                    # for tf.nn.batch_normalization's form, whose x * k and mean * k pin the chain down
                    if _match_tf_form(g, chain, node.output[0]):
                        chain.nodes.add(mul)
                        chain.computed_affine = True
                        return True
                    continue
                inv2 = node.output[0]
                for mul2 in g.users(inv2, "Mul"):
                    other = other_input(g.nodes[mul2], inv2)
                    if other in devs:
                        normalized = g.nodes[mul2].output[0]
                        chain.scale = gamma
                        chain.nodes |= {mul, mul2, *devs[other]}
                        break
                if normalized is None:
                    saved = chain.scale
                    chain.scale = gamma
                    chain.nodes.add(mul)
                    if _match_tf_form(g, chain, inv2):
                        return True
                    chain.scale = saved
                    chain.nodes.discard(mul)
                if normalized is not None:
                    break
    if normalized is None:
        return False
    chain.output = normalized
    _match_affine(g, chain)
    return True


def _variance_copies(g: GraphIndex, var: str) -> list[tuple[str, list[int], tuple[int, ...] | None]]:
    """Tensors holding the variance (:meth:`GraphIndex.aliases`), then its Transposes with their perms."""
    copies: list[tuple[str, list[int], tuple[int, ...] | None]] = []
    transposed = []
    for alias, passed in g.aliases(var).items():
        copies.append((alias, passed, None))
        for t in g.users(alias, "Transpose"):
            perm = g.attrs(t).get("perm")
            if perm and g.nodes[t].input[0] == alias and g.nodes[t].output and g.nodes[t].output[0]:
                transposed.append((g.nodes[t].output[0], [*passed, t], tuple(int(a) for a in perm)))
    return copies + transposed


def _transposed(g: GraphIndex, devs: dict[str, tuple[int, ...]], perm: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The deviations' Transposes by ``perm`` (the variance's own), with the nodes making them."""
    found: dict[str, tuple[int, ...]] = {}
    for dev, nodes in devs.items():
        for t in g.users(dev, "Transpose"):
            node = g.nodes[t]
            if node.input[0] == dev and node.output and tuple(int(a) for a in g.attrs(t).get("perm") or ()) == perm:
                found[node.output[0]] = (*nodes, t)
    return found


def _match_tf_form(g: GraphIndex, chain: _Chain, k: str) -> bool:
    """tf.nn.batch_normalization: out = x * k + (beta - mean * k), k = rsqrt(var + eps) [* gamma]; and Keras 3's
    LayerNormalization through tf2onnx: out = x * k + (-mean * k + beta)."""
    mean_aliases = g.aliases(chain.mean)
    xs = ms = None
    mean_nodes: list[int] = []
    negated = False  # Keras 3: Neg(mean) * k, then + beta
    for mul in g.users(k, "Mul"):
        other = other_input(g.nodes[mul], k)
        if other is None:
            continue
        neg = g.produced_by(other, "Neg")
        if other in mean_aliases and ms is None:
            ms, mean_nodes = mul, mean_aliases[other]
        elif neg is not None and ms is None and g.nodes[neg].input and g.nodes[neg].input[0] in mean_aliases:
            ms, mean_nodes, negated = mul, mean_aliases[g.nodes[neg].input[0]] + [neg], True
        elif g.same(other, chain.x) and xs is None:
            xs = mul
        elif xs is None and _transposed_copy(g, other, chain.x):
            xs, chain.relaid = mul, True
    if xs is None or ms is None:
        return False
    ms_out = g.nodes[ms].output[0]
    if negated:
        return _join_negated_shift(g, chain, xs, ms, ms_out, mean_nodes)
    shift = beta = None
    relayed: list[int] = []
    for alias, passed in g.aliases(ms_out).items():  # tf2onnx may relay mean * k to another layout first
        for sub in g.users(alias, "Sub"):
            node = g.nodes[sub]
            if node.input[1] == alias:
                shift, beta, relayed = sub, node.input[0], passed
                break
        if shift is not None:
            break
    shift_nodes = {shift, *relayed} if shift is not None else set()
    if shift is None:
        neg = _single_user(g, ms_out, "Neg")
        if neg is None:
            return False
        shift = neg
        shift_nodes = {neg}
    shift_out = g.nodes[shift].output[0]
    xs_out = g.nodes[xs].output[0]
    for add in g.users(xs_out, "Add"):
        if other_input(g.nodes[add], xs_out) == shift_out:
            chain.nodes |= {xs, ms, add} | shift_nodes | set(mean_nodes)
            chain.bias = beta
            chain.output = g.nodes[add].output[0]
            return True
    return False


def _join_negated_shift(g: GraphIndex, chain: _Chain, xs: int, ms: int, shift: str, mean_nodes: list[int]) -> bool:
    """x * k + (-mean * k [+ beta]): the shift, with beta where a parameter is added to it, joins x * k."""
    xs_out = g.nodes[xs].output[0]
    beta = None
    shift_nodes = {ms}
    for add in g.users(shift, "Add"):
        other = other_input(g.nodes[add], shift)
        if other is not None and other != xs_out and g.is_param_like(other):
            beta, shift = other, g.nodes[add].output[0]
            shift_nodes.add(add)
            break
    for add in g.users(xs_out, "Add"):
        if other_input(g.nodes[add], xs_out) == shift:
            chain.nodes |= {xs, add} | shift_nodes | set(mean_nodes)
            chain.bias = beta
            chain.output = g.nodes[add].output[0]
            return True
    return False


def _transposed_copy(g: GraphIndex, tensor: str, x: str) -> bool:
    """``tensor`` is a Transpose of ``x`` (through value copies): the same values in another layout."""
    idx = g.produced_by(g.root(tensor)[0], "Transpose")
    return idx is not None and bool(g.nodes[idx].input) and g.same(g.nodes[idx].input[0], x)


def _match_affine(g: GraphIndex, chain: _Chain) -> None:
    """Optional ``* gamma`` then ``+ beta`` after the normalized tensor, through Cast/Reshape copies, or on a
    transposed copy transposed back."""
    if chain.scale is None:
        chain.scale = _absorb_param_op(g, chain, "Mul")
    chain.bias = _absorb_param_op(g, chain, "Add") or chain.bias
    if chain.scale is None and chain.bias is None:
        _absorb_transposed_affine(g, chain)


def _absorb_transposed_affine(g: GraphIndex, chain: _Chain) -> None:
    """asteroid's GlobLN (Conv-TasNet): the normalized [B, C, T] tensor transposed to [B, T, C], times gamma [C],
    plus beta [C], transposed back: the layer's affine, per channel of the axis the first Transpose moves last."""
    first = _single_user(g, chain.output, "Transpose")
    perm = [int(a) for a in g.attrs(first).get("perm") or []] if first is not None else []
    if first is None or not perm or len(g.users(chain.output)) != 1 or chain.output in g.graph_outputs:
        return
    tensor, nodes, found = g.nodes[first].output[0], [first], {}
    for op in ("Mul", "Add"):
        node = _single_user(g, tensor, op)
        other = other_input(g.nodes[node], tensor) if node is not None else None
        if node is None or len(g.users(tensor)) != 1 or other is None or not g.is_param_like(other):
            continue
        found[op], tensor = other, g.nodes[node].output[0]
        nodes.append(node)
    back = _single_user(g, tensor, "Transpose")
    undo = [perm.index(axis) for axis in range(len(perm))] if sorted(perm) == list(range(len(perm))) else None
    if not found or back is None or len(g.users(tensor)) != 1 or g.attrs(back).get("perm") is None:
        return
    if [int(a) for a in g.attrs(back)["perm"]] != undo:
        return
    chain.nodes |= {*nodes, back}
    chain.scale, chain.bias = found.get("Mul"), found.get("Add")
    chain.output, chain.affine_axis = g.nodes[back].output[0], perm[-1]


def _absorb_param_op(g: GraphIndex, chain: _Chain, op: str) -> str | None:
    """If the chain's output (past transparent copies) feeds only an ``op`` with a parameter as its other
    operand, extend the chain through it and return that parameter's name."""
    tensor, passed = _follow_transparent(g, chain.output)
    node = _single_user(g, tensor, op)
    if node is None or len(_value_users(g, tensor)) != 1:
        return None
    other = other_input(g.nodes[node], tensor)
    if other is None or not g.is_param_like(other):
        return None
    chain.nodes |= set(passed) | {node}
    chain.output = g.nodes[node].output[0]
    return other


def _follow_transparent(
    g: GraphIndex, tensor: str, ops: tuple[str, ...] = ("Cast", "Identity", "Reshape", "Flatten")
) -> tuple[str, list[int]]:
    """Forward through single-user copies made by ``ops`` (at most three)."""
    passed: list[int] = []
    for _ in range(3):
        users = g.users(tensor)
        if len(users) != 1 or g.op(users[0]) not in ops:
            break
        node = g.nodes[users[0]]
        if node.input[0] != tensor or tensor in g.graph_outputs:
            break
        passed.append(users[0])
        tensor = node.output[0]
    return tensor, passed


def affine_after(g: GraphIndex, tensor: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The stored scale and shift (Mul, then Add; either may be absent) applied to ``tensor`` once single-user
    copies (a Transpose or Reshape back to the source's layout) have passed: where an exporter leaves a norm's
    own scale and shift as ones and zeros and writes the layer's gamma and beta after it (tf2onnx's Keras
    LayerNormalization)."""
    found: dict[str, np.ndarray] = {}
    tensor = _follow_transparent(g, tensor, ("Transpose", "Reshape", "Identity"))[0]
    for op in ("Mul", "Add"):
        users = g.users(tensor, op)
        other = other_input(g.nodes[users[0]], tensor) if len(users) == 1 else None
        value = as_float_array(g.param(other)) if other else None
        if value is None or not g.nodes[users[0]].output:
            continue
        found[op] = value
        tensor = g.nodes[users[0]].output[0]
    return found.get("Mul"), found.get("Add")


def decomposed(g: GraphIndex, used: set[int]) -> list[tuple[NormLayer, list[int]]]:
    results: list[tuple[NormLayer, list[int]]] = []
    taken = set(used)
    rms_candidates = []
    for idx, node in enumerate(g.nodes):
        if node.op_type not in MEAN_OPS or node.domain not in ONNX_DOMAINS or idx in taken:
            continue
        found_axes = _reduce_axes(g, idx)
        if isinstance(found_axes, bool):  # a no-op reduction
            continue
        axes = found_axes
        x, m = node_input(node, 0), node.output[0]
        var = _match_variance(g, idx, x, m, axes)
        if var is None:
            rms_candidates.append((idx, axes))
            continue
        v, var_nodes = var
        chain = _Chain(x=x, mean=m, reduce=idx, axes=axes, centered=True, nodes={idx} | var_nodes)
        aliases = g.aliases(m)

        def deviations(chain=chain, aliases=aliases) -> dict[str, tuple[int, ...]]:
            devs: dict[str, tuple[int, ...]] = {}
            for alias, passed in aliases.items():
                for sub in g.users(alias, "Sub"):
                    sn = g.nodes[sub]
                    if sn.input[1] == alias and g.same(sn.input[0], chain.x):
                        for dev, cast in _value_aliases(g, sn.output[0]).items():
                            devs[dev] = (sub, *passed, *cast)
            return devs

        if not _match_tail(g, chain, v, deviations):
            continue
        nodes = sorted(chain.nodes)
        if taken & set(nodes):
            continue
        taken |= set(nodes)
        results.append((_chain_layer(g, chain, nodes), nodes))
    for idx, axes in rms_candidates:
        if idx in taken:
            continue
        node = g.nodes[idx]
        sq = _square_of(g, node_input(node, 0))
        if sq is None:
            continue
        x = sq[0]
        chain = _Chain(x=x, mean=node.output[0], reduce=idx, axes=axes, centered=False, nodes={idx, sq[1]})

        def numerators(x=x) -> dict[str, tuple[int, ...]]:
            root = g.root(x)[0]
            return dict.fromkeys(g.aliases(root, depth=2), ())

        if not _match_tail(g, chain, node.output[0], numerators):
            continue
        nodes = sorted(chain.nodes)
        if taken & set(nodes):
            continue
        taken |= set(nodes)
        results.append((_chain_layer(g, chain, nodes), nodes))
    return results


def _chain_layer(g: GraphIndex, chain: _Chain, nodes: list[int]) -> NormLayer:
    """Classify a matched chain by its axes (traced back through Cast/Flatten/Reshape to the source)."""
    x, passed = g.root(chain.x)
    axes = chain.axes if chain.axes else None
    rank = g.rank(x)
    notes: list[str] = []
    extra: dict = {"reduce_axes": chain.axes, "reduced_tensor": chain.x}
    extra["affine_tensors"] = tuple(t for t in (chain.scale, chain.bias) if t)  # names.py names a layer by them
    groups = None
    kind: Kind
    group_like = None
    flattened = False  # Flatten to 2D then reduce axis 1: the LayerNorm idiom (onnx's function body)
    grouped_last = False  # [N, ..., G, C/G] over all but N and G: a channels-last group norm
    flatten = g.produced_by(x, "Flatten")
    if axes is not None and flatten is not None and rank == 2 and axes == (1,):
        src = g.nodes[flatten].input[0]
        src_rank = g.rank(src)
        if src_rank is not None:
            a = norm_axis(int(g.attrs(flatten).get("axis", 1)), src_rank)
            if a is not None:
                x, axes, rank = src, tuple(range(a, src_rank)), src_rank
                passed = passed + [flatten]
                flattened = True
    elif rank is not None and rank >= 3 and axes == tuple(range(2, rank)) and g.produced_by(x, "Reshape") is not None:
        # [N, G, K] or [N, G, C/G, ...] (hand-written and TF-style GroupNorms) over everything but N and G
        group_like = _group_source(g, x)
        if group_like is not None:
            src, n_groups, reshapes = group_like
            src_rank = g.rank(src)
            x, rank, passed = src, src_rank, passed + reshapes
            axes = tuple(range(1, src_rank))  # type: ignore[arg-type]
            groups = n_groups
    elif (
        rank is not None
        and rank >= 4
        and axes == tuple(a for a in range(1, rank) if a != rank - 2)
        and g.produced_by(x, "Reshape") is not None
        and shape_dim(g, x, rank - 2) is not None
    ):
        # Keras's GroupNormalization over channels last (tf2onnx): measured on this reshaped tensor, whose
        # axis -2 holds the groups, so that each group is one "channel" of it (the source's layout may differ:
        # tf2onnx skips the transpose of a 1x1 map)
        grouped_last = True
        groups = shape_dim(g, x, rank - 2)
    shape = g.shape(x)
    if grouped_last and shape is not None and groups and not isinstance(shape[-1], int):
        shape = _group_size_filled(g, chain, x, shape, groups)
    # a chain that transposes before its division goes on in the output's layout, whose axis 0 is the batch (the
    # walk's convention for every tensor): in the input's, that is the axis the transpose moves first
    perm = (
        chain.tail_perm if rank is not None and chain.tail_perm is not None and len(chain.tail_perm) == rank else None
    )
    batch_axis: int | None = 0 if perm is None else perm[0]
    batch_stats = axes is not None and batch_axis in axes
    # over [1, M, ...] with every axis but 1: the batch was folded into axis 1 (tf's fused LayerNormalization as
    # tf2onnx writes it from a .tflite file, [1, N*T, D, 1]): each of the M rows is normalized on its own
    rows = (
        perm is None
        and rank is not None
        and rank >= 3
        and axes == (0, *range(2, rank))
        and shape_dim(g, x, 0) == 1
        and _batch_elsewhere(g)
    )
    channel_axis: int | None = None
    channels = None
    if rows:
        batch_stats, batch_axis, channel_axis = False, None, 1
        kind = Kind.LAYER if rank == 4 and shape_dim(g, x, 3) == 1 else Kind.INSTANCE
        notes.append("each row of its [1, M, ...] input normalized over its own elements (the batch is in M)")
    elif not chain.centered:
        kind = Kind.RMS
        channel_axis = None if rank is None else rank - 1 if perm is None else perm[-1]
    elif axes is None or rank is None:
        kind = Kind.MOMENTS
        if axes is None:
            notes.append("reduction axes unknown (computed at run time)")
        else:
            notes.append(
                f"moments over axes {list(axes)} of a tensor whose rank onnx shape inference does not know: "
                "its kind is not told; a probe measures its set size"
            )
    elif perm is not None:
        kind, channel_axis = _kind_in_layout(perm, axes)
    elif group_like is not None:
        c = shape_dim(g, x, 1)
        channel_axis = 1
        if c is not None and groups == c:
            kind, axes = Kind.INSTANCE, tuple(range(2, rank))
        elif groups == 1:
            kind = Kind.LAYER
        else:
            kind = Kind.GROUP
    elif flattened:
        kind, channel_axis = Kind.LAYER, rank - 1
    elif grouped_last:
        kind, channel_axis = Kind.GROUP, rank - 2
    elif batch_stats and set(axes) != set(range(rank)):
        kind = Kind.BATCH
        kept = [a for a in range(rank) if a not in axes]
        channel_axis = kept[0] if len(kept) == 1 else None
    elif rank >= 4 and axes == tuple(range(2, rank)) and not _affine_over(g, chain, shape, axes):
        kind, channel_axis = Kind.INSTANCE, 1  # NCHW spatial axes; rank 3 [B, T, D]: LayerNorm
    elif axes == tuple(range(axes[0], rank)):
        kind = Kind.LAYER
        channel_axis = rank - 1 if chain.affine_axis is None else chain.affine_axis
    elif rank >= 4 and axes == tuple(range(1, rank - 1)):
        kind, channel_axis = Kind.INSTANCE, rank - 1
    elif _affine_over(g, chain, shape, axes):  # a LayerNorm over inner axes (NCHW channels: tf2onnx's Keras LN)
        kind, channel_axis = Kind.LAYER, axes[-1]
    else:
        kind = Kind.MOMENTS
    if channels is None:
        channels = shape_dim(g, x, channel_axis)
    if batch_stats:
        notes.append(
            f"statistics computed in the graph over axes {axes}, which include the batch axis: "
            "a sample's output depends on its batch companions (train-mode statistics at inference)"
        )
    if chain.eps_after_sqrt:
        extra["eps_after_sqrt"] = True
        notes.append("epsilon is added to the standard deviation, not to the variance")
    if chain.computed_affine:
        notes.append("its scale and shift are computed in the graph (a conditional norm: from another input)")
    if chain.rescaled:
        extra["rescaled"] = True
        notes.append(
            "its variance is rescaled by a count before the square root (N/(N-1), torch's unbiased x.std()): "
            "over a set of one element it divides zero by zero"
        )
    names = tuple(g.node_name(i) for i in sorted(set(nodes) | set(passed)))
    first = min(set(nodes) | set(passed))
    scale = as_float_array(g.param(g.stored_source(chain.scale))) if chain.scale else None
    bias = as_float_array(g.param(g.stored_source(chain.bias))) if chain.bias else None
    if rows and _neutral(scale) and _neutral(bias, 0.0) and chain.output:
        scale, bias = affine_after(g, chain.output)  # tf2onnx's ones and zeros: gamma and beta come after
    output = chain.output
    if chain.relaid:
        # the view gives a layer one channel axis; its output's is another, so only its input is measured
        notes.append(
            "its affine runs on a transposed copy of its input (NCHW statistics, NHWC output: tf2onnx), so its "
            "output is in another layout: measured at its input only"
        )
        output = ""
    elif chain.tail_perm is not None:
        notes.append(
            f"its variance and deviation are transposed (perm {list(chain.tail_perm)}) before the division, so "
            "its output is in another layout: measured at its input only"
        )
        output = ""
    elif passed:  # traced back through reshapes: include the copies back to the source shape
        output, hop = _back_to_shape(g, output, shape)
        names = tuple(g.node_name(i) for i in sorted(set(nodes) | set(passed) | set(hop)))
    by_element = kind in (Kind.LAYER, Kind.RMS)
    if kind is Kind.BATCH and {part for name in names for part in name.split("/")} >= _TF_BATCH_NORM_OPS:
        # tf.nn.moments and tf.nn.batch_normalization: a Keras BatchNormalization traced in training mode
        extra["tf_training"] = True
    return NormLayer(
        name=g.node_name(first),
        kind=kind,
        op_type="decomposed",
        nodes=names,
        input=x,
        output=output,
        inputs=(x,),
        outputs=(output,) if output else (),
        axes=axes,
        channel_axis=channel_axis,
        channels=channels,
        groups=groups,
        epsilon=chain.epsilon,
        training=False,
        batch_statistics=batch_stats,
        uses_running_stats=False,
        centered=chain.centered,
        scale=scale,
        bias=bias,
        # a layer norm's scale multiplies the normalized elements: its stored shape fixes their open dims
        input_shape=pinned_by_affine(shape, axes, scale if scale is not None else bias) if by_element else shape,
        batch_axis=batch_axis,
        notes=tuple(notes),
        extra=extra,
    )


def pinned_by_affine(
    shape: tuple[Dim, ...] | None, axes: tuple[int, ...] | None, affine: np.ndarray | None
) -> tuple[Dim, ...] | None:
    """``shape`` with the open dims of the normalized axes that a stored scale (or bias) fixes: it multiplies
    the normalized tensor and the output keeps the input's shape, so a [80] scale means a last axis of 80
    (onnxruntime refuses another; tesseranet's q_norm over a head dim the file leaves open)."""
    if shape is None or axes is None or affine is None or affine.ndim > len(axes):
        return shape
    aligned = (1,) * (len(axes) - affine.ndim) + tuple(affine.shape)
    pinned = list(shape)
    for axis, size in zip(axes, aligned):
        if axis < len(pinned) and size > 1 and not isinstance(pinned[axis], int):
            pinned[axis] = int(size)
    return tuple(pinned)


#: the scopes TensorFlow's BatchNormalization in training mode writes its ops in (tf.nn.moments, batch_normalization)
_TF_BATCH_NORM_OPS = frozenset({"moments", "batchnorm"})


def _group_size_filled(g: GraphIndex, chain: _Chain, x: str, shape: tuple, groups: int) -> tuple:
    """``shape`` ([N, ..., G, C/G]) with C/G, which tf2onnx computes from the input's shape at run time: the
    elements per sample of the reshape's source over those of the other axes, else gamma's or beta's C / G."""
    reshape = g.produced_by(x, "Reshape")
    source = g.shape(g.nodes[reshape].input[0]) if reshape is not None else None
    dims = [d for d in (*(source or ())[1:], *shape[1:-1]) if isinstance(d, int) and d > 0]
    if source and len(dims) == len(source) - 1 + len(shape) - 2:
        elements, others = math.prod(dims[: len(source) - 1]), math.prod(dims[len(source) - 1 :])
        if elements % others == 0:
            return (*shape[:-1], elements // others)
    for operand in (chain.scale, chain.bias):
        value = g.param(g.stored_source(operand)) if operand else None
        if value is not None and value.size > 1 and value.size % groups == 0:
            return (*shape[:-1], value.size // groups)
    return shape


def _neutral(value: np.ndarray | None, fill: float = 1.0) -> bool:
    """Absent, or every element ``fill`` (the ones and zeros an exporter gives a norm whose affine follows)."""
    return value is None or bool(np.all(np.asarray(value) == fill))


def _batch_elsewhere(g: GraphIndex) -> bool:
    """The model's inputs carry a batch that is not fixed to 1, so a tensor whose axis 0 is a fixed 1 holds
    its samples on another axis."""
    from bncheck.backends.onnx.dataflow import fixed_to_one, leading_dims  # dataflow imports this module

    return bool(leading_dims(g)) and not fixed_to_one(g)


def _kind_in_layout(perm: tuple[int, ...], axes: tuple[int, ...]) -> tuple[Kind, int | None]:
    """The kind and the input's channel axis of moments over ``axes`` of a tensor transposed by ``perm``
    before the division, classified as the same chain over the transposed tensor (batch first) would be."""
    rank = len(perm)
    out = tuple(sorted(perm.index(a) for a in axes))
    if 0 in out:
        kept = [a for a in range(rank) if a not in out]
        return Kind.BATCH, perm[kept[0]] if len(kept) == 1 else None
    if rank >= 4 and out == tuple(range(2, rank)):
        return Kind.INSTANCE, perm[1]
    if out == tuple(range(out[0], rank)):
        return Kind.LAYER, perm[-1]
    return Kind.MOMENTS, None


def _affine_over(g: GraphIndex, chain: _Chain, shape: tuple | None, axes: tuple[int, ...]) -> bool:
    """The chain's scale or bias holds one value per element of the reduced axes, as a LayerNorm's does (over
    [F, C] of a [B, T, F, C] tensor; over the channels of NCHW, tf2onnx's Keras LayerNormalization), where an
    instance norm's holds one per channel: broadcast against the input, it varies along the reduced axes only."""
    if shape is None:
        return False
    varying = {a for a in axes if shape[a] != 1}
    if not varying or not all(isinstance(shape[a], int) for a in varying):
        return False
    for operand in (chain.scale, chain.bias):
        value = g.param(operand) if operand else None
        if value is None or value.size <= 1 or value.ndim > len(shape):
            continue
        aligned = (1,) * (len(shape) - value.ndim) + tuple(value.shape)
        if {a for a, d in enumerate(aligned) if d != 1} == varying and all(aligned[a] == shape[a] for a in varying):
            return True
    return False


def _back_to_shape(g: GraphIndex, output: str, shape: tuple | None) -> tuple[str, list[int]]:
    """Forward through the copies of ``output`` up to the last one of ``shape``: a Reshape after it belongs
    to the next layer. The output and the nodes passed; ``output`` itself when no copy has that shape."""
    hop = _follow_transparent(g, output)[1]
    back = [k for k, i in enumerate(hop) if g.shape(g.nodes[i].output[0]) == shape]
    if not back:
        return output, []
    hop = hop[: back[-1] + 1]
    return g.nodes[hop[-1]].output[0], hop


def reshaped_group_norm(g: GraphIndex, idx: int, epsilon: float) -> tuple[NormLayer, list[int]] | None:
    """An InstanceNormalization of its input reshaped to [N, G, K]: torch's GroupNorm export (Reshape,
    InstanceNormalization with unit scale, Reshape back, Mul gamma, Add beta) is the source's group norm.
    None when the input is no such reshape."""
    node = g.nodes[idx]
    x = node_input(node, 0)
    if g.rank(x) != 3 or g.produced_by(x, "Reshape") is None:
        return None
    found = _group_source(g, x)
    if found is None:
        return None
    src, groups, reshapes = found
    rank, shape, channels = g.rank(src), g.shape(src), shape_dim(g, src, 1)
    chain = _Chain(x=x, mean="", reduce=idx, axes=(2,), centered=True, nodes={idx}, output=node.output[0])
    _match_affine(g, chain)
    output, hop = _back_to_shape(g, chain.output, shape)
    scale, bias, per_group = _group_affine(g, node, chain, groups, channels)
    kind, axes = Kind.GROUP, tuple(range(1, rank))  # type: ignore[arg-type]
    if channels == groups:
        kind, axes = Kind.INSTANCE, tuple(range(2, rank))  # type: ignore[arg-type]
    elif groups == 1:
        kind = Kind.LAYER
    notes = ["the group norm of its input reshaped to [N, groups, -1] (torch's GroupNorm export)"]
    if per_group:
        notes.append("scale and bias are per group, not per channel")
    positions = sorted(chain.nodes | set(reshapes) | set(hop))
    return (
        NormLayer(
            name=g.node_name(idx),  # the op's name, as before the reshapes were read
            kind=kind,
            op_type=node.op_type,
            domain=node.domain,
            nodes=tuple(g.node_name(i) for i in positions),
            input=src,
            output=output,
            inputs=(src,),
            outputs=(output,),
            axes=axes,
            channel_axis=1,
            channels=channels,
            groups=groups,
            epsilon=epsilon,
            scale=scale,
            bias=bias,
            input_shape=shape,
            notes=tuple(notes),
            extra={"reshaped_to_groups": True, **({"per_group_scale": True} if per_group else {})},
        ),
        positions,
    )


def _group_affine(
    g: GraphIndex, node, chain: _Chain, groups: int, channels: int | None
) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
    """Per-channel scale and bias of a group norm written as an instance norm over groups: the instance
    norm's per-group ones expanded to channels, then the per-channel affine after it (scale, bias, per_group)."""
    inner = [as_float_array(g.param(node_input(node, i))) for i in (1, 2)]
    outer = [as_float_array(g.param(g.stored_source(p))) if p else None for p in (chain.scale, chain.bias)]
    if any(p is None for p in inner) or (chain.scale and outer[0] is None) or (chain.bias and outer[1] is None):
        return None, None, False
    s_g, b_g = (np.asarray(p, np.float64).ravel() for p in inner)
    if not channels or channels % groups or s_g.size != groups or b_g.size != groups:
        if chain.scale is None and chain.bias is None:
            return inner[0], inner[1], True
        return None, None, False
    gamma = np.ones(channels) if outer[0] is None else np.asarray(outer[0], np.float64).ravel()
    beta = np.zeros(channels) if outer[1] is None else np.asarray(outer[1], np.float64).ravel()
    if gamma.size not in (1, channels) or beta.size not in (1, channels):
        return None, None, False
    per_channel = channels // groups
    with np.errstate(invalid="ignore", over="ignore"):  # a NaN or Inf gamma stays in them for BN005, unannounced
        scale = np.repeat(s_g, per_channel) * gamma
        shift = np.repeat(b_g, per_channel)
        # a zero per-group bias adds nothing: 0 * a NaN gamma is no NaN of the layer's bias (BN005 counts them)
        bias = np.where(shift == 0, beta, shift * gamma + beta)
    return scale.astype(np.float32), bias.astype(np.float32), False


def _group_source(g: GraphIndex, x: str) -> tuple[str, int, list[int]] | None:
    """x = reshape(S) to [N, G, K] or [N, G, C/G, ...] (possibly via more reshapes) with S [N, C, ...] of rank
    >= 3: (S, G, reshapes)."""
    passed: list[int] = []
    tensor = x
    while True:
        r = g.produced_by(tensor, "Reshape")
        if r is None:
            break
        passed.append(r)
        tensor, more = g.root(g.nodes[r].input[0])
        passed.extend(more)
    if not passed:
        return None
    src_shape, x_shape = g.shape(tensor), g.shape(x)
    if src_shape is None or x_shape is None or len(src_shape) < 3 or len(x_shape) < 3:
        return None
    n_groups = x_shape[1]
    if not isinstance(n_groups, int):
        # a target shape inference could not read (torch's dynamo export unoptimized: Concat of Constant nodes)
        target = g.ints(node_input(g.nodes[passed[0]], 1))
        if target is None or target.ndim != 1 or target.size < 2 or target[1] <= 0:
            return None
        n_groups = int(target[1])
    if isinstance(src_shape[0], int) and isinstance(x_shape[0], int) and src_shape[0] != x_shape[0]:
        return None
    if isinstance(src_shape[1], int) and src_shape[1] % n_groups:
        return None
    if len(x_shape) > 3:
        # a sample's elements, split per group: the group holds C/G channels, all of their positions
        per_group, per_source = x_shape[2:], src_shape[1:]
        if not all(isinstance(d, int) for d in (*per_group, *per_source)):
            return None
        if n_groups * math.prod(per_group) != math.prod(per_source):  # type: ignore[arg-type]
            return None
    return tensor, n_groups, passed
