"""A predict-style batch that Keras would likely not hold in memory runs as several smaller batches.

The memory check before the probe keeps the lower bound (memory.lower_bound), so as never to refuse a batch
that fits, but Keras's numpy backend holds up to about :data:`memory.HELD_FACTOR` times it on large
convolutions, and a default probe of a model whose samples take gigabytes (batch 32) grew until the watchdog
stopped it. In the predict style every layer normalizes each sample with its stored statistics, so a batch
run as pieces gives each sample the same outputs and each layer the same per-sample statistics
(probe_plan.merge_stats appends samples): the pieces are that batch's run, made in smaller steps. The
as-written style (a baked ``training=True`` normalizes over the batch) is never split.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bncheck.backends.keras import memory
from bncheck.model import InputSpec, LayerProbe
from bncheck.probe_plan import Observed, Runner, merge_stats

#: (batch size) -> why a whole batch of that size would likely not fit, or None where it would
Likely = Callable[[int], "str | None"]


#: the fewest samples a piece holds: a sample needs a companion for the batch-dependence test to test anything
MIN_PIECE = 2


def piece_sizes(batch: int, likely: Likely) -> tuple[list[int], str | None]:
    """The sizes of the pieces a batch of ``batch`` samples runs as, in order, and why ([batch] and None: whole).
    As few pieces as hold at most the largest size that would likely fit (a lower bound grows with the batch:
    bisection), their sizes evened out (within one sample) and never under :data:`MIN_PIECE`; pieces of
    about :data:`MIN_PIECE` where no smaller size would fit either (the watchdog still stops a run that grows
    past the budget)."""
    why = likely(batch) if batch > MIN_PIECE else None
    if why is None:
        return [batch], None
    low, high = MIN_PIECE, batch - 1  # the largest size in [MIN_PIECE, high] that fits, MIN_PIECE when none does
    while low < high:
        middle = (low + high + 1) // 2
        if likely(middle) is None:
            low = middle
        else:
            high = middle - 1
    count = max(1, min(math.ceil(batch / low), batch // MIN_PIECE))
    if count == 1:
        return [batch], None
    bounds = [i * batch // count for i in range(count + 1)]
    return [b - a for a, b in itertools.pairwise(bounds)], why


def _batch(feeds: Mapping[str, np.ndarray]) -> int:
    arrays = list(feeds.values())
    return int(arrays[0].shape[0]) if arrays and np.ndim(arrays[0]) else 1


def _joined(parts: list[Observed], sizes: list[int], batch: int) -> Observed | None:
    """One batch's Observed from its pieces', or None where an output does not hold the samples on its first
    axis (nothing to append them along)."""
    outputs: dict[str, np.ndarray] = {}
    for name in parts[0].outputs:
        arrays = [part.outputs.get(name) for part in parts]
        if any(a is None or np.ndim(a) == 0 or a.shape[0] != n for a, n in zip(arrays, sizes)):
            return None
        outputs[name] = np.concatenate(arrays, axis=0)  # type: ignore[arg-type]
    layers: dict[str, LayerProbe] = {}
    for name, first in parts[0].layers.items():
        inputs = [part.layers[name].input for part in parts]
        outs = [part.layers[name].output for part in parts]
        layers[name] = LayerProbe(
            layer=first.layer,
            batch_size=batch,
            input=None if any(s is None for s in inputs) else merge_stats(inputs),  # type: ignore[arg-type]
            output=None if any(s is None for s in outs) else merge_stats(outs),  # type: ignore[arg-type]
        )
    return Observed(layers, outputs)


def split_runner(whole: Runner, likely: Likely, notes: list[str]) -> Runner:
    """``whole`` (a predict-style runner), with each batch ``likely`` to exceed the budget run as pieces; the
    first such batch of each size adds a note to ``notes``."""
    planned: dict[int, list[int]] = {}

    def run(
        feeds: dict[str, np.ndarray], layers: bool = True, *, inputs_only: bool = False
    ) -> Observed | dict[str, LayerProbe]:
        batch = _batch(feeds)
        if batch not in planned:
            planned[batch], why = piece_sizes(batch, likely)
            if why is not None:
                sizes = planned[batch]
                span = f"{min(sizes)}-{max(sizes)}" if min(sizes) != max(sizes) else str(sizes[0])
                notes.append(
                    f"batch size {batch} ran as {len(sizes)} batches of {span} samples: {why}. The predict "
                    "style normalizes each sample alone, so the statistics are the same; the batch-dependence "
                    "test's companions were those of each smaller batch"
                )
        sizes = planned[batch]
        if len(sizes) == 1:
            return whole(feeds, layers, inputs_only=inputs_only)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]

        def piece(i: int) -> Observed:
            got = whole(
                {k: v[starts[i] : starts[i] + sizes[i]] for k, v in feeds.items()}, layers, inputs_only=inputs_only
            )
            assert isinstance(got, Observed)  # the Keras runner always gives the outputs with the statistics
            return got

        parts = [piece(i) for i in range(len(sizes))]
        # a piece whose outputs held NaN/Inf made the runner measure every layer from then on: the pieces
        # before it run again, so that every piece reports the same layers
        parts = [part if part.layers.keys() == parts[-1].layers.keys() else piece(i) for i, part in enumerate(parts)]
        joined = _joined(parts, sizes, batch)
        return joined if joined is not None else whole(feeds, layers, inputs_only=inputs_only)

    return run


def likely_over(
    model: Any,
    inputs: list[InputSpec],
    overrides: Mapping[str, tuple[int, ...]] | None,
    data: Mapping[str, Any] | None,
    calls: memory.Calls | None,
) -> Likely:
    """:data:`Likely` for ``model`` fed as the probe feeds ``inputs`` (memory.likely_over_budget of its lower
    bound; ``calls``: memory.sample_calls where the inputs leave dims open)."""

    def likely(batch: int) -> str | None:
        need, _ = memory.lower_bound(model, memory.fed_bytes(inputs, batch, overrides, data), batch, calls)
        return memory.likely_over_budget(need, batch)

    return likely
