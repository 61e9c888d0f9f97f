"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bncheck.backends.onnx.scratch import Scratch


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    """A probe scratch folder (made on first use) for the backend's internals, removed after the test."""
    folder = Scratch(0)
    yield folder
    folder.remove()
