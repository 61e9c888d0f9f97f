"""--provider: onnxruntime execution provider selection, and the fall back to the CPU (no GPU needed)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
from click.testing import CliRunner

from bncheck import engine
from bncheck.backends import ProbeSettings
from bncheck.backends.onnx import OnnxBackend
from bncheck.backends.onnx.providers import CPU, resolve
from bncheck.backends.onnx.run import _Engine
from bncheck.cli import main
from bncheck.errors import UsageError
from tests.builders import bn_model

CUDA, TRT = "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        (["AzureExecutionProvider", CPU], [CPU]),
        ([CUDA, CPU], [CUDA, CPU]),
        ([TRT, CUDA, CPU], [TRT, CPU]),
    ],
)
def test_auto_picks_the_best_available_provider_then_cpu(available, expected):
    assert resolve("auto", available) == expected


def test_auto_on_this_machine_follows_onnxruntimes_list():
    best = next((p for p in (TRT, CUDA) if p in ort.get_available_providers()), CPU)
    assert resolve("auto")[0] == best and resolve("auto")[-1] == CPU


def test_an_explicit_provider_this_onnxruntime_lacks_is_a_usage_error():
    with pytest.raises(UsageError, match="install onnxruntime-gpu.*available: AzureExecutionProvider, CPU"):
        resolve("cuda", ["AzureExecutionProvider", CPU])


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cli_provider_cuda_without_cuda_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["probe", bn_model(tmp_path / "m.onnx"), "--provider", "cuda"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "CUDAExecutionProvider" in line and "available:" in line


def test_probe_with_auto_says_which_provider_ran(tmp_path):
    report = engine.probe(bn_model(tmp_path / "m.onnx"), ProbeSettings(provider="auto"))
    [probe] = report.probes
    assert f"execution provider: {resolve('auto')[0]} (--provider auto)" in probe.notes


def test_default_cpu_probe_adds_no_provider_note(tmp_path):
    [probe] = engine.probe(bn_model(tmp_path / "m.onnx"), ProbeSettings()).probes
    assert not any("execution provider" in note for note in probe.notes)


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA")
@pytest.mark.filterwarnings("ignore:Specified provider")  # onnxruntime's own warning as it drops CUDA
def test_a_provider_onnxruntime_does_not_start_falls_back_to_cpu_with_a_note(tmp_path):
    view = OnnxBackend().load(bn_model(tmp_path / "m.onnx"))
    engine_ = _Engine(view.handle, view.layers, providers=[CUDA, CPU])
    try:
        assert engine_.providers == [CPU]
        assert engine_.session.get_providers() == [CPU]
        assert any(
            note.startswith(f"{CUDA} could not run the instrumented model") and f"probed on {CPU}" in note
            for note in engine_.notes
        )
    finally:
        engine_.close()
