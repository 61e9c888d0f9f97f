"""Other frameworks' files given as models: each named for what it is, with the way to a file bncheck reads, in
one line (exit 2), never "truncated or corrupt". The files are real ones, written by PyTorch, TensorFlow
and onnxruntime (tests/other_formats/make_other_formats.py) and committed."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import bncheck
from bncheck.backends.base import BackendError
from bncheck.cli import main

FILES = Path(__file__).parent / "other_formats"
SAMPLES = Path(__file__).parent.parent / "sample_models"

CASES = [
    ("torch_state_dict.pt", "is a PyTorch file (torch.save)", "torch.onnx.export"),
    ("torch_legacy.pth", "is a Python pickle", "torch.onnx.export"),
    ("torchscript.pt", "is a TorchScript archive", "torch.onnx.export"),
    ("weights.safetensors", "holds safetensors weights", "torch.onnx.export"),
    ("model.tflite", "is a TensorFlow Lite model", "tf2onnx.convert --tflite"),
    ("model.ort", "is an onnxruntime model in its ORT format", "the .onnx file the .ort was converted from"),
    ("saved_model/saved_model.pb", "is the graph of a TensorFlow SavedModel", "--saved-model"),
    ("saved_model/variables/variables.index", "is part of a TensorFlow checkpoint", "model.save('model.keras')"),
    ("tf_checkpoint/ckpt-1.data-00000-of-00001", "is part of a TensorFlow checkpoint", "model.save('model.keras')"),
    ("tf_checkpoint/checkpoint", "is part of a TensorFlow checkpoint", "model.save('model.keras')"),
    ("keras_archive.zip", "is a Keras archive under another suffix", "model.keras"),
]


@pytest.mark.parametrize(("name", "what", "way"), CASES, ids=[c[0] for c in CASES])
def test_another_frameworks_file_is_named_with_the_way_to_a_readable_one(name, what, way):
    path = str(FILES / name)
    with pytest.raises(BackendError) as info:
        bncheck.inspect(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {what}") and way in message and "corrupt" not in message
    result = CliRunner().invoke(main, ["inspect", path])
    assert result.exit_code == 2 and result.stderr.strip() == f"bncheck: error: {message}"


def test_a_keras_hdf5_file_under_another_suffix_is_told_the_suffix_it_needs(tmp_path):
    # checkm2 ships its tf.keras models as .hd5: said to be a Keras model, not only "an HDF5 file"
    path = tmp_path / "model.hd5"
    shutil.copy(SAMPLES / "keras_legacy_convnet.h5", path)
    with pytest.raises(
        BackendError, match=r"model.hd5: is a Keras model saved as HDF5 \(it holds a model_config\) under another "
    ) as info:
        bncheck.inspect(str(path))
    assert str(info.value).endswith("reads it under the suffix .h5 or .hdf5: copy or rename it")
    import h5py

    with h5py.File(tmp_path / "arrays.hd5", "w") as f:  # HDF5 without a model
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(BackendError, match=r"arrays.hd5: is an HDF5 file: bncheck reads a Keras model .* \.h5"):
        bncheck.inspect(str(tmp_path / "arrays.hd5"))


def test_a_pickled_keras_wrapper_is_told_to_save_the_model_it_wraps(tmp_path):
    # emotion-model ships a scikeras KerasClassifier as a .pkl: the torch hint said nothing useful. The pickle's
    # opcodes name its class's module in plain text (written here by hand: nothing is unpickled, here or there)
    path = tmp_path / "classifier.pkl"
    module, name = b"scikeras.wrappers", b"KerasClassifier"
    path.write_bytes(b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name + b"\x93.")
    with pytest.raises(BackendError, match=r"is a Python pickle of a scikeras wrapper.*model_\.save\('model\.keras'\)"):
        bncheck.inspect(str(path))


def test_a_zip_archive_of_no_known_kind_is_named_a_zip_archive_not_a_corrupt_model(tmp_path):
    path = tmp_path / "bundle.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "no model in here")
    with pytest.raises(BackendError, match=r"bundle.bin: is a zip archive holding none of the formats bncheck reads"):
        bncheck.inspect(str(path))


def test_a_zip_archive_holding_a_model_names_the_file_to_extract(tmp_path):
    """sleepecg 0.6.0 ships its classifiers as zips holding classifier.keras beside other files."""
    path = tmp_path / "wrn-gru-mesa.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "a classifier")
        zf.write(SAMPLES / "keras_legacy_convnet.h5", "weights/classifier.h5")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"bncheck: error: {path}: is a zip archive holding 'weights/classifier.h5': extract it and give bncheck "
        "that file"
    )


def test_a_numpy_npz_given_as_the_model_is_named_input_samples_for_data(tmp_path):
    path = tmp_path / "voices.npz"
    np.savez(path, voice=np.zeros((4, 8), np.float32), other=np.ones(3))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"bncheck: error: {path}: is a NumPy .npz archive of arrays, not a model: bncheck reads such a file as "
        "input samples (bncheck probe MODEL --data FILE.npz)"
    )


def test_a_savedmodel_folder_given_to_the_command_is_named_a_savedmodel():
    folder = str(FILES / "saved_model")
    result = CliRunner().invoke(main, ["probe", folder, "--format", "json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["message"].startswith(f"no model files (.onnx, .keras, .h5, .hdf5) in {folder}; {folder} is a ")
    assert "TensorFlow SavedModel" in error["message"] and f"--saved-model {folder}" in error["message"]


def test_a_savedmodel_folder_given_to_the_api_is_named_a_savedmodel():
    folder = str(FILES / "saved_model")
    with pytest.raises(BackendError, match=r"is a TensorFlow SavedModel, which bncheck does not read"):
        bncheck.inspect(folder)


def test_a_folder_of_no_known_kind_keeps_the_plain_message(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"bncheck: error: no model files (.onnx, .keras, .h5, .hdf5) in {tmp_path}"
