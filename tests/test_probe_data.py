"""Probe inputs: option parsing, shape resolution, synthetic samples, --data files (bncheck.probe_data)."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from bncheck.budget import OverBudgetError
from bncheck.model import InputSpec
from bncheck.probe_data import (
    DEFAULT_INT_HIGH,
    ProbeDataError,
    load_data,
    parse_batch_sizes,
    parse_input_shape,
    resolve_shape,
    synthetic_inputs,
)

IMG = InputSpec("pixels", ("N", 3, 8, 8), "float32")
TOKENS = InputSpec("ids", ("N", 5), "int64")
MASK = InputSpec("mask", ("N", 5), "bool")
SYMBOLIC = InputSpec("x", ("batch", 3, "H", "W"), "float32")


def test_parse_batch_sizes_keeps_order_and_drops_duplicates():
    assert parse_batch_sizes("1, 2,32,2") == (1, 2, 32)


@pytest.mark.parametrize("text", ["", "1,,2", "0", "-3", "two", "1.5", "99999"])
def test_parse_batch_sizes_rejects_bad_values_with_one_line(text):
    with pytest.raises(ProbeDataError) as info:
        parse_batch_sizes(text)
    assert "\n" not in str(info.value) and "batch-sizes" in str(info.value)


def test_parse_input_shape_splits_name_and_dims_at_the_last_colon():
    assert parse_input_shape("pixels:3x224x224") == ("pixels", (3, 224, 224))
    assert parse_input_shape("scope:input:4X5") == ("scope:input", (4, 5))


@pytest.mark.parametrize("text", ["pixels", ":3x4", "pixels:3xa", "pixels:3x0", "pixels:3x-1"])
def test_parse_input_shape_rejects_malformed_text(text):
    with pytest.raises(ProbeDataError):
        parse_input_shape(text)


def test_resolve_shape_sets_the_batch_dim_and_keeps_fixed_dims():
    assert resolve_shape(IMG, 7, {}) == (7, 3, 8, 8)


def test_resolve_shape_names_the_input_and_the_symbolic_dim():
    with pytest.raises(ProbeDataError) as info:
        resolve_shape(SYMBOLIC, 2, {})
    message = str(info.value)
    assert "'x'" in message and "'H'" in message and "--input-shape" in message


def test_resolve_shape_uses_input_shape_overrides():
    assert resolve_shape(SYMBOLIC, 2, {"x": (3, 16, 12)}) == (2, 3, 16, 12)


def test_resolve_shape_rejects_an_override_of_the_wrong_rank_or_a_fixed_dim():
    with pytest.raises(ProbeDataError, match="gives 2 dims"):
        resolve_shape(SYMBOLIC, 2, {"x": (16, 12)})
    with pytest.raises(ProbeDataError, match="fixed to 3"):
        resolve_shape(SYMBOLIC, 2, {"x": (4, 16, 12)})


def test_resolve_shape_rejects_a_batch_size_a_fixed_batch_dim_cannot_take():
    with pytest.raises(ProbeDataError, match="fixed batch dimension of 1"):
        resolve_shape(InputSpec("x", (1, 3), "float32"), 2, {})


def test_synthetic_inputs_are_seeded_and_typed():
    a = synthetic_inputs([IMG, TOKENS, MASK], 4, 3, {}, {"ids": 7})
    b = synthetic_inputs([IMG, TOKENS, MASK], 4, 3, {}, {"ids": 7})
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert a["pixels"].dtype == np.float32 and a["pixels"].shape == (4, 3, 8, 8)
    assert a["ids"].dtype == np.int64 and a["ids"].min() >= 0 and a["ids"].max() < 7
    assert a["mask"].dtype == np.bool_


@pytest.mark.parametrize("dtype", ["bool", "float32", "int64"])
def test_a_scalar_input_is_drawn_as_a_rank_0_array(dtype):
    """numpy draws a scalar for shape (), which onnxruntime refuses for a flag (an If's condition)."""
    (value,) = synthetic_inputs([InputSpec("flag", (), dtype, batch_axis=None)], 4, 0, {}).values()
    assert isinstance(value, np.ndarray) and value.shape == () and value.dtype == np.dtype(dtype)


def test_synthetic_floats_are_standard_normal():
    x = synthetic_inputs([InputSpec("x", ("N", 1000), "float32")], 50, 0, {})["x"]
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02


def test_synthetic_integers_without_a_table_use_the_default_range():
    ids = synthetic_inputs([TOKENS], 64, 0, {})["ids"]
    assert set(np.unique(ids)) <= set(range(DEFAULT_INT_HIGH))


def test_load_data_reads_npy_for_a_single_input(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((5, 3, 8, 8), np.float64))
    data = load_data(str(path), [IMG])
    assert data["pixels"].dtype == np.float32 and data["pixels"].shape == (5, 3, 8, 8)


def test_load_data_reads_npz_keyed_by_input_name(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, pixels=np.zeros((2, 3, 8, 8), np.float32), ids=np.zeros((2, 5), np.int32))
    data = load_data(str(path), [IMG, TOKENS])
    assert data["ids"].dtype == np.int64 and data["pixels"].shape[0] == 2


def test_load_data_names_a_wrong_shape(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((5, 3, 9, 8), np.float32))
    with pytest.raises(ProbeDataError) as info:
        load_data(str(path), [IMG])
    assert "axis 2" in str(info.value) and "needs 8" in str(info.value) and "pixels" in str(info.value)


def test_load_data_names_a_wrong_rank(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((5, 3, 8), np.float32))
    with pytest.raises(ProbeDataError, match="2 dims after the sample axis"):
        load_data(str(path), [IMG])


def test_load_data_names_a_wrong_dtype(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, pixels=np.zeros((2, 3, 8, 8), np.int32), ids=np.zeros((2, 5), np.int64))
    with pytest.raises(ProbeDataError) as info:
        load_data(str(path), [IMG, TOKENS])
    assert "int32" in str(info.value) and "pixels" in str(info.value)
    np.savez(path, pixels=np.zeros((2, 3, 8, 8), np.float32), ids=np.zeros((2, 5), np.float32))
    with pytest.raises(ProbeDataError, match="integer"):
        load_data(str(path), [IMG, TOKENS])


def test_load_data_names_missing_and_unknown_keys(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, pixels=np.zeros((2, 3, 8, 8), np.float32), idz=np.zeros((2, 5), np.int64))
    with pytest.raises(ProbeDataError, match="unknown key.*'idz'"):
        load_data(str(path), [IMG, TOKENS])
    np.savez(path, pixels=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ProbeDataError, match="missing key.*'ids'"):
        load_data(str(path), [IMG, TOKENS])


def test_load_data_refuses_npy_for_a_multi_input_model(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((5, 3, 8, 8), np.float32))
    with pytest.raises(ProbeDataError, match="model has 2"):
        load_data(str(path), [IMG, TOKENS])


def test_load_data_refuses_unequal_sample_counts_and_empty_data(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, pixels=np.zeros((2, 3, 8, 8), np.float32), ids=np.zeros((3, 5), np.int64))
    with pytest.raises(ProbeDataError, match="different numbers of samples"):
        load_data(str(path), [IMG, TOKENS])
    np.save(tmp_path / "e.npy", np.zeros((0, 3, 8, 8), np.float32))
    with pytest.raises(ProbeDataError, match="no samples"):
        load_data(str(tmp_path / "e.npy"), [IMG])


def test_load_data_never_unpickles(tmp_path):
    path = tmp_path / "o.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ProbeDataError, match="unpickl"):
        load_data(str(path), [IMG])


def _resident_bytes() -> int:
    """This process's resident memory (Linux: /proc/self/statm's second field, in pages)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_npy_data_file_is_mapped_not_copied_into_memory(tmp_path):
    """A .npy of 64 MB is loaded without 64 MB more resident memory (its pages are read from the file as the
    runs reach them), and its samples are the file's."""
    x = np.random.default_rng(0).standard_normal((682, 3, 64, 128), dtype=np.float32)  # 67 MB
    np.save(tmp_path / "big.npy", x)
    before = _resident_bytes()
    loaded = load_data(str(tmp_path / "big.npy"), [replace(IMG, shape=("N", 3, 64, 128))])["pixels"]
    assert _resident_bytes() - before < 8 << 20
    assert loaded.shape == x.shape and np.array_equal(loaded[::97], x[::97])


def test_a_truncated_npy_is_called_truncated_not_pickled(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.zeros((10, 3, 8, 8), np.float32))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ProbeDataError, match="truncated or corrupt") as caught:
        load_data(str(path), [IMG])
    assert "unpickl" not in str(caught.value)


def test_a_csv_given_as_data_is_told_the_formats_not_numpys_pickle_advice(tmp_path):
    path = tmp_path / "samples.csv"
    path.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ProbeDataError, match=r"samples.csv: not a .npy or .npz file: save the samples") as caught:
        load_data(str(path), [IMG])
    assert "pickle" not in str(caught.value)


def test_data_converted_to_the_inputs_dtype_is_checked_against_the_memory_budget(tmp_path, monkeypatch):
    """float64 samples for a float32 input are copied as float32: that copy is refused past the budget, before
    it is made, naming the file; the same samples in float32 are mapped and pass."""
    x = np.zeros((512, 3, 8, 8))  # 786 kB of float64, 393 kB as float32
    np.save(tmp_path / "f64.npy", x)
    np.save(tmp_path / "f32.npy", x.astype(np.float32))
    monkeypatch.setenv("BNCHECK_MEMORY_BUDGET", "300kB")
    with pytest.raises(OverBudgetError, match=r"f64\.npy as float32"):
        load_data(str(tmp_path / "f64.npy"), [IMG])
    assert load_data(str(tmp_path / "f32.npy"), [IMG])["pixels"].shape == (512, 3, 8, 8)


def test_load_data_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ProbeDataError, match="no such data file"):
        load_data(str(tmp_path / "nope.npz"), [IMG])
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy at all")
    with pytest.raises(ProbeDataError):
        load_data(str(bad), [IMG])


def test_load_data_accepts_any_size_for_symbolic_dims(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((3, 3, 5, 7), np.float32))
    assert load_data(str(path), [SYMBOLIC])["x"].shape == (3, 3, 5, 7)
