"""Which onnxruntime execution providers run the probe (``--provider cpu|cuda|tensorrt|auto``).

onnxruntime places every node on the first provider in its list that has a kernel for it, so a GPU list
always ends with the CPU provider: the probe's measuring reductions and any node the GPU provider has no
kernel for run there. A whole session the GPU provider refuses (the CUDA provider rejects training-mode
BatchNormalization at opset >= 14, onnxruntime#16867) is rebuilt on the CPU alone, with a note
(:func:`fallback_note`).
"""

from __future__ import annotations

from bncheck.errors import UsageError

#: --provider choices -> onnxruntime's provider names (``auto``: the first available, in this order)
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
CPU = PROVIDERS["cpu"]
CHOICES = ("cpu", "cuda", "tensorrt", "auto")


def resolve(choice: str, available: list[str] | None = None) -> list[str]:
    """The provider list for a session: the chosen (or, for ``auto``, the best available) provider, then CPU.

    ``available``: onnxruntime.get_available_providers() (asked when None). A provider that this
    onnxruntime build lacks is a usage error naming what it has."""
    if available is None:
        import onnxruntime as ort

        available = list(ort.get_available_providers())
    if choice == "auto":
        best = next((name for name in PROVIDERS.values() if name in available), CPU)
        return [best] if best == CPU else [best, CPU]
    if choice not in PROVIDERS:
        raise UsageError(f"--provider {choice}: not one of {', '.join(CHOICES)}")
    wanted = PROVIDERS[choice]
    if wanted not in available:
        hint = " (install onnxruntime-gpu instead of onnxruntime)" if choice in ("cuda", "tensorrt") else ""
        raise UsageError(
            f"--provider {choice}: this onnxruntime has no {wanted}{hint}; available: {', '.join(available)}"
        )
    return [wanted] if wanted == CPU else [wanted, CPU]


def ran_note(providers: list[str], choice: str) -> str | None:
    """What the report says about the provider that ran; None for the default CPU run."""
    if providers == [CPU] and choice == "cpu":
        return None
    return f"execution provider: {providers[0]} (--provider {choice})"


def fallback_note(provider: str, reason: str) -> str:
    return f"{provider} could not run the instrumented model ({reason}); probed on {CPU} instead"
