"""Benchmark: what `bncheck probe` costs before it does any work, against plain onnxruntime's start-up.

Usage: python benchmarks/bench_startup.py [--repeats 11] [--markdown]

Interleaved ``--repeats`` times, each in a process of its own:
- plain onnxruntime and ``bncheck probe --format json`` on a model with one Conv + BatchNormalization on
  [N, 3, 8, 8] (built here with onnx.helper, in a temporary folder), whose runs cost next to nothing: whole
  processes timed by this one from start to exit (interpreter start-up and teardown included, as
  benchmarks/real_models/run.py times them); their difference is bncheck's fixed cost per model;
- where that goes: the import stages, timed inside the child (its teardown differs from the probe's, which
  ends without the interpreter's teardown): what plain inference imports (numpy, numpy.random, onnxruntime), then onnx,
  click, the bncheck modules a probe imports, and onnx's schema registry (built on the first checker or
  shape-inference call).

On a model whose plain run takes T seconds, the probe cannot take less than T plus that fixed cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench_probe import byte_compile

# the bncheck modules `bncheck probe --format json` imports on an ONNX model (sys.modules after a probe)
BNCHECK = (
    "import bncheck.cli, bncheck.jobs, bncheck.engine, bncheck.backends.onnx.load, bncheck.backends.onnx.walk, "
    "bncheck.backends.onnx.run, bncheck.backends.onnx.probe_copy, bncheck.backends.onnx.memory, "
    "bncheck.render.json"
)

QUICK_IMPORT = (
    "import importlib.util, os, bncheck; "
    "spec = importlib.util.spec_from_file_location("
    "'quick_import', os.path.join(bncheck.__path__[0], 'backends', 'onnx', 'quick_import.py')); "
    "quick = importlib.util.module_from_spec(spec); spec.loader.exec_module(quick); quick.import_onnx(); import onnx"
)

# (label, what the stage adds); each child times its stage and every stage before it
STAGES: list[tuple[str, str]] = [
    ("numpy, numpy.random, onnxruntime (what plain imports)", "import numpy, numpy.random, onnxruntime"),
    # as the console imports it, without importlib.metadata and with onnx's dtype table and ml_dtypes left to
    # their first use (which a model of plain numeric types never makes); quick_import.py is loaded from its
    # file, so that the bncheck modules its package imports stay in their own row
    ("onnx (as bncheck's console imports it)", QUICK_IMPORT),
    ("click", "import click"),
    ("bncheck's modules", BNCHECK),
    ("onnx's schema registry", "onnx.defs.get_schema('Conv')"),
]

PLAIN = r"""
import sys
import numpy as np
import onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
for b in (1, 2, 32):
    sess.run(None, {"x": np.random.default_rng(0).standard_normal((b, 3, 8, 8)).astype(np.float32)})
"""

# what the `bncheck` console script runs
PROBE = "import sys; from bncheck.cli import console; sys.argv = ['bncheck', *sys.argv[1:]]; console()"


def build_model(path: str) -> None:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(4, np.float32), "scale"),
        numpy_helper.from_array(np.zeros(4, np.float32), "bias"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "startup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def wall(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def stage_times(python: str) -> list[float]:
    """Seconds each stage took in one fresh process, in order."""
    code = "import time\nmarks = [time.perf_counter()]\n"
    for _, statement in STAGES:
        code += f"{statement}\nmarks.append(time.perf_counter())\n"
    code += "print(' '.join(str(b - a) for a, b in zip(marks, marks[1:])))\n"
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout
    return [float(x) for x in out.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--markdown", action="store_true", help="also print the table for benchmarks/README.md")
    args = parser.parse_args()
    byte_compile(sys.executable)
    plain_label, probe_label = "plain onnxruntime on the Conv+BN model", "bncheck probe on the Conv+BN model"
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bncheck-startup-") as tmp:
        model = os.path.join(tmp, "conv_bn.onnx")
        build_model(model)
        for _ in range(args.repeats):
            times.setdefault(plain_label, []).append(wall([sys.executable, "-c", PLAIN, model]))
            probe = [sys.executable, "-c", PROBE, "probe", "--format", "json", model]
            times.setdefault(probe_label, []).append(wall(probe))
            for (label, _), seconds in zip(STAGES, stage_times(sys.executable)):
                times.setdefault(label, []).append(seconds)
    medians = {label: statistics.median(values) for label, values in times.items()}
    plain, probe = medians[plain_label], medians[probe_label]
    rows = [
        (plain_label, "whole process", f"{plain:.3f} s", _spread(times[plain_label])),
        (probe_label, "whole process", f"{probe:.3f} s", _spread(times[probe_label])),
        ("difference: bncheck's fixed cost per model", "", f"{probe - plain:.3f} s", ""),
    ]
    rows += [
        (f"import stage: {label}", "in-process", f"{medians[label]:.3f} s", _spread(times[label]))
        for label, _ in STAGES
    ]
    added = sum(medians[label] for label, _ in STAGES[1:])
    rows.append(("stages plain does not have (onnx to schema registry)", "", f"{added:.3f} s", ""))
    for label, how, median, spread in rows:
        print(f"{label:62s} {how:14s} {median:>8s}   {spread}")
    if args.markdown:
        print("\n| what | timed | median | range |\n| --- | --- | --- | --- |")
        for label, how, median, spread in rows:
            print(f"| {label} | {how} | {median} | {spread} |")


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f} s"


if __name__ == "__main__":
    main()
