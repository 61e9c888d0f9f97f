"""Benchmark: `bncheck probe --data` on a calibration set of many samples, against plain inference over that data once.

Usage: python benchmarks/bench_data.py ID[,ID...] [--samples 2000] [--repeats 3] [--cache DIR]
       (prints a Markdown table)

IDs name single-input ONNX or Keras models of the real-world set (benchmarks/real_models; run fetch.py first).
For each, ``--samples`` samples drawn from a standard normal distribution (seed 0) of the manifest's input
shape are saved as a .npy file; then fresh processes alternate, as in real_models/run.py:

- plain: onnxruntime and numpy imported, the file's session, one pass at batch 1, 2 and 32, then every sample
  of the data once in batches of 32 (what a user's own inference over the calibration set costs); for a Keras
  file the same with Keras (numpy backend, as bncheck runs it): the loaded model called with training=False;
- probe: the `bncheck probe --format json --data FILE` console process real_models/run.py times.

Such data are far from the statistics a model was trained on, so the probe flags drift (BN003) and measures
its effect: it recomputes the statistics from the data, layer after layer, and compares the outputs. That is
the work a user asks for with --data on a model whose statistics do not fit it; the table gives its share
(the probe's output-level test is reported apart, as in the real-world table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "real_models"))  # the real-world set and its plain child
from bench_breakdown import add_model_arguments, set_models
from run import PEAK, add_bncheck_argument, findings_of, interpreter_of, run_bncheck

PLAIN_DATA = (
    PEAK
    + r"""
import json, sys
import numpy as np
import onnxruntime as ort
data = np.load(sys.argv[2])
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
for b in (1, 2, 32):
    sess.run(None, {name: data[:b]})
for start in range(0, len(data), 32):
    sess.run(None, {name: data[start : start + 32]})
print(json.dumps({"rss_mb": peak_mb()}))
"""
)

PLAIN_KERAS_DATA = (
    PEAK
    + r"""
import json, os, sys
import numpy as np
os.environ.setdefault("KERAS_BACKEND", "numpy")
import keras
data = np.load(sys.argv[2])
model = keras.saving.load_model(sys.argv[1], compile=False)
for b in (1, 2, 32):
    model(data[:b], training=False)
for start in range(0, len(data), 32):
    model(data[start : start + 32], training=False)
print(json.dumps({"rss_mb": peak_mb()}))
"""
)

KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")


def data_models(ids: str, cache: Path) -> list[dict]:
    """The real-world set's ONNX and Keras models named in ``ids`` (comma-separated), in that order."""
    return set_models(ids, cache, (".onnx", *KERAS_SUFFIXES), "ONNX or Keras")


def write_data(model: dict, samples: int, folder: Path) -> Path:
    """``samples`` standard-normal samples of the model's one input (the manifest's shape, "B" the samples)."""
    (spec,) = model["inputs"]
    shape = [samples if d == "B" else int(d) for d in spec["shape"]]
    if spec["shape"][0] != "B" or "B" in spec["shape"][1:]:
        raise SystemExit(f"{model['id']}: bench_data.py takes a model whose input has its batch first")
    path = folder / f"{model['id']}_{samples}.npy"
    np.save(path, np.random.default_rng(0).standard_normal(shape, dtype=np.float32).astype(spec["dtype"]))
    return path


def run_plain(python: str, model: dict, data: Path) -> dict:
    start = time.perf_counter()
    code = PLAIN_KERAS_DATA if model["path"].endswith(KERAS_SUFFIXES) else PLAIN_DATA
    proc = subprocess.run([python, "-c", code, model["path"], str(data)], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"plain inference failed on {model['id']}: {proc.stderr.strip().splitlines()[-1:]}")
    return {"wall": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def measure(model: dict, samples: int, repeats: int, bncheck: Path, folder: Path) -> dict:
    data = write_data(model, samples, folder)
    python = interpreter_of(bncheck)
    args = ["probe", "--format", "json", "--data", str(data), *[str(a) for a in model.get("probe_args", [])]]
    plain, probe = [], []
    for _ in range(repeats):
        plain.append(run_plain(python, model, data))
        probe.append(run_bncheck(bncheck, [*args, model["path"]], measure_rss=True))
    codes = {p.get("exit") for p in probe}
    counts = findings_of(probe[0].get("doc"))
    findings = " ".join(f"{key} x{n}" for key, n in sorted(counts.items())) or "none"
    return {
        "model": model["id"],
        "samples": samples,
        "data_mb": data.stat().st_size / 2**20,
        "plain_s": statistics.median(p["wall"] for p in plain),
        "plain_mb": statistics.median(p["rss_mb"] for p in plain),
        "probe_s": statistics.median(p["wall"] for p in probe),
        "probe_mb": statistics.median(p["rss_mb"] for p in probe),
        "test_s": statistics.median(p.get("output_test_s") or 0.0 for p in probe),
        "ratios": [b["wall"] / a["wall"] for a, b in zip(plain, probe)],
        "exit": sorted(c for c in codes if c is not None),
        "findings": findings,
    }


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | samples (MB) | plain s, MB | probe s, MB | wall ratio (range) | peak ratio | output-level test s "
        "| findings (exit) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = r["probe_s"] / r["plain_s"]
        lines.append(
            f"| {r['model']} | {r['samples']} ({r['data_mb']:.0f}) | {r['plain_s']:.2f}, {r['plain_mb']:.0f} "
            f"| {r['probe_s']:.2f}, {r['probe_mb']:.0f} | {ratio:.2f}x ({min(r['ratios']):.2f}-{max(r['ratios']):.2f}) "
            f"| {r['probe_mb'] / r['plain_mb']:.2f}x | {r['test_s']:.2f} | {r['findings']} ({','.join(map(str, r['exit']))}) |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, repeats=3)
    add_bncheck_argument(parser)
    parser.add_argument("--samples", type=int, default=2000, help="calibration samples per model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        rows = [
            measure(model, args.samples, args.repeats, args.bncheck, Path(folder))
            for model in data_models(args.ids, args.cache)
        ]
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
