"""Real exports of small trained models, as users produce them, for the real-world set.

Usage, each from its own venv outside the repo (no framework is a dependency of bncheck):
    python3 -m venv /work/venvs/torch
    /work/venvs/torch/bin/pip install torch==2.13.0 onnx onnxscript numpy
    /work/venvs/torch/bin/python benchmarks/real_models/make_exports.py torch
    python3 -m venv /work/venvs/tf
    /work/venvs/tf/bin/pip install tensorflow-cpu tf2onnx onnx numpy
    /work/venvs/tf/bin/python benchmarks/real_models/make_exports.py tf
    python3 -m venv /work/venvs/paddle
    /work/venvs/paddle/bin/pip install paddlepaddle paddle2onnx packaging onnx numpy
    /work/venvs/paddle/bin/python benchmarks/real_models/make_exports.py paddle

Each framework's module (exports_torch.py, exports_tf.py, exports_paddle.py) trains its models for a few
deterministic steps on synthetic data and writes them into ``<cache>/exports/``; this script merges their
descriptions (inputs, probe arguments, batch sizes, in the format of manifest.json) into
``<cache>/exports/exports.json``, which run.py reads.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def entry(
    source: str,
    model_id: str,
    path: Path,
    covers: str,
    inputs: list[dict],
    probe_args: list[str],
    batch_sizes: list[int],
    expect: str | None = None,
) -> dict:
    """One exports.json row; ``inputs`` as in manifest.json (a dim "B" is the batch); ``expect``: the finding
    code a model broken by construction must get (run.py makes no twins of it)."""
    row = {
        "id": model_id,
        "package": source,
        "version": source.split()[1],
        "path": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "covers": covers,
        "inputs": inputs,
        "probe_args": probe_args,
        "batch_sizes": batch_sizes,
    }
    return {**row, "expect": expect} if expect else row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("framework", choices=["torch", "tf", "paddle"])
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    args = parser.parse_args()
    out = args.cache / "exports"
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    entries = importlib.import_module(f"exports_{args.framework}").export(out)
    index = out / "exports.json"
    known = json.loads(index.read_text())["models"] if index.exists() else []
    new_ids = {e["id"] for e in entries}
    merged = [e for e in known if e["id"] not in new_ids] + entries
    index.write_text(json.dumps({"models": merged}, indent=1) + "\n")
    for e in entries:
        print(f"{e['id']:24} {Path(e['path']).stat().st_size / 1e3:8.1f} kB  {e['path']}")


if __name__ == "__main__":
    main()
