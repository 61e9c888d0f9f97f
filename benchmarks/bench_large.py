"""Benchmark: a model over 2 GB (weights in an external-data file) through `inspect` and `probe`.

Usage: python benchmarks/bench_large.py [--repeats 3] [--layers 10] [--width 8192] [--keep DIR]

Generates, in a temporary folder (removed at the end unless --keep; never committed), a wide MLP: input
[N, 4096], ``--layers`` blocks of MatMul (width x width, float32) + BatchNormalization + Relu, a
LayerNormalization every other block, and a 1000-way head; 10 blocks of 8192 are 2.7 GB of weights in one
external-data file, written tensor by tensor (this process never holds them all). Then, in separate
processes, ``--repeats`` times:

- **inspect**: ``bncheck.engine.inspect`` (load, checker, shape inference, walk, static checks): wall time,
  and the bytes it read (``rchar`` of /proc/self/io: every byte through read(); ``read_bytes``: from disk,
  past the page cache), against the size of the norm parameters and of the whole weights file;
- **plain**: onnxruntime session + one pass at batch 1, 2, 32 (peak RSS = VmHWM);
- **probe**: load + probe at batch 1, 2, 32 (peak RSS), so that two copies of the weights would show as ~2x;
- **plain_data / probe_data**: the same with a ``--data`` file of 64 samples: plain also runs them through
  the model (two batches of 32), the probe measures every layer on them (``probe --data``);
- **plain_train / probe_train**: plain and probe (batch 1, 2, 32) of the same MLP with its BatchNormalizations
  in training mode (``train.onnx``, reading the same weights file), whose probe computes each by the spec's
  decomposition; the output-level test's share of the probe's wall (``output_test_s``: the bounded extra runs
  on a model whose outputs depend on the batch) is recorded apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np

IN = 4096

PEAK = r"""
def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
def io():
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(": ") for line in fh)}
"""

INSPECT = (
    PEAK
    + r"""
import time, json, sys
t0 = time.perf_counter()
# imported first, so that the bytes counted are the model's, not the modules' (whose import is timed)
import numpy, onnx, onnx.checker, onnx.shape_inference
from bncheck import engine
io0 = io()
report = engine.inspect(sys.argv[1])
io1 = io()
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "rchar": io1["rchar"] - io0["rchar"], "read_bytes": io1["read_bytes"] - io0["read_bytes"],
                  "rss_mb": status("VmHWM"), "findings": len(report.findings)}))
"""
)

PLAIN = (
    PEAK
    + r"""
import time, json, sys
t0 = time.perf_counter()
import numpy as np
import onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
for b in (1, 2, 32):
    sess.run(None, {"input": rng.standard_normal((b, IN), dtype=np.float32)})
if len(sys.argv) > 2:  # against probe --data: the data's samples through the model too, 32 at a time
    data = np.load(sys.argv[2])
    for start in range(0, len(data), 32):
        sess.run(None, {"input": data[start : start + 32]})
print(json.dumps({"wall": time.perf_counter() - t0, "rss_mb": status("VmHWM")}))
""".replace("IN", str(IN))
)

PROBE = (
    PEAK
    + r"""
import time, json, sys
t0 = time.perf_counter()
import bncheck.probe_plan as _plan
_test = [0.0]
_outputs_test = _plan._outputs_test
def _timed(*args, **kwargs):  # only counts the output-level test's time; the probe is unchanged
    t = time.perf_counter()
    try:
        return _outputs_test(*args, **kwargs)
    finally:
        _test[0] += time.perf_counter() - t
_plan._outputs_test = _timed
from bncheck.backends.onnx import OnnxBackend
from bncheck.backends.base import ProbeSettings
from bncheck.probe_data import load_data
backend = OnnxBackend()
view = backend.load(sys.argv[1], weights=False)  # as `bncheck probe` loads it
rss_load = status("VmHWM")
data = load_data(sys.argv[2], view.inputs) if len(sys.argv) > 2 else None
source = sys.argv[2] if data is not None else None
result = backend.probe(view, ProbeSettings(batch_sizes=(1, 2, 32), data=data, data_source=source))[0]
if data is None:
    assert len(result.dependence) + len(result.not_needed) == len(view.layers), (len(result.dependence), len(view.layers))
else:
    assert result.data_samples == len(data["input"]) and len(result.data) == len(view.layers), result.data_samples
view.final_info()  # what the report waits for: the file's sha256
print(json.dumps({"wall": time.perf_counter() - t0, "rss_mb": status("VmHWM"), "rss_after_load_mb": rss_load,
                  "output_test_s": _test[0]}))
"""
)

#: samples in the ``--data`` file of the data runs (two batches of 32)
DATA_SAMPLES = 64


def build(folder: str, layers: int, width: int, seed: int = 0) -> tuple[str, int, int]:
    """Write model.onnx + weights.bin into ``folder``; return (path, weight bytes, norm parameter bytes)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    data = os.path.join(folder, "weights.bin")
    inits: list = []
    nodes: list = []
    sizes = {"weights": 0, "norm": 0}

    with open(data, "wb") as fh:

        def external(name: str, array: np.ndarray) -> str:
            # one tensor in memory at a time: appended to the data file, referenced by offset
            array = np.ascontiguousarray(array, np.float32)
            offset = fh.tell()
            fh.write(array.tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
            # by hand: onnx's set_external_data wants the bytes in raw_data first (a second copy)
            for key, value in (("location", "weights.bin"), ("offset", offset), ("length", array.nbytes)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = TensorProto.EXTERNAL
            inits.append(tensor)
            sizes["weights"] += array.nbytes
            return name

        def norm_param(name: str, array: np.ndarray) -> str:
            array = array.astype(np.float32)
            sizes["norm"] += array.nbytes
            return external(name, array)

        x, cin = "input", IN
        for i in range(layers):
            w = external(f"w{i}", (rng.standard_normal((cin, width), dtype=np.float32) / np.sqrt(cin)))
            nodes.append(helper.make_node("MatMul", [x, w], [f"mm{i}"], name=f"mm{i}"))
            params = [
                norm_param(f"bn{i}_{k}", v)
                for k, v in (
                    ("scale", rng.uniform(0.5, 1.5, width)),
                    ("bias", rng.normal(0, 0.1, width)),
                    ("mean", rng.normal(0, 0.2, width)),
                    ("var", rng.uniform(0.5, 2.0, width)),
                )
            ]
            nodes.append(helper.make_node("BatchNormalization", [f"mm{i}", *params], [f"bn{i}"], name=f"bn{i}"))
            y = f"bn{i}"
            if i % 2:
                scale = norm_param(f"ln{i}_scale", rng.uniform(0.8, 1.2, width))
                bias = norm_param(f"ln{i}_bias", rng.normal(0, 0.05, width))
                nodes.append(
                    helper.make_node("LayerNormalization", [y, scale, bias], [f"ln{i}"], name=f"ln{i}", axis=-1)
                )
                y = f"ln{i}"
            nodes.append(helper.make_node("Relu", [y], [f"relu{i}"], name=f"relu{i}"))
            x, cin = f"relu{i}", width
        head = external("head_w", (rng.standard_normal((cin, 1000), dtype=np.float32) / np.sqrt(cin)))
        nodes.append(helper.make_node("MatMul", [x, head], ["logits"], name="head"))
    inits.append(numpy_helper.from_array(np.zeros(1, np.float32), "unused_inline"))  # one inline tensor too
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bncheck-bench")
    model.ir_version = 8
    path = os.path.join(folder, "model.onnx")
    onnx.save(model, path)  # the graph alone: every weight is already external
    return path, sizes["weights"], sizes["norm"]


def train_mode_copy(path: str) -> str:
    """``path``'s graph with every BatchNormalization in training mode (its running mean and variance as
    outputs too, as the spec wants), written beside it as train.onnx: the same external weights file."""
    import onnx
    from onnx import helper

    model = onnx.load(path, load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.attribute.append(helper.make_attribute("training_mode", 1))
            node.output.extend([f"{node.name}_running_mean", f"{node.name}_running_var"])
    train = os.path.join(os.path.dirname(path), "train.onnx")
    onnx.save(model, train)
    return train


def _child(code: str, model: str, *more: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, model, *more], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ranges(plain: list[dict], probe: list[dict], field: str) -> list[float]:
    """The smallest and largest probe / plain ratio of ``field`` over the repeats (pairs in run order)."""
    ratios = [b[field] / a[field] for a, b in zip(plain, probe)]
    return [min(ratios), max(ratios)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--keep", help="build the model in this folder and keep it")
    args = parser.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="bncheck-large-")
    os.makedirs(folder, exist_ok=True)
    names = ("inspect", "plain", "probe", "plain_data", "probe_data", "plain_train", "probe_train")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    loads: list[float] = []
    try:
        path, weights, norm = build(folder, args.layers, args.width)
        train = train_mode_copy(path)
        print(f"model: {weights / 1e9:.2f} GB of weights, {norm / 1e3:.0f} kB of norm parameters", file=sys.stderr)
        data = os.path.join(folder, "data.npy")
        np.save(data, np.random.default_rng(1).standard_normal((DATA_SAMPLES, IN), dtype=np.float32))
        for rep in range(args.repeats):
            loads.append(os.getloadavg()[0])
            for name, code in (("inspect", INSPECT), ("plain", PLAIN), ("probe", PROBE)):
                runs[name].append(_child(code, path))
            for name, code in (("plain_data", PLAIN), ("probe_data", PROBE)):
                runs[name].append(_child(code, path, data))
            for name, code in (("plain_train", PLAIN), ("probe_train", PROBE)):
                runs[name].append(_child(code, train))
            print(f"repeat {rep + 1}: " + " ".join(f"{k} {v[-1]}" for k, v in runs.items()), file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    med = {
        k: {f: statistics.median(r[f] for r in v) for f in v[0] if isinstance(v[0][f], (int, float))}
        for k, v in runs.items()
    }
    print(
        json.dumps(
            {
                "repeats": args.repeats,
                "load_average_1min": loads,
                "weights_bytes": weights,
                "norm_param_bytes": norm,
                "median": med,
                "inspect_read_over_weights": med["inspect"]["rchar"] / weights,
                "probe_over_plain_rss": med["probe"]["rss_mb"] / med["plain"]["rss_mb"],
                "probe_over_plain_rss_range": _ranges(runs["plain"], runs["probe"], "rss_mb"),
                "probe_over_plain_wall": med["probe"]["wall"] / med["plain"]["wall"],
                "probe_data_over_plain_data_rss": med["probe_data"]["rss_mb"] / med["plain_data"]["rss_mb"],
                "probe_data_over_plain_data_rss_range": _ranges(runs["plain_data"], runs["probe_data"], "rss_mb"),
                "probe_data_over_plain_data_wall": med["probe_data"]["wall"] / med["plain_data"]["wall"],
                "probe_train_over_plain_train_rss": med["probe_train"]["rss_mb"] / med["plain_train"]["rss_mb"],
                "probe_train_over_plain_train_rss_range": _ranges(runs["plain_train"], runs["probe_train"], "rss_mb"),
                "probe_train_over_plain_train_wall": med["probe_train"]["wall"] / med["plain_train"]["wall"],
                "probe_train_over_plain_train_wall_range": _ranges(runs["plain_train"], runs["probe_train"], "wall"),
                "probe_train_without_output_test_over_plain_train_wall": statistics.median(
                    r["wall"] - r["output_test_s"] for r in runs["probe_train"]
                )
                / med["plain_train"]["wall"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
