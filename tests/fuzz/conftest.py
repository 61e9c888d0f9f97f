"""Hypothesis profiles of the fuzz suite: ``quick`` (default, CI: deterministic, about a minute on 2 cores)
and ``long`` (``BNCHECK_FUZZ=long``: random, thousands of examples; ``BNCHECK_FUZZ_EXAMPLES`` per test)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
# quick: no explain phase (it re-runs failing examples to annotate them: seconds per example here)
settings.register_profile(
    "quick",
    max_examples=10,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    **_COMMON,
)
settings.register_profile("long", max_examples=int(os.environ.get("BNCHECK_FUZZ_EXAMPLES", "2000")), **_COMMON)
settings.load_profile("long" if os.environ.get("BNCHECK_FUZZ") == "long" else "quick")
