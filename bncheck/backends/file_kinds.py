"""What a file or folder given as a model is, when it is neither ONNX nor a Keras model: the formats people pass
by mistake (PyTorch, TensorFlow, TensorFlow Lite, onnxruntime's ORT format, safetensors), named with the way to
a file bncheck reads.

From names and leading bytes only: nothing is imported or unpickled.
"""

from __future__ import annotations

import os
import re
import zipfile

#: optimize=False: the default (dynamo's rewriter) folds each BatchNorm after a Conv or Linear into it, statistics and all
_TORCH_EXPORT = (
    "export the model to ONNX with torch.onnx.export(model.eval(), (example_input,), 'model.onnx', optimize=False), "
    "which keeps the BatchNorms the default folds into the layers before them (the TorchScript exporter, "
    "dynamo=False, folds them unless do_constant_folding=False)"
)
_KERAS_SAVE = "save the Keras model whole with model.save('model.keras')"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: a TensorFlow checkpoint's files: prefix.index, prefix.data-00000-of-00001, prefix.meta (TF1), and the text
#: file "checkpoint" that names the latest prefix
_CHECKPOINT_PART = re.compile(r".+\.(index|meta|data-\d{5}-of-\d{5})")


def saved_model_folder(path: str) -> str | None:
    """Why ``path``, a folder, is a TensorFlow SavedModel that bncheck does not read; None when it is not one."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("saved_model.pb", "saved_model.pbtxt")):
        return None
    return (
        "is a TensorFlow SavedModel, which bncheck does not read: convert it to ONNX with python -m "
        f"tf2onnx.convert --saved-model {path} --output model.onnx, or {_KERAS_SAVE}"
    )


def describe(path: str, head: bytes) -> str | None:
    """Why the file ``path`` (whose first bytes are ``head``) is no model bncheck reads, naming what it is and
    the way to one it reads; None when it is none of the formats known here."""
    name = os.path.basename(path)
    if head.startswith(b"PK\x03\x04"):
        return _archive(path)
    if head[4:8] == b"TFL3":  # the flatbuffer's file identifier
        return (
            "is a TensorFlow Lite model, which bncheck does not read: convert it to ONNX with python -m "
            f"tf2onnx.convert --tflite {path} --output model.onnx"
        )
    if head[4:8] == b"ORTM":
        return (
            "is an onnxruntime model in its ORT format, which bncheck does not read: give it the .onnx file the "
            ".ort was converted from (python -m onnxruntime.tools.convert_onnx_models_to_ort)"
        )
    if head.startswith(_HDF5_MAGIC):
        if b"model_config" in _leading(path):  # the root's attributes sit in its first object header
            return (
                "is a Keras model saved as HDF5 (it holds a model_config) under another suffix: bncheck, as "
                "Keras does, reads it under the suffix .h5 or .hdf5: copy or rename it"
            )
        return "is an HDF5 file: bncheck reads a Keras model saved as HDF5 under the suffix .h5 or .hdf5"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle's PROTO opcode, protocols 2 to 5
        return _pickle(_leading(path))
    if name in ("saved_model.pb", "saved_model.pbtxt"):
        return (
            "is the graph of a TensorFlow SavedModel, which bncheck does not read: convert its folder to ONNX with "
            f"python -m tf2onnx.convert --saved-model {os.path.dirname(path) or '.'} --output model.onnx, or "
            f"{_KERAS_SAVE}"
        )
    if name == "checkpoint" or _CHECKPOINT_PART.fullmatch(name):
        return (
            "is part of a TensorFlow checkpoint (variables without the model), which bncheck does not read: "
            f"{_KERAS_SAVE}, or convert a SavedModel to ONNX with tf2onnx"
        )
    if _safetensors(path, head):
        return f"holds safetensors weights (tensors without the model's graph), which bncheck does not read: {_TORCH_EXPORT}"
    return None


def _leading(path: str, size: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _pickle(data: bytes) -> str:
    """A pickle named by the modules its first bytes name (a pickle names each class's module in plain text)."""
    if b"scikeras" in data:
        return (
            "is a Python pickle of a scikeras wrapper, which bncheck never unpickles: save the Keras model it "
            "wraps with wrapper.model_.save('model.keras')"
        )
    if b"keras" in data:
        return f"is a Python pickle of a Keras object, which bncheck never unpickles: {_KERAS_SAVE}"
    return (
        "is a Python pickle (torch.save before PyTorch 1.6, joblib, ...), which bncheck does not read and "
        f"never unpickles: {_TORCH_EXPORT}"
    )


def _archive(path: str) -> str:
    """A zip file: PyTorch's (torch.save since 1.6, TorchScript), a Keras archive under another suffix, or other."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return "is a zip archive (damaged), not an ONNX protobuf"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        scripted = any("/code/" in n or n.endswith("/constants.pkl") for n in names)
        kind = "a TorchScript archive (torch.jit.save)" if scripted else "a PyTorch file (torch.save)"
        return f"is {kind}, which bncheck does not read: {_TORCH_EXPORT}"
    if "config.json" in names and "model.weights.h5" in names:
        return "is a Keras archive under another suffix: bncheck reads it as model.keras"
    if names and all(n.endswith(".npy") for n in names):  # numpy.savez's layout: one .npy file an array
        return (
            "is a NumPy .npz archive of arrays, not a model: bncheck reads such a file as input samples "
            "(bncheck probe MODEL --data FILE.npz)"
        )
    models = [n for n in names if n.lower().endswith(_MODEL_SUFFIXES) and not n.endswith("/")]
    if models:  # a model shipped zipped with its other files (sleepecg's classifiers hold a .keras file)
        shown = ", ".join(repr(n) for n in models[:3]) + (f" and {len(models) - 3} more" if len(models) > 3 else "")
        return f"is a zip archive holding {shown}: extract it and give bncheck that file"
    return "is a zip archive holding none of the formats bncheck reads (.onnx, .keras, .h5, .hdf5)"


_MODEL_SUFFIXES = (".onnx", ".keras", ".h5", ".hdf5")


def _safetensors(path: str, head: bytes) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then the JSON header, within the file."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    try:
        return int.from_bytes(head[:8], "little") + 8 <= os.path.getsize(path)
    except OSError:
        return False
