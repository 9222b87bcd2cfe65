"""Metric lookup (exact key wins, then dotted paths) and value reading."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckptfn
from ckptfn import MetricTypeError, init, step
from ckptfn.core.metrics import MISSING, lookup, metric_value

segments = st.text("abcxyz_", min_size=1, max_size=4)


@given(st.lists(segments, min_size=1, max_size=4), st.floats(allow_nan=False))
def test_nested_and_flat_spellings_find_the_same_value(path, value):
    name = ".".join(path)
    nested: object = value
    for part in reversed(path):
        nested = {part: nested}
    assert lookup(nested, name) == value
    assert lookup({name: value}, name) == value


@given(st.lists(segments, min_size=2, max_size=4), st.floats(allow_nan=False), st.floats(allow_nan=False))
def test_exact_key_wins_over_the_nested_path(path, flat, deep):
    name = ".".join(path)
    nested: object = deep
    for part in reversed(path):
        nested = {part: nested}
    assert lookup({**nested, name: flat}, name) == flat


def test_mixed_spellings_at_inner_levels():
    assert lookup({"val": {"loss_components.concordance": 0.3}}, "val.loss_components.concordance") == 0.3


@pytest.mark.parametrize(
    "metrics",
    [{}, {"loss_components": 0.5}, {"loss_components": {}}, {"loss_components": {"mse": 1.0}}, {"concordance": 1.0}],
)
def test_missing_anywhere_along_the_path(metrics):
    assert lookup(metrics, "loss_components.concordance") is MISSING


def test_lookup_does_not_copy_or_touch_values():
    inner = {"concordance": object()}
    assert lookup({"loss_components": inner}, "loss_components.concordance") is inner["concordance"]


@pytest.mark.parametrize(
    "value, expected",
    [
        (3, 3.0),
        (0.25, 0.25),
        (Fraction(1, 4), 0.25),
        (np.float32(0.5), 0.5),
        (np.float64(0.1), 0.1),
        (np.int64(7), 7.0),
        (np.array(1.5), 1.5),
        (np.array([2.5]), 2.5),
        (torch.tensor(0.5), 0.5),
        (torch.tensor([[0.75]]), 0.75),
        (torch.tensor(3, dtype=torch.int64), 3.0),
        (torch.tensor(0.5, dtype=torch.bfloat16), 0.5),
        (10**400, math.inf),
        (-(10**400), -math.inf),
    ],
)
def test_accepted_values_become_python_floats(value, expected):
    result = metric_value("m", value)
    assert type(result) is float and result == expected


def test_non_finite_values_are_returned_for_the_caller_to_judge():
    assert math.isnan(metric_value("m", float("nan")))
    assert metric_value("m", torch.tensor(float("-inf"))) == -math.inf


@pytest.mark.parametrize(
    "value, type_fragment",
    [
        (True, "bool"),
        (np.bool_(True), "numpy.bool"),
        (torch.tensor(True), "torch.Tensor (dtype torch.bool)"),
        ("0.5", "str"),
        (None, "NoneType"),
        ([0.5], "list"),
        ({"a": 1}, "dict"),
        (torch.tensor([0.5, 0.25]), "torch.Tensor"),
        (torch.tensor([]), "torch.Tensor"),
        (np.array([1.0, 2.0]), "numpy.ndarray"),
        (1 + 2j, "complex"),
        (torch.tensor(1 + 2j), "torch.Tensor"),
    ],
)
def test_rejected_values_name_the_metric_and_the_type(value, type_fragment):
    with pytest.raises(MetricTypeError) as info:
        step(init(ckptfn.Strategy("loss_components.concordance")), {"loss_components": {"concordance": value}})
    message = str(info.value)
    assert "'loss_components.concordance'" in message and type_fragment in message, message


def test_a_nested_mapping_where_a_value_is_expected_is_a_type_error():
    with pytest.raises(MetricTypeError, match="'loss_components'.*dict"):
        step(init(ckptfn.Strategy("loss_components")), {"loss_components": {"mse": 1.0}})
