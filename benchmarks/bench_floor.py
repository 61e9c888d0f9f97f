"""Benchmark: what onnxruntime alone takes for the probe's own graph and runs, against plain and the probe.

Usage: python benchmarks/bench_floor.py ID[,ID...] [--repeats 7] [--cache DIR]    (prints a Markdown table)

IDs name ONNX models of the real-world set (benchmarks/real_models; run fetch.py and make_exports.py first).
For each model, one warm `bncheck.probe` in this process records the graph it hands onnxruntime first (on a
train-mode model the spec's decomposition, with the measuring outputs, as the augmented graph holds it before
the statistics-first session's optimizing build, which sees the train-mode BNs without it: splice.py) and the runs it makes outside the
output-level test (each feed's shape and type). Then fresh processes alternate, as in real_models/run.py:

- plain: real_models/run.py's plain child (onnxruntime and numpy imported, the file's session, its passes);
- floor: the same child on the recorded graph, making the recorded runs (feeds of those shapes drawn as the
  plain child draws them; an integer input that held one value, as a sample rate does, holds it again);
- probe: the `bncheck probe --format json` console process real_models/run.py times, less its output-level
  test (which the real-world table also shows apart).

The floor is the work no redesign of bncheck's Python removes while it measures the same tensors with the same
graph: one session build (at onnxruntime's defaults, as plain's, without the second build that lowers the peak)
and the runs. It is not a strict bound: on a large model the probe's own session settings can beat the
defaults. What the probe takes above it is bncheck's imports (onnx's too), its Python over the graph, the
second session build and the train-mode conformance model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "real_models"))  # the real-world set and its plain child
from bench_breakdown import add_model_arguments, onnx_models, probe_kwargs
from bench_probe import byte_compile
from run import FEEDS, PEAK, add_bncheck_argument, interpreter_of, run_bncheck, run_plain

FLOOR = (
    PEAK
    + FEEDS
    + r"""
import json, sys
import onnxruntime as ort
runs = json.loads(sys.argv[2])
options = ort.SessionOptions()
options.log_severity_level = 3  # the probe's graph leaves the replaced BNs' running statistics unread: no warnings
# the folder the probe's graph reads external weights from (the model's own, as the probe's session does)
options.add_session_config_entry("session.model_external_initializers_file_folder_path", sys.argv[3])
with open(sys.argv[1], "rb") as fh:
    sess = ort.InferenceSession(fh.read(), options, providers=["CPUExecutionProvider"])
for run in runs:
    sess.run(None, feeds(run, 0))
print(json.dumps({"rss_mb": peak_mb()}))
"""
)


def record(model: dict, folder: Path) -> tuple[Path, int, list[list[dict[str, Any]]]]:
    """The first graph a warm probe of ``model`` hands onnxruntime, saved in ``folder``, its node count, and its
    runs outside the output-level test as real_models/run.py's feeds() specs (one list of inputs per run)."""
    import weakref

    import onnxruntime as ort

    import bncheck
    import bncheck.backends.onnx.run as backend
    import bncheck.probe_plan as plan

    kwargs = probe_kwargs([str(a) for a in model.get("probe_args", [])])
    bncheck.probe(model["path"], **kwargs)  # first use: imports and caches
    graphs: list[tuple[bytes, int]] = []
    runs: list[list[dict[str, Any]]] = []
    sessions: weakref.WeakSet[Any] = weakref.WeakSet()  # not kept alive: the probe frees its first build
    state = {"test": 0}
    new_session, session_run, outputs_test = backend.new_session, ort.InferenceSession.run, plan._outputs_test
    statistics_first = backend._session_statistics_first

    def recording_statistics_first(model: Any, *rest: Any, **kw: Any) -> Any:
        # the whole augmented graph, before its first build sees the train-mode BNs without their decompositions
        if not graphs:
            graphs.append((model.SerializeToString(), len(model.graph.node)))
        return statistics_first(model, *rest, **kw)

    def recording_session(source: Any, options: Any, providers: Any = None) -> Any:
        session = new_session(source, options, providers)
        if not graphs and not isinstance(source, str):
            graphs.append((source.SerializeToString(), len(source.graph.node)))
        sessions.add(session)  # the first graph's and, statistics-first, its reordered second build
        return session

    def recording_run(self: Any, names: Any, feeds: dict[str, Any], *rest: Any, **kw: Any) -> Any:
        if self in sessions and not state["test"]:
            runs.append([_spec(name, value) for name, value in feeds.items()])
        return session_run(self, names, feeds, *rest, **kw)

    def counted_test(*args: Any, **kw: Any) -> Any:
        state["test"] += 1
        try:
            return outputs_test(*args, **kw)
        finally:
            state["test"] -= 1

    backend.new_session, ort.InferenceSession.run, plan._outputs_test = recording_session, recording_run, counted_test
    backend._session_statistics_first = recording_statistics_first
    try:
        bncheck.probe(model["path"], **kwargs)
    finally:
        backend.new_session, ort.InferenceSession.run, plan._outputs_test = new_session, session_run, outputs_test
        backend._session_statistics_first = statistics_first
    if not graphs or not runs:
        raise SystemExit(f"{model['id']}: the probe built no session from a graph of its own, or ran none")
    path = folder / f"{model['id']}.onnx"
    path.write_bytes(graphs[0][0])
    return path, graphs[0][1], runs


def _spec(name: str, value: Any) -> dict[str, Any]:
    """A feeds() spec of one probe input: its shape and type, and its value where an integer input holds one
    value throughout (a sample rate, a length: the branch a model takes may depend on it)."""
    spec = {"name": name, "shape": list(value.shape), "dtype": str(value.dtype)}
    if value.dtype.kind in "iub" and value.size and (value == value.flat[0]).all():
        spec["value"] = value.flat[0].item()
    return spec


def run_floor(python: str, graph: Path, runs: list[list[dict[str, Any]]], weights: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [python, "-c", FLOOR, str(graph), json.dumps(runs), weights], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the floor process failed on {graph.name}: {proc.stderr.strip().splitlines()[-1:]}")
    return {"wall": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def measure(model: dict, bncheck: Path, python: str, repeats: int, folder: Path) -> dict[str, Any]:
    graph, nodes, runs = record(model, folder)
    probe_args = ["probe", "--format", "json", *model.get("probe_args", []), model["path"]]
    sides: dict[str, list[dict]] = {"plain": [], "floor": [], "probe": []}
    for _ in range(repeats):
        sides["plain"].append(run_plain(python, model))
        sides["floor"].append(run_floor(python, graph, runs, str(Path(model["path"]).resolve().parent)))
        sides["probe"].append(run_bncheck(bncheck, probe_args, measure_rss=True))
    for side, done in sides.items():
        bad = [d for d in done if d.get("exit", 0) not in (0, 1)]
        if bad:
            raise SystemExit(
                f"{model['id']}: a {side} process failed: {bad[0].get('stderr_line') or bad[0].get('error')}"
            )
    walls = {
        "plain": [d["wall"] for d in sides["plain"]],
        "floor": [d["wall"] for d in sides["floor"]],
        "probe": [d["wall"] - (d["output_test_s"] or 0.0) for d in sides["probe"]],
    }
    return {
        "id": model["id"],
        "runs": len(runs),
        "nodes": nodes,
        "wall": {side: statistics.median(values) for side, values in walls.items()},
        "pairs": {side: [w / p for w, p in zip(walls[side], walls["plain"])] for side in ("floor", "probe")},
        "rss": {side: statistics.median(d["rss_mb"] for d in done) for side, done in sides.items()},
    }


def _ratio(row: dict[str, Any], side: str) -> str:
    pairs, wall = row["pairs"][side], row["wall"]
    return f"{wall[side] / wall['plain']:.2f}x ({min(pairs):.2f}-{max(pairs):.2f})"


def table(rows: list[dict[str, Any]], repeats: int) -> list[str]:
    lines = [
        f"Medians of {repeats} alternated plain/floor/probe processes; the probe's wall without its output-level "
        "test; in brackets the range of the per-triple ratios.",
        "",
        "| model | plain s | floor s (graph nodes, runs) | probe s | floor / plain | probe / plain | probe - floor s |"
        " peak MB plain / floor / probe |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        w, rss = r["wall"], r["rss"]
        lines.append(
            f"| {r['id']} | {w['plain']:.3f} | {w['floor']:.3f} ({r['nodes']}, {r['runs']}) | {w['probe']:.3f} | "
            f"{_ratio(r, 'floor')} | {_ratio(r, 'probe')} | {w['probe'] - w['floor']:.3f} | "
            f"{rss['plain']:.0f} / {rss['floor']:.0f} / {rss['probe']:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, repeats=7)
    add_bncheck_argument(parser)
    args = parser.parse_args()
    models = onnx_models(args.ids, args.cache)
    python = interpreter_of(args.bncheck)
    byte_compile(python)
    folder = Path(tempfile.mkdtemp(prefix="bncheck-floor-"))
    try:
        rows = [measure(model, args.bncheck, python, args.repeats, folder) for model in models]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("\n".join(table(rows, args.repeats)))


if __name__ == "__main__":
    main()
