"""Batch dependence found by data flow: decomposed norms in any arrangement, and bare batch reductions.

Every tensor gets a symbolic *form* in one pass in topological order ("the mean of x over axes A", "x minus
that mean", "its variance plus eps", "one over its square root", "x normalized over A", ...), whatever ops
compute it: ReduceMean, or ReduceSum / ReduceSumSquare divided by a count from Shape/Gather or a constant;
``Div(Sqrt)``, ``Mul(Reciprocal(Sqrt))``, ``Pow(-0.5)`` and ``Rsqrt``; gamma before or after the division;
the mean computed once or twice. A tensor whose form is "x normalized over A" ends a decomposed norm. The
fixed-sequence matcher (patterns.py) runs first; this pass finds what it misses.

Then every reduction over the batch axis (axis 0, when axis 0 can be the batch) that no recognised layer
holds and that no earlier batch-dependent tensor feeds is reported on its own: ``x - ReduceMean(x, [0])``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from bncheck.backends.onnx.graph import ONNX_DOMAINS, GraphIndex, node_input
from bncheck.backends.onnx.patterns import _Chain, _chain_layer, _reduce_axes
from bncheck.backends.onnx.tensors import to_array
from bncheck.model import BatchOp, NormLayer

#: reductions whose result over axis 0 mixes the samples of a batch
REDUCE_OPS = frozenset(
    {
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceL2",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceLogSum",
        "ReduceLogSumExp",
    }
)
#: forms holding one value per reduced set: they survive reshapes (keepdims=0 then Unsqueeze, say)
_STATS = frozenset({"sum", "sumsq", "sumsqdev", "mean", "meansq", "sqmean", "var", "var_eps", "std", "inv"})
#: what a reduction of data holds
_REDUCED = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceSumSquare": "sumsq"}
#: a sum divided by a count becomes the matching mean
_AVERAGED = {"sum": "mean", "sumsq": "meansq", "sumsqdev": "var"}
_RESHAPES = frozenset({"Squeeze", "Unsqueeze", "Reshape", "Expand", "Flatten"})


@dataclass(frozen=True)
class Form:
    """What a tensor holds in terms of a source tensor ``x`` and reduction axes (``nodes`` compute it)."""

    what: str
    x: str
    axes: tuple[int, ...]
    nodes: frozenset[int]
    centered: bool = True
    eps: float | None = None
    eps_after_sqrt: bool = False
    scale: str | None = None
    bias: str | None = None
    rescaled: bool = False  # the variance times a count or constant: Bessel's N/(N-1) of torch's x.std()
    relaid: bool = False  # x * k with x in another layout than its statistics' (tf2onnx's NHWC affine)


class _Flow:
    def __init__(self, g: GraphIndex) -> None:
        self.g = g
        self.forms: dict[str, Form] = {}
        self.extended: set[str] = set()  # norm tensors that an affine op carried further
        self._shape_only: dict[str, bool] = {}
        # x times weights of one (tf.nn.weighted_moments' in Keras's GroupNormalization): the same values as x
        self.copies: dict[str, str] = {}

    # ------------------------------------------------------------------ helpers

    def form(self, tensor: str) -> Form | None:
        return self.forms.get(tensor)

    def source(self, tensor: str) -> str:
        tensor = self.g.root(tensor)[0]
        while tensor in self.copies:
            tensor = self.g.root(self.copies[tensor])[0]
        return tensor

    def is_ones(self, tensor: str, depth: int = 0) -> bool:
        """Every element 1, made in the graph: ones of a computed shape (ConstantOfShape), reshaped, expanded or
        plus zeros (a stored gamma of ones stays the layer's scale)."""
        g = self.g
        idx = g.producer.get(tensor)
        if idx is None or depth > 8:
            return False
        node = g.nodes[idx]
        if node.op_type == "ConstantOfShape":
            return _fill(g, idx) == 1.0
        if node.op_type in _RESHAPES or node.op_type in ("Identity", "Cast"):
            return bool(node.input) and self.is_ones(node.input[0], depth + 1)
        if node.op_type == "Add" and len(node.input) == 2:
            a, b = node.input
            return (self.is_ones(a, depth + 1) and self.is_zeros(b)) or (
                self.is_ones(b, depth + 1) and self.is_zeros(a)
            )
        return False

    def is_zeros(self, tensor: str) -> bool:
        g = self.g
        value = g.param(tensor)
        if value is not None:
            return value.size > 0 and not np.any(value)
        idx = g.producer.get(tensor)
        return idx is not None and g.nodes[idx].op_type == "ConstantOfShape" and _fill(g, idx) == 0.0

    def is_count(self, tensor: str) -> bool:
        """A positive constant or a number computed from shapes only (Shape -> Gather -> Mul -> Cast)."""
        value = self.g.scalar(tensor)
        if value is not None:
            return value > 0
        return self.shape_only(tensor)

    def shape_only(self, tensor: str, depth: int = 0) -> bool:
        if tensor in self._shape_only:
            return self._shape_only[tensor]
        g = self.g
        result = False
        if tensor in g.initializers:
            result = True
        elif depth < 32:
            idx = g.producer.get(tensor)
            if idx is not None:
                node = g.nodes[idx]
                if node.op_type in ("Shape", "Size", "Constant"):
                    result = True
                elif node.input:
                    result = all(self.shape_only(t, depth + 1) for t in node.input if t)
        self._shape_only[tensor] = result
        return result

    def param(self, tensor: str) -> bool:
        return self.g.is_param_like(tensor)

    def single_use(self, tensor: str) -> bool:
        return len(self.g.users(tensor)) == 1 and tensor not in self.g.graph_outputs

    # ------------------------------------------------------------------ the pass

    def run(self) -> None:
        for idx, node in enumerate(self.g.nodes):
            if not node.output or not node.output[0]:
                continue
            out = self._apply(idx, node)
            if out is not None:
                self.forms[node.output[0]] = out

    def _apply(self, idx: int, node) -> Form | None:
        op, g = node.op_type, self.g
        ins = list(node.input)
        if op in ("Identity", "Cast"):
            return self.form(ins[0]) if ins else None
        if node.domain not in ONNX_DOMAINS and op != "Rsqrt":
            return None
        first = self.form(ins[0]) if ins else None
        if op in _RESHAPES:  # -mean too: a Keras 3 LayerNormalization's relaid by tf2onnx
            return first if first is not None and (first.what in _STATS or first.what == "negmean") else None
        if op in ("ReduceMean", "ReduceSum", "ReduceSumSquare", "GlobalAveragePool"):
            axes = _reduce_axes(g, idx)
            if not isinstance(axes, tuple) or not axes:
                return None
            return self._reduce(idx, op, ins[0], axes)
        if op == "Sqrt" and first is not None:
            if first.what == "var_eps":
                return replace(first, what="std", nodes=first.nodes | {idx})
            if first.what in ("var", "meansq"):
                return replace(first, what="std", eps=0.0, centered=first.what == "var", nodes=first.nodes | {idx})
            return None
        if op == "Reciprocal" and first is not None and first.what == "std" and first.scale is None:
            return replace(first, what="inv", nodes=first.nodes | {idx})
        if op == "Rsqrt" and first is not None:
            return self._rsqrt(first, idx)
        if op == "Relu" and first is not None and first.what == "var":  # max(0, E[x^2] - E[x]^2): flax's
            return replace(first, nodes=first.nodes | {idx})
        if op == "Where" and len(ins) == 3:
            return self._div_no_nan(ins, idx)
        if op == "Neg" and first is not None and first.what in ("mean", "mk"):
            # -mean * k + beta (or without beta); -(mean * k), tf2onnx's beta - mean * k with beta 0 folded
            return replace(first, what="negmean" if first.what == "mean" else "nmk", nodes=first.nodes | {idx})
        if len(ins) != 2:
            return None
        a, b = ins
        fa, fb = self.form(a), self.form(b)
        if op == "Max":  # the same clamp as jax2tf writes it
            clamped = (fa, b) if fa is not None else (fb, a)
            if clamped[0] is not None and clamped[0].what == "var" and self.g.scalar(clamped[1]) == 0.0:
                return replace(clamped[0], nodes=clamped[0].nodes | {idx})
            return None
        if op == "Pow":
            exponent = g.scalar(b)
            if exponent == 2.0:
                return self._square(a, fa, idx)
            if exponent == 0.5 and fa is not None and fa.what in ("var_eps", "var", "meansq"):
                return self.apply_sqrt(fa, idx)
            if exponent == -0.5 and fa is not None:
                return self._rsqrt(fa, idx)
            return None
        if op == "Mul":
            if g.same(a, b):
                return self._square(a, fa, idx)
            for value, weights, form in ((a, b, fa), (b, a, fb)):
                if self.form(weights) is None and self.is_ones(weights):  # x times weights of one is x
                    self.copies[node.output[0]] = value
                    return None if form is None else replace(form, nodes=form.nodes | {idx})
            return self._mul(a, fa, b, fb, idx) or self._mul(b, fb, a, fa, idx)
        if op == "Div":
            return self._div(a, fa, b, fb, idx)
        if op == "Sub":
            return self._sub(a, fa, b, fb, idx)
        if op == "Add":
            return self._add(a, fa, b, idx) or self._add(b, fb, a, idx)
        return None

    def apply_sqrt(self, f: Form, idx: int) -> Form:
        if f.what == "var_eps":
            return replace(f, what="std", nodes=f.nodes | {idx})
        return replace(f, what="std", eps=0.0, centered=f.what == "var", nodes=f.nodes | {idx})

    def _rsqrt(self, f: Form, idx: int) -> Form | None:
        if f.what == "var_eps":
            return replace(f, what="inv", nodes=f.nodes | {idx})
        if f.what in ("var", "meansq"):
            return replace(f, what="inv", eps=0.0, centered=f.what == "var", nodes=f.nodes | {idx})
        return None

    def _reduce(self, idx: int, op: str, t: str, axes: tuple[int, ...]) -> Form | None:
        op = "ReduceMean" if op == "GlobalAveragePool" else op  # the mean over axes 2.., kept
        f = self.form(t)
        node_set = frozenset({idx})
        if f is None and self.is_ones(t):
            return None  # the number of elements: a count (is_count), not a statistic
        if f is not None:
            if op == "ReduceSumSquare" and f.what == "dev" and f.scale is None and f.axes == axes:
                return replace(f, what="sumsqdev", nodes=f.nodes | node_set)
            if f.what == "sq" and op != "ReduceSumSquare":
                return Form("meansq" if op == "ReduceMean" else "sumsq", f.x, axes, f.nodes | node_set)
            if f.what == "sqdev" and f.axes == axes and op != "ReduceSumSquare":
                return replace(f, what="var" if op == "ReduceMean" else "sumsqdev", nodes=f.nodes | node_set)
            if f.what == "sqmean" and op != "ReduceSumSquare":
                # the square of a pooled mean reduced again: the mean (sum) of squares of that pooled tensor, as a
                # norm after global pooling computes E[p^2] - E[p]^2 (flax's, through jax2onnx)
                square = self._squared(t)
                if square is not None:
                    p = self.g.nodes[square].input[0]
                    return Form("meansq" if op == "ReduceMean" else "sumsq", self.source(p), axes, node_set | {square})
        if _raw(f):  # data, or statistics of something else reduced again (a pooled map's group norm)
            return Form(_REDUCED[op], self.source(t), axes, node_set)
        return None

    def _squared(self, t: str) -> int | None:
        """The Mul(p, p) making ``t``, through reshapes and value-preserving copies."""
        g = self.g
        for _ in range(4):
            t = g.root(t)[0]
            idx = g.producer.get(t)
            if idx is None:
                return None
            node = g.nodes[idx]
            if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
                return idx
            if node.op_type not in _RESHAPES or not node.input:
                return None
            t = node.input[0]
        return None

    def _square(self, t: str, f: Form | None, idx: int) -> Form | None:
        if f is None or f.what == "norm":  # a norm's output squared is data squared (an RMS norm after it)
            return Form("sq", self.source(t), (), frozenset({idx}))
        if f.what == "dev" and f.scale is None:
            return replace(f, what="sqdev", nodes=f.nodes | {idx})
        if f.what == "mean":
            return replace(f, what="sqmean", nodes=f.nodes | {idx})
        return None

    def _mul(self, a: str, fa: Form | None, b: str, fb: Form | None, idx: int) -> Form | None:
        """``a * b`` with ``a`` the operand carrying the form."""
        if fb is not None and fb.what == "inv":
            if fa is not None and fa.what in ("mean", "negmean") and fb.centered and _same_stats(fa, fb):
                what = "mk" if fa.what == "mean" else "nmk"  # mean * k, -mean * k
                return replace(fb, what=what, nodes=fa.nodes | fb.nodes | {idx})
            if _raw(fa) and self.source(a) == fb.x:
                if not fb.centered:  # x * 1/rms: an RMS norm
                    return replace(fb, what="norm", nodes=fb.nodes | {idx})
                # x * k, k = gamma / std: tf.nn.batch_normalization's x * k + (beta - mean * k), which patterns.py
                # matches where the mean is a ReduceMean (here also weighted moments)
                return replace(fb, what="xk", nodes=fb.nodes | {idx})
            relaid = self._relaid(a, fb.x)
            if fa is None and fb.centered and relaid is not None:  # the same x * k on x in another layout
                return replace(fb, what="xk", relaid=True, nodes=fb.nodes | {idx, relaid})
        if fa is None:
            return None
        if fa.what in _AVERAGED:
            value = self.g.scalar(b)
            if value is not None and 0.0 < value < 1.0 and self._one_over_count(fa, value):  # times 1/N
                return replace(fa, what=_AVERAGED[fa.what], nodes=fa.nodes | {idx})
            return None
        if fa.what == "var" and fb is None and self.is_count(b):  # var * N, then / (N - 1) below
            return replace(fa, rescaled=True, nodes=fa.nodes | {idx})
        if fa.what == "dev" and fb is not None and fb.what == "inv" and fb.centered and _same_stats(fa, fb):
            if fa.scale is not None and fb.scale is not None:
                return None
            return _normalized(fa, fb, idx, fa.scale or fb.scale)
        if fb is not None or not self.param(b):
            return None
        if fa.what in ("dev", "inv") and fa.scale is None:
            return replace(fa, scale=b, nodes=fa.nodes | {idx})
        if fa.what == "norm" and fa.scale is None and fa.bias is None and self.single_use(a):
            self.extended.add(a)
            return replace(fa, scale=b, nodes=fa.nodes | {idx})
        return None

    def _relaid(self, tensor: str, x: str) -> int | None:
        """The Transpose or Reshape making ``tensor`` from ``x``: the same values in another layout (tf2onnx moves
        a [1, M, K, 1] tensor to NHWC by a Reshape where its size-1 axes make that a transpose)."""
        idx = self.g.produced_by(self.g.root(tensor)[0], "Transpose", "Reshape")
        inputs = self.g.nodes[idx].input if idx is not None else ()
        return idx if inputs and self.source(inputs[0]) == x else None

    def _div_no_nan(self, ins: list[str], idx: int) -> Form | None:
        """Where(count == 0, 0, v), tf.math.divide_no_nan's guard of a mean over no elements, or
        Where(count > 0, v, NaN), jax.numpy.var's over no degrees of freedom: v's form."""
        g = self.g
        cond, zero, value = ins
        greater = g.produced_by(cond, "Greater")
        if greater is not None and len(g.nodes[greater].input) == 2:
            f = self.form(zero)
            count, bound = g.nodes[greater].input
            spread = g.produced_by(value, "Expand")  # a NaN broadcast to the variance's shape, computed at run time
            nan = g.param(value if spread is None else g.nodes[spread].input[0])
            if (
                f is None
                or nan is None
                or not np.isnan(nan).all()
                or g.scalar(bound) != 0.0
                or not self.is_count(count)
            ):
                return None
            return replace(f, nodes=f.nodes | {idx, greater})
        f = self.form(value)
        equal = g.produced_by(cond, "Equal")
        if f is None or equal is None or g.scalar(zero) != 0.0 or len(g.nodes[equal].input) != 2:
            return None
        a, b = g.nodes[equal].input
        if not ((g.scalar(b) == 0.0 and self.is_count(a)) or (g.scalar(a) == 0.0 and self.is_count(b))):
            return None
        return replace(f, nodes=f.nodes | {idx, equal})

    def _one_over_count(self, f: Form, value: float) -> bool:
        """``value`` is 1/N for the N elements ``f`` sums, where the shapes give N (a sum times anything else is
        no mean); true where they do not."""
        shape = self.g.shape(f.x)
        dims = [shape[a] for a in f.axes if a < len(shape)] if shape is not None else []
        if len(dims) != len(f.axes) or not all(isinstance(d, int) and d > 0 for d in dims):
            return True
        return abs(value * math.prod(d for d in dims if isinstance(d, int)) - 1.0) <= 1e-5

    def _div(self, a: str, fa: Form | None, b: str, fb: Form | None, idx: int) -> Form | None:
        if fa is not None and fa.what in _AVERAGED and fb is None and self.is_count(b):
            return replace(fa, what=_AVERAGED[fa.what], nodes=fa.nodes | {idx})
        if fa is not None and fa.what == "var" and fb is None and self.is_count(b):
            return replace(fa, rescaled=True, nodes=fa.nodes | {idx})
        if fb is None or fb.what != "std" or fb.scale is not None:
            return None
        if fa is None:
            if self.g.scalar(a) == 1.0:
                return replace(fb, what="inv", nodes=fb.nodes | {idx})
            if not fb.centered and self.source(a) == fb.x:
                return replace(fb, what="norm", nodes=fb.nodes | {idx})
            return None
        if fa.what == "dev" and fb.centered and _same_stats(fa, fb):
            return _normalized(fa, fb, idx, fa.scale)
        return None

    def _sub(self, a: str, fa: Form | None, b: str, fb: Form | None, idx: int) -> Form | None:
        if fb is None:
            return None
        if fb.what == "mk":
            if fa is None and self.param(a):  # beta - mean * k
                return replace(fb, what="shift", bias=a, nodes=fb.nodes | {idx})
            if fa is not None and fa.what == "xk" and _same_stats(fa, fb) and fa.scale == fb.scale:
                return replace(fa, what="norm", nodes=fa.nodes | fb.nodes | {idx})  # x * k - mean * k
            return None
        if _raw(fa) and fb.what == "mean" and self.source(a) == fb.x:
            return replace(fb, what="dev", nodes=fb.nodes | {idx})
        if fa is not None and fa.what == "meansq" and fb.what == "sqmean" and _same_stats(fa, fb):
            return Form("var", fa.x, fa.axes, fa.nodes | fb.nodes | {idx})
        return None

    def _add(self, a: str, fa: Form | None, b: str, idx: int) -> Form | None:
        if fa is None:
            return None
        fb = self.form(b)
        if fa.what == "nmk" and fb is None and self.param(b):  # -mean * k + beta
            return replace(fa, what="shift", bias=b, nodes=fa.nodes | {idx})
        if fa.what == "xk" and _joins(fa, fb):  # x * k + shift
            return replace(fa, what="norm", bias=fb.bias, nodes=fa.nodes | fb.nodes | {idx})  # type: ignore[union-attr]
        if fa.what in ("var", "meansq") and self.form(b) is None:
            eps = self.g.scalar(b)
            if eps is not None and eps >= 0:
                return replace(fa, what="var_eps", eps=eps, centered=fa.what == "var", nodes=fa.nodes | {idx})
        if fa.what == "std" and fa.eps == 0.0 and not fa.eps_after_sqrt and self.form(b) is None:
            eps = self.g.scalar(b)
            if eps is not None and eps > 0:  # MVN: epsilon added to the standard deviation
                return replace(fa, eps=eps, eps_after_sqrt=True, nodes=fa.nodes | {idx})
        if fa.what == "norm" and fa.bias is None and self.form(b) is None and self.param(b) and self.single_use(a):
            self.extended.add(a)
            return replace(fa, bias=b, nodes=fa.nodes | {idx})
        return None


def _fill(g: GraphIndex, idx: int) -> float | None:
    """The value a ConstantOfShape node fills its output with (0.0 when it names none)."""
    value = g.attrs(idx).get("value")
    if value is None:
        return 0.0
    try:
        fill = to_array(value).ravel()
    except Exception:  # a malformed attribute: no value to read
        return None
    return float(fill[0]) if fill.size == 1 else None


def _joins(xk: Form, other: Form | None) -> bool:
    """``other`` is the shift (beta - mean * k, or -mean * k) that completes ``xk`` = x * k to a norm."""
    return other is not None and other.what in ("shift", "nmk") and _same_stats(xk, other) and xk.scale == other.scale


def _raw(f: Form | None) -> bool:
    """A tensor an op may read as data: no form, statistics of an earlier tensor (a global pool's mean), or a
    whole norm's output (a LayerNorm straight after another, as MiT's stages write them)."""
    return f is None or f.what in _STATS or f.what == "norm"


def _same_stats(a: Form, b: Form) -> bool:
    return a.x == b.x and a.axes == b.axes


def _normalized(dev: Form, std: Form, idx: int, scale: str | None) -> Form:
    """x - mean over (an inverse) std of the same statistics, joined at node ``idx``: a whole normalization."""
    return Form(
        "norm",
        dev.x,
        dev.axes,
        dev.nodes | std.nodes | {idx},
        eps=std.eps,
        eps_after_sqrt=std.eps_after_sqrt,
        scale=scale,
        rescaled=std.rescaled,
    )


# ====================================================================== entry points


def _forms(g: GraphIndex) -> tuple[dict[str, Form], set[str]]:
    """The forms of ``g``'s tensors and the norm tensors an affine carried further, computed once per index
    (the pass's results only: a _Flow kept there would hold ``g`` in a reference cycle, and with it every array
    the index read until the cyclic collector runs)."""
    cached = g.derived.get("forms")
    if cached is None:
        flow = _Flow(g)
        flow.run()
        cached = g.derived["forms"] = (flow.forms, flow.extended)
    return cached


def _moment_forms(g: GraphIndex, idx: int) -> tuple[str, int, Form, Form] | None:
    """A BatchNormalization's input, its rank, and the forms of its mean and variance inputs where these are
    a mean and a variance of one tensor over the same axes; else None."""
    node = g.nodes[idx]
    x = node_input(node, 0)
    rank = g.rank(x)
    if rank is None or rank < 2 or len(node.input) < 5:
        return None
    forms, _ = _forms(g)
    mean, var = forms.get(node.input[3]), forms.get(node.input[4])
    if mean is None or var is None or mean.what != "mean" or var.what != "var" or var.rescaled:
        return None
    return (x, rank, mean, var) if mean.x == var.x and mean.axes == var.axes else None


def own_moments(g: GraphIndex, idx: int) -> bool:
    """A BatchNormalization's mean and variance inputs are the moments of its own input over every axis but 1
    (tf2onnx's fused Keras LayerNormalization: X reshaped to [1, M, K, 1], its moments computed beside it): the
    node normalizes with the statistics of its input, not stored ones."""
    found = _moment_forms(g, idx)
    if found is None:
        return False
    x, rank, mean, _ = found
    return mean.x == g.root(x)[0] and mean.axes == (0,) + tuple(range(2, rank))


def batch_moments(g: GraphIndex, idx: int) -> list[int] | None:
    """The nodes computing a BatchNormalization's mean and variance inputs where these are the per-channel moments
    of its own input over the batch and spatial axes (axis 0 a batch), or None. torch writes BatchNorm with
    track_running_stats=False (and F.batch_norm without running statistics) so: its dynamo exporter as ReduceMeans
    of the input, its TorchScript exporter as ReduceMeans over [0, 1] of the input reshaped to [N, C, -1] and
    transposed to [N, -1, C], feeding a training-mode node's running-statistics inputs."""
    found = _moment_forms(g, idx)
    if found is None:
        return None
    x, rank, mean, var = found
    # in a file fixed to batch 1, the batch a relaxed copy feeds; not a reshape to [1, M, ...] (tf2onnx's fused
    # LayerNormalization folds the batch into M: own_moments' per-sample rows)
    relaxed = fixed_to_one(g) and g.produced_by(x, "Reshape") is None
    if not axis0_is_batch(g, x, relaxed=relaxed):
        return None
    relayout: list[int] = []
    if mean.x != g.root(x)[0]:
        relaid = _channels_last_flat(g, mean.x, x)
        if relaid is None:
            return None
        relayout, source_axes = relaid
        axes = tuple(sorted(a for axis in mean.axes for a in source_axes[axis]))
    else:
        axes = mean.axes
    if axes != (0,) + tuple(range(2, rank)):
        return None
    nodes = set(mean.nodes | var.nodes)
    if all(set(g.users(out)) <= nodes | set(relayout) for i in relayout for out in g.nodes[i].output):
        nodes |= set(relayout)  # the reshape and transpose only the moments read
    return sorted(nodes)


def _channels_last_flat(g: GraphIndex, tensor: str, x: str) -> tuple[list[int], list[tuple[int, ...]]] | None:
    """``tensor`` = Transpose(Reshape(x, [N, C, -1]), [0, 2, 1]) (or the Reshape alone): its nodes and, for each of
    its axes, the axes of ``x`` it holds; None otherwise. Checked on the inferred shapes (torch's TorchScript exporter
    writes this form only for a fixed batch)."""
    nodes: list[int] = []
    perm = [0, 1, 2]
    transpose = g.produced_by(tensor, "Transpose")
    if transpose is not None:
        perm = list(g.attrs(transpose).get("perm", [2, 1, 0]))
        nodes.append(transpose)
        tensor = node_input(g.nodes[transpose], 0)
    reshape = g.produced_by(tensor, "Reshape")
    if reshape is None or node_input(g.nodes[reshape], 0) != x or sorted(perm) != [0, 1, 2]:
        return None
    nodes.append(reshape)
    flat, shape = g.shape(tensor), g.shape(x)
    if flat is None or shape is None or len(flat) != 3 or len(shape) < 2:
        return None
    spatial = [d for d in shape[2:] if isinstance(d, int)]
    if len(spatial) != len(shape) - 2 or not isinstance(flat[2], int) or math.prod(spatial) != flat[2]:
        return None
    if flat[0] != shape[0] or flat[1] != shape[1]:
        return None
    held = [(0,), (1,), tuple(range(2, len(shape)))]
    return nodes, [held[p] for p in perm]


def dataflow_norms(g: GraphIndex, used: set[int]) -> list[tuple[NormLayer, list[int]]]:
    """Decomposed norms the fixed-sequence matcher missed (none of their nodes in ``used``), as (layer, node
    positions)."""
    forms, extended = _forms(g)
    results: list[tuple[NormLayer, list[int]]] = []
    taken = set(used)
    ends = [(t, f) for t, f in forms.items() if f.what == "norm" and t not in extended]
    for tensor, f in sorted(ends, key=lambda item: min(item[1].nodes)):
        nodes = sorted(f.nodes)
        if taken & set(nodes):
            continue
        taken |= set(nodes)
        reduce = min(i for i in nodes if g.op(i).startswith("Reduce") or g.op(i) == "GlobalAveragePool")
        chain = _Chain(
            x=f.x,
            mean=g.nodes[reduce].output[0],
            reduce=reduce,
            axes=f.axes,
            centered=f.centered,
            nodes=set(nodes),
            epsilon=f.eps,
            eps_after_sqrt=f.eps_after_sqrt,
            output=tensor,
            scale=f.scale,
            bias=f.bias,
            rescaled=f.rescaled,
            relaid=f.relaid,
        )
        results.append((_chain_layer(g, chain, nodes), nodes))
    return results


def batch_reductions(
    g: GraphIndex, layers: list[tuple[int, NormLayer, list[int]]], relaxed: bool = False
) -> list[BatchOp]:
    """Reductions over the batch axis held by no recognised layer and fed by no earlier batch dependence.

    ``layers`` are (first node, layer, node positions). A tensor is batch-dependent downstream of a layer
    that uses batch statistics or of a reported reduction; reductions fed by one are its consequences.
    ``relaxed``: in a file that fixes the batch to 1, those a batch would reach once relaxed.
    """
    in_layer: dict[int, NormLayer] = {}
    for _, held_by, nodes in layers:
        for i in nodes:
            in_layer[i] = held_by
    dependent: set[str] = set()
    valued = set(g.graph_inputs)  # tensors that depend on an input's values, not only on its shape
    found: list[BatchOp] = []
    spatial: bool | None = None  # _axis0_spatial, computed at the first candidate
    for idx, node in enumerate(g.nodes):
        fed = any(t in dependent for t in node.input if t)
        layer = in_layer.get(idx)
        source = layer is not None and layer.batch_statistics
        data = node.op_type not in ("Shape", "Size") and any(t in valued for t in node.input if t)
        if not fed and layer is None and data and node.op_type in REDUCE_OPS and node.domain in ONNX_DOMAINS:
            op = _batch_reduction(g, idx, relaxed)
            if op is not None and spatial is None:
                spatial = _axis0_spatial(g)
            if op is not None and not spatial:
                found.append(op)
                source = True
        if data:
            valued.update(o for o in node.output if o)
        if (fed or source) and node.op_type not in ("Shape", "Size"):
            dependent.update(o for o in node.output if o)
    return found


#: onnx element types of integers and booleans: lengths, counts, ids, masks
_INTEGER_TYPES = frozenset({2, 3, 4, 5, 6, 7, 9, 12, 13})


def _batch_reduction(g: GraphIndex, idx: int, relaxed: bool = False) -> BatchOp | None:
    node = g.nodes[idx]
    axes = _reduce_axes(g, idx)
    x = node_input(node, 0)
    if not isinstance(axes, tuple) or 0 not in axes or not axis0_is_batch(g, x, relaxed):
        return None
    if g.types.get(x) in _INTEGER_TYPES:
        # the longest sentence of the batch, say, which pads the others: shape arithmetic, not a value a sample's
        # result is computed from (where it is, the probe's output test finds the dependence)
        return None
    return BatchOp(
        name=g.node_name(idx),
        op_type=node.op_type,
        axes=axes,
        input=x,
        output=node.output[0],
        input_shape=g.shape(x),
        keepdims=bool(int(g.attrs(idx).get("keepdims", 1))),
    )


#: ops whose input is [N, C, spatial...]: a dim on a spatial axis there is positions of one sample
_SPATIAL_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"})


def _axis0_spatial(g: GraphIndex) -> bool:
    """Every input's free axis 0 reaches a convolution or pool as a spatial axis: the model adds its own batch
    of one and convolves along axis 0 (madmom's key and beat models take one excerpt's frames on axis 0), so
    axis 0 holds positions of one sample, and a reduction over it mixes no samples. Followed by position
    (:func:`_follow_axis0`), not by the dim's name: onnx's shape inference names a padded dim anew."""
    batched = [name for name in g.graph_inputs if (shape := g.shape(name)) and not isinstance(shape[0], int)]
    return bool(batched) and all(_follow_axis0(g, name) for name in batched)


#: ops that keep their input's axes where they are (a Pad changes their sizes only)
_AXES_KEPT = frozenset({"Pad", "Identity", "Cast", "Relu", "Abs", "Neg", "Log", "Exp", "Sqrt"})


def _follow_axis0(g: GraphIndex, tensor: str) -> bool:
    """Whether ``tensor``'s axis 0, followed through Unsqueeze, Transpose and the ops of :data:`_AXES_KEPT` (as
    their first input), reaches a convolution or pool at a spatial axis (2 or later)."""
    todo, seen = [(tensor, 0)], set()
    while todo:
        current, axis = todo.pop()
        if (current, axis) in seen:
            continue
        seen.add((current, axis))
        for idx in g.users(current):
            node = g.nodes[idx]
            if node.domain not in ONNX_DOMAINS or node_input(node, 0) != current or not node.output:
                continue
            if node.op_type in _SPATIAL_OPS:
                if axis >= 2:
                    return True
                continue
            moved = _moved_axis(g, idx, axis)
            if moved is not None:
                todo.append((node.output[0], moved))
    return False


def _moved_axis(g: GraphIndex, idx: int, axis: int) -> int | None:
    """Where axis ``axis`` of node ``idx``'s first input sits in its output; None where the node does not keep
    it as a whole axis (or its axes cannot be read)."""
    node = g.nodes[idx]
    if node.op_type in _AXES_KEPT:
        return axis
    attrs = g.attrs(idx)
    if node.op_type == "Transpose":
        perm = attrs.get("perm")
        return list(perm).index(axis) if perm is not None and axis in perm else None
    if node.op_type == "Unsqueeze":
        raw = attrs.get("axes")
        if raw is None and len(node.input) > 1:
            value = g.ints(node.input[1])
            raw = None if value is None else [int(a) for a in value.ravel()]
        rank = g.rank(node_input(node, 0))
        if raw is None or (rank is None and any(a < 0 for a in raw)):
            return None
        inserted = sorted(a + rank + len(raw) if a < 0 else a for a in raw)
        for at in inserted:  # output positions, lowest first: each one at or before the axis moves it on
            axis += at <= axis
        return axis
    return None


def fixed_to_one(g: GraphIndex) -> bool:
    """The inputs that carry a batch fix it to 1."""
    return leading_dims(g) == {1}


def _input_axes(g: GraphIndex) -> tuple[list, list[int | None]]:
    """The graph inputs' shapes and batch axes, as the probe feeds them (onnx.batch_axes)."""
    # that module imports the walk, which imports this
    from bncheck.backends.onnx import input_batch_axes

    if g.input_axes is None:
        inputs = [g.shape(i) for i in g.graph_inputs]
        outputs = [g.shape(o) for o in g.graph_outputs]
        g.input_axes = inputs, input_batch_axes(g.nodes, g.graph_inputs, inputs, outputs, g.shape)
    return g.input_axes


def leading_dims(g: GraphIndex) -> set:
    inputs, axes = _input_axes(g)
    # the batch dims of the inputs that carry one (a style-weights vector [26] beside an image [1, ...] has none)
    return {s[axis] for s, axis in zip(inputs, axes) if s and axis is not None}


def axis0_is_batch(g: GraphIndex, tensor: str, relaxed: bool = False) -> bool:
    """Axis 0 of ``tensor`` can hold several samples: not in a file whose inputs fix the batch to 1 (unless
    ``relaxed``: then a data tensor's axis 0 of 1 is where the relaxed batch goes), not a fixed 1, not a fixed
    size in a model whose inputs have a free batch dim, not a dim that the inputs name only on another axis (a
    sequence length, say)."""
    inputs, axes = _input_axes(g)
    if inputs and all(axis is None for axis in axes):
        return False  # no input carries a batch (a frame of audio and a flat state): nothing holds two samples
    leading = {s[axis] for s, axis in zip(inputs, axes) if s and axis is not None}
    if leading == {1}:
        if not relaxed:
            return False  # a file fixed to batch 1: no tensor holds a second sample, whatever its axis 0 is
        shape = g.shape(tensor)
        return not shape or not isinstance(shape[0], int) or shape[0] == 1
    shape = g.shape(tensor)
    if not shape:
        return True  # unknown: the walk's convention, axis 0 is the batch
    dim = shape[0]
    if isinstance(dim, int):
        fixed = bool(leading) and all(isinstance(d, int) for d in leading)
        return dim > 1 and not any(isinstance(d, str) for d in leading) and not (fixed and dim not in leading)
    if isinstance(dim, str):
        # names the inputs carry off their batch axes (every dim of an input without one: a shared image's height)
        elsewhere = {d for s, a in zip(inputs, axes) if s for i, d in enumerate(s) if i != a and isinstance(d, str)}
        return not (dim in elsewhere and dim not in leading)
    return True
