"""The newest ONNX IR version the installed onnxruntime reads.

onnx's helpers write their own newest IR version (14 from onnx 1.23), which onnxruntime reads only from a later
release (1.32): a file saved by a newer onnx than the onnxruntime beside it is refused as a whole, although its
graph and opsets are ones that onnxruntime runs. The bytes of every session bncheck builds (``run.new_session``,
and the conformance model's) get the newest IR version the runtime reads instead; the file itself, and the
models bncheck builds from it, keep theirs.
"""

from __future__ import annotations

import functools
import re

#: what onnxruntime 1.27, pyproject.toml's floor, reads: only a newer file asks the runtime
FLOOR_READS = 13


def runnable_ir_version(ir_version: int) -> int:
    """``ir_version``, or the newest IR version the installed onnxruntime reads where it refuses that one."""
    if ir_version <= FLOOR_READS:
        return ir_version
    newest = _newest_read(ir_version)
    return ir_version if newest is None else min(ir_version, newest)


@functools.cache
def _newest_read(ir_version: int) -> int | None:
    # onnxruntime has no API for it; refusing a one-node model at ``ir_version`` names the number
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in "xy")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "ir", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir_version)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        found = re.search(r"max supported IR version: (\d+)", str(exc))
        return int(found[1]) if found else None
    return None
