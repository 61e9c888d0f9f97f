"""Benchmark: `bncheck fix --data` on deep chains whose repairs alternate with layers left unchanged, against plain
inference over that data once.

Usage: python benchmarks/bench_fix_chain.py [--kind residual|chaotic] [--format onnx|keras] [--blocks 150,300]
       [--samples 512] [--repeats 2] [--bncheck PATH]    (prints a Markdown table)

The models are built here, deterministically (seed 0), on 8 channels of 8x8 with ``--samples`` standard-normal
samples as the calibration data, as ONNX files or as Keras 3 ``.keras`` files (channels last, the samples
transposed; the Keras one needs keras with the numpy backend):

- residual: blocks x <- x + relu(BN(conv3x3(x))) whose BN statistics are the data's, computed block by block
  in float64 as a calibrated model would hold them, but for every third block, whose variance is stored 4x too
  large: a deep residual net with a few stale blocks. The probe flags those (and a few below them); `fix`
  recalibrates them, and the blocks between them stay unchanged once the ones above are repaired.
- chaotic: Conv+BN+Relu blocks with random 3x3 convolutions (N(0, 0.3)) and random running statistics, whose
  float32 rounding grows with depth (docs/architecture.md, ``bncheck fix`` for ONNX).

Fresh processes alternate: plain (bench_data.py's: onnxruntime's session of the file, or Keras's load of it, a
pass at batch 1, 2 and 32, then every sample once in batches of 32) and `bncheck fix --dry-run --format json --data FILE` (the probe
of the original, BN003's effect with the repair as a dry run, then the repair replaying its passes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "real_models"))  # the real-world set's process helpers
from bench_data import run_plain
from run import add_bncheck_argument, interpreter_of, run_bncheck

CHANNELS = 8
SIDE = 8


def _conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A 3x3 convolution with padding 1 in float64 (the calibration's reference)."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((x.shape[0], w.shape[0], SIDE, SIDE))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("oi,nihw->nohw", w[:, :, dy, dx], padded[:, :, dy : dy + SIDE, dx : dx + SIDE])
    return out


def blocks_of(kind: str, blocks: int, data: np.ndarray, epsilon: float) -> list[dict[str, np.ndarray]]:
    """Each block's convolution (out, in, 3, 3) and BN parameters (the ONNX names: s, b, m, v)."""
    rng = np.random.default_rng(0)
    x = data.astype(np.float64)
    found = []
    for i in range(blocks):
        if kind == "residual":
            w = rng.normal(0, 1 / np.sqrt(9 * CHANNELS), (CHANNELS, CHANNELS, 3, 3))
            conv = _conv(x, w)
            mean, var = conv.mean(axis=(0, 2, 3)), conv.var(axis=(0, 2, 3))
            scale, bias = rng.uniform(0.1, 0.3, CHANNELS), rng.uniform(-0.05, 0.05, CHANNELS)
            normed = (conv - mean[:, None, None]) / np.sqrt(var + epsilon)[:, None, None]
            x = x + np.maximum(scale[:, None, None] * normed + bias[:, None, None], 0)
            stored = (mean, var * 4 if i % 3 == 2 else var)
        else:
            w = rng.normal(0, 0.3, (CHANNELS, CHANNELS, 3, 3))
            scale, bias = rng.uniform(0.8, 1.2, CHANNELS), rng.uniform(-0.1, 0.1, CHANNELS)
            stored = (rng.uniform(-0.1, 0.1, CHANNELS), rng.uniform(0.5, 1.5, CHANNELS))
        found.append({"w": w, "s": scale, "b": bias, "m": stored[0], "v": stored[1]})
    return found


def build(kind: str, blocks: int, data: np.ndarray, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    name = "input"
    for i, block in enumerate(blocks_of(kind, blocks, data, 1e-5)):
        inits += [numpy_helper.from_array(block["w"].astype(np.float32), f"w{i}")]
        inits += [numpy_helper.from_array(block[k].astype(np.float32), f"bn{i}.{k}") for k in "sbmv"]
        nodes.append(helper.make_node("Conv", [name, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        bn_inputs = [f"c{i}", *[f"bn{i}.{k}" for k in "sbmv"]]
        nodes.append(helper.make_node("BatchNormalization", bn_inputs, [f"b{i}"], name=f"bn{i}"))
        nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"))
        if kind == "residual":
            nodes.append(helper.make_node("Add", [name, f"r{i}"], [f"x{i}"], name=f"add{i}"))
            name = f"x{i}"
        else:
            name = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [name], ["gap"], name="gap"))
    shape: list[int | str] = ["N", CHANNELS, SIDE, SIDE]
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("gap", TensorProto.FLOAT, ["N", CHANNELS, 1, 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def build_keras(kind: str, blocks: int, data: np.ndarray, path: Path) -> None:
    """The same chain as a Keras 3 functional model, channels last, Keras's default epsilon (1e-3)."""
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    import keras

    layers = keras.layers
    inp = keras.Input((SIDE, SIDE, CHANNELS), name="input")
    x = inp
    for i, block in enumerate(blocks_of(kind, blocks, data, 1e-3)):
        conv = layers.Conv2D(CHANNELS, 3, padding="same", use_bias=False, name=f"conv{i}")
        bn = layers.BatchNormalization(epsilon=1e-3, name=f"bn{i}")
        relu = layers.ReLU(name=f"relu{i}")(bn(conv(x)))
        x = layers.Add(name=f"add{i}")([x, relu]) if kind == "residual" else relu
        conv.set_weights([block["w"].transpose(2, 3, 1, 0).astype(np.float32)])
        bn.set_weights([block[k].astype(np.float32) for k in "sbmv"])
    keras.Model(inp, layers.GlobalAveragePooling2D(name="gap")(x)).save(path)


def measure(kind: str, fmt: str, blocks: int, data: Path, repeats: int, bncheck: Path, folder: Path) -> dict:
    samples = np.load(data)
    if fmt == "keras":
        model = folder / f"{kind}{blocks}.keras"
        build_keras(kind, blocks, samples, model)
        data = folder / "data_nhwc.npy"
        np.save(data, np.ascontiguousarray(samples.transpose(0, 2, 3, 1)))
    else:
        model = folder / f"{kind}{blocks}.onnx"
        build(kind, blocks, samples, model)
    python = interpreter_of(bncheck)
    plain, fixes = [], []
    for _ in range(repeats):
        plain.append(run_plain(python, {"id": model.stem, "path": str(model)}, data))
        fixes.append(
            run_bncheck(bncheck, ["fix", "--dry-run", "--format", "json", "--data", str(data), str(model)], True)
        )
    doc = fixes[0].get("doc") or {}
    outcome = doc.get("fix") or {}
    actions = [layer.get("action") for layer in outcome.get("layers", [])]
    return {
        "kind": f"{kind} ({fmt})",
        "blocks": blocks,
        "plain_s": statistics.median(p["wall"] for p in plain),
        "plain_mb": statistics.median(p["rss_mb"] for p in plain),
        "fix_s": statistics.median(f["wall"] for f in fixes),
        "fix_mb": statistics.median(f.get("rss_mb") or 0.0 for f in fixes),
        "walls": [f["wall"] for f in fixes],
        "passes": outcome.get("passes"),
        "recalibrated": actions.count("recalibrated"),
        "unchanged": actions.count("unchanged"),
    }


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| chain | blocks | plain s, MB | fix s (range), MB | wall ratio | peak ratio | passes | recalibrated / unchanged |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['blocks']} | {r['plain_s']:.2f}, {r['plain_mb']:.0f} "
            f"| {r['fix_s']:.2f} ({min(r['walls']):.2f}-{max(r['walls']):.2f}), {r['fix_mb']:.0f} "
            f"| {r['fix_s'] / r['plain_s']:.1f}x | {r['fix_mb'] / r['plain_mb']:.2f}x | {r['passes']} "
            f"| {r['recalibrated']} / {r['unchanged']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("residual", "chaotic"), default="residual")
    parser.add_argument("--format", choices=("onnx", "keras"), default="onnx", help="the file the chain is saved as")
    parser.add_argument("--blocks", default="150,300", help="comma-separated chain lengths")
    parser.add_argument("--samples", type=int, default=512, help="calibration samples")
    parser.add_argument("--repeats", type=int, default=2, help="plain/fix pairs per chain")
    add_bncheck_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fix-chain-") as folder:
        data = Path(folder) / "data.npy"
        shape = (args.samples, CHANNELS, SIDE, SIDE)
        np.save(data, np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
        blocks = [int(b) for b in args.blocks.split(",")]
        rows = [measure(args.kind, args.format, n, data, args.repeats, args.bncheck, Path(folder)) for n in blocks]
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
