"""The numpy reference statistics and the probe plan (bncheck.probe_plan), framework-free."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from bncheck.model import LayerProbe, TensorStats, median
from bncheck.probe_data import ProbeDataError
from bncheck.probe_plan import (
    OUTPUT_ELEMENTS,
    _changes,
    _dependences,
    _finite_mean,
    _side_rows,
    _thin,
    compare_outputs,
    in_background,
    make_plan,
    merge_stats,
    per_sample_dims,
    scores_over_last_axis,
    tensor_stats,
)


def test_tensor_stats_matches_direct_numpy_for_nchw():
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 3, 5, 6)).astype(np.float32)
    x[1, 2, 0, :3] = 0.0
    s = tensor_stats(x, channel_axis=1, batch_axis=0)
    wide = x.astype(np.float64)
    np.testing.assert_allclose(s.sample_mean, wide.mean(axis=(2, 3)))
    np.testing.assert_allclose(s.sample_sq, (wide**2).mean(axis=(2, 3)))
    np.testing.assert_allclose(s.mean, wide.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(s.var, wide.var(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_array_equal(s.min, wide.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(s.max, wide.max(axis=(0, 2, 3)))
    assert s.zeros.tolist() == [0, 0, 3] and s.count == 4 * 30 and s.batch_size == 4


def test_tensor_stats_handles_channel_last_and_missing_axes():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    last = tensor_stats(x, channel_axis=-1, batch_axis=0)
    np.testing.assert_allclose(last.sample_mean, x.mean(axis=1))
    whole = tensor_stats(x, channel_axis=None, batch_axis=None)
    assert whole.sample_mean.shape == (1, 1) and whole.sample_mean[0, 0] == x.mean()
    per_sample = tensor_stats(x, channel_axis=None, batch_axis=0)
    np.testing.assert_allclose(per_sample.sample_mean[:, 0], x.reshape(2, -1).mean(axis=1))


def test_tensor_stats_of_one_value_per_sample_and_channel_are_those_values():
    """[N, C] (BatchNorm1d): each sample's mean is its value, bit for bit (a -0.0 mean as numpy's 0.0), and the
    extremes and counts are each column's, NaN ignored, Inf counted."""
    x = np.random.default_rng(3).normal(0.0, 2.0, (6, 5)).astype(np.float32)
    x[0, 0], x[1, 1], x[:, 2], x[2, 3], x[3, 3] = np.nan, np.inf, np.nan, -0.0, 0.0
    s = tensor_stats(x, channel_axis=1, batch_axis=0)
    wide = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        expected_sq = wide * wide
    assert np.array_equal(s.sample_mean, wide, equal_nan=True) and not np.signbit(s.sample_mean[2, 3])
    assert np.array_equal(s.sample_sq, expected_sq, equal_nan=True)
    with pytest.warns(RuntimeWarning, match="All-NaN slice"):  # column 2, numpy's warning, not the probe's
        low, high = np.nanmin(wide, axis=0), np.nanmax(wide, axis=0)
    assert np.array_equal(s.min, low, equal_nan=True) and np.array_equal(s.max, high, equal_nan=True)
    assert s.zeros.tolist() == [0, 0, 0, 2, 0] and s.nonfinite.tolist() == [1, 1, 6, 0, 0]
    assert s.count == 6 and s.batch_size == 6


def test_tensor_stats_counts_nonfinite_and_ignores_nan_in_extremes():
    x = np.ones((2, 2, 3), np.float32)
    x[0, 0, 0] = np.nan
    x[1, 1, 2] = np.inf
    s = tensor_stats(x, 1, 0)
    assert s.nonfinite.tolist() == [1, 1]
    assert s.min.tolist() == [1.0, 1.0] and s.max.tolist() == [1.0, np.inf]
    assert np.isnan(s.sample_mean[0, 0]) and np.isinf(s.sample_mean[1, 1])


def test_tensor_stats_extremes_and_counts_of_channels_last_maps_are_each_channels():
    """Channels-last maps (a Keras conv's [N, H, W, C]) and channels-first ones ([N, C, H, W]): min and max
    ignore NaN (NaN only for an all-NaN channel), zeros and NaN/Inf counted per channel, as numpy's
    reductions of each channel's values give them."""
    rng = np.random.default_rng(5)
    x = rng.normal(0.0, 1.0, (8, 31, 32, 8)).astype(np.float32)
    x[..., 1] = np.maximum(x[..., 1], 0.0)
    x[3, 4, 5, 2], x[7, 30, 31, 2], x[..., 4] = np.inf, -np.inf, np.nan
    x[0, ::3, ::2, 6] = np.nan
    x[5, 1, :, 7] = 9.0
    for laid, axis in ((x, 3), (np.ascontiguousarray(np.moveaxis(x, 3, 1)), 1)):
        s = tensor_stats(laid, channel_axis=axis, batch_axis=0)
        per_channel = np.moveaxis(laid, axis, 0).reshape(8, -1).astype(np.float64)
        with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning, match="All-NaN slice"):
            low, high = np.nanmin(per_channel, axis=1), np.nanmax(per_channel, axis=1)
        assert np.array_equal(s.min, low, equal_nan=True) and np.array_equal(s.max, high, equal_nan=True)
        assert s.zeros.tolist() == (per_channel == 0).sum(axis=1).tolist()
        assert s.nonfinite.tolist() == (~np.isfinite(per_channel)).sum(axis=1).tolist()
        assert s.max[7] == 9.0 and s.nonfinite[2] == 2 and s.nonfinite[4] == 8 * 31 * 32 and s.zeros[1] > 0


def test_merge_stats_equals_stats_of_the_concatenation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 4, 5)).astype(np.float32), rng.normal(size=(2, 4, 5)).astype(np.float32)
    merged = merge_stats([tensor_stats(a, 1), tensor_stats(b, 1)])
    whole = tensor_stats(np.concatenate([a, b]), 1)
    for field in ("sample_mean", "sample_sq", "min", "max", "zeros", "nonfinite"):
        np.testing.assert_allclose(getattr(merged, field), getattr(whole, field))
    assert merged.count == whole.count and merged.batch_size == 5


def test_merge_stats_keeps_what_was_not_measured():
    from dataclasses import replace

    x = tensor_stats(np.ones((2, 3, 4), np.float32), 1)
    unmeasured = replace(
        x, min=np.full(3, np.nan), max=np.full(3, np.nan), minmax_measured=False, zeros_exact=False, derived=True
    )
    merged = merge_stats([x, unmeasured])
    assert not merged.minmax_measured and not merged.zeros_exact and merged.derived
    assert merge_stats([x, x]).minmax_measured and merge_stats([x, x]).zeros_exact


def test_plan_for_1_2_32_uses_seven_runs_and_forty_samples():
    plan = make_plan((1, 2, 32), 4, None, False)
    assert len(plan.runs) == 7
    assert sum(len(r) for r in plan.runs) == 40
    assert plan.probe_runs[1] == (0,) and plan.probe_runs[32] == tuple(range(32))
    assert plan.group_runs[2] == ((0, 1), (2, 3))
    assert plan.solo_runs == ((0,), (1,), (2,), (3,))


def test_plan_for_1_2_makes_plain_inferences_runs_only():
    plan = make_plan((1, 2), 4, None, False)
    assert plan.samples == 1
    assert plan.runs == ((0,), (0, 1))  # plain inference at 1 and 2: the same 3 samples
    assert plan.solo_runs == ((0,),) and plan.group_runs[2] == ((0, 1),)


def test_plan_takes_at_most_half_the_largest_batch_in_probe_samples():
    assert make_plan((1, 2, 8), 4, None, False).samples == 4
    assert make_plan((1, 2, 4), 4, None, False).samples == 2
    assert make_plan((1, 2, 32), 6, None, False).samples == 6


def test_plan_puts_every_probe_sample_in_a_batch_of_every_size():
    plan = make_plan((1, 3, 8), 5, None, False)
    for size, runs in plan.group_runs.items():
        assert all(len(r) == size for r in runs)
        assert set(range(5)) <= {i for r in runs for i in r}


def test_plan_with_data_wraps_small_data_and_covers_every_sample_once():
    plan = make_plan((1, 2, 8), 4, 3, True)
    assert plan.samples == 3  # the data's 3, not the 4 asked for
    assert plan.probe_runs[8] == (0, 1, 2, 0, 1, 2, 0, 1)
    assert sorted(i for r in plan.data_runs for i in r) == [0, 1, 2]


def test_plan_without_a_batch_size_above_one_has_no_dependence_runs():
    plan = make_plan((1,), 4, None, False)
    assert plan.runs == ((0,),) and plan.solo_runs == ()


def test_take_returns_the_rows_and_slices_consecutive_rows_without_copying():
    from bncheck.probe_plan import _take

    pool = {"x": np.arange(5 * 3, dtype=np.float32).reshape(5, 3)}
    for rows in ((1, 2, 3), (4, 0), (2,)):
        np.testing.assert_array_equal(_take(pool, rows)["x"], pool["x"][list(rows)])
        assert _take(pool, rows)["x"].flags["C_CONTIGUOUS"]
    assert np.shares_memory(_take(pool, (1, 2, 3))["x"], pool["x"])
    assert not np.shares_memory(_take(pool, (4, 0))["x"], pool["x"])


def test_median_equals_numpys_and_is_nan_for_nan_or_nothing():
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 10, 11):
        values = rng.standard_normal(size)
        assert median(values) == float(np.median(values))
    assert median(np.array([[4.0, np.inf], [1.0, 2.0]])) == float(np.median([4.0, np.inf, 1.0, 2.0]))
    assert math.isnan(median(np.array([1.0, np.nan, 2.0])))
    assert math.isnan(median(np.array([])))


def test_output_scale_is_the_root_mean_per_position_variance_and_leaves_nan_positions_out():
    from bncheck.probe_plan import output_scale

    rows = np.random.default_rng(4).standard_normal((6, 50)).astype(np.float32)
    want = math.sqrt(float(np.mean(np.var(rows.astype(np.float64), axis=0))))
    assert output_scale(rows) == pytest.approx(want, rel=1e-12)
    holed = rows.copy()
    holed[:, 7] = np.nan  # a position without a number in any sample: no spread from it
    kept = np.delete(rows.astype(np.float64), 7, axis=1)
    assert output_scale(holed) == pytest.approx(math.sqrt(float(np.mean(np.var(kept, axis=0)))), rel=1e-12)


def test_output_scale_and_sample_shifts_over_several_blocks_equal_the_whole_array_formulas():
    from bncheck.probe_plan import _BLOCK_ELEMENTS, SCALE_FLOOR, output_scale, sample_shifts

    rng = np.random.default_rng(5)
    width = _BLOCK_ELEMENTS + 12_345  # two blocks for three rows, the second a partial one
    rows = (rng.standard_normal((3, width)) * 2.0 + 5.0).astype(np.float32)
    whole = rows.astype(np.float64)
    want = math.sqrt(float(np.mean(np.var(whole, axis=0))))
    assert output_scale(rows) == pytest.approx(want, rel=1e-12)
    assert output_scale(np.full((3, width), 7.0, np.float32)) == pytest.approx(SCALE_FLOOR * 7.0, rel=1e-12)
    holed = rows.copy()
    holed[:, -1] = np.nan  # in the last block: the masked form takes over for the whole output
    kept = np.delete(whole, -1, axis=1)
    assert output_scale(holed) == pytest.approx(math.sqrt(float(np.mean(np.var(kept, axis=0)))), rel=1e-12)

    other = rows + rng.standard_normal(rows.shape).astype(np.float32) * 0.1
    other[2, -1] = np.inf  # a non-finite element where the reference has a number: that sample is inf
    diff = (other.astype(np.float64) - whole) / 0.5
    shifts = sample_shifts(rows, other, 0.5)
    assert shifts[:2] == pytest.approx(np.sqrt(np.mean(diff[:2] ** 2, axis=1)), rel=1e-12)
    assert shifts[2] == math.inf


def test_in_background_returns_the_workers_result_and_raises_its_error_in_the_caller():
    worker_threads: list[str] = []

    def work() -> int:
        worker_threads.append(threading.current_thread().name)
        return 42

    assert in_background(work)() == 42
    assert worker_threads == ["bncheck-draw"]

    def fail() -> int:
        raise ProbeDataError("no size for 'h'")

    result = in_background(fail)
    with pytest.raises(ProbeDataError, match="no size for 'h'"):
        result()


def _layer_stats(rng: np.random.Generator, run: tuple[int, ...], channels: int, bad: bool) -> TensorStats:
    """Per-sample rows that depend on the sample and a little on its companions; ``bad`` puts a NaN in the
    first sample's first channel whenever it has companions (a dependence the test must call infinite)."""
    base = np.array([[np.sin(i + c) for c in range(channels)] for i in run])
    mean = base + 0.01 * len(run) + rng.normal(0.0, 1e-3, base.shape)
    sq = mean * mean + 1.0
    if bad and len(run) > 1:
        mean[run.index(0) if 0 in run else 0, 0] = np.nan
    nan = np.full(channels, np.nan)
    zeros = np.zeros(channels, np.int64)
    return TensorStats(
        len(run), len(run) * 4, mean, sq, nan, nan, zeros, zeros, zeros_exact=False, minmax_measured=False
    )


def test_layers_compared_side_by_side_give_each_layers_own_batch_dependence():
    """_dependences computes the layers of one layout on a shared channel axis: each layer's changes and worst
    batch size are those it gets compared alone (widths 1 to 7, a NaN only with companions, a layer lacking
    its group rows)."""
    plan = make_plan((1, 2, 32), 4, None, False)
    rng = np.random.default_rng(0)
    widths = {"a": 3, "b": 1, "c": 7, "nan": 2, "rowless": 5}
    results: dict[tuple[int, ...], dict[str, LayerProbe]] = {}
    for run in plan.runs:
        results[run] = {}
        for name, width in widths.items():
            if name == "rowless" and len(run) > 1:
                continue
            stats = _layer_stats(rng, run, width, bad=name == "nan")
            results[run][name] = LayerProbe(name, len(run), stats, _layer_stats(rng, run, width, bad=False))
    together = _dependences(plan, results, list(widths))
    assert list(together) == list(widths)
    assert math.isinf(together["nan"].input_change) and math.isnan(together["rowless"].input_change)
    for name in widths:
        alone = {}
        for side in ("input", "output"):
            rows = _side_rows(plan, results, name, side)
            alone[side] = _changes([rows])[0] if rows is not None else (math.nan, None)
        got = together[name]
        for change, (expected, _) in ((got.input_change, alone["input"]), (got.output_change, alone["output"])):
            # float64 rounding apart: numpy sums a lone column pairwise and columns side by side row by row
            assert math.isclose(change, expected, rel_tol=1e-12) or (math.isnan(change) and math.isnan(expected))
        assert got.worst_batch_size == alone["output"][1]
    assert 0 < together["a"].output_change < math.inf and together["a"].worst_batch_size in (2, 32)


def test_layers_computed_in_blocks_give_the_changes_of_one_block():
    """Wide layers are compared a block of channels at a time (CHANGE_ELEMENTS): each layer's changes and worst
    batch size are those of all the layers side by side, for every block size down to a layer a block."""
    plan = make_plan((1, 2, 32), 4, None, False)
    rng = np.random.default_rng(1)
    widths = {"a": 3, "b": 6, "c": 7, "nan": 2, "d": 5}
    results: dict[tuple[int, ...], dict[str, LayerProbe]] = {}
    for run in plan.runs:
        results[run] = {
            name: LayerProbe(
                name, len(run), _layer_stats(rng, run, width, bad=name == "nan"), _layer_stats(rng, run, width, False)
            )
            for name, width in widths.items()
        }
    whole = _dependences(plan, results, list(widths), elements=10**9)
    rows = sum(len(run) for run in plan.runs)
    for elements in (1, 7 * rows, 12 * rows):
        assert _dependences(plan, results, list(widths), elements=elements) == whole
    assert math.isinf(whole["nan"].input_change) and 0 < whole["a"].output_change < math.inf


def test_finite_mean_is_nanmean_over_the_finite_values():
    rng = np.random.default_rng(2)
    rows = rng.normal(0.0, 1e3, (40, 9))
    assert np.array_equal(_finite_mean(rows), np.nanmean(rows, axis=0))  # bit for bit where all are finite
    rows[3, 1], rows[5, 2], rows[:, 4] = np.nan, np.inf, np.nan
    with pytest.warns(RuntimeWarning, match="Mean of empty slice"):  # numpy's, for the all-NaN column
        expected = np.nanmean(np.where(np.isfinite(rows), rows, np.nan), axis=0)
    got = _finite_mean(rows)  # without that warning
    assert np.array_equal(got, expected, equal_nan=True) and np.isnan(got[4]) and np.isfinite(got[2])


def test_top1_agreement_is_quoted_for_class_scores_and_not_for_a_mask_or_ids():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((8, 5)).astype(np.float32)
    moved = scores.copy()
    moved[:2] = moved[:2, ::-1]  # two samples' arg-max changes
    assert scores_over_last_axis(scores, ("batch", 5)[1:]) and scores_over_last_axis(scores, None)
    comparison = compare_outputs("logits", scores, moved, 1.0, classes=True)
    assert comparison.agreement == pytest.approx(float(np.mean(scores.argmax(1) == moved.argmax(1))))
    assert comparison.positions == 1 and "top1_positions" not in comparison.numbers()
    mask = rng.random((8, 16)) > 0.5
    ids = rng.integers(0, 100, (8, 16))
    assert not scores_over_last_axis(mask, (16,)) and not scores_over_last_axis(ids, (16,))
    assert compare_outputs("mask", mask, ~mask, 1.0).agreement is None
    assert compare_outputs("ids", ids, ids + 1, 1.0).agreement is None


def test_an_l2_normalized_embedding_is_not_class_scores():
    # efficientword-net's 2048-d embedding, compared by cosine: "top-1 agrees on 0%" of its arg-max meant nothing
    rng = np.random.default_rng(1)
    embedding = rng.standard_normal((8, 64)).astype(np.float32)
    assert scores_over_last_axis(embedding, (64,))  # as logits
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
    assert not scores_over_last_axis(embedding, (64,))
    assert not scores_over_last_axis(embedding.astype(np.float16), (64,))


def test_a_logit_per_sequence_position_is_not_class_scores():
    # [batch, seq]: one sigmoid logit per position; an arg-max over the positions would mean nothing
    presence = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    assert not scores_over_last_axis(presence, per_sample_dims(("batch", "seq"), presence.shape))
    assert not scores_over_last_axis(presence, per_sample_dims((1, "seqlen"), (1, 64)))
    assert scores_over_last_axis(presence, per_sample_dims(("batch", 64), presence.shape))  # a fixed class axis


def test_a_sequence_of_class_scores_agrees_per_position():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 10, 6)).astype(np.float32)
    moved = logits.copy()
    moved[0, :3] = moved[0, :3, ::-1]  # three positions of one sample change their arg-max
    assert scores_over_last_axis(logits, per_sample_dims(("batch", "seq_len", 6), logits.shape))
    comparison = compare_outputs("logits", logits, moved, 1.0, classes=True)
    expected = float(np.mean(logits.argmax(2) == moved.argmax(2)))
    assert comparison.agreement == pytest.approx(expected) and expected < 1.0
    assert comparison.positions == 10 and comparison.numbers()["top1_positions"] == 10
    # a CTC head [T, batch, classes] kept samples first: its time axis is the positions
    assert per_sample_dims((10, "batch", 6), logits.shape) == (10, 6)


def test_independent_scores_and_fixed_grids_have_no_top1_but_softmax_rows_and_sequence_logits_do():
    rng = np.random.default_rng(4)
    sigmoid = (1 / (1 + np.exp(-rng.standard_normal((4, 172, 88))))).astype(np.float32)
    softmax = np.exp(rng.standard_normal((4, 172, 88)))
    softmax /= softmax.sum(-1, keepdims=True)
    grid = per_sample_dims(("batch", 172, 88), sigmoid.shape)  # [frames, notes], both fixed
    sequence = per_sample_dims(("batch", "time", 88), sigmoid.shape)
    assert grid == (172, 88) and sequence == ("time", 88)
    # values in [0, 1] whose rows are not distributions: a mask or multi-label sigmoids, on a grid or not
    assert not scores_over_last_axis(sigmoid, grid) and not scores_over_last_axis(sigmoid, sequence)
    # logits: classes per position of a free sequence, not on a fixed grid (frames x notes, anchors x classes)
    assert scores_over_last_axis(sigmoid * 8 - 4, sequence) and not scores_over_last_axis(sigmoid * 8 - 4, grid)
    # softmax rows are classes wherever they sit, declared or not (float16 rounding allowed)
    assert scores_over_last_axis(softmax.astype(np.float32), grid)
    assert scores_over_last_axis(softmax.astype(np.float16), None)
    assert not scores_over_last_axis(softmax.astype(np.float32), per_sample_dims(("batch", 172, "k"), softmax.shape))


def test_a_thinned_output_map_gets_no_top1_agreement_as_if_it_were_class_scores():
    # a detector's output thinned for the comparison is a subset of its elements
    maps = np.random.default_rng(1).standard_normal((4, 2, 300, 300)).astype(np.float32)
    thin, moved = _thin(maps), _thin(maps + 0.1)
    assert thin.shape[0] == 4 and 0 < thin[0].size <= OUTPUT_ELEMENTS
    comparison = compare_outputs("map", thin, moved, 1.0)
    assert comparison.agreement is None and comparison.shift == pytest.approx(0.1, rel=1e-3)


def test_a_thinned_sequence_of_class_scores_keeps_whole_rows_of_classes():
    # a text recognizer's [batch, positions, 6625 classes]: evenly spaced positions, every class of each
    scores = np.random.default_rng(5).standard_normal((2, 40, 6625)).astype(np.float32)
    thin = _thin(scores, rows=True)
    assert thin.shape == (2, 8, 6625) and thin[0].size <= OUTPUT_ELEMENTS
    np.testing.assert_array_equal(thin, scores[:, ::5])
    moved = scores.copy()
    moved[:, ::5, 0] = 10.0  # every kept position's arg-max changes to class 0 in both samples
    comparison = compare_outputs("scores", thin, _thin(moved, rows=True), 1.0, classes=True)
    assert comparison.agreement == 0.0 and comparison.positions == 8


def test_signed_values_within_unit_range_are_a_regression_not_class_scores():
    # insightface's 2d106det: 106 (x, y) landmarks in [-1, 1]; "top-1 agrees on 72%" of their arg-max meant nothing
    rng = np.random.default_rng(4)
    landmarks = np.tanh(rng.standard_normal((8, 212))).astype(np.float32)
    assert not scores_over_last_axis(landmarks, (212,))
    assert scores_over_last_axis(landmarks * 3, (212,))  # logits leave the range
    assert compare_outputs("fc1", landmarks, landmarks[::-1], 1.0).agreement is None
