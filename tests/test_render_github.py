"""GitHub workflow commands: one annotation per finding at its level, escaped as the Actions toolkit does."""

from __future__ import annotations

import json
from pathlib import Path

from bncheck import engine
from bncheck.render import github
from tests.named_models import HOSTILE_NAMES, bn_chain_model

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _lines(model: str) -> list[str]:
    return github.render(engine.inspect(str(SAMPLES / model))).splitlines()


def test_errors_are_error_commands_with_file_and_title():
    lines = _lines("collapse_1x1_train_mode.onnx")
    path = str(SAMPLES / "collapse_1x1_train_mode.onnx")
    assert lines[0].startswith(f"::error file={github.escape_property(path)},title=BN001 collapse::head_bn: ")
    assert lines[1].startswith(f"::error file={github.escape_property(path)},title=BN002 train-mode::head_bn: ")
    assert "%0Afix: " in lines[0]  # the hint is the annotation's second line
    assert lines[-1].endswith("2 errors, 0 warnings, 0 info; worst: error; fails --fail-on error (exit 1)")
    assert len(lines) == 3


def test_warnings_are_warning_commands():
    lines = _lines("epsilon_1e-8.onnx")
    assert [line.split(" ", 1)[0] for line in lines[:-1]] == ["::warning"]
    assert "title=BN004 epsilon::bn2: " in lines[0]


def test_info_findings_are_notices():
    lines = _lines("instancenorm_lowered_to_bn.onnx")
    assert lines[0].startswith("::notice ") and "title=BN002 train-mode::" in lines[0]


def test_clean_model_prints_the_summary_line_alone():
    lines = _lines("clean_resnet.onnx")
    assert len(lines) == 1 and not lines[0].startswith("::")
    assert "6 normalization layers, 0 errors" in lines[0]


def test_escaping_follows_the_actions_toolkit():
    assert github.escape_data("100% done\r\nnext") == "100%25 done%0D%0Anext"
    assert github.escape_property("C:\\m,1.onnx") == "C%3A\\m%2C1.onnx"
    line = github.workflow_command("warning", ["a: b, 5%", "second"], file="dir,x/m:1.onnx", title="T")
    assert line == "::warning file=dir%2Cx/m%3A1.onnx,title=T::a: b, 5%25%0Asecond"


def test_hostile_names_stay_on_one_annotation_line(tmp_path):
    path = bn_chain_model(tmp_path / "hostile.onnx", HOSTILE_NAMES, stale=True)
    lines = github.render(engine.inspect(path)).splitlines()
    annotations = [line for line in lines if line.startswith("::error ")]
    assert len(annotations) == len(HOSTILE_NAMES)
    assert all(line.isprintable() for line in lines)
    assert any("::row\\nbreak: " in line for line in annotations)
    assert any("::\\x1b]0;title\\x07: " in line for line in annotations)


def test_error_annotation_for_a_run_that_could_not_finish():
    text = github.render_error("m.onnx: not an ONNX model", "model", command="probe", model_path="m.onnx")
    assert text == "::error file=m.onnx,title=bncheck probe (model error)::m.onnx: not an ONNX model\n"


def test_a_measured_effect_on_the_outputs_reaches_annotations_and_sarif():
    from click.testing import CliRunner

    from bncheck.cli import main

    model = str(Path(__file__).resolve().parent.parent / "sample_models" / "train_mode_bn.onnx")
    github = CliRunner().invoke(main, ["probe", model, "--format", "github"]).stdout
    culprit = next(line for line in github.splitlines() if "::bn1: " in line)
    assert "%0Aeffect: logits move " in culprit
    sarif = json.loads(CliRunner().invoke(main, ["probe", model, "--format", "sarif"]).stdout)
    texts = [r["message"]["text"] for r in sarif["runs"][0]["results"] if r["message"]["text"].startswith("bn1: ")]
    assert texts and "(effect: logits move " in texts[0]
