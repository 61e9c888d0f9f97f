"""Benchmark: what measuring every BatchNormalization output costs at batch 32, by the kernels used.

Usage: python benchmarks/bench_measuring.py [--repeats 7] [--batch 32]

Builds the ResNet-50 of ``resnet_model.py`` in a temporary folder and, in one process, one onnxruntime
session per variant (default options, ORT_ENABLE_ALL as plain inference uses), each adding graph outputs
for the 53 BatchNormalization outputs:

- ``plain``: nothing added (what plain inference runs);
- ``mean``: GlobalAveragePool per BN output (the per-channel means only);
- ``mean+sq (Mul, GAP)``: GlobalAveragePool of x and of Mul(x, x) (what the probe measures on an
  inference BN);
- ``mean+sq (GlobalLpPool p=2)``: one kernel for the squares (sqrt of the sum of squares);
- ``mean+sq (ReduceMean, ReduceSumSquare)``: the generic reductions over H and W.

The runs of one batch are interleaved across variants (a busy spell of the machine hits them alike) and
the median of ``--repeats`` is reported, with its ratio to ``plain``. It shows the floor of the probe's run
time on such a model: every BN output must be read at least once for its mean, and once more for its
squares, and an extra consumer of a BN output stops onnxruntime fusing Conv+BN with the following Relu.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _variant(model, kind: str):
    import onnx
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    added: list = []
    outputs: list[str] = []
    for i, node in enumerate([n for n in graph.node if n.op_type == "BatchNormalization"]):
        t = node.output[0]
        if kind == "plain":
            continue
        added.append(helper.make_node("GlobalAveragePool", [t], [f"m{i}"]))
        outputs.append(f"m{i}")
        if kind == "mean+sq (Mul, GAP)":
            added += [
                helper.make_node("Mul", [t, t], [f"s{i}"]),
                helper.make_node("GlobalAveragePool", [f"s{i}"], [f"q{i}"]),
            ]
        elif kind == "mean+sq (GlobalLpPool p=2)":
            added.append(helper.make_node("GlobalLpPool", [t], [f"q{i}"], p=2))
        elif kind == "mean+sq (ReduceMean, ReduceSumSquare)":
            axes = helper.make_tensor(f"axes{i}", onnx.TensorProto.INT64, [2], [2, 3])
            graph.initializer.append(axes)
            added[-1] = helper.make_node("ReduceMean", [t, axes.name], [f"m{i}"], keepdims=0)
            added.append(helper.make_node("ReduceSumSquare", [t, axes.name], [f"q{i}"], keepdims=0))
        if kind != "mean":
            outputs.append(f"q{i}")
    graph.node.extend(added)
    graph.output.extend(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs)
    if kind == "mean+sq (ReduceMean, ReduceSumSquare)":
        del copy.opset_import[:]
        copy.opset_import.append(helper.make_opsetid("", 18))  # axes as an input
    return copy


KINDS = (
    "plain",
    "mean",
    "mean+sq (Mul, GAP)",
    "mean+sq (GlobalLpPool p=2)",
    "mean+sq (ReduceMean, ReduceSumSquare)",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    import numpy as np
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, HERE)
    from resnet_model import build_resnet50

    with tempfile.TemporaryDirectory(prefix="bncheck-measuring-") as folder:
        path = build_resnet50(os.path.join(folder, "resnet50.onnx"))
        model = onnx.load(path)
        sessions = {k: ort.InferenceSession(_variant(model, k).SerializeToString()) for k in KINDS}
    name = sessions["plain"].get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for k in KINDS:  # warm-up: the first run of a session allocates its arena
        sessions[k].run(None, {name: x})
    for _ in range(args.repeats):
        for k in KINDS:
            start = time.perf_counter()
            sessions[k].run(None, {name: x})
            times[k].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    print(f"| variant | run at batch {args.batch} (median of {args.repeats}) | ratio to plain | range |")
    print("| --- | --- | --- | --- |")
    for k in KINDS:
        ratios = [t / p for t, p in zip(times[k], times["plain"])]
        print(
            f"| {k} | {statistics.median(times[k]):.3f} s | **{statistics.median(times[k]) / base:.2f}x** "
            f"| {min(ratios):.2f}-{max(ratios):.2f} |"
        )
    print(f"load average: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
