"""Many models per run: folder expansion, failures kept per model, processes give the same reports."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

from bncheck import budget, engine, many, share

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


def test_workers_take_their_share_of_the_automatic_memory_budget(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bncheck.cli import main
    from tests.test_onnx_memory import _wide_conv

    monkeypatch.delenv("BNCHECK_MEMORY_BUDGET", raising=False)
    # 4096 samples of 1024x1024 need about 1.2 TB: refused by each worker, whose budget is its share
    models = [_wide_conv(tmp_path / f"{name}.onnx", hw=1024) for name in ("a", "b")]
    result = CliRunner().invoke(main, ["probe", "-j", "2", "--format", "json", "--batch-sizes", "1,2,4096", *models])
    errors = [entry["error"]["message"] for entry in json.loads(result.stdout)["models"]]
    assert len(errors) == 2 and all("50% of available memory shared by 2 --jobs workers" in e for e in errors), errors


def test_a_share_of_the_machine_halves_the_budget_and_the_runtimes_threads():
    import onnxruntime as ort

    from bncheck.backends.onnx.run import session_options

    cores = len(os.sched_getaffinity(0))
    alone = budget.budget()
    try:
        share.set_workers(2)
        halved = budget.budget()
        threads = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "").intra_op_num_threads
    finally:
        share.set_workers(1)
    assert 0.45 < halved / alone < 0.55
    assert threads == max(1, cores // 2)
    assert session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "").intra_op_num_threads == 0  # its default
