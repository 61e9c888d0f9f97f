"""Hypothesis strategies for hostile bncheck inputs: small ONNX graphs around a normalization layer (valid
and subtly invalid), byte mutations of the committed sample models, and option values.

Every strategy draws a *recipe* (plain data, so hypothesis can shrink and print it) and a function turns
the recipe into files in a workspace; the same recipe always gives the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.fuzz.corpus import HOSTILE_NAMES

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"

# ------------------------------------------------------------------------------------------- values

#: names that have broken rendering or one-line errors before, and random text
NAMES = st.one_of(
    st.sampled_from(["bn", "x", "", "bn/1", "a:b", "名前", "[bold]x[/bold]", *HOSTILE_NAMES.values()]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
)
FLOATS = st.one_of(
    st.sampled_from([0.0, 1e-5, 1e-3, 0.1, 1.0, -1.0, 1e-12, 1e30, float("nan"), float("inf"), -float("inf")]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
#: dims: mostly small, sometimes symbolic, zero, negative or huge
DIMS = st.one_of(
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 6),
    st.sampled_from(["N", "C", "H", "W", "seq", ""]),
    st.sampled_from([0, -1, -3, 2**31, 2**40, 2**63 - 1]),
)
ELEM_TYPES = st.sampled_from(
    [TensorProto.FLOAT] * 6
    + [
        TensorProto.FLOAT16,
        TensorProto.DOUBLE,
        TensorProto.INT64,
        TensorProto.BFLOAT16,
        TensorProto.BOOL,
        TensorProto.STRING,
    ]
)
NORM_OPS = st.sampled_from(
    [
        "BatchNormalization",
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "MeanVarianceNormalization",
        "moments",
    ]
)

#: report format and probe batch sizes of a fuzzed run
FORMATS_AND_SIZES = st.tuples(st.sampled_from(["table", "json"]), st.sampled_from(["1,2,32", "1", "2,3", "1,4096"]))

# ------------------------------------------------------------------------------------------- ONNX graphs


@st.composite
def onnx_recipes(draw: st.DrawFn) -> dict[str, Any]:
    """A recipe for a small ONNX model: one normalization layer (or a hand-written moments chain) with
    optional neighbours, drawn attributes, parameters, dtypes, external data and subgraph placement."""
    rank = draw(st.integers(2, 5))
    dims = [draw(DIMS) for _ in range(rank)]
    if draw(st.booleans()):  # most models: a symbolic batch and small fixed dims
        dims[0] = "N"
    op = draw(NORM_OPS)
    recipe: dict[str, Any] = {
        "op": op,
        "opset": draw(st.sampled_from([7, 9, 11, 13, 14, 15, 17, 18, 21, 22, 99])),
        "ir_version": draw(st.sampled_from([3, 7, 8, 9, 10, 0, 99])),
        "dims": dims,
        "input_type": draw(ELEM_TYPES),
        "param_type": draw(ELEM_TYPES),
        "channels_delta": draw(st.sampled_from([0, 0, 0, 0, 1, -1])),
        "param_seed": draw(st.integers(0, 2**16)),
        "specials": draw(st.lists(st.tuples(st.sampled_from(["scale", "bias", "mean", "var"]), FLOATS), max_size=3)),
        "attrs": draw(
            st.dictionaries(
                st.sampled_from(
                    [
                        "epsilon",
                        "momentum",
                        "training_mode",
                        "axis",
                        "num_groups",
                        "spatial",
                        "axes",
                        "stash_type",
                        "bogus",
                    ]
                ),
                st.one_of(FLOATS, st.integers(-3, 5), st.lists(st.integers(-4, 4), max_size=4), st.just("text")),
                max_size=3,
            )
        ),
        "outputs": draw(st.sampled_from([1, 1, 3, 5])),
        "node_name": draw(NAMES),
        "input_name": draw(st.one_of(st.just("x"), NAMES.filter(bool))),
        "before": draw(st.sampled_from(["none", "none", "conv", "relu", "identity", "reshape"])),
        "after": draw(st.sampled_from(["none", "none", "relu", "pool", "norm"])),
        "subgraph": draw(st.sampled_from(["none", "none", "none", "if", "loop", "function"])),
        "external": draw(
            st.sampled_from(
                [
                    "none",
                    "none",
                    "none",
                    "valid",
                    "missing",
                    "parent",
                    "absolute",
                    "symlink",
                    "offset",
                    "unknown_keys",
                    "dir",
                    "short",
                ]
            )
        ),
        "raw_data": draw(st.sampled_from(["ok", "ok", "ok", "short", "long", "empty"])),
        "output_dims": draw(st.sampled_from(["same", "same", "none", "wrong"])),
        "give_shape": draw(st.booleans()),  # probe with --input-shape for the symbolic dims
    }
    return recipe


def probe_options(recipe: dict[str, Any]) -> list[str]:
    """``--input-shape`` giving the recipe's symbolic non-batch dims (2 each), when it asks for it."""
    rest = recipe["dims"][1:]
    if not recipe["give_shape"] or all(isinstance(d, int) for d in rest):
        return []
    dims = "x".join(str(d) if isinstance(d, int) else "2" for d in rest)
    return ["--input-shape", f"{recipe['input_name']}:{dims}"]


def _np_type(elem: int) -> Any:
    try:
        return helper.tensor_dtype_to_np_dtype(elem)
    except (KeyError, ValueError, TypeError):
        return np.float32


def _tensor(name: str, values: np.ndarray, elem: int) -> TensorProto:
    if elem == TensorProto.STRING:
        return helper.make_tensor(name, elem, values.shape, [str(v).encode() for v in values.ravel()])
    if elem == TensorProto.BFLOAT16:
        return helper.make_tensor(name, elem, values.shape, values.astype(np.float32).ravel().tolist())
    return numpy_helper.from_array(values.astype(_np_type(elem)), name)


def _attr(key: str, value: Any) -> onnx.AttributeProto:
    return helper.make_attribute(key, value)


def build_onnx(recipe: dict[str, Any], folder: Path, canary: Path) -> Path:
    """Write the recipe's model (and its external data) into ``folder``; returns the model path."""
    dims = recipe["dims"]
    x = recipe["input_name"]
    channels = dims[1] if isinstance(dims[1], int) and 0 < dims[1] <= 64 else 3
    count = max(0, channels + recipe["channels_delta"])
    rng = np.random.default_rng(recipe["param_seed"])
    params = {
        "scale": rng.uniform(0.5, 1.5, count),
        "bias": rng.uniform(-0.5, 0.5, count),
        "mean": rng.uniform(-0.3, 0.3, count),
        "var": rng.uniform(0.5, 1.5, count),
    }
    for key, value in recipe["specials"]:
        if count:
            params[key][rng.integers(0, count)] = value
    op = recipe["op"]
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    src = x
    if recipe["before"] == "conv":
        inits.append(_tensor("conv_w", rng.standard_normal((channels, channels, 1, 1)), TensorProto.FLOAT))
        nodes.append(helper.make_node("Conv", [src, "conv_w"], ["pre"], name="conv"))
        src = "pre"
    elif recipe["before"] in ("relu", "identity"):
        nodes.append(helper.make_node(recipe["before"].capitalize(), [src], ["pre"], name="pre"))
        src = "pre"
    elif recipe["before"] == "reshape":
        inits.append(numpy_helper.from_array(np.array([0, channels, -1], np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", [src, "shape"], ["pre"], name="reshape"))
        src = "pre"
    attrs = {k: v for k, v in recipe["attrs"].items()}
    name = recipe["node_name"]
    if op == "BatchNormalization":
        names = ["scale", "bias", "mean", "var"]
        outs = ["y", "rm", "rv", "sm", "sv"][: recipe["outputs"]]
        norm = helper.make_node(op, [src, *names], outs, name=name)
    elif op in ("InstanceNormalization", "LayerNormalization"):
        names = ["scale", "bias"]
        norm = helper.make_node(op, [src, *names], ["y"], name=name)
    elif op == "GroupNormalization":
        names = ["scale", "bias"]
        attrs.setdefault("num_groups", 1)
        norm = helper.make_node(op, [src, *names], ["y"], name=name)
    elif op == "MeanVarianceNormalization":
        names = []
        norm = helper.make_node(op, [src], ["y"], name=name)
    else:  # a hand-written batch norm: moments over the drawn axes
        names = []
        drawn = attrs.pop("axes", None)
        axes = drawn if isinstance(drawn, list) and drawn else [0, 2, 3]
        eps = numpy_helper.from_array(np.array(1e-5, np.float32), "eps")
        inits.append(eps)
        sub = [
            helper.make_node("ReduceMean", [src], ["mu"], axes=axes, keepdims=1, name=name or "mean"),
            helper.make_node("Sub", [src, "mu"], ["d"], name="sub"),
            helper.make_node("Mul", ["d", "d"], ["d2"], name="sq"),
            helper.make_node("ReduceMean", ["d2"], ["v"], axes=axes, keepdims=1, name="var"),
            helper.make_node("Add", ["v", "eps"], ["ve"], name="add_eps"),
            helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
            helper.make_node("Div", ["d", "sd"], ["y"], name="div"),
        ]
        norm = None
    if norm is not None:
        for key, value in attrs.items():
            with contextlib.suppress(ValueError, TypeError):  # a value onnx cannot store as an attribute
                norm.attribute.append(_attr(key, value))
        sub = [norm]
    for key in names:
        inits.append(_tensor(key, params[key], recipe["param_type"]))
    out = "y"
    if recipe["after"] == "relu":
        sub.append(helper.make_node("Relu", ["y"], ["z"], name="relu"))
        out = "z"
    elif recipe["after"] == "pool":
        sub.append(helper.make_node("GlobalAveragePool", ["y"], ["z"], name="pool"))
        out = "z"
    elif recipe["after"] == "norm" and names:
        second = helper.make_node(norm.op_type, ["y", *names], ["z"], name=f"{name}_2")
        second.attribute.extend(norm.attribute)
        sub.append(second)
        out = "z"
    elem = recipe["input_type"]
    out_dims = {"same": dims, "none": None, "wrong": [7] * len(dims)}[recipe["output_dims"]]
    if recipe["subgraph"] in ("if", "loop"):
        body_out = helper.make_tensor_value_info(out, elem, out_dims)
        if recipe["subgraph"] == "if":
            then = helper.make_graph(sub, "then", [], [body_out])
            other = helper.make_graph(
                [helper.make_node("Identity", [src], [out], name="else_id")],
                "else",
                [],
                [helper.make_tensor_value_info(out, elem, out_dims)],
            )
            inits.append(numpy_helper.from_array(np.array(True), "cond"))
            nodes.append(helper.make_node("If", ["cond"], ["result"], then_branch=then, else_branch=other, name="if"))
        else:
            body = helper.make_graph(
                [*sub, helper.make_node("Identity", ["c_in"], ["c_out"], name="keep")],
                "body",
                [
                    helper.make_tensor_value_info("i", TensorProto.INT64, []),
                    helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                ],
                [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), body_out],
            )
            inits += [
                numpy_helper.from_array(np.array(1, np.int64), "trip"),
                numpy_helper.from_array(np.array(True), "cond"),
            ]
            nodes.append(helper.make_node("Loop", ["trip", "cond"], ["result"], body=body, name="loop"))
        out = "result"
    else:
        nodes += sub
    graph = helper.make_graph(
        nodes,
        "fuzz",
        [helper.make_tensor_value_info(x, elem, dims)],
        [helper.make_tensor_value_info(out, elem, out_dims)],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", recipe["opset"])]
    functions = []
    if recipe["subgraph"] == "function":  # the nodes become a local function called once
        fn_inputs = [x, *[t.name for t in inits]]
        functions.append(helper.make_function("local", "Body", fn_inputs, [out], graph.node, opsets))
        del graph.node[:]
        graph.node.append(helper.make_node("Body", fn_inputs, [out], domain="local", name="call"))
        opsets.append(helper.make_opsetid("local", 1))
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = recipe["ir_version"]
    _raw_data(model, recipe["raw_data"])
    _external(model, recipe["external"], folder, canary)
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _raw_data(model: onnx.ModelProto, how: str) -> None:
    for tensor in model.graph.initializer:
        if tensor.name in ("scale", "var") and tensor.raw_data:
            if how == "short":
                tensor.raw_data = tensor.raw_data[:-1]
            elif how == "long":
                tensor.raw_data = tensor.raw_data + b"\x00" * 8
            elif how == "empty":
                tensor.raw_data = b""


def _external(model: onnx.ModelProto, how: str, folder: Path, canary: Path) -> None:
    """Move the scale/mean initializers to external data, in the drawn (often hostile) way."""
    if how == "none":
        return
    tensors = [t for t in model.graph.initializer if t.name in ("scale", "mean") and t.raw_data]
    blob = b"".join(t.raw_data for t in tensors)
    location = {
        "valid": "w.bin",
        "missing": "gone.bin",
        "parent": "../outside/secret.bin",
        "absolute": str(canary),
        "symlink": "link.bin",
        "offset": "w.bin",
        "unknown_keys": "w.bin",
        "dir": "sub",
        "short": "w.bin",
    }[how]
    if how in ("valid", "offset", "unknown_keys"):
        (folder / "w.bin").write_bytes(blob)
    elif how == "short":
        (folder / "w.bin").write_bytes(blob[: len(blob) // 2])
    elif how == "symlink":
        os.symlink(canary, folder / "link.bin")
    elif how == "dir":
        (folder / "sub").mkdir()
    offset = 0
    for tensor in tensors:
        data = tensor.raw_data
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        entries = [("location", location), ("offset", str(offset)), ("length", str(len(data)))]
        if how == "offset":
            entries = [("location", location), ("offset", str(2**62)), ("length", str(2**62))]
        if how == "unknown_keys":
            entries += [(f"k{i}", "v") for i in range(50)]
        for key, value in entries:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        offset += len(data)


# ------------------------------------------------------------------------------------------- byte mutations

SEEDS = sorted(
    p.name for p in SAMPLES.iterdir() if p.suffix in (".onnx", ".keras", ".h5") and p.stat().st_size < 60_000
)

#: (operation, position seed, size, byte value): the position comes from a PRNG seeded by the drawn integer,
#: so mutations spread over the whole file (hypothesis favours small numbers, which would hit the header only)
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "flip", "flip", "set", "set", "zero", "delete", "insert", "duplicate", "truncate"]),
        st.integers(0, 2**32 - 1),
        st.integers(1, 64),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def mutate_bytes(data: bytes, mutations: list[tuple[str, int, int, int]]) -> bytes:
    """Apply byte-level mutations at positions drawn from their seeds (so a recipe fits any seed file)."""
    buf = bytearray(data)
    for op, where, size, value in mutations:
        if not buf:
            break
        pos = random.Random(where).randrange(len(buf))
        if op == "flip":
            buf[pos] ^= 1 << (value % 8)
        elif op == "set":
            buf[pos] = value
        elif op == "delete":
            del buf[pos : pos + size]
        elif op == "insert":
            buf[pos:pos] = bytes([value]) * size
        elif op == "duplicate":
            buf[pos:pos] = buf[pos : pos + size]
        elif op == "truncate":
            del buf[pos:]
        elif op == "zero":
            buf[pos : pos + size] = bytes(len(buf[pos : pos + size]))
    return bytes(buf)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), FLOATS.filter(math.isfinite), NAMES),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(NAMES, inner, max_size=3)),
    max_leaves=6,
)


def mutate_json(document: Any, edits: list[tuple[int, Any]]) -> Any:
    """Replace values at seeded positions of a JSON tree's depth-first walk by drawn values."""

    def walk(node: Any, slots: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            slots.append((node, key))
            walk(child, slots)
        return slots

    for where, value in edits:
        slots = walk(document, [])
        if slots:
            parent, key = slots[random.Random(where).randrange(len(slots))]
            parent[key] = value
    return document


@st.composite
def mutated_files(draw: st.DrawFn) -> dict[str, Any]:
    """A sample model, mutated as raw bytes or (for .keras) member by member."""
    seed = draw(st.sampled_from(SEEDS))
    recipe: dict[str, Any] = {"seed": seed, "bytes": draw(MUTATIONS)}
    if seed.endswith(".keras"):
        recipe["level"] = draw(st.sampled_from(["bytes", "config", "weights"]))
        if recipe["level"] == "config":
            recipe["json"] = draw(st.lists(st.tuples(st.integers(0, 2**32 - 1), JSON_VALUES), min_size=1, max_size=4))
    return recipe


def build_mutated(recipe: dict[str, Any], folder: Path) -> Path:
    seed = recipe["seed"]
    data = (SAMPLES / seed).read_bytes()
    level = recipe.get("level", "bytes")
    if level == "bytes":
        data = mutate_bytes(data, recipe["bytes"])
    else:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = {name: zf.read(name) for name in zf.namelist()}
        if level == "config":
            members["config.json"] = json.dumps(
                mutate_json(json.loads(members["config.json"]), recipe["json"])
            ).encode()
        else:
            members["model.weights.h5"] = mutate_bytes(members["model.weights.h5"], recipe["bytes"])
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zf:
            for name, member in members.items():
                zf.writestr(name, member)
        data = out.getvalue()
    path = folder / f"m{Path(seed).suffix}"
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------- options

OPTION_TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "1",
            "-1",
            "1,2,32",
            "32",
            "4097",
            "1,,2",
            "x",
            "99999999999999999999",
            "1e3",
            " 2 ",
            "x:3x4x4",
            "x:",
            ":",
            "x:0x0",
            "x:-1",
            "x:" + "9" * 40,
            "x:3x100000x100000",
            "BN001",
            "collapse,BN9",
            "error",
            "never",
            "json",
            "table",
            "sarif",
            "\x1b[31m",
            "[/red]",
            "a\nb",
        ]
    ),
    st.text(max_size=20),
)


@st.composite
def option_recipes(draw: st.DrawFn) -> dict[str, Any]:
    """A command line for a valid model: a command and a few options with drawn (often wrong) values."""
    command = draw(st.sampled_from(["inspect", "probe", "probe", "fix", "explain", "checks"]))
    options = draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "--batch-sizes",
                        "--input-shape",
                        "--seed",
                        "--samples",
                        "--select",
                        "--ignore",
                        "--fail-on",
                        "--format",
                        "--output",
                        "--data",
                        "--only",
                        "--batch-size",
                        "--dry-run",
                        "--bogus",
                    ]
                ),
                OPTION_TEXT,
            ),
            max_size=4,
        )
    )
    data = draw(
        st.sampled_from(
            ["none", "good", "wrong_shape", "wrong_dtype", "empty", "nan", "pickle", "npz_keys", "not_numpy"]
        )
    )
    seed = draw(
        st.sampled_from(
            [
                "clean_bn_convnet.onnx",
                "collapse_1x1_train_mode.onnx",
                "keras_epsilon_1e-8.keras",
                "keras_legacy_convnet.h5",
                "layernorm_size1_axis.onnx",
            ]
        )
    )
    return {"command": command, "options": options, "data": data, "seed": seed}


def build_options(recipe: dict[str, Any], folder: Path) -> list[str]:
    """Copy the recipe's model into ``folder``, write its data file; returns the argument list."""
    seed = recipe["seed"]
    model = folder / f"m{Path(seed).suffix}"
    model.write_bytes((SAMPLES / seed).read_bytes())
    args = [recipe["command"]] + ([] if recipe["command"] in ("checks",) else [model.name])
    if recipe["command"] == "explain":
        args = ["explain", recipe["options"][0][1] if recipe["options"] else "BN001"]
    _write_data(recipe["data"], seed, folder)
    for option, value in recipe["options"]:
        if option == "--dry-run":
            args.append(option)
            continue
        if option == "--output":
            value = "report.json" if not value or "/" in value or "\x00" in value else value
        if option == "--data" and recipe["data"] != "none":
            value = "data.npz" if recipe["data"] == "npz_keys" else "data.npy"
        if "\x00" in value:
            value = value.replace("\x00", "")
        args += [option, value]
    return args


def _write_data(kind: str, seed: str, folder: Path) -> None:
    shape = {
        "clean_bn_convnet.onnx": (8, 3, 16, 16),
        "collapse_1x1_train_mode.onnx": (8, 3, 8, 8),
        "keras_epsilon_1e-8.keras": (8, 12),
        "keras_legacy_convnet.h5": (8, 8, 8, 3),
        "layernorm_size1_axis.onnx": (8, 4, 1),
    }.get(seed, (8, 3))
    rng = np.random.default_rng(0)
    path = folder / "data.npy"
    if kind == "good":
        np.save(path, rng.standard_normal(shape).astype(np.float32))
    elif kind == "wrong_shape":
        np.save(path, rng.standard_normal((8, 5)).astype(np.float32))
    elif kind == "wrong_dtype":
        np.save(path, np.ones(shape, dtype=np.complex64))
    elif kind == "empty":
        np.save(path, np.zeros((0, *shape[1:]), np.float32))
    elif kind == "nan":
        np.save(path, np.full(shape, np.nan, np.float32))
    elif kind == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "npz_keys":
        np.savez(folder / "data.npz", **{f"k{i}": np.zeros(shape, np.float32) for i in range(20)})
    elif kind == "not_numpy":
        path.write_bytes(b"\x93NUMPY\x01\x00garbage")
