"""Metadata is plain data; user values are converted or rejected by key path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ckptfn import PayloadError
from ckptfn.core.metadata import RESERVED_KEYS, build_metadata, flatten_metrics, to_plain

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=25,
)


def is_plain(x) -> bool:
    if isinstance(x, dict):
        return all(type(k) is str and is_plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(is_plain(v) for v in x)
    return type(x) in (str, int, float, bool, type(None))


@given(json_like)
def test_plain_data_passes_through_unchanged(value):
    result = to_plain(value)
    assert is_plain(result)
    assert repr(result) == repr(value)


@given(st.dictionaries(st.text(min_size=1), st.floats() | st.integers(-10**6, 10**6) | st.text() | st.booleans()))
def test_flatten_metrics_keeps_exactly_the_numbers(metrics):
    flat = flatten_metrics({"outer": metrics})
    expected = {f"outer.{k}": float(v) for k, v in metrics.items() if type(v) in (int, float)}
    assert repr(flat) == repr(expected)


def test_conversions():
    assert to_plain({"a": np.float32(0.5), "b": torch.tensor([2]), "c": (1, 2), "d": np.bool_(False)}) == {
        "a": 0.5, "b": 2, "c": [1, 2], "d": False}


@pytest.mark.parametrize("bad, where", [({"x": {1: 2}}, "metadata['x']"), ({"x": [object()]}, "metadata['x'][0]"),
                                        ({"t": torch.ones(3)}, "metadata['t']"), ({"s": {1, 2}}, "metadata['s']")])
def test_rejections_name_the_key(bad, where):
    with pytest.raises(PayloadError) as info:
        to_plain(bad)
    assert str(info.value).startswith(where)


def test_reserved_keys_cannot_be_overridden():
    for key in RESERVED_KEYS:
        with pytest.raises(ValueError, match=repr(key)):
            build_metadata([], epoch=0, timestamp="t", metrics=None, manager_state=None, versions={}, extra={key: 1})
    meta = build_metadata([], epoch=None, timestamp="t", metrics={"a": math.nan}, manager_state=None, versions={}, extra={"run": "r1"})
    assert meta["run"] == "r1" and math.isnan(meta["metrics"]["a"])
