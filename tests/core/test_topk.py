"""Top-k by value (issue 14): ``Strategy(top_k=k)`` keeps the k best finite values seen.

Checked against reference models written here: a list of ``(value, arrival)`` sorted best
first (ties: the earlier arrival first) for ``min_delta=0``, and the same list grown one
decision at a time, in exact arithmetic, for ``min_delta > 0``.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import ckptfn
from ckptfn import Best, Config, ConfigError, Enter, Member, Save, Skip, Strategy, init, scan, step
from ckptfn.core.metrics import MISSING
from ckptfn.core.naming import member_name, member_of
from ckptfn.core.wire import decision_from_wire, decision_to_wire

from tests.strategies import (
    NON_FINITE,
    finite_values,
    grid_logical_values,
    grid_min_deltas,
    grid_values,
    logical_values,
    modes,
    top_k_runs,
    top_k_strategies,
)


# --- reference models -------------------------------------------------------------------------


def usable(value: object) -> bool:
    return value is not MISSING and math.isfinite(value)


def rank_key(mode: str):
    """Best first; among equal values the earlier arrival first. Items: ``(value, arrival, ...)``."""
    return (lambda m: (m[0], m[1])) if mode == "min" else (lambda m: (-m[0], m[1]))


def beats(mode: str, old: float, new: float, min_delta: float) -> bool:
    """``new`` is better than ``old`` by more than ``min_delta``, in exact arithmetic."""
    gain = Fraction(old) - Fraction(new) if mode == "min" else Fraction(new) - Fraction(old)
    return gain > Fraction(min_delta)


def k_best(strategy: Strategy, logical: list) -> list[tuple[float, int]]:
    """``min_delta=0``: the k best finite values of the whole history, ``(value, epoch)`` best first."""
    seen = [(v, epoch) for epoch, v in enumerate(logical) if usable(v)]
    return sorted(seen, key=rank_key(strategy.mode))[: strategy.top_k]


class TopKModel:
    """The top k grown one decision at a time (any ``min_delta``): ``best`` and ``others``
    are ``(value, arrival, epoch, global_step)``; ``others`` best first."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy
        self.best = None
        self.others: list[tuple] = []
        self.arrivals = 0

    @property
    def members(self) -> list[tuple]:
        return ([self.best] if self.best is not None else []) + self.others

    def offer(self, value: float, epoch: int, global_step: int | None = None) -> str | None:
        """Judge one finite value: ``"save"`` (new best), ``"enter"`` or None."""
        s, item = self.strategy, (value, self.arrivals, epoch, global_step)
        self.arrivals += 1
        order = rank_key(s.mode)
        if self.best is None or beats(s.mode, self.best[0], value, s.min_delta):
            self.others = sorted(self.members, key=order)[: s.top_k - 1]
            self.best = item
            return "save"
        if len(self.members) < s.top_k:
            self.others = sorted([*self.others, item], key=order)
            return "enter"
        worst = max(self.members, key=order)  # the k-th best; ties: the later one is worse
        if not beats(s.mode, worst[0], value, s.min_delta):
            return None
        self.others = sorted([m for m in self.others if m != worst] + [item], key=order)
        return "enter"

    def truncate(self, top_k: int) -> None:
        self.strategy = ckptfn.Strategy(
            self.strategy.metric_name, mode=self.strategy.mode, min_delta=self.strategy.min_delta,
            top_k=top_k, on_missing=self.strategy.on_missing,
        )
        self.others = self.others[: top_k - 1]

    def kept(self) -> list[tuple]:
        return [(v, e, g) for v, _, e, g in self.members]


def kept_of(best: Best) -> list[tuple]:
    """``(value, epoch, global_step)`` of the best, then of each member, as the state lists them."""
    if best.value is None:
        return [(m.value, m.epoch, m.global_step) for m in best.others]
    return [(best.value, best.epoch, best.global_step)] + [(m.value, m.epoch, m.global_step) for m in best.others]


def check_best(strategy: Strategy, best: Best) -> None:
    """The shape every top-k state has: at most k, distinct member names that say their position."""
    k = strategy.top_k
    assert (best.value is not None) + len(best.others) <= k
    names = [m.name for m in best.others]
    assert len(set(names)) == len(names)
    assert strategy.filename not in names
    for m in best.others:
        assert member_of(m.name, strategy.filename)
        assert m.name in {member_name(strategy.filename, m.epoch, m.global_step, clash) for clash in range(k + 1)}
    values = [m.value for m in best.others]
    assert values == sorted(values, reverse=strategy.mode == "max")  # best first


def check_transition(strategy: Strategy, before: Best, after: Best, action: object) -> None:
    """The action says exactly how the kept set changed: who enters, under which name, who leaves."""
    old = {m.name: m for m in before.others}
    new = {m.name: m for m in after.others}
    if action is None or isinstance(action, Skip):
        assert after == before
        return
    leaves = set(action.leaves)
    assert len(action.leaves) == len(leaves) <= 1
    assert not leaves & set(new)
    if isinstance(action, Save):
        assert action.previous == before.value
        assert (after.value, after.epoch, after.global_step) == (action.value, action.epoch, action.global_step)
        assert (action.aside is None) == (before.value is None or strategy.top_k == 1)
        arriving = {}
        if action.aside is not None:
            assert action.aside not in old
            arriving = {action.aside: Member(before.value, before.epoch, before.global_step, action.aside)}
    else:
        assert isinstance(action, Enter)
        assert (after.value, after.epoch, after.global_step) == (before.value, before.epoch, before.global_step)
        assert action.name not in old and action.name != strategy.filename
        arriving = {action.name: Member(action.value, action.epoch, action.global_step, action.name)}
        full = (before.value is not None) + len(before.others) >= strategy.top_k
        if full:
            kept = [before.value] + [m.value for m in before.others]
            worst = max(kept) if strategy.mode == "min" else min(kept)
            assert action.kth == worst
            assert beats(strategy.mode, action.kth, action.value, strategy.min_delta)
        else:
            assert action.kth is None and not leaves
    pool = {**old, **arriving}
    assert leaves <= set(pool)
    assert new == {name: member for name, member in pool.items() if name not in leaves}


def metrics_of(strategy: Strategy, value: object) -> dict:
    return {} if value is MISSING else {strategy.metric_name: value}


def flat_history(strategy: Strategy, logical: list) -> list[dict]:
    return [metrics_of(strategy, v) for v in logical]


# --- the kept set ---------------------------------------------------------------------------


@given(top_k_runs())
def test_kept_set_is_the_k_best_finite_values_seen(run):
    """After every decision (finite, NaN/inf or missing values; min_delta=0), the best and
    the members are the k best finite values so far, best first, ties keeping the earlier."""
    strategy, logical, history = run
    state = init(strategy)
    for index, metrics in enumerate(history):
        before = state.bests[0]
        state, actions = step(state, metrics)
        after = state.bests[0]
        check_best(strategy, after)
        assert kept_of(after) == [(v, e, None) for v, e in k_best(strategy, logical[: index + 1])]
        assert len(actions) <= 1
        check_transition(strategy, before, after, actions[0] if actions else None)


@given(top_k_runs(min_delta=grid_min_deltas, values=grid_logical_values))
def test_with_min_delta_a_value_enters_only_if_it_beats_the_kth_by_more(run):
    """With min_delta > 0 a value enters while the top k is not full, or when it beats the
    k-th best by more than min_delta; a new best needs to beat the best by more (exact grid)."""
    strategy, logical, history = run
    model, state = TopKModel(strategy), init(strategy)
    for epoch, (value, metrics) in enumerate(zip(logical, history)):
        before = state.bests[0]
        state, actions = step(state, metrics)
        verdict = model.offer(value, epoch) if usable(value) else None
        kinds = [type(a).__name__ for a in actions if not isinstance(a, Skip)]
        assert kinds == {"save": ["Save"], "enter": ["Enter"], None: []}[verdict]
        assert kept_of(state.bests[0]) == model.kept()
        check_transition(strategy, before, state.bests[0], actions[0] if actions else None)


@given(top_k_runs(min_delta=st.one_of(st.just(0.0), st.floats(0, 1e6)), values=logical_values))
def test_float_rounding_never_grants_an_entry(run):
    """Any floats and min_delta: every Enter beats the k-th by more than min_delta, every Save
    beats the previous best by more than min_delta, in exact arithmetic."""
    strategy, _, history = run
    _, per_step = scan(init(strategy), history)
    for action in (a for actions in per_step for a in actions):
        if isinstance(action, Enter) and action.kth is not None:
            assert beats(strategy.mode, action.kth, action.value, strategy.min_delta)
        if isinstance(action, Save) and action.previous is not None:
            assert beats(strategy.mode, action.previous, action.value, strategy.min_delta)


@given(top_k_runs(min_delta=st.one_of(st.just(0.0), st.floats(0, 1e6))))
def test_the_best_of_a_top_k_strategy_is_the_plain_best(run):
    """The file at ``filename`` follows the plain strict-improvement rule, whatever k: the
    same Saves (epoch, value, previous) and the same best as ``top_k=1``."""
    strategy, _, history = run
    plain = Strategy(strategy.metric_name, mode=strategy.mode, min_delta=strategy.min_delta, on_missing="warn")
    top_final, top_steps = scan(init(strategy), history)
    plain_final, plain_steps = scan(init(plain), history)

    def saves(per_step):
        return [[(a.epoch, a.value, a.previous) for a in s if isinstance(a, Save)] for s in per_step]

    assert saves(top_steps) == saves(plain_steps)
    best, plain_best = top_final.bests[0], plain_final.bests[0]
    assert (best.value, best.epoch, best.global_step) == (plain_best.value, plain_best.epoch, plain_best.global_step)


@given(st.sampled_from(["val_loss", "loss_components.mse"]), modes, grid_min_deltas,
       st.lists(grid_logical_values, max_size=25))
def test_top_k_1_is_the_plain_overwriting_strategy(name, mode, min_delta, logical):
    """``top_k=1`` (also from plain data) is today's ``overwrite=True`` strategy: equal records,
    equal actions and states, saves exactly at strict improvements beyond min_delta, never an
    Enter, never a member, an aside or a leaving name."""
    plain = Strategy(name, mode=mode, min_delta=min_delta)
    parsed = Config.from_mapping({"on_missing": "warn", "strategies": [
        {"metric_name": name, "mode": mode, "min_delta": min_delta, "top_k": 1}]})
    plain_config = Config([plain], on_missing="warn")
    assert parsed == plain_config
    assert plain.overwrite is True and plain.top_k == 1
    history = [{} if v is MISSING else {name: v} for v in logical]
    one_final, one_steps = scan(init(parsed), history)
    plain_final, plain_steps = scan(init(plain_config), history)
    assert (one_final, one_steps) == (plain_final, plain_steps)
    best, expected = None, []
    for epoch, value in enumerate(logical):
        if usable(value) and (best is None or beats(mode, best, value, min_delta)):
            expected.append((epoch, value, best))
            best = value
    saves = [a for s in one_steps for a in s if isinstance(a, Save)]
    assert [(a.epoch, a.value, a.previous) for a in saves] == expected
    assert all(a.aside is None and a.leaves == () for a in saves)
    assert not any(isinstance(a, Enter) for s in one_steps for a in s)
    assert one_final.bests[0].others == () and one_final.bests[0].value == best


@given(grid_min_deltas, st.integers(2, 5), st.lists(st.one_of(logical_values, grid_logical_values), max_size=25))
def test_max_on_x_keeps_what_min_on_minus_x_keeps(min_delta, k, logical):
    """Mode duality: max on x and min on -x keep the same members (values negated) under the
    same names, with the same action types, entering and leaving names."""
    as_max = Strategy("val_loss", mode="max", min_delta=min_delta, top_k=k, on_missing="warn")
    as_min = Strategy("val_loss", mode="min", min_delta=min_delta, top_k=k, on_missing="warn")
    max_final, max_steps = scan(init(as_max), [{} if v is MISSING else {"val_loss": v} for v in logical])
    min_final, min_steps = scan(init(as_min), [{} if v is MISSING else {"val_loss": -v} for v in logical])

    def shape(per_step):
        return [[(type(a).__name__, getattr(a, "aside", None), getattr(a, "name", None), getattr(a, "leaves", ()))
                 for a in s] for s in per_step]

    assert shape(max_steps) == shape(min_steps)
    mx, mn = max_final.bests[0], min_final.bests[0]
    assert (mx.value is None) == (mn.value is None)
    if mx.value is not None:
        assert mx.value == -mn.value and mx.epoch == mn.epoch
    assert [(m.value, m.epoch, m.name) for m in mx.others] == [(-m.value, m.epoch, m.name) for m in mn.others]


@given(top_k_strategies(top_k=st.integers(2, 4)), st.lists(grid_values, max_size=20),
       st.lists(st.integers(0, 3), min_size=20, max_size=20), st.lists(st.integers(0, 2), min_size=20, max_size=20))
def test_member_names_stay_distinct_when_positions_repeat(strategy, values, epochs, steps):
    """Decisions at the same (epoch, global_step) (explicit positions, repeated) still give
    members distinct names: ``-1``, ``-2``, ... on a clash; each name says its position."""
    state = init(strategy)
    for value, epoch, global_step in zip(values, epochs, steps):
        before = state.bests[0]
        state, actions = step(state, {strategy.metric_name: value}, epoch, global_step=global_step)
        check_best(strategy, state.bests[0])
        check_transition(strategy, before, state.bests[0], actions[0] if actions else None)
        assert all(a.global_step == global_step and a.epoch == epoch for a in actions)


# --- the pinned example from the issue --------------------------------------------------------


def test_issue_example_keeps_060_058_055_and_says_who_enters_and_leaves():
    """Max-mode values 0.50, 0.45, 0.60, 0.55, 0.58 with top_k=3 keep 0.60, 0.58, 0.55 (Lightning's
    save_top_k=3); ``keep=3`` with overwrite=False would keep 0.60 and 0.50 (the improvements)."""
    s = Strategy("acc", mode="max", top_k=3)
    final, per_step = scan(init(s), [{"acc": v} for v in (0.50, 0.45, 0.60, 0.55, 0.58)])
    assert per_step == (
        (Save(s, 0, 0.50, None),),
        (Enter(s, 1, 0.45, "best_acc-epoch=1.pt"),),
        (Save(s, 2, 0.60, 0.50, aside="best_acc-epoch=0.pt"),),
        (Enter(s, 3, 0.55, "best_acc-epoch=3.pt", kth=0.45, leaves=["best_acc-epoch=1.pt"]),),
        (Enter(s, 4, 0.58, "best_acc-epoch=4.pt", kth=0.50, leaves=["best_acc-epoch=0.pt"]),),
    )
    assert final.bests[0] == Best(0.60, 2, None, [Member(0.58, 4, None, "best_acc-epoch=4.pt"),
                                                  Member(0.55, 3, None, "best_acc-epoch=3.pt")])
    archived = Strategy("acc", mode="max", overwrite=False, keep=3)
    _, improvements = scan(init(archived), [{"acc": v} for v in (0.50, 0.45, 0.60, 0.55, 0.58)])
    assert [a.value for s_ in improvements for a in s_] == [0.50, 0.60]


def test_issue_example_with_global_steps_names_the_step():
    """With the global step known, member names say it: ``best_acc-epoch=3-step=120.pt``."""
    s = Strategy("acc", mode="max", top_k=3)
    final, _ = scan(init(s), [{"acc": v} for v in (0.50, 0.45, 0.60, 0.55, 0.58)], global_steps=[40 * (e + 1) for e in range(5)])
    assert [(m.value, m.name) for m in final.bests[0].others] == [
        (0.58, "best_acc-epoch=4-step=200.pt"), (0.55, "best_acc-epoch=3-step=160.pt")]
    assert final.bests[0].global_step == 120


def test_a_tie_with_the_kth_does_not_enter_and_a_tie_with_the_best_is_a_member():
    """Ties: the earlier value stays; a value equal to the best is not a new best but may enter."""
    s = Strategy("loss", top_k=2)
    final, per_step = scan(init(s), [{"loss": v} for v in (1.0, 1.0, 1.0, 0.5)])
    assert [[type(a).__name__ for a in actions] for actions in per_step] == [["Save"], ["Enter"], [], ["Save"]]
    assert per_step[3][0].aside == "best_loss-epoch=0.pt" and per_step[3][0].leaves == ("best_loss-epoch=1.pt",)
    assert kept_of(final.bests[0]) == [(0.5, 3, None), (1.0, 0, None)]


# --- the record -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"top_k": 0}, "top_k: expected an int >= 1, got int 0"),
        ({"top_k": 2.0}, "top_k: expected an int >= 1, got float 2.0"),
        ({"top_k": True}, "top_k: expected an int >= 1, got bool True"),
        ({"top_k": 3, "overwrite": False}, "top_k: top_k=3 keeps the 3 best values under their own names"),
        ({"top_k": 3, "overwrite": False, "keep": 2}, "top_k: top_k=3 keeps the 3 best values"),
        ({"top_k": 2, "filename": "x" * 118 + ".pt"}, "top_k: top_k=2 names its members"),
    ],
)
def test_top_k_validates_itself(fields, message):
    """``top_k`` is an int >= 1; above 1 it refuses overwrite=False and keep, and filenames
    too long to leave room for member names."""
    with pytest.raises(ConfigError) as info:
        Strategy("acc", **fields)
    assert str(info.value).startswith(message), str(info.value)


def test_top_k_from_plain_data_and_its_key_path_errors():
    """``top_k`` in plain data; a bad one names its key path; numpy-like ints are accepted."""
    import numpy as np

    config = Config.from_mapping([{"metric_name": "acc", "mode": "max", "top_k": np.int64(3)}])
    assert config.strategies[0].top_k == 3 and type(config.strategies[0].top_k) is int
    with pytest.raises(ConfigError, match=r"^\[0\]\.top_k: expected an int >= 1, got int 0"):
        Config.from_mapping([{"metric_name": "acc", "top_k": 0}])
    with pytest.raises(ConfigError, match=r"^strategies\[1\]\.top_k: top_k=2 keeps"):
        Config.from_mapping({"strategies": [{"metric_name": "a"}, {"metric_name": "acc", "top_k": 2, "overwrite": False}]})


def test_a_filename_of_member_form_is_refused_beside_a_top_k_strategy():
    """A strategy whose filename looks like another's top-k member would be pruned: refused."""
    with pytest.raises(ConfigError, match=r"strategies\[1\]\.filename: 'best_acc-epoch=3.pt' has the form of a top-k member"):
        Config([Strategy("acc", top_k=2), Strategy("b", filename="best_acc-epoch=3.pt")])
    Config([Strategy("acc"), Strategy("b", filename="best_acc-epoch=3.pt")])  # top_k=1 keeps no members: fine


def test_actions_refuse_members_that_are_not_member_names():
    """``Enter``/``Save`` validate their names: member names of the strategy only, none for top_k=1."""
    s = Strategy("acc", mode="max", top_k=3)
    with pytest.raises(ValueError, match="is not a top-k member name of 'best_acc.pt'"):
        Enter(s, 1, 0.5, "other.pt")
    with pytest.raises(ValueError, match="keeps no top-k members"):
        Save(Strategy("acc"), 1, 0.4, 0.5, aside="best_acc-epoch=0.pt")
    with pytest.raises(ValueError, match="does not beat the k-th best"):
        Enter(s, 1, 0.4, "best_acc-epoch=1.pt", kth=0.5)
    with pytest.raises(ValueError, match="keeps no top-k members"):
        Enter(Strategy("acc", mode="max"), 1, 0.4, "best_acc-epoch=1.pt")


# --- resume and the wire ------------------------------------------------------------------------


@given(top_k_runs(min_delta=grid_min_deltas), st.data())
def test_resume_from_to_dict_continues_like_the_uninterrupted_run(run, data):
    """``to_dict`` -> JSON -> ``restore`` at any point, then the rest of the history: the same
    final state (members and their names included) and the same actions as one run."""
    strategy, _, history = run
    config = Config([strategy, ckptfn.Every(n_steps=3)], on_missing="warn")
    steps = [10 * i for i in range(len(history))]
    k = data.draw(st.integers(0, len(history)))
    full_final, full_steps = scan(init(config), history, global_steps=steps)
    head, head_steps = scan(init(config), history[:k], global_steps=steps[:k])
    saved = json.loads(json.dumps(head.to_dict(), allow_nan=False))
    restored = ckptfn.restore(config, saved)
    assert restored == head
    resumed_final, tail_steps = scan(restored, history[k:], range(k, len(history)), global_steps=steps[k:])
    assert resumed_final == full_final and head_steps + tail_steps == full_steps


@given(top_k_runs(), st.integers(1, 5))
def test_restore_with_a_smaller_top_k_keeps_the_best_ones(run, smaller):
    """Restoring for the same strategy with another top_k keeps the best ``top_k`` of the saved
    set (same identity: metric, mode, filename); ``top_k=1`` keeps only the best."""
    strategy, _, history = run
    final, _ = scan(init(strategy), history)
    changed = Strategy(strategy.metric_name, mode=strategy.mode, top_k=smaller, on_missing="warn")
    restored = ckptfn.restore(changed, final.to_dict()).bests[0]
    assert kept_of(restored) == kept_of(final.bests[0])[: smaller if final.bests[0].value is not None else smaller - 1]
    check_best(changed, restored)


@given(top_k_runs(min_delta=grid_min_deltas))
def test_decisions_with_enter_round_trip_through_the_wire(run):
    """Every decision of a top-k run (Save with aside/leaves, Enter, Skip) is rebuilt exactly
    from ``decision_to_wire``, which holds only plain data."""
    strategy, _, history = run
    config = Config([strategy, ckptfn.Every(2)], on_missing="warn")
    state = init(config)

    def plain(value):
        if isinstance(value, (tuple, list)):
            return all(plain(v) for v in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return value is None or isinstance(value, (str, int, float, bool))

    for epoch, metrics in enumerate(history):
        state, actions = step(state, metrics, global_step=7 * epoch)
        wire = decision_to_wire(state, actions)
        assert plain(wire)
        assert decision_from_wire(config, wire) == (state, actions)


def test_restore_refuses_malformed_members_by_key_path():
    """Saved members are checked: a missing name, duplicate names, a non-finite value."""
    s = Strategy("acc", mode="max", top_k=3)
    state, _ = scan(init(s), [{"acc": v} for v in (0.5, 0.6, 0.7)])
    data = json.loads(json.dumps(state.to_dict()))
    assert [m["name"] for m in data["strategies"][0]["top_k_others"]] == ["best_acc-epoch=1.pt", "best_acc-epoch=0.pt"]
    broken = json.loads(json.dumps(data))
    del broken["strategies"][0]["top_k_others"][1]["name"]
    with pytest.raises(ConfigError, match=r"^strategies\[0\]\.top_k_others\[1\]\.name: required key is missing"):
        ckptfn.restore(s, broken)
    broken = json.loads(json.dumps(data))
    broken["strategies"][0]["top_k_others"][1]["name"] = "best_acc-epoch=1.pt"
    with pytest.raises(ConfigError, match="distinct names"):
        ckptfn.restore(s, broken)
    broken = json.loads(json.dumps(data))
    broken["strategies"][0]["top_k_others"][0]["value"] = None
    with pytest.raises(ConfigError, match=r"top_k_others\[0\]\.value"):
        ckptfn.restore(s, broken)


# --- a state machine ------------------------------------------------------------------------------


class TopKMachine(RuleBasedStateMachine):
    """Random decisions, restores (with a changed top_k) and wire round trips beside ``TopKModel``."""

    @initialize(strategy=top_k_strategies(min_delta=grid_min_deltas, top_k=st.integers(1, 5)),
                every=st.booleans())
    def start(self, strategy, every):
        self.strategy = strategy
        self.extra = (ckptfn.Every(n_steps=5),) if every else ()
        self.config = Config((strategy, *self.extra), on_missing="warn")
        self.state = init(self.config)
        self.model = TopKModel(strategy)
        self.epoch, self.global_step = 0, 0

    def _decide(self, value):
        before = self.state.bests[0]
        metrics = {} if value is MISSING else {self.strategy.metric_name: value}
        self.state, actions = step(self.state, metrics, self.epoch, global_step=self.global_step)
        mine = [a for a in actions if a.strategy == self.strategy]
        verdict = self.model.offer(value, self.epoch, self.global_step) if usable(value) else None
        expected = {"save": [Save], "enter": [Enter], None: []}[verdict]
        if not usable(value):
            expected = [Skip]
        assert [type(a) for a in mine] == expected
        check_transition(self.strategy, before, self.state.bests[0], mine[0] if mine else None)
        wire = decision_to_wire(self.state, actions)
        assert decision_from_wire(self.config, wire) == (self.state, actions)
        self.epoch += 1

    @rule(value=grid_values, gap=st.integers(0, 7))
    def decide_on_a_grid_value(self, value, gap):
        self.global_step += gap
        self._decide(value)

    @rule(value=st.one_of(st.sampled_from(NON_FINITE), st.just(MISSING)))
    def decide_on_a_value_that_cannot_be_judged(self, value):
        self._decide(value)

    @rule(value=finite_values)
    def decide_on_any_float_without_min_delta(self, value):
        if self.strategy.min_delta == 0:  # exact: the model and the floats agree
            self._decide(value)

    @rule()
    def round_trip_through_json(self):
        self.state = ckptfn.restore(self.config, json.loads(json.dumps(self.state.to_dict(), allow_nan=False)))

    @rule(top_k=st.integers(1, 5))
    def restore_with_another_top_k(self, top_k):
        s = self.strategy
        self.strategy = Strategy(s.metric_name, mode=s.mode, min_delta=s.min_delta, top_k=top_k, on_missing="warn")
        self.config = Config((self.strategy, *self.extra), on_missing="warn")
        self.state = ckptfn.restore(self.config, self.state.to_dict())
        self.model.truncate(top_k)

    @invariant()
    def kept_set_matches_the_model(self):
        best = self.state.bests[0]
        check_best(self.strategy, best)
        assert kept_of(best) == self.model.kept()


TestTopKMachine = TopKMachine.TestCase


def test_members_without_a_best_judge_the_next_value_against_the_members():
    """A top-k set restored from member files whose best file is gone (moved away by hand):
    ``Best(None, others=...)``. The next value, however bad, must not become "the best" at
    ``filename`` while better members exist: the best is the best value kept."""
    s = Strategy("acc", mode="max", top_k=3)
    members = [Member(0.8, 2, None, "best_acc-epoch=2.pt"), Member(0.5, 0, None, "best_acc-epoch=0.pt")]
    state = ckptfn.State(Config([s]), [Best(None, None, None, members)])
    state, _ = step(state, {"acc": 0.1}, 3)
    best = state.bests[0]
    kept = [v for v, _, _ in kept_of(best)]
    assert best.value == max(kept), f"best_acc.pt holds {best.value} while a member holds {max(kept)}"
