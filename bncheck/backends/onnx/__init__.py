"""The ONNX backend: safe loading (onnx_load), the static walk (onnx_walk), the probe (onnx_probe)."""

from __future__ import annotations

from bncheck.backends.base import Backend, ProbeSettings
from bncheck.fix_result import FixOutcome, FixRequest
from bncheck.model import InputSpec, ModelView, ProbeResult

#: `fix` keeps a model of up to this size loaded through its probe; larger ones are re-read from the file.
KEEP_WEIGHTS_BYTES = 1 << 30


class OnnxBackend(Backend):
    """ONNX files: read without executing anything; probes run in onnxruntime (see onnx_probe)."""

    format = "onnx"

    def load(self, path: str) -> ModelView:
        from bncheck.backends.onnx.load import load_onnx
        from bncheck.backends.onnx.walk import walk_all

        handle = load_onnx(path)
        layers, walk_notes, batch_ops = walk_all(handle)
        assert handle.info is not None  # load_onnx always sets it
        return ModelView(
            info=handle.info,
            layers=layers,
            inputs=graph_inputs(handle),
            notes=list(handle.notes) + walk_notes,
            handle=handle,
            batch_ops=batch_ops,
        )

    def probe(self, view: ModelView, settings: ProbeSettings) -> list[ProbeResult]:
        from bncheck.backends.onnx.run import run_probe

        return [run_probe(view, settings, release_weights=not view.handle.keep_weights)]

    def check_fix(self, view: ModelView, request: FixRequest) -> None:
        from bncheck.backends.onnx.fix import precheck

        precheck(view, request)
        # fix probes the original, then edits the same loaded model: keep its weights through the probe (one
        # read of the file) unless holding them twice would cost too much memory
        view.handle.keep_weights = view.handle.size_bytes <= KEEP_WEIGHTS_BYTES

    def fix(self, view: ModelView, request: FixRequest) -> FixOutcome:
        from bncheck.backends.onnx.fix import fix_onnx

        return fix_onnx(view, request)

    def input_files(self, path: str) -> list[str]:
        from bncheck.backends.onnx.load import input_files

        return input_files(path)


def graph_inputs(handle) -> list[InputSpec]:
    """The graph inputs the probe feeds per sample: declared inputs that are neither initializers nor
    only a norm's parameters."""
    from onnx import helper

    from bncheck.backends.onnx.probe_copy import parameter_inputs

    graph = handle.model.graph
    stored = {init.name for init in graph.initializer}
    stored |= set(parameter_inputs(graph))  # fed as fixed tensors by the probe, not batched (probe_copy)
    specs = []
    for value in graph.input:
        if value.name in stored:
            continue
        elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
        try:
            dtype = helper.tensor_dtype_to_np_dtype(elem).name if elem else "unknown"
        except (KeyError, ValueError, TypeError):
            dtype = "unknown"
        specs.append(InputSpec(name=value.name, shape=handle.value_shapes.get(value.name), dtype=dtype))
    return specs
