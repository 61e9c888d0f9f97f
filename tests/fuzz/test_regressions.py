"""One regression test per hostile-input defect the fuzzing found; each runs the real CLI in a subprocess
under the contract of :mod:`tests.fuzz.contract` (exit 0/1/2, one stderr line on exit 2, no file read
outside the model's folder, bounded time and memory) and then asserts what the fix promises."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from tests.fuzz import contract, corpus
from tests.fuzz.contract import Workspace

REPO = Path(__file__).resolve().parents[2]


def _run(
    ws: Workspace, *args: str, env: dict[str, str] | None = None, timeout: float = contract.TIMEOUT
) -> contract.Run:
    result = contract.run(ws, list(args), env=env, timeout=timeout)
    assert not result.violations(), result.violations() + [result.describe()]
    return result


def _refused(result: contract.Run, *words: str) -> None:
    assert result.returncode == 2, result.describe()
    line = result.stderr.strip()
    for word in words:
        assert word.lower() in line.lower(), (word, line)


# ------------------------------------------------------------------------ reads outside the model (HDF5)


@pytest.mark.parametrize("command", ["inspect", "probe"])
def test_keras_dataset_with_external_storage_is_refused_before_reading(command: str) -> None:
    with Workspace() as ws:
        weights = corpus.keras_weights(4, dataset=corpus.external_storage(ws.canary))
        corpus.write_keras(ws.model_dir / "m.keras", corpus.keras_bn_config([None, 4]), weights)
        result = _run(ws, command, "m.keras")
        _refused(result, "external")
        assert "12345" not in result.stdout


def test_legacy_h5_dataset_with_external_storage_is_refused_before_reading() -> None:
    with Workspace() as ws:
        corpus.write_legacy_h5(
            ws.model_dir / "m.h5", corpus.keras_bn_config([None, 4]), dataset=corpus.external_storage(ws.canary)
        )
        _refused(_run(ws, "inspect", "m.h5"), "external")


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_virtual_dataset_mapping_outside_files_is_refused(suffix: str) -> None:
    with Workspace() as ws:
        source = corpus.outside_h5(ws.outside / "source.h5")
        config = corpus.keras_bn_config([None, 4])
        if suffix == ".keras":
            corpus.write_keras(
                ws.model_dir / "m.keras", config, corpus.keras_weights(4, dataset=corpus.virtual_dataset(source))
            )
        else:
            corpus.write_legacy_h5(ws.model_dir / "m.h5", config, dataset=corpus.virtual_dataset(source))
        _refused(_run(ws, "inspect", f"m{suffix}"), "virtual")


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_external_link_to_another_file_is_refused(suffix: str) -> None:
    import h5py

    with Workspace() as ws:
        source = corpus.outside_h5(ws.outside / "source.h5")
        config = corpus.keras_bn_config([None, 4])
        if suffix == ".keras":

            def link(h5: h5py.File) -> None:
                del h5["layers/batch_normalization/vars"]
                h5["layers/batch_normalization/vars"] = h5py.ExternalLink(str(source), "/vars")

            corpus.write_keras(ws.model_dir / "m.keras", config, corpus.keras_weights(4, extra=link))
        else:

            def bn_group(weights: h5py.Group, name: str) -> None:
                weights[name] = h5py.ExternalLink(str(source), "/bn")

            corpus.write_legacy_h5(ws.model_dir / "m.h5", config, bn_group=bn_group)
        result = _run(ws, "inspect", f"m{suffix}")
        _refused(result, "external link")
        assert "12345" not in result.stdout


# ------------------------------------------------------------------------ names printed as literal text


@pytest.mark.parametrize("kind", sorted(corpus.HOSTILE_NAMES))
def test_onnx_node_names_print_as_literal_text(kind: str) -> None:
    name = corpus.HOSTILE_NAMES[kind]
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", name=name, input_dims=[1, 3, 1, 1])
        result = _run(ws, "probe", "m.onnx", "--batch-sizes", "1")
        assert result.returncode in (0, 1)
        visible = name.replace("\n", "\\n").replace("\x1b", "\\x1b").replace("\x07", "\\x07")
        assert visible in result.stdout
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", result.stdout), "control characters reached the terminal"
        rows = [line for line in result.stdout.splitlines() if line.startswith("bn")]
        assert any(line.startswith(visible[:28]) for line in rows), "the name's row was broken"
        document = json.loads(_run(ws, "inspect", "m.onnx", "--format", "json").stdout)
        assert [layer["name"] for layer in document["layers"]] == [name]  # JSON keeps the exact name


@pytest.mark.parametrize("kind", sorted(corpus.HOSTILE_NAMES))
def test_keras_layer_names_print_as_literal_text(kind: str) -> None:
    name = corpus.HOSTILE_NAMES[kind]
    with Workspace() as ws:
        corpus.write_keras(
            ws.model_dir / "m.keras", corpus.keras_bn_config([None, 4], name), corpus.keras_weights(4, bn_name=name)
        )
        result = _run(ws, "inspect", "m.keras")
        assert result.returncode in (0, 1)
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", result.stdout)
        assert name.replace("\n", "\\n").replace("\x1b", "\\x1b").replace("\x07", "\\x07") in result.stdout
        document = json.loads(_run(ws, "inspect", "m.keras", "--format", "json").stdout)
        assert [layer["name"] for layer in document["layers"]] == [name]


# ------------------------------------------------------------------------ memory: estimate before allocating


def test_input_shape_over_the_memory_budget_is_refused_with_the_estimate() -> None:
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=["N", "c", "h", "w"])
        result = _run(ws, "probe", "m.onnx", "--input-shape", "x:100000x100000x100000")
        _refused(result, "BNCHECK_MEMORY_BUDGET", "x")
        assert re.search(r"\d(\.\d+)? ?[KMGTPE]i?B", result.stderr), result.stderr


def test_memory_budget_can_be_raised_and_lowered_by_environment() -> None:
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=["N", 3, 64, 64])
        _refused(_run(ws, "probe", "m.onnx", env={"BNCHECK_MEMORY_BUDGET": "1MB"}), "BNCHECK_MEMORY_BUDGET")
        assert _run(ws, "probe", "m.onnx", env={"BNCHECK_MEMORY_BUDGET": "2GB"}).returncode in (0, 1)
        _refused(_run(ws, "probe", "m.onnx", env={"BNCHECK_MEMORY_BUDGET": "lots"}), "BNCHECK_MEMORY_BUDGET")


def test_keras_input_shape_over_the_memory_budget_is_refused() -> None:
    with Workspace() as ws:
        corpus.write_keras(
            ws.model_dir / "m.keras", corpus.keras_bn_config([None, 100000, 100000]), corpus.keras_weights(100000)
        )
        _refused(_run(ws, "probe", "m.keras"), "BNCHECK_MEMORY_BUDGET")


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_hdf5_dataset_larger_than_the_budget_is_refused_before_reading(suffix: str) -> None:
    with Workspace() as ws:
        config = corpus.keras_bn_config([None, 4])
        if suffix == ".keras":
            corpus.write_keras(
                ws.model_dir / "m.keras", config, corpus.keras_weights(4, dataset=corpus.huge_fill_value)
            )
        else:
            corpus.write_legacy_h5(ws.model_dir / "m.h5", config, dataset=corpus.huge_fill_value)
        assert os.path.getsize(ws.model_dir / f"m{suffix}") < 100_000
        _refused(_run(ws, "inspect", f"m{suffix}"), "BNCHECK_MEMORY_BUDGET")


@pytest.mark.parametrize("value", ["x:99999999999999999999999999", "x:3x4x" + "9" * 400, "x:3x99999999999"])
def test_huge_integer_in_input_shape_is_a_usage_error(value: str) -> None:
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=["N", "c", "h", "w"])
        result = _run(ws, "probe", "m.onnx", "--input-shape", value)
        _refused(result, "usage error", "--input-shape")
        assert len(result.stderr) < 400


@pytest.mark.parametrize("dim", [0, -3])
def test_declared_zero_or_negative_dim_names_the_input_and_the_dim(dim: int) -> None:
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=["N", 3, dim, 4])
        _refused(_run(ws, "probe", "m.onnx"), "'x'", "axis 2", "--input-shape")
        # Keras input shapes are read as written: the same refusal, with the dim
        corpus.write_keras(ws.model_dir / "k.keras", corpus.keras_bn_config([None, dim, 4]), corpus.keras_weights(4))
        _refused(_run(ws, "probe", "k.keras"), "'x'", "axis 1", str(dim))


@pytest.mark.parametrize("batch", [2**40, 2**63 - 1])
def test_declared_huge_batch_is_rejected_up_front(batch: int) -> None:
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=[batch, 3, 4, 4])
        result = _run(ws, "probe", "m.onnx", timeout=30)
        _refused(result, "'x'", str(batch))
        assert result.seconds < 30


# ------------------------------------------------------------------------ hangs: linear config walk


def test_nested_models_fanned_out_inspect_quickly() -> None:
    with Workspace() as ws:
        corpus.write_keras(ws.model_dir / "m.keras", corpus.nested_fanout_config(30, 5), None)
        result = _run(ws, "inspect", "m.keras", timeout=30)
        assert result.returncode in (0, 1, 2)
        assert result.seconds < 15


def test_long_chain_in_reverse_order_inspects_quickly() -> None:
    with Workspace() as ws:
        corpus.write_keras(ws.model_dir / "m.keras", corpus.reversed_chain_config(2000), None)
        result = _run(ws, "inspect", "m.keras", "--format", "json", timeout=30)
        assert result.returncode in (0, 1)
        assert result.seconds < 15
        assert len(json.loads(result.stdout)["layers"]) == 200


def test_nesting_beyond_the_depth_cap_is_refused_with_the_cap() -> None:
    with Workspace() as ws:
        config = corpus.nested_fanout_config(1, 200)
        corpus.write_keras(ws.model_dir / "m.keras", config, None)
        _refused(_run(ws, "inspect", "m.keras", timeout=30), "nested", "deep")


# ------------------------------------------------------------------------ stderr: no runtime log noise


def test_raw_data_of_the_wrong_length_keeps_stderr_to_one_line() -> None:
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", raw_scale=b"\x00" * 5)
        for command in ("inspect", "probe"):
            result = _run(ws, command, "m.onnx")
            assert "\x1b" not in result.stderr


def test_zero_size_input_keeps_stderr_to_one_line() -> None:
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=["N", 3, 4, 4])
        np.save(ws.model_dir / "d.npy", np.zeros((1, 3, 4, 0), np.float32))
        _run(ws, "probe", "m.onnx", "--input-shape", "x:3x4x4", "--data", "d.npy")
        corpus.onnx_bn(ws.model_dir / "z.onnx", input_dims=["N", 3, "h", 4])
        _run(ws, "probe", "z.onnx", "--input-shape", "x:3x0x4")


def test_float16_statistics_keep_stderr_to_one_line() -> None:
    from onnx import TensorProto

    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", stats_type=TensorProto.FLOAT16)
        result = _run(ws, "probe", "m.onnx")
        assert "\x1b" not in result.stderr


def test_onnx_warning_about_unknown_external_data_keys_becomes_a_short_note() -> None:
    with Workspace() as ws:
        (ws.model_dir / "w.bin").write_bytes(np.ones(3, np.float32).tobytes())
        keys = [("location", "w.bin")] + [(f"k{i}", "v") for i in range(10_000)]
        corpus.onnx_bn(ws.model_dir / "m.onnx", external={"scale": keys})
        result = _run(ws, "inspect", "m.onnx", "--format", "json")
        document = json.loads(result.stdout)
        notes = [note["message"] for note in document["notes"]]
        assert any("unknown" in note and "9,997 more" in note for note in notes), notes
        assert all(len(note) < 500 for note in notes)


def test_data_file_with_thousands_of_unknown_keys_names_a_few() -> None:
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=["N", 3, 4, 4])
        np.savez(ws.model_dir / "d.npz", **{f"k{i}": np.zeros((2, 3, 4, 4), np.float32) for i in range(10_000)})
        result = _run(ws, "probe", "m.onnx", "--data", "d.npz")
        _refused(result, "9,997 more")
        assert len(result.stderr) < 500


# ------------------------------------------------------------------------ reports never overwrite inputs


@pytest.mark.parametrize("command", ["inspect", "probe"])
def test_report_output_never_overwrites_the_model(command: str) -> None:
    with Workspace() as ws:
        model = corpus.onnx_bn(ws.model_dir / "m.onnx")
        before = model.read_bytes()
        _refused(_run(ws, command, "m.onnx", "-o", "m.onnx"), "m.onnx")
        _refused(_run(ws, command, "m.onnx", "-o", str(model)), "m.onnx")
        os.symlink("m.onnx", ws.model_dir / "link.json")
        _refused(_run(ws, command, "m.onnx", "-o", "link.json"))
        assert model.read_bytes() == before


def test_report_output_never_overwrites_external_data_or_the_data_file() -> None:
    with Workspace() as ws:
        (ws.model_dir / "w.bin").write_bytes(np.ones(3, np.float32).tobytes())
        corpus.onnx_bn(ws.model_dir / "m.onnx", external={"scale": [("location", "w.bin")]})
        np.save(ws.model_dir / "d.npy", np.zeros((4, 3, 4, 4), np.float32))
        weights, data = (ws.model_dir / "w.bin").read_bytes(), (ws.model_dir / "d.npy").read_bytes()
        _refused(_run(ws, "inspect", "m.onnx", "-o", "w.bin"), "w.bin")
        _refused(_run(ws, "probe", "m.onnx", "--data", "d.npy", "-o", "d.npy"), "d.npy")
        assert (ws.model_dir / "w.bin").read_bytes() == weights
        assert (ws.model_dir / "d.npy").read_bytes() == data


def test_keras_report_output_never_overwrites_the_model() -> None:
    with Workspace() as ws:
        path = corpus.write_keras(ws.model_dir / "m.keras", corpus.keras_bn_config([None, 4]), corpus.keras_weights(4))
        before = path.read_bytes()
        _refused(_run(ws, "inspect", "m.keras", "--output", "m.keras"), "m.keras")
        assert path.read_bytes() == before


def test_report_is_written_atomically() -> None:
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx")
        report = ws.model_dir / "report.json"
        report.write_text("previous report")
        # a failed run leaves the previous report whole
        _refused(_run(ws, "probe", "m.onnx", "--batch-sizes", "1", "--data", "missing.npy", "-o", "report.json"))
        assert report.read_text() == "previous report"
        result = _run(ws, "inspect", "m.onnx", "-o", "report.json")
        assert json.loads(report.read_text())["exit_code"] == result.returncode
        assert sorted(p.name for p in ws.model_dir.iterdir()) == ["m.onnx", "report.json"]  # no temp file left


# ------------------------------------------------------------------------ installing from the repository


def test_readme_never_installs_bncheck_by_name_from_the_package_index() -> None:
    """No release is published: a command installing bncheck by name would install whatever holds that name on
    the package index. Commands (code blocks, inline code) install from the repository or a checkout; inline
    code followed by "would" is the README's warning about the bare command."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```.*?```", text, re.DOTALL)
    inline = [code for code, warning in re.findall(r"`([^`\n]*pip install[^`\n]*)`(\s+would)?", text) if not warning]
    # a requirement naming bncheck (extras allowed) that is not followed by "@ URL"
    bare = re.compile(r"pip install\s+(?:-\S+\s+)*['\"]?bncheck(?:\[[\w,]+\])?['\"]?(?!\s*@)(?=\s|$|`)", re.MULTILINE)
    found = [m for command in blocks + [f"`{c}`" for c in inline] for m in bare.findall(command)]
    assert not found, found
    assert 'pip install "bncheck @ git+' in text


# ------------------------------------------------------------------------ found by the fuzz suite itself


def test_onnx_attribute_of_the_wrong_type_is_read_as_absent() -> None:
    """training_mode stored as a float (NaN): the walk uses the default instead of crashing."""
    import onnx
    from onnx import helper

    with Workspace() as ws:
        path = corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=["N", 3, 4, 4])
        model = onnx.load(str(path))
        model.graph.node[0].attribute.append(helper.make_attribute("training_mode", float("nan")))
        onnx.save(model, str(path))
        document = json.loads(_run(ws, "inspect", "m.onnx", "--format", "json").stdout)
        assert [layer["training"] for layer in document["layers"]] == [False]
        # onnxruntime refuses the mismatched attribute: one line naming it
        _refused(_run(ws, "probe", "m.onnx", "--input-shape", "x:3x4x4"), "attribute")


def test_keras_config_field_of_the_wrong_type_is_a_one_line_error() -> None:
    """A tensor's config written as `true`: exit 2 naming the malformed config, not an internal error."""
    with Workspace() as ws:
        config = corpus.keras_bn_config([None, 4])
        config["config"]["layers"][1]["inbound_nodes"][0]["args"][0]["config"] = True
        corpus.write_keras(ws.model_dir / "m.keras", config, corpus.keras_weights(4))
        _refused(_run(ws, "inspect", "m.keras"), "malformed model config")


def test_attribute_type_is_checked_for_an_operator_newer_than_the_opset() -> None:
    """LayerNormalization declared at opset 7 (it exists from 17) with epsilon written as a string."""
    import onnx
    from onnx import helper

    with Workspace() as ws:
        path = ws.model_dir / "m.onnx"
        node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], name="ln", epsilon="text")
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
            initializer=[
                helper.make_tensor("scale", onnx.TensorProto.FLOAT, [4], [1.0] * 4),
                helper.make_tensor("bias", onnx.TensorProto.FLOAT, [4], [0.0] * 4),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
        model.ir_version = 3
        path.write_bytes(model.SerializeToString())
        _run(ws, "inspect", "m.onnx")
        _run(ws, "probe", "m.onnx")


def test_name_that_is_not_utf8_is_a_one_line_error() -> None:
    """A flipped bit inside a tensor name: protobuf hands the name back as bytes; JSON once failed on it."""
    with Workspace() as ws:
        path = corpus.onnx_bn(ws.model_dir / "m.onnx")
        data = path.read_bytes()
        path.write_bytes(data.replace(b"bias", b"bi\xb2s"))
        _refused(_run(ws, "inspect", "m.onnx", "--format", "json"), "not UTF-8")


def test_local_function_domain_at_an_old_opset_probes() -> None:
    """A model calling a local function (its own opset domain) at IR 3: the probe copy's IR upgrade once
    crashed on the domain onnx has no IR version for."""
    from onnx import helper

    with Workspace() as ws:
        path = corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=[1, 3, 4, 4])
        import onnx

        model = onnx.load(str(path))
        inputs = ["x", "scale", "bias", "mean", "var"]
        opsets = [helper.make_opsetid("", 7)]
        body = helper.make_function("local", "Body", inputs, ["y"], list(model.graph.node), opsets)
        del model.graph.node[:]
        model.graph.node.append(helper.make_node("Body", inputs, ["y"], domain="local", name="call"))
        del model.opset_import[:]
        model.opset_import.extend([*opsets, helper.make_opsetid("local", 1)])
        model.functions.append(body)
        model.ir_version = 3
        path.write_bytes(model.SerializeToString())
        _run(ws, "probe", "m.onnx")


def test_negative_seed_is_a_usage_error() -> None:
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=[1, 3, 4, 4])
        _refused(_run(ws, "probe", "m.onnx", "--seed", "-1"), "usage error", "--seed")


def test_int64_tensor_with_short_raw_data_in_a_fixed_batch_model_probes_to_a_clean_error() -> None:
    """The probe copy's batch relaxation read every 1-D int64 initializer as a shape; a short raw_data crashed it."""
    from onnx import TensorProto

    with Workspace() as ws:
        corpus.onnx_bn(
            ws.model_dir / "m.onnx", input_dims=[1, 3, 4, 4], stats_type=TensorProto.INT64, raw_scale=b"\x00" * 7
        )
        _run(ws, "inspect", "m.onnx")
        _refused(_run(ws, "probe", "m.onnx"), "m.onnx")


def test_batch_norm_with_empty_parameters_that_onnxruntime_runs_anyway_probes_to_a_clean_error() -> None:
    """Opset 7, a 1-channel input, parameters of 0 values: onnxruntime's BatchNormalization-7 returns an empty
    output instead of refusing, and decoding its statistics crashed with a numpy reshape error."""
    from tests.fuzz.strategies import build_onnx

    recipe = {
        "op": "BatchNormalization",
        "opset": 7,
        "ir_version": 3,
        "dims": [1, 1],
        "input_type": 1,
        "param_type": 1,
        "channels_delta": -1,
        "param_seed": 0,
        "specials": [],
        "attrs": {},
        "outputs": 3,
        "node_name": "bn",
        "input_name": "x",
        "before": "none",
        "after": "none",
        "subgraph": "none",
        "external": "none",
        "raw_data": "ok",
        "output_dims": "same",
        "give_shape": False,
    }
    with Workspace() as ws:
        build_onnx(recipe, ws.model_dir, ws.canary)
        _run(ws, "inspect", "m.onnx")
        _refused(_run(ws, "probe", "m.onnx", "--batch-sizes", "1,2,32"), "empty tensor", "'bn'")


def test_dim_name_that_is_not_utf8_is_a_one_line_error() -> None:
    """A flipped bit in a symbolic dim's name: the shape reader once ran a regex over the bytes."""
    with Workspace() as ws:
        path = corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=["batch", 3, 4, 4])
        path.write_bytes(path.read_bytes().replace(b"batch", b"bat\xe3h"))
        _refused(_run(ws, "inspect", "m.onnx"), "not UTF-8")


def test_graph_name_that_is_not_utf8_is_a_one_line_error() -> None:
    """A flipped bit in the graph's own name: copying the graph for the checker raised UnicodeDecodeError."""
    with Workspace() as ws:
        path = corpus.onnx_bn(ws.model_dir / "m.onnx")
        large = b"\x00" * 5000  # a large initializer, so that the loader builds its weight-less skeleton
        data = path.read_bytes()
        import onnx
        from onnx import numpy_helper

        model = onnx.load_model_from_string(data)
        model.graph.name = "graphname"
        model.graph.initializer.append(numpy_helper.from_array(np.frombuffer(large, np.float32), "pad"))
        path.write_bytes(model.SerializeToString().replace(b"graphname", b"gr\xf4phname"))
        _refused(_run(ws, "inspect", "m.onnx"), "not UTF-8")


def test_text_that_is_not_utf8_met_by_the_probe_is_a_one_line_error() -> None:
    """A flipped bit in layernorm_size1_axis.onnx's header text: the probe's model copy raised UnicodeDecodeError."""
    from tests.fuzz import strategies

    with Workspace() as ws:
        path = strategies.build_mutated(
            {"seed": "layernorm_size1_axis.onnx", "bytes": [("flip", 1, 1, 7)]}, ws.model_dir
        )
        _run(ws, "inspect", path.name)
        _run(ws, "probe", path.name)


def test_function_op_undefined_at_its_opset_is_refused_instead_of_crashing_onnxruntime() -> None:
    """A LayerNormalization inside a model-local function of an opset-7 model: onnxruntime's session
    constructor crashed the process (SIGSEGV) instead of raising."""
    import onnx
    from onnx import TensorProto, helper

    function = helper.make_function(
        "local", "F", ["x", "s", "b"], ["y"],
        [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1)],
        opset_imports=[helper.make_opsetid("", 7)],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("F", ["x", "s", "b"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor("s", TensorProto.FLOAT, [4], np.ones(4)),
            helper.make_tensor("b", TensorProto.FLOAT, [4], np.zeros(4)),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 7), helper.make_opsetid("local", 1)],
        functions=[function],
        ir_version=8,
    )
    with Workspace() as ws:
        onnx.save(model, ws.model_dir / "m.onnx")
        _run(ws, "inspect", "m.onnx")
        _refused(_run(ws, "probe", "m.onnx"), "'LayerNormalization'", "opset 7 does not define")


def test_empty_norm_parameters_print_no_numpy_warning() -> None:
    """A BatchNormalization whose parameters hold no channel: the table's median of an empty array wrote
    numpy's RuntimeWarning to stderr after the report."""
    with Workspace() as ws:
        corpus.onnx_bn(ws.model_dir / "m.onnx", input_dims=[1, 1], channels=0)
        result = _run(ws, "inspect", "m.onnx")
        assert result.returncode in (0, 1) and result.stderr == ""
        assert "empty" in result.stdout


def test_hdf5_file_on_which_libhdf5_loops_is_refused_in_bounded_time() -> None:
    """Flipped bytes in keras_legacy_convnet.h5 (a damaged global heap behind its string attributes): libhdf5
    looped forever reading the 'backend' attribute, so inspect and probe ran until killed."""
    from tests.fuzz import strategies

    recipe = {
        "seed": "keras_legacy_convnet.h5",
        "bytes": [("flip", 280, 36, 242), ("zero", 9448175, 26, 152), ("flip", 3800, 59, 49), ("flip", 39952, 22, 0)],
    }
    with Workspace() as ws:
        path = strategies.build_mutated(recipe, ws.model_dir)
        result = _run(ws, "inspect", path.name, timeout=50)
        _refused(result, "did not finish in 20 s")
        assert result.seconds < 40


def test_a_cut_onnxruntime_rejects_leaves_the_dependence_unlocated_instead_of_crashing() -> None:
    """A flipped bit in collapse_1x1_train_mode.onnx drops the type of head_bn's attribute: the probe runs the
    node by the spec's decomposition, but the localisation's cuts kept the node as written and onnxruntime's
    InvalidGraph escaped as an internal error."""
    from tests.fuzz import strategies

    with Workspace() as ws:
        path = strategies.build_mutated(
            {"seed": "collapse_1x1_train_mode.onnx", "bytes": [("flip", 41829709, 1, 3)]}, ws.model_dir
        )
        result = _run(ws, "probe", path.name, "--format", "json")
        assert result.returncode == 1
        assert "where it starts was not located" in result.stdout
