"""Run bncheck on the real-world set and its broken twins, against plain inference, and write the table.

Usage (with the Python of the venv that has bncheck installed; it needs onnx, numpy and h5py):
    python benchmarks/real_models/fetch.py
    /work/venvs/torch/bin/python benchmarks/real_models/make_exports.py torch    # optional, see README
    python benchmarks/real_models/run.py [--repeats 1] [--twin-repeats 1] [--min-seconds 0 --max-repeats 11]
        [--only ID,...] [--bncheck PATH] [--no-readme]

For every model of manifest.json, of ``.cache/exports/exports.json`` and for the broken twins that
twins.py writes into ``.cache/twins/`` (train-mode and 0/1 statistics, for every model with a
BatchNormalization), this runs as whole subprocesses:
  - ``bncheck inspect --format json MODEL``;
  - ``bncheck probe --format json [probe_args] MODEL`` (default batch sizes 1,2,32; 1,2,B for a static batch B);
  - plain inference in the same venv: onnxruntime session (default options) + one pass at each batch size
    the model runs (1, 2, 32), or for Keras files ``keras.saving.load_model`` + one call per batch size with
    the backend bncheck uses (KERAS_BACKEND, default numpy). A file with a static batch B runs only B: as many
    passes at B as cover the samples of the probe's batch sizes (1,2,B by default: ceil((3 + B) / B)).
Wall time is measured by this process around each child (start to exit, interpreter start-up included for
both sides); peak RSS is VmHWM from /proc/self/status inside each child (bncheck runs under a small wrapper
that reads it at exit; ru_maxrss would include this parent's pages inherited at fork). The same wrapper times
the probe's output-level test (output dependence, effect runs, localisation: the bounded extra work on a model
whose outputs depend on the batch), so the table gives the ratio without it too. Plain and probe are
interleaved ``--repeats`` times (with ``--min-seconds``, more for a model of short processes: see evaluate);
medians are reported, with the range of each pair's own ratio. Results go to
``.cache/results.json`` and, unless ``--no-readme``, into benchmarks/README.md between the real-models markers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import twins
from fetch import DEFAULT_CACHE, load_manifest, model_path, sha256_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared helpers
from bench_probe import bncheck_folder, byte_compile

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START = "<!-- real-models-table:start -->"
END = "<!-- real-models-table:end -->"
TIMEOUT = 1800

# Runs the bncheck console script (the file pip wrote, as a user's shell runs it) in-process and writes, at exit, the child's own peak RSS and what the
# output-level test (bncheck.probe_plan._outputs_test: output dependence, effect runs, localisation) took:
# its wall time and the runs it asked the probe's runner for. The wrapper only counts; the probe is unchanged.
# Its first line is what console() does first: with the collector on, the imports below ran 36 collections
# (7-8 ms) that a user's `bncheck` process never runs.
WRAPPER = r"""
import gc; gc.disable()
import atexit, json, os, sys, time
import bncheck.probe_plan as _plan
_test = {"s": 0.0, "runs": 0}
_outputs_test = _plan._outputs_test
def _timed(view, plan, pool, runner, *rest, **kw):
    def counted(*a, **k):
        _test["runs"] += 1
        return runner(*a, **k)
    t = time.perf_counter()
    try:
        return _outputs_test(view, plan, pool, counted, *rest, **kw)
    finally:
        _test["s"] += time.perf_counter() - t
_plan._outputs_test = _timed
def _peak():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                with open(os.environ["REAL_MODELS_RSS_FILE"], "w") as out:
                    json.dump({"rss_mb": int(line.split()[1]) / 1024, "output_test_s": _test["s"],
                               "output_test_runs": _test["runs"]}, out)
atexit.register(_peak)
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
with open(script) as fh:
    code = compile(fh.read(), script, "exec")
exec(code, {"__name__": "__main__", "__file__": script})
"""

PEAK = r"""
def peak_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
"""

FEEDS = r"""
import numpy as np
def feeds(inputs, batch, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for spec in inputs:
        shape = tuple(batch if d == "B" else d for d in spec["shape"])
        dtype = np.dtype(spec["dtype"])
        if "value" in spec:
            out[spec["name"]] = np.full(shape, spec["value"], dtype)
        elif dtype.kind in "iu":
            out[spec["name"]] = rng.integers(spec.get("low", 0), spec.get("high", 2), shape).astype(dtype)
        else:
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return out
"""

PLAIN_ONNX = (
    PEAK
    + FEEDS
    + r"""
import json, sys
import onnxruntime as ort
spec = json.loads(sys.argv[2])
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
for b in spec["batch_sizes"]:
    sess.run(None, feeds(spec["inputs"], b))
print(json.dumps({"rss_mb": peak_mb()}))
"""
)

PLAIN_KERAS = (
    PEAK
    + FEEDS
    + r"""
import json, os, sys
os.environ.setdefault("KERAS_BACKEND", "numpy")
import keras
spec = json.loads(sys.argv[2])
model = keras.saving.load_model(sys.argv[1], compile=False)
for b in spec["batch_sizes"]:
    x = feeds(spec["inputs"], b)
    model(list(x.values()) if len(x) > 1 else next(iter(x.values())), training=False)
print(json.dumps({"rss_mb": peak_mb(), "backend": keras.backend.backend()}))
"""
)


def interpreter_of(script: Path) -> str:
    """The Python of a console script (its shebang), so that plain inference runs in bncheck's own venv."""
    first = script.read_text(errors="replace").splitlines()[0]
    return first[2:].strip() if first.startswith("#!") else sys.executable


def bncheck_revision(python: str) -> str:
    """bncheck's version and the git commit of its source tree (an editable install follows a moving branch)."""
    where = bncheck_folder(python)
    commit = subprocess.run(
        ["git", "-C", where or ".", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", where or ".", "status", "--porcelain", "--", "."], capture_output=True, text=True, check=False
    ).stdout.strip()
    return f"{commit or 'unknown commit'}{' (modified)' if dirty else ''} at {where}"


def collect_models(cache: Path, only: set[str] | None) -> list[dict]:
    """Shipped models, exports and twins, each with path, kind (shipped/export/twin-*) and its parent."""
    models = []
    for entry in load_manifest():
        path = model_path(cache, entry)
        if not path.exists() or sha256_of(path) != entry["sha256"]:
            sys.exit(f"{path}: missing or wrong sha256; run fetch.py first")
        models.append({**entry, "path": str(path), "origin": "shipped"})
    exports = cache / "exports" / "exports.json"
    if exports.exists():
        for entry in json.loads(exports.read_text())["models"]:
            if Path(entry["path"]).exists():
                models.append({**entry, "origin": "export"})
    else:
        print(f"note: {exports} not found; run make_exports.py for the export rows", file=sys.stderr)
    out = cache / "twins"
    out.mkdir(parents=True, exist_ok=True)
    twin_rows = []
    for parent in models:
        src = Path(parent["path"])
        if parent.get("expect"):
            continue  # broken by construction already
        base = {k: v for k, v in parent.items() if k not in ("id", "path", "sha256", "covers", "origin", "expect")}
        if src.suffix == ".onnx" and twins.count_bn(src) > 0:
            dest = out / f"{parent['id']}__trainmode.onnx"
            twins.train_mode_twin(src, dest)
            twin_rows.append(
                {
                    **base,
                    "id": dest.stem,
                    "path": str(dest),
                    "origin": "twin-trainmode",
                    "parent": parent["id"],
                    "covers": "every BN in training mode (opset >= 14)",
                }
            )
            dest = out / f"{parent['id']}__stats01.onnx"
            twins.stats01_twin(src, dest)
            twin_rows.append(
                {
                    **base,
                    "id": dest.stem,
                    "path": str(dest),
                    "origin": "twin-stats01",
                    "parent": parent["id"],
                    "covers": "running mean 0, variance 1 on every BN",
                }
            )
        elif src.suffix in (".h5", ".hdf5"):
            dest = out / f"{parent['id']}__stats01{src.suffix}"
            twins.keras_stats01_twin(src, dest)
            twin_rows.append(
                {
                    **base,
                    "id": dest.stem,
                    "path": str(dest),
                    "origin": "twin-stats01",
                    "parent": parent["id"],
                    "covers": "moving mean 0, variance 1 on every BN",
                }
            )
    models += twin_rows
    return [m for m in models if not only or m["id"] in only or m.get("parent") in only]


def _one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def run_bncheck(bncheck: Path, args: list[str], measure_rss: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".rss", delete=False) as tmp:
        rss_file = tmp.name
    env = {**os.environ, "REAL_MODELS_RSS_FILE": rss_file}
    cmd = [interpreter_of(bncheck), "-c", WRAPPER, str(bncheck), *args] if measure_rss else [str(bncheck), *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        code, stdout, stderr = -9, "", f"timeout after {TIMEOUT} s"
    wall = time.perf_counter() - t0
    measured: dict = {}
    try:
        text = Path(rss_file).read_text()
        measured = json.loads(text) if text else {}
    finally:
        os.unlink(rss_file)
    doc = None
    if stdout.strip():
        try:
            doc = json.loads(stdout)
        except json.JSONDecodeError:
            doc = None
    return {
        "cmd": "bncheck " + " ".join(args),
        "exit": code,
        "wall": wall,
        "rss_mb": measured.get("rss_mb"),
        "output_test_s": measured.get("output_test_s"),
        "output_test_runs": measured.get("output_test_runs"),
        "doc": doc,
        "stderr": stderr.strip(),
        "stderr_line": _one_line(stderr),
        "traceback": "Traceback" in stderr,
    }


def probe_sizes(model: dict) -> list[int]:
    """The batch sizes ``bncheck probe`` asks for: --batch-sizes in the model's probe_args, else the default
    (1,2,32; 1,2,B for an ONNX file that fixes its batch to B)."""
    args = [str(a) for a in model.get("probe_args", [])]
    for i, arg in enumerate(args):
        if arg == "--batch-sizes" and i + 1 < len(args):
            return [int(b) for b in args[i + 1].split(",")]
        if arg.startswith("--batch-sizes="):
            return [int(b) for b in arg.split("=", 1)[1].split(",")]
    fixed = fixed_batch_of(model)
    return sorted({1, 2, fixed}) if fixed else [1, 2, 32]


def fixed_batch_of(model: dict) -> int | None:
    """B for an ONNX file whose inputs fix the batch (no input dim is "B" in the manifest), else None."""
    sizes = model.get("batch_sizes") or []
    free = any(d == "B" for spec in model.get("inputs", []) for d in spec["shape"])
    return int(sizes[0]) if Path(model["path"]).suffix == ".onnx" and len(sizes) == 1 and not free else None


def plain_batches(model: dict) -> list[int]:
    """Plain inference's passes: one per batch size the model runs. A file that fixes its batch to B runs
    only B, so it makes ceil(sum(probe sizes) / B) passes at B: the samples the probe's batches hold; a
    manifest's ``plain_batches`` where the probe cannot relax that batch and runs B alone."""
    if model.get("plain_batches"):
        return list(model["plain_batches"])
    fixed = fixed_batch_of(model)
    if fixed is None:
        return list(model["batch_sizes"])
    return [fixed] * -(-sum(probe_sizes(model)) // fixed)


def run_plain(python: str, model: dict) -> dict:
    code = PLAIN_KERAS if Path(model["path"]).suffix in (".h5", ".hdf5", ".keras") else PLAIN_ONNX
    spec = json.dumps({"inputs": model["inputs"], "batch_sizes": plain_batches(model)})
    t0 = time.perf_counter()
    proc = subprocess.run(
        [python, "-c", code, model["path"], spec], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"exit": proc.returncode, "wall": wall, "rss_mb": None, "error": _one_line(proc.stderr)}
    return {"exit": 0, "wall": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def findings_of(doc: dict | None) -> Counter[str]:
    """Counts by code and severity initial, e.g. {'BN004 w': 7}."""
    if not doc:
        return Counter()
    return Counter(f"{f['code']} {f['severity'][0]}" for f in doc.get("findings", []))


def layer_kinds(doc: dict | None) -> Counter[str]:
    return Counter(layer.get("kind", "?") for layer in (doc or {}).get("layers", []))


def evaluate(
    model: dict, bncheck: Path, python: str, repeats: int, min_seconds: float = 0.0, max_repeats: int = 0
) -> dict:
    """``repeats`` interleaved plain/probe pairs; then, while the pairs so far took less than ``min_seconds`` in
    all, more pairs up to ``max_repeats``: a row of short processes gets the pairs that steady its medians for
    the time one pair of a large model takes."""
    inspect = run_bncheck(bncheck, ["inspect", "--format", "json", model["path"]], measure_rss=False)
    probe_args = ["probe", "--format", "json", *model.get("probe_args", []), model["path"]]
    probes, plains = [], []
    spent = 0.0
    while len(probes) < repeats or (spent < min_seconds and len(probes) < max_repeats):
        plains.append(run_plain(python, model))
        probes.append(run_bncheck(bncheck, probe_args, measure_rss=True))
        spent += plains[-1]["wall"] + probes[-1]["wall"]
    probe = probes[-1]
    ok_plain = [p for p in plains if p["exit"] == 0]
    ok_probe = [p for p in probes if p["exit"] in (0, 1)]
    result = {
        "id": model["id"],
        "origin": model["origin"],
        "parent": model.get("parent"),
        "expect": model.get("expect"),
        "package": model["package"],
        "version": model["version"],
        "path": model["path"],
        "covers": model["covers"],
        "batch_sizes": model["batch_sizes"],
        "plain_batches": plain_batches(model),
        "inspect": {k: v for k, v in inspect.items() if k != "doc"},
        "probe": {k: v for k, v in probe.items() if k != "doc"},
        "plain": plains[-1],
        "inspect_doc": inspect["doc"],
        "probe_doc": probe["doc"],
        "layers": dict(layer_kinds(inspect["doc"] or probe["doc"])),
        "inspect_findings": dict(findings_of(inspect["doc"])),
        "probe_findings": dict(findings_of(probe["doc"])),
        "probe_notes": (probe["doc"] or {}).get("notes", []),
        "probe_batch_sizes": ((probe["doc"] or {}).get("settings") or {}).get("batch_sizes"),
    }
    if ok_plain and ok_probe:
        plain_wall = statistics.median(p["wall"] for p in ok_plain)
        probe_wall = statistics.median(p["wall"] for p in ok_probe)
        result["plain_wall"], result["probe_wall"] = plain_wall, probe_wall
        result["time_ratio"] = probe_wall / plain_wall
        # the bounded extra work on a model whose outputs depend on the batch, shown apart (issue: "show both")
        tests = [p for p in ok_probe if p.get("output_test_s") is not None]
        if tests:
            result["output_test_s"] = statistics.median(p["output_test_s"] for p in tests)
            result["output_test_runs"] = max(p["output_test_runs"] for p in tests)
            without = statistics.median(p["wall"] - p["output_test_s"] for p in tests)
            result["time_ratio_without_output_test"] = without / plain_wall
        rss_probe = [p["rss_mb"] for p in ok_probe if p["rss_mb"]]
        rss_plain = [p["rss_mb"] for p in ok_plain if p.get("rss_mb")]
        if rss_probe and rss_plain:
            result["plain_rss"], result["probe_rss"] = statistics.median(rss_plain), statistics.median(rss_probe)
            result["rss_ratio"] = result["probe_rss"] / result["plain_rss"]
    # the spread: each interleaved pair's own ratio (a pair is a plain run and the probe run right after it)
    pairs = [(a, b) for a, b in zip(plains, probes) if a["exit"] == 0 and b["exit"] in (0, 1)]
    result["pairs"] = [
        {"plain_wall": a["wall"], "probe_wall": b["wall"], "plain_rss": a.get("rss_mb"), "probe_rss": b["rss_mb"]}
        for a, b in pairs
    ]
    if pairs:
        times = [b["wall"] / a["wall"] for a, b in pairs]
        result["time_ratio_range"] = [min(times), max(times)]
        rss = [b["rss_mb"] / a["rss_mb"] for a, b in pairs if a.get("rss_mb") and b["rss_mb"]]
        if rss:
            result["rss_ratio_range"] = [min(rss), max(rss)]
    return result


def layers_with(doc: dict | None, code: str) -> set[str]:
    return {f["layer"] for f in (doc or {}).get("findings", []) if f["code"] == code}


def recall(results: list[dict]) -> list[str]:
    lines = []
    for origin, code in (("twin-trainmode", "BN002"), ("twin-stats01", "BN003")):
        rows = [r for r in results if r["origin"] == origin]
        if not rows:
            continue
        hit_probe = [r for r in rows if layers_with(r["probe_doc"], code)]
        hit_inspect = [r for r in rows if layers_with(r["inspect_doc"], code)]
        bn_total = sum(r["layers"].get("batch", 0) for r in rows)
        bn_probe = sum(len(layers_with(r["probe_doc"], code)) for r in rows)
        bn_inspect = sum(len(layers_with(r["inspect_doc"], code)) for r in rows)
        missed = ", ".join(r["id"] for r in rows if r not in hit_probe) or "none"
        lines.append(
            f"- {code} on {origin} twins: probe {len(hit_probe)}/{len(rows)} models "
            f"({bn_probe}/{bn_total} BN layers), inspect {len(hit_inspect)}/{len(rows)} models "
            f"({bn_inspect}/{bn_total} BN layers); probe missed: {missed}"
        )
    for r in results:
        if r.get("expect"):
            where = [step for step in ("inspect", "probe") if layers_with(r[f"{step}_doc"], r["expect"])]
            lines.append(
                f"- {r['expect']} on `{r['id']}` (broken by construction): "
                + (f"found by {' and '.join(where)}" if where else "NOT found")
            )
    return lines


def _fmt_findings(counts: dict[str, int]) -> str:
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items())) or "-"


def all_notes(doc: dict | None) -> list:
    """The report's notes and each probe run's (where the probe says what it did with batch and noise)."""
    runs = ((doc or {}).get("probe") or {}).get("runs") or []
    return [*(doc or {}).get("notes", []), *(n for run in runs for n in run.get("notes", []))]


def _fmt_notes(notes: list) -> str:
    """First note of each level with the count of the others (a Keras 2 file gives one per layer)."""
    by_level: dict[str, list[str]] = {}
    for note in notes:
        level, message = (note.get("level", "?"), note.get("message", "")) if isinstance(note, dict) else ("run", note)
        by_level.setdefault(level, []).append(str(message))
    parts = []
    for level, messages in by_level.items():
        more = f" (+{len(messages) - 1} more)" if len(messages) > 1 else ""
        parts.append(f"{level}: {messages[0][:220]}{more}")
    return "; ".join(parts)


def _probe_ran(r: dict) -> str:
    """Batch sizes the probe really ran (and how it handled a fixed batch), against plain inference's."""
    runs = ((r["probe_doc"] or {}).get("probe") or {}).get("runs") or []
    sizes = ",".join(str(b) for b in runs[0].get("batch_sizes") or []) if runs else "-"
    handling = runs[0].get("batch_handling") if runs else None
    if isinstance(handling, dict):
        handling = handling.get("mode") or handling.get("kind") or json.dumps(handling, sort_keys=True)
    if handling and len(str(handling)) > 90:
        handling = str(handling)[:89] + "…"
    passes = r.get("plain_batches") or r.get("batch_sizes", [])
    if len(passes) > 1 and len(set(passes)) == 1:
        plain = f"{passes[0]} x{len(passes)}"  # a fixed batch, run as often as the probe's samples need
    else:
        plain = ",".join(str(b) for b in passes)
    return f"{sizes}{f' ({handling})' if handling else ''} ({plain})"


def _fmt_ratio(value: float | None, spread: list[float] | None = None, pairs: int | None = None) -> str:
    """``1.38x (1.31-1.45)``: the ratio of the medians, then the range of the per-pair ratios; with ``pairs``,
    ``1.38x (1.31-1.45, 11 pairs)``."""
    if value is None:
        return "-"
    count = f", {pairs} pairs" if pairs else ""
    if spread and spread[0] != spread[1]:
        return f"{value:.2f}x ({spread[0]:.2f}-{spread[1]:.2f}{count})"
    return f"{value:.2f}x"


def _fmt_output_test(r: dict) -> str:
    """``0.09 s (28); 2.08x``: the output-level test's median time and runs, and the time ratio without it;
    ``0.00 s`` alone where it ran nothing (a clean model: the comparison reuses the probe's own runs)."""
    if r.get("output_test_s") is None:
        return "-"
    text = f"{r['output_test_s']:.2f} s"
    if r.get("output_test_runs"):
        text += f" ({r['output_test_runs']}); {_fmt_ratio(r.get('time_ratio_without_output_test'))}"
    return text


def _train_mode(results: list[dict], key: str) -> list[float]:
    """``key`` of the train-mode twins and the models broken by construction, sorted."""
    return sorted(r[key] for r in results if r.get(key) and (r["origin"] == "twin-trainmode" or r.get("expect")))


def markdown(results: list[dict], repeats: str, stamp: str, revision: str) -> str:
    head = (
        "| model | source | norm layers (inspect) | inspect exit: findings | probe exit: findings | probe ran "
        "(plain ran) | probe s / plain s | time ratio (range) | output-level test: s (runs); time ratio without it "
        "| peak RSS MB probe / plain | memory ratio (range) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    rows = []
    for r in results:
        kinds = " ".join(f"{k} {v}" for k, v in sorted(r["layers"].items())) or "0"
        insp = f"{r['inspect']['exit']}: {_fmt_findings(r['inspect_findings'])}"
        prob = f"{r['probe']['exit']}: {_fmt_findings(r['probe_findings'])}"
        if r["probe"]["exit"] == 2 or r["probe"]["traceback"]:
            prob += " (see failures)"
        if r["plain"]["exit"] != 0:
            secs = f"{r['probe']['wall']:.2f} / plain failed"
        else:
            secs = f"{r.get('probe_wall', r['probe']['wall']):.2f} / {r.get('plain_wall', r['plain']['wall']):.2f}"
        rss = f"{r['probe_rss']:.0f} / {r['plain_rss']:.0f}" if r.get("rss_ratio") else "-"
        if not r["layers"]:
            secs += " (no norm layer)"
        source = r["package"] + ("" if r["origin"] == "export" else f" {r['version']}")
        if r["origin"].startswith("twin"):
            source = f"twin of {r['parent']}"
        rows.append(
            f"| {r['id']} | {source} | {kinds} | {insp} | {prob} | {_probe_ran(r)} | {secs} | "
            f"{_fmt_ratio(r.get('time_ratio'), r.get('time_ratio_range'), len(r.get('pairs', [])))} | "
            f"{_fmt_output_test(r)} | {rss} | "
            f"{_fmt_ratio(r.get('rss_ratio'), r.get('rss_ratio_range'))} |"
        )
    ratios = [r for r in results if r.get("time_ratio") and r["origin"] != "twin-trainmode" and not r.get("expect")]
    summary = []
    if ratios:
        t = sorted(r["time_ratio"] for r in ratios)
        m = sorted(r["rss_ratio"] for r in ratios if r.get("rss_ratio"))
        summary.append(
            f"Time ratio over the {len(t)} models in inference mode (train-mode models excluded): median "
            f"{statistics.median(t):.2f}x, max {t[-1]:.2f}x; memory ratio median "
            f"{statistics.median(m):.2f}x, max {m[-1]:.2f}x."
        )
        train = _train_mode(results, "time_ratio")
        if train:
            summary.append(
                f"Train-mode models ({len(train)}): time ratio median {statistics.median(train):.2f}x, "
                f"max {train[-1]:.2f}x."
            )
        without = _train_mode(results, "time_ratio_without_output_test")
        if without:
            summary.append(
                f"The same without the output-level test (the bounded extra runs on a model whose outputs depend "
                f"on the batch): median {statistics.median(without):.2f}x, max {without[-1]:.2f}x."
            )
    fails = []
    for r in results:
        for step in ("inspect", "probe"):
            s = r[step]
            if s["exit"] not in (0, 1) or s["traceback"] or (s["exit"] == 1 and r[f"{step}_doc"] is None):
                fails.append(f"- `{r['id']}` {step} exit {s['exit']}: `{s['stderr_line'][:300]}`")
        if r["plain"]["exit"] != 0:
            error = r["plain"].get("error", "")[:300]
            fails.append(f"- `{r['id']}` plain inference exit {r['plain']['exit']}: `{error}`")
    notes = [
        f"- `{r['id']}`: {_fmt_notes(all_notes(r['probe_doc']))}"
        for r in results
        if all_notes(r["probe_doc"]) and not r["origin"].startswith("twin")
    ]
    on_trained = []
    for r in results:
        if r["origin"].startswith("twin") or r.get("expect"):
            continue
        for step in ("inspect", "probe"):
            groups: dict[tuple[str, str], list[dict]] = {}
            for f in (r[f"{step}_doc"] or {}).get("findings", []):
                groups.setdefault((f["code"], f["severity"]), []).append(f)
            for (code, severity), found in sorted(groups.items()):
                first = found[0]
                on_trained.append(
                    f"- `{r['id']}` {step}: {code} {severity} x{len(found)}, first on "
                    f"`{first['layer']}`: {first['message'][:260]}"
                )
    text = [
        (
            f"Run {stamp}, bncheck {revision}, {repeats} interleaved plain/probe pair(s) per model (medians; in "
            "brackets the range of the pairs' own ratios), "
            "`bncheck probe` with default batch sizes (1,2,32; 1,2,B for a file with a static batch B) unless the "
            "manifest says otherwise; plain inference of a static batch B runs as many passes at B as cover the "
            'probe\'s samples ("1 x3").'
        ),
        "",
        head + "\n".join(rows),
        "",
        *summary,
        "",
        "Recall on broken twins:",
        "",
        *recall(results),
        "",
        ("Findings on trained models (shipped and clean exports; each a false positive until numbers show a defect):"),
        "",
        *(on_trained or ["- none"]),
        "",
        "Failures (exit 2, crashes, plain inference failures):",
        "",
        *(fails or ["- none"]),
        "",
        "Probe notes (twins left out: theirs repeat their model's):",
        "",
        *(notes or ["- none"]),
    ]
    return "\n".join(text)


def write_readme(block: str) -> None:
    text = README.read_text()
    new = f"{START}\n{block}\n{END}"
    if START in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _m: new, text, flags=re.DOTALL)
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    README.write_text(text)


def add_bncheck_argument(parser: argparse.ArgumentParser) -> None:
    """--bncheck: the console script whose processes are measured (this run and bench_floor.py)."""
    parser.add_argument(
        "--bncheck",
        type=Path,
        default=Path(sys.executable).parent / "bncheck",
        help="the bncheck console script (default: beside this Python)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    add_bncheck_argument(parser)
    parser.add_argument("--repeats", type=int, default=1, help="plain/probe pairs per shipped or exported model")
    parser.add_argument("--twin-repeats", type=int, default=1, help="plain/probe pairs per broken twin")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=0.0,
        help="after the repeats, more pairs for a model until its pairs have taken this long in all (0: off)",
    )
    parser.add_argument("--max-repeats", type=int, default=11, help="the most pairs --min-seconds adds up to")
    parser.add_argument("--only", help="comma-separated model ids (a shipped model's id includes its twins)")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument(
        "--revision",
        help="what to call the bncheck under test in the table (default: the git commit of its source tree)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the README table from .cache/results.json without running anything",
    )
    args = parser.parse_args()
    if args.render_only:
        saved = json.loads((args.cache / "results.json").read_text())
        sizes = {m["id"]: m["batch_sizes"] for m in load_manifest()}
        exports = args.cache / "exports" / "exports.json"
        if exports.exists():
            sizes.update({m["id"]: m["batch_sizes"] for m in json.loads(exports.read_text())["models"]})
        for r in saved["results"]:  # results written before run.py recorded them
            r.setdefault("batch_sizes", sizes.get(r["id"]) or sizes.get(r.get("parent") or "", []))
        write_readme(markdown(saved["results"], saved["repeats"], saved["stamp"], saved["revision"]))
        return
    only = set(args.only.split(",")) if args.only else None
    models = collect_models(args.cache, only)
    python = interpreter_of(args.bncheck)
    byte_compile(python)
    revision = args.revision or bncheck_revision(python)
    results = []
    for model in models:
        repeats = args.twin_repeats if model["origin"].startswith("twin") else args.repeats
        result = evaluate(model, args.bncheck, python, repeats, args.min_seconds, args.max_repeats)
        results.append(result)
        print(
            f"{model['id']:34} inspect {result['inspect']['exit']} {_fmt_findings(result['inspect_findings'])} | "
            f"probe {result['probe']['exit']} {_fmt_findings(result['probe_findings'])} | "
            f"time {_fmt_ratio(result.get('time_ratio'))} rss {_fmt_ratio(result.get('rss_ratio'))} "
            f"{result['probe']['stderr_line'][:150] if result['probe']['exit'] == 2 else ''}",
            file=sys.stderr,
        )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    after = args.revision or bncheck_revision(python)
    if after != revision:
        revision = f"{revision} (changed to {after} during the run: rerun for consistent rows)"
    if args.min_seconds:
        repeats = (
            f"{args.repeats} ({args.twin_repeats} for twins; up to {args.max_repeats} for a model whose pairs "
            f"had taken under {args.min_seconds:g} s in all)"
        )
    else:
        repeats = f"{args.repeats} ({args.twin_repeats} for twins)"
    (args.cache / "results.json").write_text(
        json.dumps(
            {"results": results, "repeats": repeats, "stamp": stamp, "revision": revision}, indent=1, default=str
        )
    )
    block = markdown(results, repeats, stamp, revision)
    if not args.no_readme and not only:
        write_readme(block)
    print(block)


if __name__ == "__main__":
    main()
