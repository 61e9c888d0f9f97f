"""Numbers as the JSON document writes them: NaN and Inf as strings, numpy scalars as Python's."""

from __future__ import annotations

import math

import numpy as np

from bncheck.findings import number
from bncheck.render.json import jsonable


def test_number_writes_non_finite_values_as_strings():
    assert [number(v) for v in (math.nan, math.inf, -math.inf)] == ["nan", "inf", "-inf"]
    assert [number(v) for v in (np.float32("nan"), np.float64("inf"), np.float16("-inf"))] == ["nan", "inf", "-inf"]


def test_number_keeps_finite_values_and_their_kind():
    assert number(0.25) == 0.25 and type(number(0.25)) is float
    assert number(7) == 7 and type(number(7)) is int
    assert type(number(np.int64(7))) is int and type(number(np.float32(0.5))) is float
    assert number(True) == 1.0 and type(number(True)) is float  # a bool is a number here, not an integer
    assert number(None) is None


def test_jsonable_converts_nested_evidence():
    value = {"a": (1, 2.5, math.nan), 3: np.array([np.inf, 1.0]), "b": np.bool_(True), "c": None, "d": "x"}
    assert jsonable(value) == {"a": [1, 2.5, "nan"], "3": ["inf", 1.0], "b": True, "c": None, "d": "x"}
