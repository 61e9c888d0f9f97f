"""Keras files edited after saving, shared by the Keras tests (needs keras; KERAS_BACKEND set by the caller)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path


def bn_model_with_config_field(tmp_path: Path, field: str, value: str) -> str:
    """A saved Sequential([Input, BatchNormalization]) whose BN config entry ``field`` is rewritten to
    ``value`` (e.g. a module or registered_name from outside Keras)."""
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="bn")])
    path = tmp_path / "foreign.keras"
    model.save(path)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    config = json.loads(members["config.json"])
    config["config"]["layers"][1][field] = value
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)
