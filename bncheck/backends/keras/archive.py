"""Read Keras files without Keras (zipfile, json, h5py): the .keras archive and legacy .h5 containers, guarded."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from typing import Any

from bncheck.backends.base import BackendError
from bncheck.backends.keras.config import KerasFile, build
from bncheck.backends.keras.weights import (
    WINDOWS_PATHS,
    KerasWeights,
    LegacyWeights,
    as_slash_paths,
    attr_str,
    has_backslash_paths,
)
from bncheck.backends.keras.weights_only import weights_only_layers, weights_only_notes
from bncheck.errors import BncheckError, one_line
from bncheck.model import Note

#: Largest uncompressed size accepted for config.json / metadata.json (a big model's config is a few MB).
MAX_JSON_BYTES = 64 * 1024**2
#: Largest uncompressed size accepted for model.weights.h5 (declared or actually read).
MAX_WEIGHTS_BYTES = 16 * 1024**3
#: Members larger than RATIO_FLOOR that inflate more than MAX_RATIO times their stored size are refused as
#: zip bombs. Keras writes members stored (ratio 1) and DEFLATE tops out near 1032:1; Keras's own loader uses
#: the same ratio (keras.src.saving.saving_lib._ZIP_MEMBER_MAX_EXPANSION = 100).
MAX_RATIO = 100
RATIO_FLOOR = 1024**2
#: Links scanned in an HDF5 file before it is refused as unreasonable (a MobileNet's weights hold about 1,000).
MAX_H5_LINKS = 1_000_000


#: Time a static read may take, in seconds: a base plus the file's size at a slow disk's pace.
READ_SECONDS = 20.0
READ_BYTES_PER_SECOND = 25e6


def read(path: str) -> KerasFile:
    """Read ``path`` (.keras or .h5/.hdf5) into a :class:`KerasFile`. Raises BackendError (one line)."""
    if not os.path.exists(path):
        raise BackendError(f"{path}: no such file")
    if os.path.isdir(path):
        raise BackendError(f"{path}: is a directory, not a Keras model file")
    if not hasattr(os, "fork"):
        return _read(path)
    limit = READ_SECONDS + os.path.getsize(path) / READ_BYTES_PER_SECOND
    return _read_in_child(path, limit)


#: the first bytes of an HDF5 file (its superblock at offset 0, as h5py and Keras write it)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: what a .keras file that is an HDF5 file says (tf.keras 2 saved HDF5 where asked, whatever the name)
HDF5_NAMED_KERAS = "an HDF5 file (Keras 2's format) despite its .keras name: read, and loaded for a probe, as one"


def is_hdf5(path: str) -> bool:
    """Whether ``path`` starts with the HDF5 signature (False where it cannot be read: the reader says why)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False


def _read(path: str) -> KerasFile:
    if not path.lower().endswith(".keras"):
        return _read_h5(path)
    if not is_hdf5(path):
        return _read_keras(path)
    found = _read_h5(path)
    found.notes.insert(0, Note("info", HDF5_NAMED_KERAS))
    return found


def _read_in_child(path: str, limit: float) -> KerasFile:
    """:func:`_read` in a forked child, killed after ``limit`` seconds: libhdf5 loops forever in C on some
    damaged files (a corrupt global heap behind a string attribute), where no Python timer can stop it."""
    import pickle
    import selectors
    import signal
    import time
    import warnings

    readable, writable = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ and JAX warn on fork in a threaded process; the child only reads the file and exits
        warnings.simplefilter("ignore")
        pid = os.fork()
    if pid == 0:  # the child: one pickled (ok, value) pair on the pipe, then exit without cleanup
        os.close(readable)
        try:
            try:
                payload = pickle.dumps((True, _read(path)))
            except BaseException as exc:
                try:
                    payload = pickle.dumps((False, exc))
                except Exception:
                    payload = pickle.dumps((False, RuntimeError(one_line(exc))))
            with os.fdopen(writable, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(0)
    os.close(writable)
    chunks: list[bytes] = []
    deadline = time.monotonic() + limit
    with os.fdopen(readable, "rb", buffering=0) as pipe, selectors.DefaultSelector() as selector:
        selector.register(pipe, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise BackendError(
                    f"{path}: reading the file did not finish in {limit:.0f} s (a damaged HDF5 structure "
                    "makes libhdf5 loop); the file is refused"
                )
            chunk = pipe.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    try:
        ok, value = pickle.loads(b"".join(chunks))
    except Exception:
        raise BackendError(f"{path}: reading the file stopped the reading process (a damaged file)") from None
    if not ok:
        raise value
    return value


def _read_keras(path: str) -> KerasFile:
    import h5py

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BackendError(f"{path}: not a .keras file (not a readable zip archive: {exc})") from None
    with zf:
        members = {info.filename: info for info in zf.infolist()}
        for info in members.values():
            _guard_member(path, info)
        if "config.json" not in members:
            raise BackendError(f"{path}: not a .keras file (no config.json in the archive)")
        config = _read_json_member(path, zf, members["config.json"])
        metadata = _read_json_member(path, zf, members["metadata.json"]) if "metadata.json" in members else {}
        version = metadata.get("keras_version") if isinstance(metadata, dict) else None
        weights_info = members.get("model.weights.h5")
        notes: list[Note] = []
        if weights_info is None:
            notes.append(Note("warning", "the archive has no model.weights.h5: parameters are unknown"))
            return build(path, "keras", config, None, version, None, notes)
        with _open_member(path, zf, weights_info) as raw:
            try:
                weights = h5py.File(raw, "r")
            except Exception as exc:  # h5py raises OSError/ValueError on what is not HDF5
                raise BackendError(f"{path}: model.weights.h5 is not a readable HDF5 file ({one_line(exc)})") from None
            with weights:
                try:
                    guard_hdf5(path, weights, "model.weights.h5")
                except BackendError:
                    raise
                except Exception as exc:  # h5py on a damaged link table or object header
                    raise BackendError(f"{path}: damaged model.weights.h5 ({one_line(exc)})") from None
                if has_backslash_paths(weights):
                    notes.append(
                        Note("info", f"{WINDOWS_PATHS}: read, and loaded for a probe, as the paths they spell")
                    )
                    with _with_slash_paths(path, raw) as fixed:
                        return build(path, "keras", config, KerasWeights(fixed), version, None, notes)
                return build(path, "keras", config, KerasWeights(weights), version, None, notes)


@contextlib.contextmanager
def _with_slash_paths(path: str, raw: Any) -> Iterator[Any]:
    """A writable copy of the HDF5 file ``raw`` holds, its Windows names (WINDOWS_PATHS) given the paths they
    spell, open."""
    import shutil

    import h5py

    raw.seek(0)
    with tempfile.TemporaryFile() as copy:
        shutil.copyfileobj(raw, copy)
        with h5py.File(copy, "r+") as h5:
            try:
                as_slash_paths(h5)
            except Exception as exc:  # h5py on names that collide or a damaged group
                raise BackendError(f"{path}: damaged weights file ({one_line(exc)})") from None
            yield h5


def _read_h5(path: str) -> KerasFile:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except Exception as exc:
        raise BackendError(f"{path}: not a readable HDF5 file ({one_line(exc)})") from None
    with handle:
        try:
            guard_hdf5(path, handle)
            raw = handle.attrs.get("model_config")
            if raw is None:
                windows = has_backslash_paths(handle)
                if windows:
                    with open(path, "rb") as source, _with_slash_paths(path, source) as fixed:
                        found = weights_only_layers(fixed)
                else:
                    found = weights_only_layers(handle)
                if found is None:
                    raise BackendError(
                        f"{path}: no model_config in this HDF5 file (a weights-only file?): save the whole model "
                        "with model.save()"
                    )
                layers, others, broken = found
                version = attr_str(handle.attrs.get("keras_version"))
                backend = attr_str(handle.attrs.get("backend"))
                saved = f"saved by keras {version}" if version else "saved by an unknown Keras version"
                notes = [Note("info", saved), *weights_only_notes(len(layers), others)]
                if windows:
                    notes.append(Note("info", f"{WINDOWS_PATHS}: read as the paths they spell"))
                found_file = KerasFile(path, "h5", version, backend, {}, layers, [], notes, weights_only=True)
                found_file.broken_weights = broken
                return found_file
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8")
            if len(raw) > MAX_JSON_BYTES:
                raise BackendError(f"{path}: model_config is larger than {MAX_JSON_BYTES} bytes")
            config = _parse_json(path, "model_config", raw)
            version = attr_str(handle.attrs.get("keras_version"))
            backend = attr_str(handle.attrs.get("backend"))
            group = handle.get("model_weights")
            weights = LegacyWeights(group) if group is not None else None
            notes = [] if weights is not None else [Note("warning", "no model_weights group: parameters are unknown")]
            return build(path, "h5", config, weights, version, backend, notes)
        except BncheckError:
            raise
        except Exception as exc:
            raise BackendError(f"{path}: damaged Keras HDF5 file ({one_line(exc)})") from None


def guard_hdf5(path: str, h5: Any, member: str = "") -> None:
    """Refuse an HDF5 file that would make h5py read other files, before any dataset is read: external links,
    datasets with external storage (raw bytes in another file), virtual datasets (mappings of other files'
    datasets). Keras refuses the same files ("Not allowed: H5 file with external Dataset").

    Every link is inspected without being followed (``getlink=True``); groups reached by hard links are
    scanned once each, so a group linked into itself cannot loop.
    """
    import h5py

    where = f"{path}: {member}" if member else f"{path}:"
    stack, seen, count = [h5["/"]], {h5["/"].id}, 0
    while stack:
        group = stack.pop()
        for name in group:
            count += 1
            if count > MAX_H5_LINKS:
                raise BackendError(f"{where} more than {MAX_H5_LINKS:,} HDF5 links: refusing an unreasonable file")
            link_path = f"{group.name.rstrip('/')}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise BackendError(
                    f"{where} {link_path!r} is an external link to {link.filename!r}: refusing to read other files"
                )
            if not isinstance(link, h5py.HardLink):
                continue  # a soft link names a path inside this file, scanned as itself
            target = group.get(name)
            if isinstance(target, h5py.Dataset):
                if target.external:
                    files = sorted({str(entry[0]) for entry in target.external})
                    raise BackendError(
                        f"{where} dataset {link_path!r} has external storage in {files[0]!r}: "
                        "refusing to read other files"
                    )
                if target.is_virtual:
                    raise BackendError(
                        f"{where} dataset {link_path!r} is a virtual dataset mapping other files: "
                        "refusing to read other files"
                    )
            elif isinstance(target, h5py.Group) and target.id not in seen:
                seen.add(target.id)
                stack.append(target)


def _guard_member(path: str, info: zipfile.ZipInfo) -> None:
    """Refuse members that escape the archive or inflate like a zip bomb, before anything is decompressed.

    Every member is checked for its path and ratio (Keras extracts assets when it loads the file for the
    probe); the absolute size limits apply to the members bncheck reads.
    """
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
        raise BackendError(f"{path}: archive member {info.filename!r} has a path that escapes the archive")
    limit = {"config.json": MAX_JSON_BYTES, "metadata.json": MAX_JSON_BYTES, "model.weights.h5": MAX_WEIGHTS_BYTES}.get(
        name
    )
    if limit is not None and info.file_size > limit:
        raise BackendError(f"{path}: archive member {info.filename!r} declares {info.file_size} bytes (limit {limit})")
    if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise BackendError(
            f"{path}: archive member {info.filename!r} inflates {info.compress_size} bytes to {info.file_size} "
            f"(more than {MAX_RATIO}x): refusing a possible zip bomb"
        )


def _read_json_member(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    try:
        with zf.open(info) as member:
            data = member.read(MAX_JSON_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise BackendError(f"{path}: cannot read {info.filename} from the archive ({one_line(exc)})") from None
    if len(data) > MAX_JSON_BYTES:
        raise BackendError(f"{path}: {info.filename} is larger than {MAX_JSON_BYTES} bytes")
    return _parse_json(path, info.filename, data)


def _parse_json(path: str, what: str, data: str | bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BackendError(f"{path}: {what} is not valid JSON ({one_line(exc)})") from None


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start+size) of a file: a stored zip member, read in place.

    Written by hand because zipfile's own member file re-reads the member from its start on every backward
    seek before Python 3.12, and HDF5 seeks backwards constantly (quadratic on a large weights file).
    """

    def __init__(self, path: str, start: int, size: int) -> None:
        super().__init__()
        self._file = open(path, "rb")
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        self._file.seek(self._start + self._pos)
        data = self._file.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_member(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> io.IOBase:
    """A seekable file object over the member: in place when stored, else inflated into a capped temp file."""
    if info.compress_type == zipfile.ZIP_STORED and info.flag_bits & 0x1 == 0:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise BackendError(f"{path}: damaged zip archive (bad local header for {info.filename})")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.compress_size > os.path.getsize(path):
            raise BackendError(f"{path}: damaged zip archive ({info.filename} runs past the end of the file)")
        return _Window(path, start, info.compress_size)
    tmp = tempfile.TemporaryFile()
    try:
        with zf.open(info) as member:
            copied = 0
            while chunk := member.read(1 << 20):
                copied += len(chunk)
                if copied > MAX_WEIGHTS_BYTES or copied > MAX_RATIO * max(info.compress_size, 1) + RATIO_FLOOR:
                    raise BackendError(
                        f"{path}: {info.filename} inflates past the limits: refusing a possible zip bomb"
                    )
                tmp.write(chunk)
    except BackendError:
        tmp.close()
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        tmp.close()
        raise BackendError(f"{path}: cannot read {info.filename} from the archive ({one_line(exc)})") from None
    tmp.seek(0)
    return tmp
