"""Offsets of raw_data bytes inside a serialized ONNX file, read with a minimal protobuf scanner.

Hand-written because protobuf's Python API gives no byte offsets; onnxruntime can then read the weights from the
model file itself as external data (no second copy in memory).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("bad varint")


def _fields(buf: Any, start: int, end: int) -> Iterable[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each protobuf field in buf[start:end]; the
    value of a length-delimited field is its payload."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(buf, pos)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:  # groups (3, 4): not in ONNX files
            raise ValueError(f"unsupported wire type {wire}")
        if after > end:
            raise ValueError("truncated field")
        yield number, wire, pos, after
        pos = after


def raw_data_offsets(path: str) -> dict[str, tuple[int, int]] | None:
    """Byte offset and length of each top-level initializer's ``raw_data`` inside the ONNX file ``path``,
    or None when the file's layout is not the plain one (a repeated graph field, duplicate names).

    Why by hand: neither onnx nor protobuf's Python API tells where a field's bytes sit in the file, and
    with those offsets the probe's session reads the weights straight from the user's file as external
    data (``offset``/``length``), instead of this process writing a 100 MB copy first (0.15 s on
    ResNet-50). Only the wire format is walked (ModelProto.graph = 7, GraphProto.initializer = 5,
    TensorProto.name = 8, raw_data = 9); values are never decoded beyond names.
    """
    import mmap

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return None
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        graphs = [(a, b) for number, wire, a, b in _fields(buf, 0, size) if number == 7 and wire == 2]
        if len(graphs) != 1:
            return None  # protobuf would merge several graph fields: not worth following
        found: dict[str, tuple[int, int]] = {}
        for number, wire, a, b in _fields(buf, *graphs[0]):
            if number != 5 or wire != 2:
                continue
            name, raw = None, None
            for f_number, f_wire, fa, fb in _fields(buf, a, b):
                if f_number == 8 and f_wire == 2:
                    name = bytes(buf[fa:fb]).decode("utf-8", "replace")
                elif f_number == 9 and f_wire == 2:
                    raw = (fa, fb - fa)  # the last occurrence wins, as in protobuf
            if name is None or name in found:
                return None if name in found else found
            if raw is not None:
                found[name] = raw
        return found
    except (ValueError, IndexError):
        return None
    finally:
        buf.close()
