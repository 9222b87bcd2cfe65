"""prepare_payload: what it lets through always loads with torch.load(weights_only=True)."""

from __future__ import annotations

import collections
import io
import math
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptfn import PayloadError
from ckptfn.io.payload import prepare_payload

atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.complex_numbers(allow_nan=False),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.binary(max_size=4).map(bytearray),
    st.sampled_from([torch.float16, torch.int8, torch.device("cpu"), torch.Size([]), torch.Size([3, 1])]),
    st.integers(0, 4).map(lambda n: torch.arange(n, dtype=torch.float32)),
    st.sampled_from([np.float32(1.5), np.int64(-3), np.bool_(True), np.arange(3), pathlib.PurePosixPath("/x")]),
)
values = st.recursive(
    atoms,
    lambda inner: st.lists(inner, max_size=3)
    | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=3)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3).map(collections.OrderedDict)
    | st.sets(st.integers() | st.text(max_size=3), max_size=3),
    max_leaves=12,
)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=150, deadline=None)
@given(values)
def test_whatever_prepare_lets_through_loads_with_weights_only(value):
    try:
        prepared = prepare_payload({"v": value})
    except PayloadError as error:
        assert "payload" in str(error)  # names where it is
        return
    buffer = io.BytesIO()
    torch.save(prepared, buffer)
    buffer.seek(0)
    assert same(prepared, torch.load(buffer, weights_only=True))


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"a": b""}, "payload['a']: empty bytes"),
        ({"a": frozenset([1])}, "payload['a']: builtins.frozenset"),
        ({"a": [collections.defaultdict(int)]}, "payload['a'][0]: collections.defaultdict"),
        ({"a": lambda: 0}, "payload['a']: builtins.function"),
    ],
)
def test_what_cannot_load_is_refused_by_key_path(bad, where):
    with pytest.raises(PayloadError, match=where.replace("[", r"\[").replace("]", r"\]")):
        prepare_payload(bad)


def test_nothing_is_copied_when_nothing_needs_converting():
    state_dict = torch.nn.Linear(2, 2).state_dict()
    assert prepare_payload({"model": state_dict})["model"] is state_dict
