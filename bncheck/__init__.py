"""bncheck: diagnose the normalization layers of saved neural networks.

The Python API (the CLI is built on it)::

    import bncheck
    report = bncheck.inspect("model.onnx")
    report = bncheck.probe("model.onnx", batch_sizes=[1, 2, 32], data="calib.npz")
    assert report.exit_code(fail_on="error") == 0, [f.message for f in report.findings]

Kept import-free on purpose: `bncheck --help` must not pull in onnx, onnxruntime or keras, so the functions
below import the engine when called.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from bncheck.report import Report

__version__ = "0.1.0"
__all__ = ["__version__", "fix", "inspect", "probe"]


def inspect(path: str, *, select: Sequence[str] = (), ignore: Sequence[str] = (), fail_on: str = "error") -> Report:
    """Static checks only: load ``path``, walk its normalization layers, report what needs no execution."""
    from bncheck import engine

    return engine.inspect(str(path), select=select, ignore=ignore, fail_on=fail_on)


def probe(
    path: str,
    *,
    batch_sizes: Iterable[int] | None = None,
    data: str | np.ndarray | Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    samples: int = 4,
    select: Sequence[str] = (),
    ignore: Sequence[str] = (),
    fail_on: str = "error",
    all_layers: bool = False,
) -> Report:
    """Static checks plus probe batches. ``batch_sizes``: None probes 1,2,32, or 1,2,B for an ONNX file that
    fixes its batch to B. ``data``: a .npy/.npz path, one array (single-input models) or a mapping of input
    name to array, first axis = samples; None draws seeded synthetic inputs. ``all_layers``: measure every
    normalization layer, also inference-mode ones that no check needs without ``data``."""
    from bncheck import engine
    from bncheck.model import DEFAULT_BATCH_SIZES, ProbeSettings

    settings = ProbeSettings(
        batch_sizes=DEFAULT_BATCH_SIZES if batch_sizes is None else tuple(int(b) for b in batch_sizes),
        default_sizes=batch_sizes is None,
        seed=seed,
        input_shapes={k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()},
        data_path=data if isinstance(data, str) else None,
        data_source=data if isinstance(data, str) else ("in-memory" if data is not None else "synthetic"),
        samples=samples,
        all_layers=all_layers,
    )
    arrays = None if data is None or isinstance(data, str) else data
    return engine.probe(str(path), settings, select=select, ignore=ignore, fail_on=fail_on, arrays=arrays)


def fix(path: str, output: str | None, *, data: str | None = None, **options: Any) -> Report:
    """Write a repaired copy of ``path`` to ``output`` (see `bncheck fix --help` for ``options``)."""
    from bncheck import fixing

    return fixing.fix(str(path), output, data, **options)
