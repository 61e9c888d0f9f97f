"""Before/after of `bncheck fix` on the sample models: findings, and how the fixed model's predictions agree.

Run: python benchmarks/fix_samples.py [--out DIR]   (writes the fixed models to DIR, a temporary folder by default)

For each ONNX sample with something to repair, fixed as a user would (stats auto; with
sample_models/calib_drift.npz where the repair needs data), it prints the original's and the written model's
finding counts and the exit code, and compares predictions on the 64 calibration samples:

- batch-1 agreement: the argmax of each sample run alone against the original's for the same sample run in
  one batch of 64 (what the train-mode model computes in its own batch context; onnx.reference for train-mode
  nodes, whose onnxruntime kernel deviates from the spec, see DEVELOPERS.md), before and after the fix;
- for stale_drift.onnx, the argmax against trained_matching.onnx (same weights, exact statistics).
Keras samples are fixed too (findings only; the Keras tests compare their predictions).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CALIB = SAMPLES / "calib_drift.npz"
# (sample, data file or None, --stats); train-mode samples: compared with their own batch-of-64 output
ONNX = [
    ("train_mode_bn.onnx", None, "auto"),
    ("train_mode_bn.onnx", CALIB, "auto"),
    ("train_mode_bn.onnx", CALIB, "data"),
    ("collapse_1x1_train_mode.onnx", None, "auto"),
    ("collapse_1x1_train_mode.onnx", CALIB, "data"),  # with --only BN002 (see ONLY_TRAIN_MODE)
    ("handwritten_batch_moments.onnx", CALIB, "auto"),
    ("stale_stats.onnx", CALIB, "auto"),
    ("stale_drift.onnx", CALIB, "auto"),
]
#: their clean inference BNs' stored statistics drift from calib_drift.npz (BN003, which fix would repair too):
#: repaired alone, the train-mode layer is compared with the original in its batch context
ONLY_TRAIN_MODE = ("collapse_1x1_train_mode.onnx", "handwritten_batch_moments.onnx")
BATCH_CONTEXT = ("train_mode_bn.onnx", "collapse_1x1_train_mode.onnx", "handwritten_batch_moments.onnx")
KERAS = {
    "keras_baked_training_1d.keras": None,
    "keras_legacy_convnet.h5": None,
    "keras_brief_fit_drift.keras": SAMPLES / "keras_calib.npy",
}


def outputs(path: str, x: np.ndarray, batch: int) -> np.ndarray:
    """The first output, ``x`` fed in batches of ``batch``: onnx.reference (the spec) for every model, so that
    train-mode originals and fixed models are computed alike."""
    from onnx.reference import ReferenceEvaluator

    session = ReferenceEvaluator(path)
    name = session.input_names[0]
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def counts(report) -> str:  # type: ignore[no-untyped-def]
    c = report.counts()
    return f"{c['error']}E/{c['warning']}W/{c['info']}I"


def main() -> None:
    from bncheck.fixing import fix

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bncheck-fix-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    x = np.load(CALIB)["input"]
    print(
        f"{'sample':31} {'data':4} {'stats':5} {'before':9} {'after':9} exit  batch-1 argmax agreement, before -> after"
    )
    for k, (name, data, stats) in enumerate(ONNX):
        src = str(SAMPLES / name)
        out = str(out_dir / f"{k}_{name.replace('.onnx', '.fixed.onnx')}")
        only = ("BN002",) if name in ONLY_TRAIN_MODE and data else ()
        report = fix(src, out, str(data) if data else None, stats=stats, only=only)
        before_alone = outputs(src, x, 1).argmax(axis=1)
        fixed_alone = outputs(out, x, 1).argmax(axis=1)
        line = (
            f"{name:31} {'yes' if data else 'no':4} {stats + ('*' if only else ''):5} {counts(report):9} {counts(report.fix.after):9} "
            f"{int(report.exit_code):4}  "
        )
        if name in BATCH_CONTEXT:
            in_batch = outputs(src, x, 64).argmax(axis=1)
            line += f"vs its batch-64 output {np.mean(before_alone == in_batch):.0%} -> {np.mean(fixed_alone == in_batch):.0%}"
        elif name == "stale_drift.onnx":
            exact = outputs(str(SAMPLES / "trained_matching.onnx"), x, 1).argmax(axis=1)
            line += f"vs trained_matching {np.mean(before_alone == exact):.0%} -> {np.mean(fixed_alone == exact):.0%}"
        else:
            line += f"predictions changed by the fix: {np.mean(before_alone != fixed_alone):.0%}"
        print(line)
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    for name, data in KERAS.items():
        src = str(SAMPLES / name)
        out = str(out_dir / name.replace(".keras", ".fixed.keras").replace(".h5", ".fixed.h5"))
        report = fix(src, out, str(data) if data else None)
        print(
            f"{name:31} {'yes' if data else 'no':4} {'auto':5} {counts(report):9} {counts(report.fix.after):9} "
            f"{int(report.exit_code):4}  {', '.join(f'{e.layer} {e.action}' for e in report.fix.outcome.layers)}"
        )


if __name__ == "__main__":
    main()
