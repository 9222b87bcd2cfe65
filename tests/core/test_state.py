"""State.to_dict / restore: plain data, config changes, malformed input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckptfn
from ckptfn import Best, Config, ConfigError, State, Strategy, init, restore, scan

from tests.strategies import runs

PLAIN = (dict, list, str, int, float, bool, type(None))


def only_plain(data) -> bool:
    if isinstance(data, dict):
        return all(isinstance(k, str) and only_plain(v) for k, v in data.items())
    if isinstance(data, list):
        return all(only_plain(v) for v in data)
    return type(data) in PLAIN


@given(run=runs())
def test_to_dict_is_plain_data_that_survives_json_and_torch_load(run, tmp_path_factory):
    config, _, history = run
    state, _ = scan(init(config), history)
    data = state.to_dict()
    assert only_plain(data)
    assert restore(config, json.loads(json.dumps(data, allow_nan=False))) == state
    path = tmp_path_factory.mktemp("state") / "state.pt"
    torch.save(data, path)
    assert restore(config, torch.load(path, weights_only=True)) == state


def test_restore_keeps_unchanged_strategies_and_resets_changed_ones():
    old = Config(
        [
            Strategy("val_loss"),
            Strategy("val_corr", mode="max"),
            Strategy("mse", filename="m.pt"),
            Strategy("dropped"),
        ]
    )
    state = State(old, [Best(0.5, 3), Best(0.9, 4), Best(0.1, 2), Best(1.0, 1)], steps=5)
    new = Config(
        [
            Strategy("val_loss", min_delta=0.1, overwrite=False),  # same identity: keeps its best
            Strategy("val_corr", mode="min"),  # mode changed: fresh
            Strategy("other", filename="m.pt"),  # metric changed under the same file: fresh
            Strategy("brand_new"),  # new: fresh
        ]
    )
    restored = restore(new, state.to_dict())
    assert restored.bests == (Best(0.5, 3), Best(), Best(), Best())
    assert restored.steps == 5 and restored.config == new


def test_restore_none_is_a_fresh_state():
    assert restore(Strategy("a"), None) == init(Strategy("a"))


def _valid():
    return State(Config([Strategy("a")]), [Best(0.5, 1)], steps=2).to_dict()


def _broken(change):
    data = _valid()
    change(data)
    return data


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2], "saved state must be a mapping, got list"),
        (_broken(lambda d: d.update(format="other/1")), "format: expected 'ckptfn.state/1', got 'other/1'"),
        (_broken(lambda d: d.pop("steps")), "steps: required key is missing"),
        (_broken(lambda d: d.update(steps=-1)), "steps: expected an int >= 0, got -1"),
        (_broken(lambda d: d.update(strategies="x")), "strategies: expected a list, got 'x'"),
        (_broken(lambda d: d["strategies"].append(7)), "strategies[1]: expected a mapping, got int"),
        (_broken(lambda d: d["strategies"][0].pop("mode")), "strategies[0].mode: required key is missing"),
        (_broken(lambda d: d["strategies"][0].update(best="0.5")), "strategies[0].best: expected a finite number"),
        (_broken(lambda d: d["strategies"][0].update(best=math.nan)), "strategies[0].best: expected a finite number"),
        (_broken(lambda d: d["strategies"][0].update(best_epoch=1.5)), "strategies[0].best_epoch: expected an int"),
        (_broken(lambda d: d["strategies"][0].update(best=None)), "strategies[0]: value None and epoch 1 must both"),
        (_broken(lambda d: d["strategies"].append(dict(d["strategies"][0]))), "strategies[1].filename: 'best_a.pt' appears twice"),
    ],
)
def test_malformed_data_is_a_config_error_naming_the_path(data, message):
    with pytest.raises(ConfigError) as info:
        restore(Strategy("a"), data)
    assert str(info.value).startswith(message), str(info.value)


@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20))
def test_restore_of_arbitrary_data_only_raises_config_error(data):
    try:
        restore(Strategy("a"), data)
    except ConfigError:
        pass


def test_state_validates_itself():
    with pytest.raises(ConfigError, match="2 bests for 1 strategies"):
        State(Config([Strategy("a")]), [Best(), Best()])
    with pytest.raises(ConfigError, match="value"):
        Best(math.inf, 1)
    with pytest.raises(ConfigError, match="both"):
        Best(0.5, None)
