"""The custom-op libraries a model's onnxruntime sessions need: onnxruntime-extensions' kernels for the ops of
its ``ai.onnx.contrib`` domain (tokenizers, audio and image pre-processing), where that package is installed."""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
from typing import Any

#: the domain of onnxruntime-extensions' operators
EXTENSIONS_DOMAIN = "ai.onnx.contrib"

INSTALL_HINT = f"its {EXTENSIONS_DOMAIN} ops need onnxruntime-extensions (pip install onnxruntime-extensions)"


def imports_extensions(model: Any) -> bool:
    """Whether ``model`` (a ModelProto) imports onnxruntime-extensions' domain."""
    return any(entry.domain == EXTENSIONS_DOMAIN for entry in model.opset_import)


def libraries(model: Any) -> tuple[str, ...]:
    """The libraries to register in every session of ``model``: onnxruntime-extensions' where the model imports
    its domain and the package is installed, else none."""
    if not imports_extensions(model):
        return ()
    found = extensions_library()
    return (found,) if found else ()


@functools.lru_cache(maxsize=1)
def extensions_library() -> str | None:
    """The path of onnxruntime-extensions' kernel library, or None when it is not installed. Found beside the
    package's files: its own ``get_library_path`` imports the whole package first (about 0.6 s)."""
    try:
        spec = importlib.util.find_spec("onnxruntime_extensions")
    except (ImportError, ValueError):  # a module entry without a spec, or blocked (None in sys.modules)
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_extensions_pydll" + suffix)
            if os.path.isfile(path):
                return path
    return None


def register(options: Any, found: tuple[str, ...]) -> None:
    """Register ``found`` libraries in onnxruntime SessionOptions ``options``."""
    for path in found:
        options.register_custom_ops_library(path)
