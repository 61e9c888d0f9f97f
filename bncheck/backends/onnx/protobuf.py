"""Offsets of raw_data bytes inside a serialized ONNX file, read with a minimal protobuf scanner.

Hand-written because protobuf's Python API gives no byte offsets; onnxruntime can then read the weights from the
model file itself as external data (no second copy in memory), and the loader can parse a model without its
large weights (:func:`without_large_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
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
    for number, wire, _, value_start, value_end in _spans(buf, start, end):
        yield number, wire, value_start, value_end


def _spans(buf: Any, start: int, end: int) -> Iterable[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        begin = pos
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
        yield number, wire, begin, pos, after
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


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


#: TensorProto fields that hold a tensor's values besides raw_data (9): a tensor with any of them is left as it
#: is (segment = 3, float/int32/string/int64 data = 4-7, double/uint64 data = 10-11)
_OTHER_DATA_FIELDS = frozenset({3, 4, 5, 6, 7, 10, 11})


def without_large_weights(
    buf: Any, size: int, location: str, threshold: int, types: Collection[int]
) -> tuple[bytearray, dict[str, tuple[int, int]]] | None:
    """The serialized model in buf[:size] with the raw_data of each top-level initializer of an element type
    in ``types`` larger than ``threshold`` bytes left in the file: the initializer instead names ``location`` (the model file itself)
    as its external data, with the bytes' offset and length there. Returns the new serialization and
    {initializer name: (offset, length)}, or None when nothing is that large or the layout is not the plain
    one (several graph fields, duplicate names, an initializer already external).

    Why by hand: protobuf's Python API parses every field, and would copy weights in that neither the walk nor
    the probe reads (docs/architecture.md). Fields are cut and re-framed, never decoded; the rest is copied
    byte for byte.
    """
    try:
        top = list(_spans(buf, 0, size))
        graphs = [span for span in top if span[0] == 7 and span[1] == 2]
        if len(graphs) != 1:
            return None
        # the graph's payload as pieces: (start, end) ranges of buf, or new bytes
        pieces: list[tuple[int, int] | bytes] = []
        found: dict[str, tuple[int, int]] = {}
        names: set[str] = set()
        for number, wire, begin, a, b in _spans(buf, graphs[0][3], graphs[0][4]):
            if number != 5 or wire != 2:
                pieces.append((begin, b))
                continue
            tensor = list(_spans(buf, a, b))
            name = next((bytes(buf[fa:fb]).decode("utf-8") for n, w, _, fa, fb in tensor if n == 8 and w == 2), None)
            if name is None or name in names:
                return None
            names.add(name)
            if any(n in (13, 14) for n, *_ in tensor):
                return None  # external data: the loader validates it first (load._validate_external)
            raws = [(fa, fb) for n, w, _, fa, fb in tensor if n == 9 and w == 2]
            dtype = next((_varint(buf, fa)[0] for n, w, _, fa, _ in tensor if n == 2 and w == 0), 0)
            small = not raws or raws[-1][1] - raws[-1][0] <= threshold
            if small or dtype not in types or any(n in _OTHER_DATA_FIELDS for n, *_ in tensor):
                pieces.append((begin, b))
                continue
            offset, end = raws[-1]  # the last occurrence wins, as in protobuf
            kept = b"".join(bytes(buf[fs:fb]) for n, _, fs, _, fb in tensor if n != 9)
            entries = b"".join(
                _delimited(13, _delimited(1, key.encode()) + _delimited(2, value.encode()))
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(end - offset)))
            )
            pieces.append(_delimited(5, kept + entries + b"\x70\x01"))  # data_location (14) = EXTERNAL (1)
            found[name] = (offset, end - offset)
        if not found:
            return None
        length = sum(p[1] - p[0] if isinstance(p, tuple) else len(p) for p in pieces)
        out = bytearray()
        for span in top:
            if span is graphs[0]:
                out += _encode_varint(7 << 3 | 2) + _encode_varint(length)
                for piece in pieces:
                    out += buf[piece[0] : piece[1]] if isinstance(piece, tuple) else piece
            else:
                out += buf[span[2] : span[4]]
        return out, found
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
