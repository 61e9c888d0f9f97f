"""onnx imported without importlib.metadata in bncheck's own processes (backends/onnx/quick_import.py).

Each test runs a fresh interpreter: what is imported, and in which order, is the behaviour under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _fresh(code: str) -> dict:
    """The JSON object ``code`` prints, run in a new interpreter."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_onnx_leaves_importlib_metadata_unimported_and_onnx_version_right():
    out = _fresh(
        """
        import json, sys
        from bncheck.backends.onnx.quick_import import import_onnx
        import_onnx()
        import onnx
        loaded = "importlib.metadata" in sys.modules
        attribute = hasattr(sys.modules["importlib"], "metadata")
        import importlib.metadata
        print(json.dumps({"loaded": loaded, "attribute": attribute, "onnx": onnx.__version__,
                          "real": importlib.metadata.version("onnx"),
                          "entry_points": callable(importlib.metadata.entry_points)}))
        """
    )
    assert out["loaded"] is False and out["attribute"] is False
    assert out["onnx"] == out["real"]
    assert out["entry_points"]  # the real module, not the stand-in, once onnx is in


@pytest.mark.parametrize("name", ["onnx", "numpy", "onnxruntime", "click", "Click", "h5py", "rich"])
def test_dist_info_version_is_importlib_metadata_version(name):
    out = _fresh(
        f"""
        import json
        from bncheck.backends.onnx.quick_import import dist_info_version
        found = dist_info_version({name!r})
        import importlib.metadata
        print(json.dumps({{"found": found, "real": importlib.metadata.version({name!r})}}))
        """
    )
    assert out["found"] == out["real"]


def test_a_distribution_not_installed_is_left_to_importlib_metadata():
    out = _fresh(
        """
        import json, sys
        from bncheck.backends.onnx import quick_import
        found = quick_import.dist_info_version("no-such-distribution-bncheck")
        with quick_import._stand_in():
            import importlib.metadata as stand_in
            try:
                stand_in.version("no-such-distribution-bncheck")
            except Exception as exc:
                caught = exc
        raised = type(caught).__module__ + "." + type(caught).__name__
        real = sys.modules["importlib.metadata"]
        print(json.dumps({"found": found, "raised": raised, "real_after": type(real).__name__,
                          "same_class": isinstance(caught, real.PackageNotFoundError)}))
        """
    )
    assert out["found"] is None
    # the real module answered, and is in place after the stand-in's context
    assert out["raised"] == "importlib.metadata.PackageNotFoundError" and out["same_class"]
    assert out["real_after"] == "module"


def test_other_names_of_the_stand_in_are_the_real_modules():
    out = _fresh(
        """
        import json, sys
        from bncheck.backends.onnx import quick_import
        with quick_import._stand_in():
            import importlib.metadata as stand_in
            points = stand_in.entry_points(group="console_scripts")
            real = sys.modules["importlib.metadata"]
        print(json.dumps({"bncheck": any(p.name == "bncheck" for p in points),
                          "real": type(real).__name__, "is_stand_in": real is stand_in}))
        """
    )
    assert out["bncheck"]  # bncheck's own console script, found through the real module
    assert out["real"] == "module" and not out["is_stand_in"]


def test_two_folders_of_one_name_are_left_to_importlib_metadata(tmp_path: Path):
    for version in ("1.0", "2.0"):
        info = tmp_path / f"twice_installed-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: twice-installed\nVersion: {version}\n\n")
    out = _fresh(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from bncheck.backends.onnx.quick_import import dist_info_version
        print(json.dumps({{"found": dist_info_version("twice-installed")}}))
        """
    )
    assert out["found"] is None  # importlib.metadata takes the first the folder lists: not ours to guess


def test_the_first_folder_on_the_path_wins_as_in_importlib_metadata(tmp_path: Path):
    for folder, version in (("first", "3.1.post2"), ("second", "9.9")):
        info = tmp_path / folder / f"Shadowed.Name-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: Shadowed.Name\nVersion: {version}\n\nVersion: body\n"
        )
    out = _fresh(
        f"""
        import json, sys
        sys.path[:0] = [{str(tmp_path / "first")!r}, {str(tmp_path / "second")!r}]
        from bncheck.backends.onnx.quick_import import dist_info_version
        found = dist_info_version("shadowed-name")
        import importlib.metadata
        print(json.dumps({{"found": found, "real": importlib.metadata.version("shadowed-name")}}))
        """
    )
    assert out["found"] == out["real"] == "3.1.post2"


def test_import_onnx_leaves_the_deferred_modules_unimported():
    out = _fresh(
        """
        import json, sys
        from bncheck.backends.onnx.quick_import import DEFERRED, Deferred, import_onnx
        before = set(sys.modules)  # what the interpreter's start-up imported (a coverage hook, say) is not ours
        import_onnx()
        import onnx
        print(json.dumps({
            "deferred": [name for name in DEFERRED if isinstance(sys.modules[name], Deferred)],
            "heavy": [name for name in ("tarfile", "argparse", "subprocess") if name in set(sys.modules) - before],
            "attribute": isinstance(onnx.compose, Deferred),
            "dunder": hasattr(sys.modules["onnx.utils"], "__file__"),
            "still": isinstance(sys.modules["onnx.utils"], Deferred),
        }))
        """
    )
    assert out["deferred"] == [
        "onnx.compose",
        "onnx.utils",
        "onnx.gen_proto",
        "google.protobuf.json_format",
        "google.protobuf.text_format",
        "google.protobuf.internal.python_message",
        "onnx._mapping",
        "ml_dtypes",
    ]
    assert out["heavy"] == []
    assert out["attribute"]
    assert out["dunder"] is False and out["still"]  # hasattr(module, "__file__") imports nothing


def test_a_deferred_module_is_the_real_one_from_its_first_use(tmp_path: Path):
    out = _fresh(
        f"""
        import json, sys
        from bncheck.backends.onnx.quick_import import Deferred, import_onnx
        import_onnx()
        import onnx
        from onnx import helper
        merge = onnx.compose.merge_models  # the first name read imports onnx.compose
        model = helper.make_model(helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])]))
        same = {{}}
        for fmt in ("json", "textproto"):  # protobuf's JSON and text formats, through their stand-ins
            path = {str(tmp_path)!r} + "/model." + fmt
            onnx.save_model(model, path, format=fmt)
            same[fmt] = onnx.load_model(path, format=fmt) == model
        from google.protobuf import text_format
        from google.protobuf.internal import python_message  # the pure-Python backend's, unused by upb's
        attach = python_message._AttachFieldHelpers
        print(json.dumps({{
            "merge": merge.__module__,
            "compose": type(sys.modules["onnx.compose"]).__name__,
            "attribute": onnx.compose is sys.modules["onnx.compose"],
            "same": same,
            "text_format": type(text_format).__name__,
            "parse": callable(text_format.Parse),
            "python_message": type(sys.modules["google.protobuf.internal.python_message"]).__name__,
            "attach": attach.__module__,
        }}))
        """
    )
    assert out["merge"] == "onnx.compose"
    assert out["compose"] == "module" and out["attribute"]  # the real module, in sys.modules and on onnx
    assert out["same"] == {"json": True, "textproto": True}
    assert out["text_format"] == "module" and out["parse"]
    assert out["python_message"] == "module" and out["attach"] == "google.protobuf.internal.python_message"
