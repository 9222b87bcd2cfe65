"""Sharing rank 0's decision: the wire form rebuilds exactly what ``step`` returned, as plain data."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckptfn
from ckptfn import Config, ConfigError, Every, Strategy, init, step
from ckptfn.core.wire import decision_from_wire, decision_to_wire, failure_from_wire, failure_to_wire, is_failure

from tests.strategies import runs

PLAIN = (str, int, float, bool, type(None))


def plain(value: object) -> bool:
    """Only builtins all the way down: what the other ranks unpickle can be nothing else."""
    if isinstance(value, (tuple, list)):
        return all(plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and plain(item) for key, item in value.items())
    return type(value) in PLAIN


def same_actions(a, b) -> bool:
    """Equal actions, including ``Skip.value`` (left out of equality because NaN != NaN)."""
    if a != b:
        return False
    for x, y in zip(a, b):
        vx, vy = getattr(x, "value", None), getattr(y, "value", None)
        if not (vx == vy or (isinstance(vx, float) and isinstance(vy, float) and math.isnan(vx) and math.isnan(vy))):
            return False
    return True


@given(runs(), st.data())
def test_every_rank_rebuilds_rank_0s_decision_whatever_its_own_metrics(run, data):
    config, _logical, history = run
    config = Config(config.strategies + (Every(2, filename="last.pt"),), on_missing=config.on_missing)
    leader = follower = init(config)
    for metrics in history:
        if data.draw(st.booleans()):  # a follower that diverged (e.g. missed a write's outcome)...
            follower = init(config)
        leader, actions = step(leader, metrics)
        wire = pickle.loads(pickle.dumps(decision_to_wire(leader, actions)))  # what travels
        assert plain(wire)
        follower, rebuilt = decision_from_wire(config, wire)
        assert follower == leader  # ...is back in step after the next decision
        assert same_actions(rebuilt, actions)


def test_a_rank_configured_differently_is_told_so():
    state, actions = step(init([Strategy("val_loss"), Strategy("val_corr", mode="max")]), {"val_loss": 1.0, "val_corr": 0.5})
    other = init([Strategy("val_corr", mode="max"), Strategy("val_loss")]).config
    with pytest.raises(ConfigError, match=r"rank 0 decides for strategies \['best_val_loss.pt', 'best_val_corr.pt'\]"):
        decision_from_wire(other, decision_to_wire(state, actions))


@pytest.mark.parametrize(
    "error",
    [
        ckptfn.MetricTypeError("val_loss: expected a real number"),
        ckptfn.ConfigError("bad mode", "mode"),
        ckptfn.CheckpointWriteError("disk full", ("run/best_loss.pt",)),
        ckptfn.PayloadError("payload['fn']: cannot store function"),
        ValueError("epoch must be >= 0"),
    ],
)
def test_failures_keep_their_type_message_and_published_paths(error):
    wire = pickle.loads(pickle.dumps(failure_to_wire(error)))
    assert plain(wire) and is_failure(wire)
    rebuilt = failure_from_wire(wire)
    assert type(rebuilt) is type(error)
    assert str(rebuilt).startswith("on rank 0: ") and str(rebuilt).endswith(str(error))
    assert getattr(rebuilt, "published", ()) == getattr(error, "published", ())


def test_an_unknown_failure_becomes_a_runtime_error_naming_it():
    rebuilt = failure_from_wire(failure_to_wire(ZeroDivisionError("division by zero")))
    assert type(rebuilt) is RuntimeError and "ZeroDivisionError: division by zero" in str(rebuilt)
