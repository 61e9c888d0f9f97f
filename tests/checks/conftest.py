"""Run the real engine (real ONNX backend, real onnxruntime) and pick one check's findings."""

from __future__ import annotations

import pytest

from bncheck import engine
from bncheck.backends import ProbeSettings


def _inspect(path: str, code: str):
    return [f for f in engine.inspect(path).findings if f.code == code]


def _probe(path: str, code: str, **settings):
    settings.setdefault("batch_sizes", (1, 2, 8))
    report = engine.probe(path, ProbeSettings(**settings))
    return [f for f in report.findings if f.code == code]


@pytest.fixture
def inspect_findings():
    return _inspect


@pytest.fixture
def probe_findings():
    return _probe
