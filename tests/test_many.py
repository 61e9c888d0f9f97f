"""Many models per run: folder expansion, failures kept per model, processes give the same reports."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from bncheck import engine, many

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    shutil.copy(SAMPLES / "stale_stats.onnx", root / "b.onnx")
    shutil.copy(SAMPLES / "clean_bn_convnet.onnx", root / "sub" / "a.onnx")
    shutil.copy(SAMPLES / "keras_epsilon_1e-8.keras", root / "sub" / "k.keras")
    shutil.copy(SAMPLES / "clean_bn_convnet.onnx", root / ".hidden" / "x.onnx")
    (root / "notes.txt").write_text("not a model")
    (root / "broken.onnx").write_bytes(b"\x08\x07garbage")
    return root


def test_folders_expand_recursively_by_extension_skipping_hidden(tmp_path):
    root = _tree(tmp_path)
    found = [Path(p).relative_to(root).as_posix() for p in many.expand([str(root)])]
    assert found == ["b.onnx", "broken.onnx", "sub/a.onnx", "sub/k.keras"]


def test_files_given_twice_are_checked_once_and_missing_ones_kept(tmp_path):
    a = str(SAMPLES / "clean_bn_convnet.onnx")
    missing = str(tmp_path / "nope.onnx")
    assert many.expand([a, a, missing]) == [a, missing]


def test_a_broken_model_is_a_failure_entry_and_the_others_are_reported(tmp_path):
    models = many.expand([str(_tree(tmp_path))])
    results = many.run(models, engine.inspect)
    by_name = {Path(m).name: r for m, r in zip(models, results)}
    assert isinstance(by_name["broken.onnx"], many.Failure) and by_name["broken.onnx"].kind == "model"
    assert {f.code for f in by_name["b.onnx"].findings} == {"BN003"}
    assert by_name["a.onnx"].findings == []
    assert many.worst_exit(results) == 2
    assert many.worst_exit([by_name["a.onnx"], by_name["b.onnx"]]) == 1


def test_processes_give_the_same_reports_in_the_same_order(tmp_path):
    models = many.expand([str(_tree(tmp_path))])
    job = functools.partial(engine.inspect, fail_on="warning")
    serial = many.run(models, job, jobs=1)
    parallel = many.run(models, job, jobs=2)
    summary = [
        (type(r).__name__, getattr(r, "message", None), [(f.code, f.layer) for f in getattr(r, "findings", [])])
        for r in serial
    ]
    assert summary == [
        (type(r).__name__, getattr(r, "message", None), [(f.code, f.layer) for f in getattr(r, "findings", [])])
        for r in parallel
    ]


def test_progress_counts_models_done(tmp_path):
    seen: list[tuple[int, int]] = []
    many.run([str(SAMPLES / "clean_bn_convnet.onnx")] * 2, engine.inspect, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 2), (1, 2), (2, 2)]
