"""Benchmark: `bncheck probe` against plain onnxruntime inference on a ResNet-50-sized model.

Usage: python benchmarks/bench_probe.py [--repeats 5] [--keep DIR]

Builds the model (benchmarks/resnet_model.py: 53 BatchNormalization, 224x224, dynamic batch, random
weights, non-default statistics) in a temporary folder, then alternates, ``--repeats`` times:
(a) plain onnxruntime (default session options): session creation + one forward pass at batch 1, 2, 32;
(b) the probe through the ONNX backend: load (checker, shape inference, walk) + ``run_probe`` with batch
    sizes 1,2,32, including the batch-dependence runs (K=4).
Each measurement runs in its own subprocess; wall time is taken inside the child from before its first
import to the end of its work, peak RSS from /proc/self/status (VmHWM). Reports medians and the
ratios b/a. Interpreter start-up (identical for both) is excluded.
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

HERE = os.path.dirname(os.path.abspath(__file__))

# Peak RSS is VmHWM from /proc/self/status: ru_maxrss is inherited from the parent at fork and kept across
# exec on Linux, so a child of a large parent would report the parent's peak.
PEAK = r"""
def peak_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
"""

PLAIN = PEAK + r"""
import time, json, sys
t0 = time.perf_counter()
import numpy as np
import onnxruntime as ort
t_import = time.perf_counter() - t0
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
for b in (1, 2, 32):
    sess.run(None, {"input": rng.standard_normal((b, 3, 224, 224), dtype=np.float32)})
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "import": t_import, "rss_mb": peak_mb()}))
"""

PROBE = PEAK + r"""
import time, json, sys
t0 = time.perf_counter()
from bncheck.backends.onnx import OnnxBackend
from bncheck.backends.base import ProbeSettings
backend = OnnxBackend()
view = backend.load(sys.argv[1])
t1 = time.perf_counter()
rss_load = peak_mb()
result = backend.probe(view, ProbeSettings(batch_sizes=(1, 2, 32)))[0]
wall = time.perf_counter() - t0
assert len(result.dependence) == 53, len(result.dependence)
deps = result.dependence.values()
print(json.dumps({"wall": wall, "load": t1 - t0, "rss_mb": peak_mb(),
                  "rss_after_load_mb": rss_load,
                  "max_output_change": max(d.output_change for d in deps),
                  "max_input_change": max(d.input_change for d in deps)}))
"""


def _child(code: str, model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, model], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", help="build the model in this folder and keep it")
    args = parser.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="bncheck-bench-")
    os.makedirs(folder, exist_ok=True)
    model = os.path.join(folder, "resnet50_bn.onnx")
    # built in a child too, so that this process stays small
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); "
                    f"from resnet_model import build_resnet50; build_resnet50({model!r})"], check=True)
    runs: dict[str, list[dict]] = {"plain": [], "probe": []}
    try:
        for rep in range(args.repeats):
            for name, code in (("plain", PLAIN), ("probe", PROBE)):
                runs[name].append(_child(code, model))
            print(f"repeat {rep + 1}: plain {runs['plain'][-1]} probe {runs['probe'][-1]}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall", "rss_mb")} for k, v in runs.items()}
    ratios = {f: med["probe"][f] / med["plain"][f] for f in ("wall", "rss_mb")}
    # the probe engine alone (run_probe after the backend's load) against the plain session + runs
    engine = statistics.median(r["wall"] - r["load"] for r in runs["probe"])
    plain_session_runs = statistics.median(r["wall"] - r["import"] for r in runs["plain"])
    ratios["wall_run_probe_only"] = engine / plain_session_runs
    ratios["rss_after_load"] = statistics.median(r["rss_after_load_mb"] for r in runs["probe"]) / med["plain"]["rss_mb"]
    print(json.dumps({"repeats": args.repeats, "median": med, "ratio_probe_over_plain": ratios,
                      "probe_load_median_s": statistics.median(r["load"] for r in runs["probe"]),
                      "dependence_noise": max(max(r["max_output_change"], r["max_input_change"])
                                              for r in runs["probe"])},
                     indent=2))


if __name__ == "__main__":
    main()
