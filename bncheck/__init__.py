"""bncheck: diagnose the normalization layers of saved neural networks.

Kept import-free on purpose: `bncheck --help` must not pull in onnx, onnxruntime or keras.
"""

__version__ = "0.1.0"
