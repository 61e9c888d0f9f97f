"""Benchmark: `bncheck probe` against plain onnxruntime inference, on several models.

Usage: python benchmarks/bench_probe.py [--repeats 5] [--models resnet50,mobilenet-v2,...] [--keep DIR]
                                        [--markdown] [--json OUT] [--all-layers]

Builds each model (benchmarks/resnet_model.py, benchmarks/arch_models.py) in a temporary folder, then
alternates, ``--repeats`` times and model after model inside each repeat (so that a busy spell of the
machine hits every model and both sides alike):
(a) plain onnxruntime (default session options): session creation + one forward pass at batch 1, 2, 32;
(b) the probe through the ONNX backend: load (checker, shape inference, walk) + ``probe`` with batch
    sizes 1,2,32, including the batch-dependence runs (K=4) and, on a model whose outputs depend on the
    batch, the output-effect runs and the localisation.
Each measurement runs in its own subprocess; wall time is taken inside the child from before its first
import to the end of its work, peak RSS from /proc/self/status (VmHWM). Reports medians, the ratio of
the medians b/a and the range of the per-repeat ratios, the load average (os.getloadavg) seen at each
repeat, and for the probe: how many onnxruntime runs it made and what the output-level test (output
dependence, output effect, localisation) cost in time and runs. Interpreter start-up (identical for
both) is excluded.
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

#: name -> (builder module in benchmarks/, function, keyword arguments)
MODELS: dict[str, tuple[str, str, dict]] = {
    "resnet50": ("resnet_model", "build_resnet50", {}),
    "resnet50-b": ("resnet_model", "build_resnet50", {"variant": "b"}),
    "mobilenet-v2": ("arch_models", "build_mobilenet_v2", {}),
    "transformer": ("arch_models", "build_transformer", {}),
    "conv3d": ("arch_models", "build_conv3d", {}),
    "resnet50-train": ("resnet_model", "build_resnet50", {"train": True}),
    "resnet50-batchmix": ("resnet_model", "build_resnet50", {"batch_mix": True}),
}

# Peak RSS is VmHWM from /proc/self/status: ru_maxrss is inherited from the parent at fork and kept across
# exec on Linux, so a child of a large parent would report the parent's peak.
PEAK = r"""
def peak_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
"""

PLAIN = (
    PEAK
    + r"""
import time, json, sys
t0 = time.perf_counter()
import numpy as np
import onnxruntime as ort
t_import = time.perf_counter() - t0
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
for b in (1, 2, 32):
    sess.run(None, {i.name: rng.standard_normal((b, *i.shape[1:]), dtype=np.float32) for i in sess.get_inputs()})
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "import": t_import, "rss_mb": peak_mb()}))
"""
)

# Counting wrappers only (the probe runs unchanged): every onnxruntime run, and the output-level test.
PROBE = (
    PEAK
    + r"""
import time, json, sys
t0 = time.perf_counter()
from bncheck.backends.onnx import OnnxBackend
from bncheck.backends.base import ProbeSettings
import bncheck.probe_plan as plan
from onnxruntime.capi.onnxruntime_inference_collection import Session
counts = {"runs": 0, "dyn_runs": 0, "dyn_s": 0.0, "in_dyn": False}
run = Session.run
def counted(self, *a, **k):
    counts["runs"] += 1
    counts["dyn_runs"] += counts["in_dyn"]
    return run(self, *a, **k)
Session.run = counted
outputs_test = plan._outputs_test
def timed(*a, **k):
    t = time.perf_counter()
    counts["in_dyn"] = True
    try:
        return outputs_test(*a, **k)
    finally:
        counts["in_dyn"] = False
        counts["dyn_s"] += time.perf_counter() - t
plan._outputs_test = timed
backend = OnnxBackend()
view = backend.load(sys.argv[1], weights=False)  # as `bncheck inspect` and `bncheck probe` load it
t1 = time.perf_counter()
rss_load = peak_mb()
all_layers = len(sys.argv) > 2 and sys.argv[2] == "all-layers"
result = backend.probe(view, ProbeSettings(batch_sizes=(1, 2, 32), all_layers=all_layers))[0]
view.final_info()  # what the report waits for: the file's sha256, hashed in a thread
wall = time.perf_counter() - t0
measured = len(result.dependence) + len(result.not_needed)
assert measured == len(view.layers), (len(result.dependence), len(result.not_needed), len(view.layers))
deps = list(result.dependence.values())
print(json.dumps({"wall": wall, "load": t1 - t0, "rss_mb": peak_mb(), "rss_after_load_mb": rss_load,
                  "runs": counts["runs"], "dyn_runs": counts["dyn_runs"], "dyn_s": counts["dyn_s"],
                  "layers": len(view.layers), "located": result.located is not None,
                  "output_dependent": bool(result.output_dependence) and any(
                      c.max_shift > 0.01 for by in result.output_dependence.values() for c in by.values()),
                  "max_output_change": max((d.output_change for d in deps), default=0.0),
                  "max_input_change": max((d.input_change for d in deps), default=0.0)}))
"""
)


def _child(code: str, model: str, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, model, *extra], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _build(name: str, path: str) -> None:
    module, function, kwargs = MODELS[name]
    # built in a child, so that this process stays small
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {HERE!r}); "
            f"from {module} import {function}; {function}({path!r}, **{kwargs!r})",
        ],
        check=True,
    )


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians, ratio of medians, range of the per-repeat ratios, and the probe's run counts."""
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall", "rss_mb")} for k, v in runs.items()}
    pairs = list(zip(runs["plain"], runs["probe"]))
    out: dict = {"median": med}
    for f in ("wall", "rss_mb"):
        per = [b[f] / a[f] for a, b in pairs]
        out[f"ratio_{f}"] = med["probe"][f] / med["plain"][f]
        out[f"ratio_{f}_range"] = (min(per), max(per))
    probe = runs["probe"]
    out["probe_load_s"] = statistics.median(r["load"] for r in probe)
    out["rss_after_load_ratio"] = statistics.median(r["rss_after_load_mb"] for r in probe) / med["plain"]["rss_mb"]
    for f in ("runs", "dyn_runs", "dyn_s"):
        out[f] = statistics.median(r[f] for r in probe)
    out["layers"] = probe[0]["layers"]
    out["located"] = probe[0]["located"]
    out["output_dependent"] = probe[0]["output_dependent"]
    return out


def markdown(summary: dict[str, dict], repeats: int) -> str:
    lines = [
        "| model | norm layers | plain wall | probe wall | **wall ratio** (range) | plain peak | probe peak | "
        "**RSS ratio** (range) | ort runs | output-level test: runs, time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        w, r = s["ratio_wall_range"], s["ratio_rss_mb_range"]
        lines.append(
            f"| {name} | {s['layers']} | {s['median']['plain']['wall']:.2f} s | {s['median']['probe']['wall']:.2f} s "
            f"| **{s['ratio_wall']:.2f}x** ({w[0]:.2f}-{w[1]:.2f}) | {s['median']['plain']['rss_mb']:.0f} MB "
            f"| {s['median']['probe']['rss_mb']:.0f} MB | **{s['ratio_rss_mb']:.2f}x** ({r[0]:.2f}-{r[1]:.2f}) "
            f"| {s['runs']:.0f} | {s['dyn_runs']:.0f}, {s['dyn_s']:.2f} s"
            f"{' (located)' if s['located'] else ''} |"
        )
    lines.append(f"\nmedians of {repeats} interleaved repeats")
    return "\n".join(lines)


def bncheck_folder(python: str) -> str:
    """The folder of the bncheck package ``python`` imports ('' when it imports none)."""
    return subprocess.run(
        [python, "-c", "import bncheck, os; print(os.path.dirname(bncheck.__file__))"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def byte_compile(python: str) -> None:
    """Byte-compile the bncheck package ``python`` imports, as a regular ``pip install`` does: an editable
    install run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile its modules in every measured process."""
    subprocess.run([python, "-m", "compileall", "-q", bncheck_folder(python)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--keep", help="build the models in this folder and keep them (reused when present)")
    parser.add_argument("--markdown", action="store_true", help="also print the table for benchmarks/README.md")
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument(
        "--all-layers",
        action="store_true",
        help="probe as `bncheck probe --all-layers` does: inference-mode BNs measured too (what measuring them costs)",
    )
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    byte_compile(sys.executable)
    folder = args.keep or tempfile.mkdtemp(prefix="bncheck-bench-")
    os.makedirs(folder, exist_ok=True)
    paths = {n: os.path.join(folder, f"{n}.onnx") for n in names}
    runs: dict[str, dict[str, list[dict]]] = {n: {"plain": [], "probe": []} for n in names}
    loads: list[float] = []
    try:
        for name, path in paths.items():
            if not (args.keep and os.path.exists(path)):
                _build(name, path)
        for rep in range(args.repeats):
            loads.append(os.getloadavg()[0])
            for name, path in paths.items():
                for side, code in (("plain", PLAIN), ("probe", PROBE)):
                    extra = ("all-layers",) if side == "probe" and args.all_layers else ()
                    runs[name][side].append(_child(code, path, *extra))
                print(
                    f"repeat {rep + 1} {name}: plain {runs[name]['plain'][-1]} probe {runs[name]['probe'][-1]}",
                    file=sys.stderr,
                )
        loads.append(os.getloadavg()[0])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    summary = {n: summarize(r) for n, r in runs.items()}
    print(json.dumps({"repeats": args.repeats, "load_average_1min": loads, "models": summary}, indent=2))
    if args.markdown:
        print(markdown(summary, args.repeats))
        print(f"load average (1 min) at each repeat: {', '.join(f'{x:.1f}' for x in loads)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"repeats": args.repeats, "load_average_1min": loads, "runs": runs, "models": summary}, fh, indent=1
            )


if __name__ == "__main__":
    main()
