"""The table fits the terminal, shortens long names in the middle, explains its words, prints names literally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bncheck import engine
from bncheck.backends import ProbeSettings
from bncheck.render import json as json_render
from bncheck.render import table
from tests.named_models import HOSTILE_NAMES, LONG_MODULE_NAMES, bn_chain_model

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
WIDTHS = (60, 80, 120, 200)


def _probe(path: str, all_layers: bool = False):
    return engine.probe(path, ProbeSettings(batch_sizes=(1, 2, 32), all_layers=all_layers))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tables")
    long_names = bn_chain_model(folder / "torch_names.onnx", LONG_MODULE_NAMES)
    hostile = bn_chain_model(folder / "hostile.onnx", HOSTILE_NAMES, stale=True)
    return {
        "collapse probe": _probe(str(SAMPLES / "collapse_1x1_train_mode.onnx")),
        "resnet inspect": engine.inspect(str(SAMPLES / "clean_resnet.onnx")),
        "torch names probe": _probe(long_names, all_layers=True),
        "torch names inspect": engine.inspect(long_names),
        "hostile inspect": engine.inspect(hostile),
        "hostile probe": _probe(hostile),
    }


@pytest.mark.parametrize("width", WIDTHS)
def test_no_line_is_longer_than_the_terminal(reports, width):
    for name, report in reports.items():
        lines = table.render(report, width=width).splitlines()
        assert max(len(line) for line in lines) <= width, (name, width)


def test_a_wide_terminal_shows_full_names_and_every_column(reports):
    text = table.render(reports["torch names probe"], width=200)
    for name in LONG_MODULE_NAMES:
        assert name in text
    header = text.splitlines()[1].split()
    assert header == ["layer", "kind", "ch", "eps", "mode", "b=1", "b=2", "b=32", "status"]
    assert "hidden" not in text


def test_at_80_columns_long_names_are_shortened_in_the_middle_and_stay_apart(reports):
    lines = table.render(reports["torch names probe"], width=80).splitlines()
    rows = [line.split()[0] for line in lines[3 : 3 + len(LONG_MODULE_NAMES)]]
    assert rows[0].startswith("encoder.") and rows[0].endswith("batch_norm_1") and "..." in rows[0]
    assert all("..." in row for row in rows)
    assert len(set(rows)) == len(LONG_MODULE_NAMES), rows
    assert any("hidden: terminal too narrow" in line for line in lines)


def test_json_keeps_the_full_names(reports):
    document = json.loads(json_render.render(reports["torch names probe"]))
    assert [layer["name"] for layer in document["layers"]] == list(LONG_MODULE_NAMES)


@pytest.mark.parametrize("color", [False, True])
def test_hostile_names_print_literally_one_row_each(reports, color):
    report = reports["hostile inspect"]
    text = table.render(report, width=120, color=color)
    assert "\x07" not in text and "\x1b]" not in text and "\u202e" not in text
    assert "\x1b[31mred" not in text  # only the table's own SGR codes, never the name's
    for shown in ("[/red]", "\\x1b]0;title\\x07", "row\\nbreak", "\\x1b[31mred", "a\\u202eb"):
        assert shown in text
    if not color:
        lines = text.splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("[/red]"))
        assert [line.split()[0] for line in lines[first : first + len(HOSTILE_NAMES)]] == [
            "[/red]",
            "\\x1b]0;title\\x07",
            "row\\nbreak",
            "\\x1b[31mred",
            "a\\u202eb",
        ]
        assert sum(line.startswith("ERROR   BN003 stale-stats") for line in lines) == len(HOSTILE_NAMES)


def test_markup_in_a_name_is_not_interpreted(reports):
    text = table.render(reports["hostile probe"], width=100)
    assert "ERROR   BN003 stale-stats [/red]" in text


def test_legend_explains_the_words_the_table_shows(reports):
    probe_text = table.render(reports["collapse probe"], width=100)
    legend = {line.split()[0] for line in probe_text.splitlines() if line.startswith(("n=", "batch!", "constant"))}
    assert legend == {"n=", "batch!", "constant"}
    assert not any(line.startswith(("set ", "affected ")) for line in probe_text.splitlines())
    inspect_text = table.render(reports["resnet inspect"], width=100)
    assert any(line.startswith("set ") for line in inspect_text.splitlines())
    assert not any(line.startswith(("n= ", "constant ")) for line in inspect_text.splitlines())


def test_affected_is_explained_when_a_layer_is_affected():
    # inference-mode layers downstream of the batch moments: measured (and so "affected") with --all-layers
    text = table.render(_probe(str(SAMPLES / "handwritten_batch_moments.onnx"), all_layers=True), width=100)
    assert any(line.rstrip().endswith("affected") for line in text.splitlines())  # a layer's status
    assert any(line.startswith("affected ") for line in text.splitlines())  # its legend line


def test_summary_line_gets_singular_and_plural_right(tmp_path):
    one = bn_chain_model(tmp_path / "one.onnx", ["bn"], stale=True)
    text = table.render(engine.inspect(one), width=120)
    assert "1 normalization layer, 1 error, 0 warnings, 0 info;" in text


def test_names_shorter_than_the_header_never_get_a_cell_cropped(tmp_path):
    """The "layer" header's width counts when columns are fitted: no cell is cut short ("...") at any width
    the table can fit."""
    report = _probe(bn_chain_model(tmp_path / "short.onnx", ["b1", "b2"], stale=True))
    for width in range(56, 101):
        text = table.render(report, width=width)
        assert max(len(line) for line in text.splitlines()) <= width
        assert "\u2026" not in text, width  # rich crops a cell with an ellipsis when the table does not fit


def test_the_set_column_names_the_batch_N_and_hides_generated_dim_names(tmp_path):
    from tests.builders import bn_model

    path = bn_model(tmp_path / "m.onnx", hw=("p2o.DynamicDimension.1", "W"))
    text = table.render(engine.inspect(path), width=120)
    row = next(line for line in text.splitlines() if line.startswith("bn "))
    assert row.split()[-2] == "N*?*W"
    assert "DynamicDimension" not in text
    # the JSON report keeps the names the file gives
    doc = json.loads(json_render.render(engine.inspect(path)))
    assert "p2o.DynamicDimension.1" in json.dumps(doc)


def test_a_default_probe_says_in_one_line_which_layers_it_left_unmeasured_and_why():
    text = table.render(_probe(str(SAMPLES / "clean_resnet.onnx")), width=200)
    lines = text.splitlines()
    (line,) = [line for line in lines if "not measured" in line]
    assert line.startswith("probe: ") and "layer(s) not measured, each in inference mode: an affine map" in line
    assert not any(line.rstrip().endswith("not measured") for line in lines)  # no layer's status says it


def _printed(renderable, width: int, color: bool) -> str:
    """What table.render's console prints for ``renderable``."""
    import io

    from rich.console import Console

    console = Console(
        file=io.StringIO(),
        width=width,
        force_terminal=color,
        color_system="standard" if color else None,
        no_color=None if color else True,
        highlight=False,
        soft_wrap=False,
        emoji=False,
        markup=False,
    )
    console.print(renderable)
    return console.file.getvalue()


@pytest.mark.parametrize("color", [False, True])
@pytest.mark.parametrize("width", WIDTHS)
def test_the_layer_grid_prints_as_richs_table_of_the_same_columns(reports, width, color):
    laid_out = 0
    for name, report in reports.items():
        columns, fits = table._layer_grid(report).layout(width)
        if not fits:
            continue  # rich's own table prints it (and shrinks what does not fit)
        laid_out += 1
        ours = _printed(table._lines(columns), width, color)
        assert ours == _printed(table._rich_table(columns), width, color), name
    assert laid_out >= 2, "too few reports laid out at this width to compare"


def test_a_one_element_set_after_a_collapse_upstream_reads_constant_as_bn001_says(tmp_path):
    """Two train-mode BNs on 1x1 maps with a bias-free 1x1 Conv between: at batch size 1 the first outputs its beta
    of 0, so the second's input is all zero and "ok" was shown in its cell beside its own BN001 error (a
    one-element set is constant whatever the input)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = 4
    params = []
    nodes = []
    source = "x"
    for i in range(2):
        names = [f"bn{i}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
        values = [np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)]
        params += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in zip(names, values)]
        outs = [f"y{i}", f"rm{i}", f"rv{i}"]
        nodes.append(helper.make_node("BatchNormalization", [source, *names], outs, name=f"bn{i}", training_mode=1))
        source = f"y{i}"
        if i == 0:
            weight = np.random.default_rng(0).normal(size=(c, c, 1, 1)).astype(np.float32)
            params.append(numpy_helper.from_array(weight, "conv.weight"))
            nodes.append(helper.make_node("Conv", ["y0", "conv.weight"], ["c0"], name="conv"))
            source = "c0"
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "chain", [value("x", TensorProto.FLOAT, ["N", c, 1, 1])], [value("y1", TensorProto.FLOAT, None)], params
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    path = tmp_path / "chain.onnx"
    onnx.save(model, str(path))
    report = _probe(str(path))
    assert [(f.code, f.layer) for f in report.findings if f.code == "BN001"] == [("BN001", "bn0"), ("BN001", "bn1")]
    doc = json.loads(json_render.render(report))
    cells = {name: doc["probe"]["runs"][0]["layers"][name]["by_batch_size"]["1"]["status"] for name in ("bn0", "bn1")}
    assert cells == {"bn0": "constant", "bn1": "constant"}
    text = table.render(report, width=120)
    assert sum("n=1 constant" in line for line in text.splitlines()) == 2
