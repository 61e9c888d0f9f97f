"""Write the files of other frameworks that tests/test_other_formats.py gives bncheck: what people pass by mistake.

    /work/venvs/torch/bin/python tests/other_formats/make_other_formats.py torch   # torch and safetensors
    /work/venvs/tf/bin/python tests/other_formats/make_other_formats.py tf         # tensorflow
    python tests/other_formats/make_other_formats.py ort                            # onnxruntime's ORT format

Each framework writes its own files from a tiny model with fixed seeds, into this folder (committed: a few kB
each, so that the tests need neither framework).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def torch_files() -> None:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    torch.save(model.state_dict(), HERE / "torch_state_dict.pt")
    torch.save(model.state_dict(), HERE / "torch_legacy.pth", _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 8, 8)), HERE / "torchscript.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(HERE / "weights.safetensors"))


def tf_files() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 3)),
            tf.keras.layers.Conv2D(4, 3),
            tf.keras.layers.BatchNormalization(),
            tf.keras.layers.GlobalAveragePooling2D(),
        ]
    )
    for folder in ("saved_model", "tf_checkpoint"):
        shutil.rmtree(HERE / folder, ignore_errors=True)
    tf.saved_model.save(model, str(HERE / "saved_model"))
    # ckpt-1.index, ckpt-1.data-00000-of-00001 and the text file "checkpoint" naming the latest
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(HERE / "tf_checkpoint"), 1).save()
    (HERE / "model.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    model.save(HERE / "keras_model.keras")
    os.replace(HERE / "keras_model.keras", HERE / "keras_archive.zip")  # a Keras archive under another suffix


def ort_files() -> None:
    """A sample model converted by onnxruntime's own tool to its ORT format, which onnxruntime runs."""
    import subprocess
    import tempfile

    source = HERE.parent.parent / "sample_models" / "clean_bn_convnet.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(source, Path(tmp) / "model.onnx")
        tool = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", "--output_dir", tmp]
        subprocess.run([*tool, str(Path(tmp) / "model.onnx")], check=True, capture_output=True)
        shutil.copy(Path(tmp) / "model.ort", HERE / "model.ort")


if __name__ == "__main__":
    {"torch": torch_files, "tf": tf_files, "ort": ort_files}[sys.argv[1]]()
