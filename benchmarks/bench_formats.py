"""Benchmark: what each report format adds to a whole `bncheck probe` process, against plain onnxruntime.

Usage: python benchmarks/bench_formats.py ID[,ID...] [--repeats 15] [--formats table,json,sarif,github]
       [--cache DIR] [--bncheck PATH]    (prints a Markdown table)

The real-world set's table (real_models/run.py) times ``--format json``, what a CI gate reads; a user at a
terminal gets the default, the table rendered with rich. For each model (ids of the real-world set; run
real_models/fetch.py and make_exports.py first), fresh processes alternate, their order rotated each round:
plain inference (real_models/run.py's plain child) and ``bncheck probe [probe_args] [--format F]`` for each
format ("table": no ``--format``), through real_models/run.py's wrapper, stdout a pipe as in CI (so the table
is 80 columns wide and without colour). The output-level test is left out of the wall times, as in the
real-world table. Per model: each format's median wall and its ratio to plain's, and what it adds against
json, by median of the rounds' own differences.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "real_models"))  # the real-world set and its plain child
from bench_breakdown import add_model_arguments, onnx_models
from bench_probe import byte_compile
from run import add_bncheck_argument, interpreter_of, run_bncheck, run_plain


def measure(model: dict, bncheck: Path, python: str, formats: list[str], repeats: int) -> dict[str, list[float]]:
    """Wall seconds per repeat: plain's and each format's probe (less its output-level test)."""
    walls: dict[str, list[float]] = {name: [] for name in ["plain", *formats]}
    for repeat in range(repeats):
        order = list(walls)
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
            if name == "plain":
                result = run_plain(python, model)
                if result["exit"] != 0:
                    sys.exit(f"{model['id']}: plain inference failed: {result.get('error')}")
                walls[name].append(result["wall"])
                continue
            args = ["probe", *model.get("probe_args", []), model["path"]]
            args += [] if name == "table" else ["--format", name]
            result = run_bncheck(bncheck, args, measure_rss=True)
            if result["exit"] not in (0, 1):
                sys.exit(f"{model['id']}: bncheck {' '.join(args)} exited {result['exit']}: {result['stderr_line']}")
            walls[name].append(result["wall"] - (result["output_test_s"] or 0.0))
    return walls


def table(rows: list[tuple[dict, dict[str, list[float]]]], formats: list[str], repeats: int) -> list[str]:
    against_json = [f for f in formats if f != "json"] if "json" in formats else []
    head = ["model", "plain", *formats, *(f"{f} - json" for f in against_json)]
    lines = [
        f"{repeats} rounds per model; wall s (ratio to plain), medians; `X - json`: median of the rounds' own "
        "differences, ms",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    for model, walls in rows:
        plain = statistics.median(walls["plain"])
        cells = [model["id"], f"{plain:.3f}"]
        cells += [f"{statistics.median(walls[f]):.3f} ({statistics.median(walls[f]) / plain:.2f}x)" for f in formats]
        for f in against_json:
            diffs = [a - b for a, b in zip(walls[f], walls["json"])]
            cells.append(f"{statistics.median(diffs) * 1000:+.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, repeats=15)
    add_bncheck_argument(parser)
    parser.add_argument("--formats", default="table,json", help="comma-separated; table: the default")
    args = parser.parse_args()
    formats = args.formats.split(",")
    python = interpreter_of(args.bncheck)
    byte_compile(python)
    rows = [
        (model, measure(model, args.bncheck, python, formats, args.repeats))
        for model in onnx_models(args.ids, args.cache)
    ]
    print("\n".join(table(rows, formats, args.repeats)))


if __name__ == "__main__":
    main()
