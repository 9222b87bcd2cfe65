"""Metadata is bounded on the way in (``to_plain``, ``build_metadata``) and on the way out
(``shape_problem``, which every reader applies): no cycles, at most MAX_DEPTH levels, at most
MAX_VALUES values as a tree. (Core functions; here beside the readers that rely on them.)"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptfn import PayloadError
from ckptfn.core.metadata import MAX_DEPTH, MAX_VALUES, build_metadata, flatten_metrics, shape_problem, to_plain


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def expanded(value) -> int:
    """The values of ``value`` counted as a tree, by brute force (small inputs only)."""
    if isinstance(value, dict):
        return 1 + sum(1 + expanded(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(expanded(v) for v in value)
    return 1


@st.composite
def shared_dags(draw):
    """Lists and dicts built bottom-up, each new node reusing earlier ones (a DAG, as pickle can share)."""
    nodes: list = [draw(st.integers() | st.text(max_size=3) | st.none())]
    for _ in range(draw(st.integers(1, 12))):
        picks = draw(st.lists(st.integers(0, len(nodes) - 1), max_size=4))
        children = [nodes[i] for i in picks]
        nodes.append(children if draw(st.booleans()) else {f"k{i}": child for i, child in enumerate(children)})
    return nodes[-1]


@settings(max_examples=200, deadline=None)
@given(shared_dags())
def test_shared_containers_are_counted_as_the_tree_they_print_as(value):
    problem = shape_problem({"x": value})
    depth_ok = _depth(value) < MAX_DEPTH
    assert (problem is None) == (expanded({"x": value}) <= MAX_VALUES and depth_ok)
    if problem is None:
        json.dumps(value)  # every walk ends: the bound holds for what a reader returns


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_lists_sharing_lists_are_judged_in_microseconds_not_2_to_the_80():
    shared: list = [0]
    for _ in range(80):
        shared = [shared, shared]
    started = time.perf_counter()
    assert shape_problem({"x": shared}).startswith("metadata['x']: more than 1000000 values")
    assert time.perf_counter() - started < 0.05
    with pytest.raises(PayloadError, match=r"metadata\['x'\]: more than 1000000 values"):
        to_plain({"x": shared})


def test_cycles_and_depth_are_located():
    looped: dict = {"a": [1]}
    looped["a"].append(looped)
    assert shape_problem(looped) == "metadata['a'][1]: contains itself"
    assert shape_problem({"deep": nested(MAX_DEPTH)}) == "metadata['deep']" + "[0]" * (MAX_DEPTH - 1) + f": nested deeper than {MAX_DEPTH} levels"
    assert shape_problem({"ok": nested(MAX_DEPTH - 1)}) is None
    assert shape_problem({"k": {(1, (2, (3,))): 0}}) is None  # keys are walked too


def test_to_plain_refuses_what_no_reader_would_accept_and_shares_what_is_shared():
    looped: list = []
    looped.append(looped)
    with pytest.raises(PayloadError, match=r"metadata\['x'\]\[0\]: contains itself"):
        to_plain({"x": looped})
    with pytest.raises(PayloadError, match=f"nested deeper than {MAX_DEPTH} levels"):
        to_plain(nested(MAX_DEPTH + 1))
    with pytest.raises(PayloadError, match="more than 1000000 values"):
        to_plain([0] * (MAX_VALUES + 1))
    tags = ("a", "b")
    plain = to_plain({"one": tags, "two": tags})
    assert plain == {"one": ["a", "b"], "two": ["a", "b"]} and plain["one"] is plain["two"]


def test_build_metadata_bounds_the_whole_record():
    big = list(range(MAX_VALUES // 2))
    with pytest.raises(PayloadError, match="more than 1000000 values"):  # each key fits; together they do not
        build_metadata([], epoch=0, timestamp="t", metrics=None, manager_state=None, versions={},
                       extra={"a": big, "b": list(big), "c": list(big)})
    with pytest.raises(PayloadError, match="nested deeper than"):
        build_metadata([], epoch=0, timestamp="t", metrics=None, manager_state=None, versions={},
                       extra={"a": nested(MAX_DEPTH)})  # fits alone, one level too deep inside the record


def test_flatten_metrics_of_a_mapping_that_holds_itself_is_a_payload_error():
    # it recursed until RecursionError
    metrics: dict = {"val_loss": 0.5}
    metrics["self"] = metrics
    with pytest.raises(PayloadError, match=f"nested deeper than {MAX_DEPTH} levels"):
        flatten_metrics(metrics)
