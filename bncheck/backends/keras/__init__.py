"""The Keras backend: `.keras` and legacy `.h5` files.

``load`` is static (bncheck.backends.keras_static: zipfile + json + h5py, no keras import, nothing executed),
so `bncheck inspect` works without the optional extra. ``probe`` imports keras lazily (the ``bncheck[keras]``
extra), refuses files that carry code (Lambda layers, objects from outside Keras) before anything is loaded,
loads with ``safe_mode=True`` only, and runs the shared probe plan through bncheck.backends.keras.probe.
"""

from __future__ import annotations

from bncheck.backends.base import Backend, BackendError, ProbeSettings, sha256_of
from bncheck.backends.keras.archive import KerasFile, read
from bncheck.fix_result import FixOutcome, FixRequest
from bncheck.model import ModelInfo, ModelView, ProbeResult


class KerasBackend(Backend):
    """Keras 3 ``.keras`` archives and legacy (Keras 2/tf_keras or Keras 3) ``.h5``/``.hdf5`` files."""

    format = "keras"

    def load(self, path: str, *, weights: bool = True) -> ModelView:
        """Read the file statically; ``view.handle`` is the :class:`KerasFile` (config, unsafe list)."""
        static = read(path)
        try:
            sha = sha256_of(path)
        except OSError as exc:
            raise BackendError(f"{path}: cannot read ({exc.strerror or exc})") from None
        info = ModelInfo(
            path=path,
            format=static.format,
            sha256=sha,
            producer="keras",
            framework_version=static.keras_version,
        )
        return ModelView(
            info=info,
            layers=static.layers,
            inputs=static.inputs,
            notes=static.notes,
            handle=static,
            broken_weights=static.broken_weights,
        )

    def probe(self, view: ModelView, settings: ProbeSettings) -> list[ProbeResult]:
        """One ProbeResult per call style: "as-written" and "predict" when a training flag is baked, else
        "predict" only. Raises BackendError when keras is missing or the file carries code."""
        static = view.handle
        if not isinstance(static, KerasFile):
            raise BackendError(f"{view.info.path}: not loaded by the Keras backend")
        from bncheck.backends.keras.probe import probe_keras

        return probe_keras(view, static, settings)

    def check_fix(self, view: ModelView, request: FixRequest) -> None:
        from bncheck.backends.keras.fix import check_keras_fix

        check_keras_fix(view, self._static(view), request)

    def fix(self, view: ModelView, request: FixRequest) -> FixOutcome:
        """Needs keras (the optional extra): missing, a BackendError with the install hint (exit 2)."""
        from bncheck.backends.keras.fix import fix_keras

        return fix_keras(view, self._static(view), request)

    def import_modules(self, command: str) -> None:
        if command != "inspect":
            from bncheck.backends.keras.probe import import_keras

            import_keras("")

    @staticmethod
    def _static(view: ModelView) -> KerasFile:
        if not isinstance(view.handle, KerasFile):
            raise BackendError(f"{view.info.path}: not loaded by the Keras backend")
        return view.handle
