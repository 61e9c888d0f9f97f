"""Write bncheck's Keras sample models: one small .keras/.h5 file per defect plus clean ones.

Every weight of the untrained samples is set from numpy with a fixed seed (not from Keras initializers,
whose random streams differ per backend), and the .keras archives are rewritten without their time stamps
(zip member dates, ``date_saved``) and with Keras's ``shared_object_id`` values (memory addresses) renumbered
in order of appearance, so those files are the same bytes on every run; ``tests/test_keras_probe.py`` checks
that. The untrained samples are built on Keras's numpy backend; the two fitted samples (matching statistics,
drifting statistics) are trained by ``model.fit`` on the jax backend (the numpy backend cannot train), in a
child process: their bytes depend on XLA's float arithmetic, so the tests check what they claim (their
moving statistics against their calibration data), not their bytes.

Run:  python sample_models/make_keras_samples.py [--out DIR] [--only NAME ...]

What each file is and the findings bncheck must produce on it: sample_models/KERAS.md and ``SAMPLES`` below.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

SEED = 20261125
OUT = Path(__file__).resolve().parent

# Calibration data of the two fitted samples: 8 features, each N(FEATURE_MEAN, FEATURE_STD).
FEATURES = 8
FEATURE_MEAN = np.array([3.0, -2.0, 1.5, 4.0, -3.0, 2.0, 0.5, -1.0])
FEATURE_STD = np.array([1.0, 2.0, 0.5, 1.5, 1.0, 0.8, 2.0, 1.2])
CALIB_FILE = "keras_calib.npy"
CALIB_SAMPLES = 256
TRAIN_SAMPLES = 2048
FIT_BATCH = 32
MATCHING_EPOCHS = 12  # 768 updates at momentum 0.99: the moving statistics have converged (0.99**768 ~ 5e-4)
DRIFT_STEPS = 10  # 10 updates at momentum 0.99: moving mean ~10% of the way from 0 to the data's mean


def rng_for(name: str) -> np.random.Generator:
    """One stable stream per sample: adding a sample never changes another sample's bytes."""
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


def set_weights(model, rng: np.random.Generator, *, trained_stats: bool) -> None:
    """Every variable from numpy: kernels He-normal, biases small, BN/LN/GN parameters and, when
    ``trained_stats``, non-default moving statistics (as a trained model would have); else Keras's initial
    values (moving mean 0, variance 1): the never-trained state."""
    import keras

    for layer in _all_layers(model):
        values = []
        for var in layer.weights:
            shape = tuple(var.shape)
            short = var.name.split("/")[-1]
            if short in ("kernel", "depthwise_kernel", "pointwise_kernel"):
                fan_in = int(np.prod(shape[:-1])) if short != "depthwise_kernel" else int(np.prod(shape[:2]))
                values.append(rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape))
            elif short == "bias":
                values.append(rng.normal(0.0, 0.05, shape))
            elif short in ("gamma", "scale"):
                values.append(rng.uniform(0.8, 1.2, shape) if trained_stats else np.ones(shape))
            elif short == "beta":
                values.append(rng.normal(0.0, 0.1, shape) if trained_stats else np.zeros(shape))
            elif short == "moving_mean":
                values.append(rng.normal(0.0, 0.3, shape) if trained_stats else np.zeros(shape))
            elif short == "moving_variance":
                values.append(rng.uniform(0.5, 1.5, shape) if trained_stats else np.ones(shape))
            else:
                values.append(np.asarray(keras.ops.convert_to_numpy(var)))
        if values:
            layer.set_weights([np.asarray(v, dtype=np.float32) for v in values])


def _all_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)
        else:
            yield layer


# --------------------------------------------------------------------------- the samples


def baked_training_1d(rng):
    """seed-000 on 1-D features: the logits come out of a BatchNormalization called with a baked
    training=True. At batch size 1 the batch statistics of one sample give x - mean = 0: every logit equals
    beta (0), whatever the input. model.predict overrides the flag in Keras 3; model(x) does not."""
    import keras
    from keras import layers

    inp = keras.Input((16,), name="features")
    x = layers.Dense(32, activation="relu", name="hidden")(inp)
    x = layers.Dense(10, name="logits_dense")(x)
    out = layers.BatchNormalization(name="logits_bn")(x, training=True)
    model = keras.Model(inp, out, name="classifier")
    set_weights(model, rng, trained_stats=True)
    model.get_layer("logits_bn").set_weights(
        [
            np.ones(10, np.float32),
            np.zeros(10, np.float32),
            rng.normal(0.0, 0.3, 10).astype(np.float32),
            rng.uniform(0.5, 1.5, 10).astype(np.float32),
        ]
    )
    return model


def mobilenetv2_untrained(rng):
    """A never-trained MobileNetV2-style convnet (inverted residual blocks, depthwise convolutions, ReLU6,
    BatchNormalization with keras.applications' momentum 0.999 and epsilon 1e-3), saved straight after
    construction: every moving mean is 0 and every moving variance 1 (the update ops never ran)."""
    import keras
    from keras import layers

    def bn(x, name):
        return layers.BatchNormalization(momentum=0.999, epsilon=1e-3, name=name)(x)

    def block(x, expand, out_channels, stride, index):
        in_channels = x.shape[-1]
        prefix = f"block_{index}_"
        h = layers.Conv2D(in_channels * expand, 1, use_bias=False, name=prefix + "expand")(x)
        h = layers.ReLU(6.0, name=prefix + "expand_relu")(bn(h, prefix + "expand_BN"))
        h = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=prefix + "depthwise")(h)
        h = layers.ReLU(6.0, name=prefix + "depthwise_relu")(bn(h, prefix + "depthwise_BN"))
        h = layers.Conv2D(out_channels, 1, use_bias=False, name=prefix + "project")(h)
        h = bn(h, prefix + "project_BN")
        if stride == 1 and in_channels == out_channels:
            h = layers.Add(name=prefix + "add")([x, h])
        return h

    inp = keras.Input((32, 32, 3), name="image")
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="Conv1")(inp)
    x = layers.ReLU(6.0, name="Conv1_relu")(bn(x, "bn_Conv1"))
    for index, (expand, channels, stride) in enumerate([(1, 8, 1), (4, 12, 2), (4, 12, 1), (4, 16, 2), (4, 16, 1)]):
        x = block(x, expand, channels, stride, index)
    x = layers.Conv2D(64, 1, use_bias=False, name="Conv_1")(x)
    x = layers.ReLU(6.0, name="out_relu")(bn(x, "Conv_1_bn"))
    x = layers.GlobalAveragePooling2D(name="global_average_pooling2d")(x)
    out = layers.Dense(10, name="predictions")(x)
    model = keras.Model(inp, out, name="mobilenetv2_style")
    set_weights(model, rng, trained_stats=False)
    return model


def _mlp(name: str, momentum: float = 0.99):
    import keras
    from keras import layers

    inp = keras.Input((FEATURES,), name="x")
    x = layers.Dense(16, name="dense_1")(inp)
    x = layers.BatchNormalization(momentum=momentum, name="bn_1")(x)
    x = layers.ReLU(name="relu_1")(x)
    x = layers.Dense(16, name="dense_2")(x)
    x = layers.BatchNormalization(momentum=momentum, name="bn_2")(x)
    x = layers.ReLU(name="relu_2")(x)
    out = layers.Dense(1, name="out")(x)
    return keras.Model(inp, out, name=name)


def calibration_data(n: int, rng: np.random.Generator) -> np.ndarray:
    """Samples of the fitted samples' input distribution (float64 draws rounded to float32)."""
    return (FEATURE_MEAN + FEATURE_STD * rng.standard_normal((n, FEATURES))).astype(np.float32)


def _targets(x: np.ndarray) -> np.ndarray:
    z = (x - FEATURE_MEAN) / FEATURE_STD
    return (np.sin(z[:, :1]) + 0.5 * z[:, 1:2] * z[:, 2:3] - 0.3 * z[:, 3:4]).astype(np.float32)


def _fit(name: str, rng: np.random.Generator, *, epochs: int, steps: int | None):
    import keras

    keras.utils.set_random_seed(SEED)
    model = _mlp(name)
    set_weights(model, rng, trained_stats=False)
    x = calibration_data(TRAIN_SAMPLES, rng)
    y = _targets(x)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    if steps is not None:
        x, y = x[: steps * FIT_BATCH], y[: steps * FIT_BATCH]
    model.fit(x, y, batch_size=FIT_BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model


def trained_matching(rng):
    """An MLP fitted long enough (768 updates at the default momentum 0.99) that its moving statistics
    match its data: clean, also when probed with its calibration data (keras_calib.npy)."""
    return _fit("trained_matching", rng, epochs=MATCHING_EPOCHS, steps=None)


def brief_fit_drift(rng):
    """The same MLP fitted for only 10 updates at momentum 0.99: the moving statistics moved ~10% of the way
    from their initial values (not the defaults any more, so no static finding) and disagree with the data:
    drift (BN003 warning) with --data keras_calib.npy."""
    return _fit("brief_fit_drift", rng, epochs=1, steps=DRIFT_STEPS)


def legacy_h5(rng):
    """A small convnet in the legacy HDF5 format: BatchNormalization on conv features, then global average
    pooling to 1x1 maps and a BatchNormalization called with a baked training=True (the seed-000 convnet):
    at batch size 1 its set has one element and it outputs beta."""
    import keras
    from keras import layers

    inp = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = layers.BatchNormalization(name="conv_bn")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    x = layers.BatchNormalization(name="head_bn")(x, training=True)
    x = layers.Flatten(name="flatten")(x)
    out = layers.Dense(4, name="logits")(x)
    model = keras.Model(inp, out, name="legacy_convnet")
    set_weights(model, rng, trained_stats=True)
    return model


def epsilon_tiny(rng):
    """A BatchNormalization with epsilon 1e-8: below the 1.001e-5 that TensorFlow's fused kernel and cuDNN
    silently raise it to, so frameworks disagree on this layer (BN004 warning). Statistics as if trained."""
    import keras
    from keras import layers

    inp = keras.Input((12,), name="x")
    x = layers.Dense(12, name="dense")(inp)
    x = layers.BatchNormalization(epsilon=1e-8, name="bn_eps")(x)
    out = layers.Dense(2, name="out")(x)
    model = keras.Model(inp, out, name="epsilon_tiny")
    set_weights(model, rng, trained_stats=True)
    return model


def nested(rng):
    """Clean normalization layers inside nested models: a Functional block (BatchNormalization with
    scale=False) and a Sequential block (LayerNormalization, GroupNormalization, BatchNormalization), named
    by their path ("encoder/enc_bn", "head/head_bn", ...). Statistics as if trained: no findings."""
    import keras
    from keras import layers

    e_in = keras.Input((8,), name="e_in")
    e = layers.Dense(12, name="enc_dense")(e_in)
    e = layers.BatchNormalization(scale=False, name="enc_bn")(e)
    encoder = keras.Model(e_in, layers.ReLU(name="enc_relu")(e), name="encoder")
    head = keras.Sequential(
        [
            keras.Input((12,)),
            layers.Dense(12, name="head_dense"),
            layers.LayerNormalization(name="head_ln"),
            layers.Reshape((3, 4), name="head_reshape"),
            layers.GroupNormalization(groups=2, name="head_gn"),
            layers.Flatten(name="head_flatten"),
            layers.BatchNormalization(name="head_bn"),
            layers.Dense(3, name="head_out"),
        ],
        name="head",
    )
    inp = keras.Input((8,), name="x")
    x = layers.BatchNormalization(name="input_bn")(inp)
    out = head(encoder(x))
    model = keras.Model(inp, out, name="nested")
    set_weights(model, rng, trained_stats=True)
    return model


#: file -> (builder, fitted, findings expected from `inspect`, from `probe` (both call styles),
#:          from `probe --data keras_calib.npy`)
SAMPLES: dict[str, tuple[Callable, bool, list, list, list | None]] = {
    "keras_baked_training_1d.keras": (
        baked_training_1d,
        False,
        [["BN001", "error", "logits_bn"], ["BN002", "error", "logits_bn"]],
        [["BN001", "error", "logits_bn"], ["BN002", "error", "logits_bn"]],
        None,
    ),
    "keras_mobilenetv2_untrained.keras": (mobilenetv2_untrained, False, "every BN: BN003 error", "same", None),
    "keras_trained_matching.keras": (trained_matching, True, [], [], []),
    "keras_brief_fit_drift.keras": (
        brief_fit_drift,
        True,
        [],
        [],
        [["BN003", "error", "bn_1"], ["BN003", "error", "bn_2"]],
    ),
    "keras_legacy_convnet.h5": (
        legacy_h5,
        False,
        [["BN001", "error", "head_bn"], ["BN002", "error", "head_bn"]],
        [["BN001", "error", "head_bn"], ["BN002", "error", "head_bn"]],
        None,
    ),
    "keras_epsilon_1e-8.keras": (
        epsilon_tiny,
        False,
        [["BN004", "warning", "bn_eps"]],
        [["BN004", "warning", "bn_eps"]],
        None,
    ),
    "keras_nested.keras": (nested, False, [], [], None),
}


# --------------------------------------------------------------------------- deterministic files


def _renumber_shared_ids(text: str) -> str:
    """Keras writes ``shared_object_id`` as the object's memory address: renumber them 1, 2, ... in order of
    appearance (consistently, so the objects Keras shares on load are the same)."""
    mapping: dict[str, str] = {}

    def sub(match: re.Match) -> str:
        old = match.group(1)
        mapping.setdefault(old, str(len(mapping) + 1))
        return f'"shared_object_id": {mapping[old]}'

    return re.sub(r'"shared_object_id": (\d+)', sub, text)


def normalize_keras_archive(path: Path) -> None:
    """Rewrite a .keras zip without time stamps: fixed member dates, ``date_saved`` removed from metadata."""
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info.filename)) for info in zf.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members:
            if name == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta, sort_keys=True).encode()
            elif name == "config.json":
                data = _renumber_shared_ids(data.decode()).encode()
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    path.write_bytes(out.getvalue())


def write(name: str, out_dir: Path) -> Path:
    builder = SAMPLES[name][0]
    model = builder(rng_for(name))
    path = out_dir / name
    model.save(path)
    if path.suffix == ".keras":
        normalize_keras_archive(path)
    return path


def write_calibration(out_dir: Path) -> Path:
    path = out_dir / CALIB_FILE
    np.save(path, calibration_data(CALIB_SAMPLES, rng_for(CALIB_FILE)))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", nargs="*", default=None, help="sample file names (default: all)")
    args = parser.parse_args(argv)
    names = list(args.only if args.only is not None else SAMPLES)
    fitted = [n for n in names if SAMPLES[n][1]]
    untrained = [n for n in names if not SAMPLES[n][1]]
    if fitted and untrained:
        # One backend per process (Keras reads KERAS_BACKEND once, at import): the fitted samples in a child.
        subprocess.run([sys.executable, __file__, "--out", str(args.out), "--only", *fitted], check=True)
        names = untrained
    # Fitting needs jax (Keras's numpy backend does not implement fit); the untrained samples are built with
    # numpy, the fastest to import and build (their .keras bytes are the same under jax; the legacy .h5
    # records the backend). Set before keras is first imported: every builder imports it lazily.
    os.environ["KERAS_BACKEND"] = "jax" if fitted and not untrained else "numpy"
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = write(name, args.out)
        print(f"{path}  {path.stat().st_size} bytes")
    if args.only is None:
        print(write_calibration(args.out))


if __name__ == "__main__":
    main()
