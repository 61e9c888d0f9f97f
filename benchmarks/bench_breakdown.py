"""Benchmark: where a warm `bncheck probe` spends its time, phase by phase, beside plain onnxruntime's session and runs.

Usage: python benchmarks/bench_breakdown.py ID[,ID...] [--repeats 5] [--cache DIR]    (prints a Markdown table per model)

IDs name ONNX models of the real-world set (benchmarks/real_models: shipped models, exports and their twins;
run fetch.py and make_exports.py first). For each model, in this one process: a first probe and a first plain
pass pay the imports and first-use costs; then each of ``--repeats`` rounds runs ``bncheck.probe`` (the Python
API, with the manifest's probe arguments) and plain inference (a session and the passes real_models/run.py's
plain child makes). The probe's phases are timed by wrapping the functions that do them (the probe itself is
unchanged); each moment of the main thread counts in the innermost phase running, and what no phase covers is
"other". Medians over the rounds.

This is the work a model adds in a warm process. A whole `bncheck probe` process adds bncheck's fixed cost per
process on top (its imports and onnx's schema registry), which bench_startup.py measures.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "real_models"))  # the real-world set and its plain child
from fetch import DEFAULT_CACHE
from run import FEEDS, collect_models, plain_batches

# (label, module, attribute): each moment counts in the innermost of these running on the main thread
PROBE_PHASES = [
    ("load: parse, names, shapes", "bncheck.backends.onnx.load", "load_onnx"),
    ("onnx.checker", "onnx.checker", "check_model"),
    ("onnx shape inference", "onnx.shape_inference", "infer_shapes"),
    ("static walk", "bncheck.backends.onnx.walk", "walk_all"),
    ("memory check", "bncheck.backends.onnx.memory", "check"),
    ("probe copy (relaxed batch, opset)", "bncheck.backends.onnx.run", "prepare"),
    ("graph instrumentation", "bncheck.backends.onnx.instrument", "Augmenter.__init__"),
    ("graph instrumentation", "bncheck.backends.onnx.instrument", "Augmenter.finish"),
    ("onnxruntime session builds", "onnxruntime", "InferenceSession.__init__"),
    ("onnxruntime runs", "onnxruntime", "InferenceSession.run"),
    ("train-mode conformance model", "bncheck.backends.onnx.run", "_add_runtime_deviations"),
    ("per-layer batch dependence", "bncheck.probe_plan", "_dependences"),
    ("output-level test (dependence, effect)", "bncheck.probe_plan", "_outputs_test"),
    ("checks and report", "bncheck.engine", "_report"),
]
PLAIN_PHASES = ["onnxruntime session builds", "onnxruntime runs"]


class Phases:
    """Exclusive time per label of the wrapped functions, on the main thread (the probe draws its synthetic
    inputs in a worker thread, whose time overlaps the main thread's)."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._stack: list[list[Any]] = []  # [label, when its current slice began]
        self._main = threading.main_thread()

    def wrap(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not self._main:
                return function(*args, **kwargs)
            now = time.perf_counter()
            if self._stack:  # the caller's slice ends here
                self.totals[self._stack[-1][0]] += now - self._stack[-1][1]
            self._stack.append([label, now])
            self.calls[label] += 1
            try:
                return function(*args, **kwargs)
            finally:
                end = time.perf_counter()
                done, began = self._stack.pop()
                self.totals[done] += end - began
                if self._stack:
                    self._stack[-1][1] = end  # the caller's slice resumes

        return timed

    def take(self) -> tuple[Counter[str], Counter[str]]:
        totals, calls = self.totals, self.calls
        self.totals, self.calls = Counter(), Counter()
        return totals, calls


def install(phases: Phases) -> None:
    for label, module_name, attribute in PROBE_PHASES:
        owner: Any = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, phases.wrap(label, getattr(owner, name)))


def probe_kwargs(args: list[str]) -> dict[str, Any]:
    """The manifest's probe arguments (--input-shape NAME:AxB, --batch-sizes 1,2,8) as bncheck.probe's."""
    from bncheck.probe_data import parse_batch_sizes, parse_input_shape

    kwargs: dict[str, Any] = {}
    for flag, value in zip(args[::2], args[1::2]):  # every probe argument of the manifest takes one value
        if flag == "--input-shape":
            name, dims = parse_input_shape(value)
            kwargs.setdefault("input_shapes", {})[name] = dims
        elif flag == "--batch-sizes":
            kwargs["batch_sizes"] = parse_batch_sizes(value)
    return kwargs


def plain_feeds() -> Callable[..., dict[str, Any]]:
    """real_models/run.py's feeds(), which its plain child runs."""
    namespace: dict[str, Any] = {}
    exec(FEEDS, namespace)
    return namespace["feeds"]


def measure(model: dict, repeats: int, phases: Phases) -> dict[str, Any]:
    import onnxruntime as ort

    import bncheck

    kwargs = probe_kwargs([str(a) for a in model.get("probe_args", [])])
    feeds = plain_feeds()
    batches = plain_batches(model)

    def plain() -> None:
        session = ort.InferenceSession(model["path"], providers=["CPUExecutionProvider"])
        for batch in batches:
            session.run(None, feeds(model["inputs"], batch))

    def probe() -> None:
        bncheck.probe(model["path"], **kwargs)

    rounds: dict[str, list[tuple[float, Counter[str], Counter[str]]]] = {"probe": [], "plain": []}
    for round_ in range(repeats + 1):  # the first round only warms up
        for side, work in (("probe", probe), ("plain", plain)):
            phases.take()
            start = time.perf_counter()
            work()
            wall = time.perf_counter() - start
            totals, calls = phases.take()
            if round_:
                rounds[side].append((wall, totals, calls))
    return rounds


def _median(rounds: list[tuple[float, Counter[str], Counter[str]]], label: str | None) -> float:
    if label is None:
        return statistics.median(wall for wall, _, _ in rounds)
    if label == "other":
        return statistics.median(wall - sum(totals.values()) for wall, totals, _ in rounds)
    return statistics.median(totals[label] for _, totals, _ in rounds)


def table(model: dict, rounds: dict[str, Any]) -> list[str]:
    probe, plain = rounds["probe"], rounds["plain"]
    labels = list(dict.fromkeys(label for label, _, _ in PROBE_PHASES)) + ["other"]
    calls = rounds["probe"][-1][2]
    lines = [
        f"{model['id']}: warm `bncheck.probe` {_median(probe, None) * 1000:.0f} ms, plain onnxruntime "
        f"{_median(plain, None) * 1000:.0f} ms ({_median(probe, None) / _median(plain, None):.2f}x; "
        f"medians of {len(probe)} rounds)",
        "",
        "| phase | probe ms | calls | plain ms |",
        "| --- | --- | --- | --- |",
    ]
    for label in labels:
        mine = _median(probe, label)
        theirs = _median(plain, label) if label in PLAIN_PHASES or label == "other" else None
        if mine < 0.0005 and not theirs:
            continue
        lines.append(
            f"| {label} | {mine * 1000:.1f} | {calls.get(label, '')} | "
            f"{'' if theirs is None else f'{theirs * 1000:.1f}'} |"
        )
    lines.append(f"| total | {_median(probe, None) * 1000:.1f} | | {_median(plain, None) * 1000:.1f} |")
    return lines


def add_model_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The model ids, --repeats and --cache, as this benchmark and bench_floor.py take them."""
    parser.add_argument("ids", help="comma-separated model ids of the real-world set (ONNX files)")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)


def set_models(ids: str, cache: Path, suffixes: tuple[str, ...] = (".onnx",), kind: str = "ONNX") -> list[dict]:
    """The real-world set's models named in ``ids`` (comma-separated), in that order; exits naming any that is
    not a model of the set whose file ends in one of ``suffixes`` (``kind`` names them in that message)."""
    wanted = ids.split(",")
    models = {m["id"]: m for m in collect_models(cache, set(wanted))}
    missing = [i for i in wanted if i not in models or not models[i]["path"].endswith(suffixes)]
    if missing:
        sys.exit(f"not an {kind} model of the real-world set: {', '.join(missing)}")
    return [models[i] for i in wanted]


def onnx_models(ids: str, cache: Path) -> list[dict]:
    """The real-world set's ONNX models named in ``ids`` (see :func:`set_models`)."""
    return set_models(ids, cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, repeats=5)
    args = parser.parse_args()
    phases = Phases()
    install(phases)
    for model in onnx_models(args.ids, args.cache):
        print("\n".join(table(model, measure(model, args.repeats, phases))), end="\n\n")


if __name__ == "__main__":
    main()
