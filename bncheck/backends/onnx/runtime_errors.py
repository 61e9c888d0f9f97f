"""onnxruntime's error messages on the one line a note or an exit-2 error has."""

from __future__ import annotations

import re

from bncheck.errors import one_line

#: onnxruntime's run errors: "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape
#: node. Name:'view' Status Message: /onnxruntime_src/.../reshape_helper.h:91 onnxruntime::ReshapeHelper::
#: ReshapeHelper(...) input_shape_size == size was false. The input tensor cannot be reshaped ...": the prefix,
#: the node line and the source location, so that the reason fits the one line a note or error has
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
#: a session's load error names the file the message is already about: "Load model from PATH failed:"
_ORT_LOAD = re.compile(r"^Load model from .* failed:\s*")
_ORT_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ")
_ORT_SOURCE = re.compile(r"/\S+\.(?:h|cc|cpp):\d+ \S+\([^)]*\)\s?(?:[^.]*? was false\. )?")


def runtime_message(exc: BaseException, limit: int = 300) -> str:
    """An onnxruntime error on one line, without its boilerplate: "Reshape node 'view': The input tensor
    cannot be reshaped to the requested shape. Input shape:{32,2,576}, requested shape:{32,1,3,192}"."""
    text = " ".join(str(exc).split())
    text = _ORT_LOAD.sub("", _ORT_PREFIX.sub("", text))
    # tf2onnx and keras2onnx leave nodes unnamed: "Concat node ''" would name nothing
    text = _ORT_NODE.sub(
        lambda m: f"{m.group(1)} node {m.group(2)!r}: " if m.group(2) else f"an unnamed {m.group(1)} node: ", text
    )
    text = _ORT_SOURCE.sub("", text)
    return one_line(RuntimeError(text), limit) if text else one_line(exc, limit)
