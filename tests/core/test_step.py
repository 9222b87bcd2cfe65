"""Laws of the decision core, checked against a tiny reference model."""

from __future__ import annotations

import copy
import json
import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckptfn
from ckptfn import Config, Save, Skip, init, scan, step
from ckptfn.core.metrics import MISSING

from tests.strategies import logical_histories, min_deltas, rendered, runs


def reference(strategy: ckptfn.Strategy, logical: list[dict]) -> tuple[list, float | None]:
    """The rules of one strategy, written as the plain loop the library replaces.

    Returns ``[(epoch, kind, value, previous)]`` and the final best.
    """
    events, best = [], None
    for epoch, values in enumerate(logical):
        value = values[strategy.metric_name]
        if value is MISSING:
            events.append((epoch, "missing", None, None))
        elif not math.isfinite(value):
            events.append((epoch, "not_finite", None, None))
        elif best is None or (
            value < best - strategy.min_delta
            if strategy.mode == "min"
            else value > best + strategy.min_delta
        ):
            events.append((epoch, "save", value, best))
            best = value
    return events, best


def as_events(actions_per_step, strategy) -> list:
    return [
        (a.epoch, "save", a.value, a.previous) if isinstance(a, Save) else (a.epoch, a.reason, None, None)
        for actions in actions_per_step
        for a in actions
        if a.strategy == strategy
    ]


@given(runs(min_delta=0.0))
def test_best_is_running_extreme_of_finite_values(run):
    config, logical, history = run
    state = init(config)
    for epoch, metrics in enumerate(history):
        state, _ = step(state, metrics)
        for strategy, best in zip(config.strategies, ckptfn.best_values(state).values()):
            seen = [e[strategy.metric_name] for e in logical[: epoch + 1]]
            finite = [v for v in seen if v is not MISSING and math.isfinite(v)]
            expected = (min if strategy.mode == "min" else max)(finite) if finite else None
            assert best == expected


@given(runs())
def test_saves_exactly_at_strict_records_beyond_min_delta(run):
    config, logical, history = run
    final, per_step = scan(init(config), history)
    for strategy in config.strategies:
        expected, expected_best = reference(strategy, logical)
        assert as_events(per_step, strategy) == expected
        assert ckptfn.best_values(final)[strategy.filename] == expected_best
    for action in (a for actions in per_step for a in actions if isinstance(a, Save)):
        s = action.strategy
        assert ckptfn.improved(s.mode, action.previous, action.value, s.min_delta)
        if action.previous is not None:  # exact arithmetic: float rounding never grants a save
            gain = Fraction(action.previous) - Fraction(action.value)
            assert (gain if s.mode == "min" else -gain) > Fraction(s.min_delta)


@given(min_deltas, logical_histories(["val_loss"]))
def test_max_on_x_saves_when_min_on_minus_x_saves(min_delta, logical):
    def history(sign):
        return [{} if e["val_loss"] is MISSING else {"val_loss": sign * e["val_loss"]} for e in logical]

    as_max = ckptfn.Strategy("val_loss", mode="max", min_delta=min_delta, on_missing="warn")
    as_min = ckptfn.Strategy("val_loss", mode="min", min_delta=min_delta, on_missing="warn")
    _, max_steps = scan(init(as_max), history(1))
    _, min_steps = scan(init(as_min), history(-1))

    def saves(per_step, sign):
        return [(a.epoch, sign * a.value) for actions in per_step for a in actions if isinstance(a, Save)]

    assert saves(max_steps, 1) == saves(min_steps, -1)
    assert [[type(a) for a in s] for s in max_steps] == [[type(a) for a in s] for s in min_steps]


@given(runs(), st.data())
def test_step_is_pure_and_deterministic(run, data):
    config, logical, history = run
    k = data.draw(st.integers(0, len(history)))
    state, _ = scan(init(config), history[:k])
    metrics = data.draw(rendered(logical[k] if k < len(logical) else {}))
    state_before, metrics_before = copy.deepcopy(state), copy.deepcopy(metrics)
    first = step(state, metrics)
    second = step(state, metrics)
    assert state == state_before
    assert repr(metrics) == repr(metrics_before)  # repr: NaN != NaN, but prints the same
    assert repr(first) == repr(second)
    assert first[0] == second[0]


@given(runs())
def test_strategies_do_not_interfere(run):
    config, _, history = run
    multi_final, multi_steps = scan(init(config), history)
    for index, strategy in enumerate(config.strategies):
        single_final, single_steps = scan(init(Config([strategy], on_missing="warn")), history)
        assert [tuple(a for a in s if a.strategy == strategy) for s in multi_steps] == list(
            single_steps
        )
        assert multi_final.bests[index] == single_final.bests[0]


@given(runs())
def test_missing_and_non_finite_never_save_or_move_the_best(run):
    config, logical, history = run
    state = init(config)
    for values, metrics in zip(logical, history):
        new_state, actions = step(state, metrics)
        for index, strategy in enumerate(config.strategies):
            value = values[strategy.metric_name]
            if value is MISSING or not math.isfinite(value):
                mine = [a for a in actions if a.strategy == strategy]
                reason = "missing" if value is MISSING else "not_finite"
                assert [(type(a), a.reason) for a in mine] == [(Skip, reason)]
                assert new_state.bests[index] == state.bests[index]
        state = new_state


@given(runs(), st.data())
def test_resume_from_to_dict_continues_like_the_uninterrupted_run(run, data):
    config, _, history = run
    k = data.draw(st.integers(0, len(history)))
    full_final, full_steps = scan(init(config), history)
    head_state, head_steps = scan(init(config), history[:k])
    saved = json.loads(json.dumps(head_state.to_dict(), allow_nan=False))
    resumed_final, tail_steps = scan(ckptfn.restore(config, saved), history[k:])
    assert resumed_final == full_final
    assert head_steps + tail_steps == full_steps


@given(runs())
def test_scan_equals_a_manual_fold_of_step(run):
    config, _, history = run
    state, manual = init(config), []
    for metrics in history:
        state, actions = step(state, metrics)
        manual.append(actions)
    assert scan(init(config), history) == (state, tuple(manual))


@given(runs())
def test_epoch_defaults_to_steps_taken_and_explicit_epochs_are_used(run):
    config, _, history = run
    _, default_steps = scan(init(config), history)
    state, explicit = init(config), []
    for index, metrics in enumerate(history):
        state, actions = step(state, metrics, epoch=10 + 2 * index)
        explicit.append(actions)
    assert [[a.epoch for a in s] for s in default_steps] == [[i] * len(s) for i, s in enumerate(default_steps)]
    assert [[a.epoch for a in s] for s in explicit] == [[10 + 2 * i] * len(s) for i, s in enumerate(explicit)]
    assert state.steps == len(history)


@given(runs())
def test_disabled_config_never_acts(run):
    config, _, history = run
    off = ckptfn.Config(config.strategies, enabled=False)
    final, per_step = scan(init(off), history)
    assert per_step == ((),) * len(history)
    assert set(ckptfn.best_values(final).values()) <= {None}


def test_documented_example_three_strategies():
    config = ckptfn.Config.from_mapping(
        [
            {"metric_name": "val_loss", "filename": "best_loss.pt"},
            {"metric_name": "loss_components.concordance", "filename": "best_concordance.pt"},
            {"metric_name": "val_residual_spearman", "mode": "max", "filename": "best_corr.pt"},
        ]
    )
    history = [
        {"val_loss": 1.0, "loss_components": {"concordance": 0.5}, "val_residual_spearman": 0.1},
        {"val_loss": 0.8, "loss_components": {"concordance": 0.6}, "val_residual_spearman": 0.3},
        {"val_loss": 0.9, "loss_components": {"concordance": 0.4}, "val_residual_spearman": 0.2},
        {"val_loss": float("nan"), "loss_components": {}, "val_residual_spearman": 0.2},
    ]
    final, per_step = scan(init(config), history)
    summary = [[(type(a).__name__, a.filename) for a in s] for s in per_step]
    assert summary == [
        [("Save", "best_loss.pt"), ("Save", "best_concordance.pt"), ("Save", "best_corr.pt")],
        [("Save", "best_loss.pt"), ("Save", "best_corr.pt")],
        [("Save", "best_concordance.pt")],
        [("Skip", "best_loss.pt"), ("Skip", "best_concordance.pt")],
    ]
    assert ckptfn.best_values(final) == {"best_loss.pt": 0.8, "best_concordance.pt": 0.4, "best_corr.pt": 0.3}
    assert per_step[1][0].previous == 1.0
    assert [a.reason for a in per_step[3]] == ["not_finite", "missing"]


def test_min_delta_example():
    strategy = ckptfn.Strategy("val_loss", min_delta=0.1)
    _, per_step = scan(init(strategy), [{"val_loss": v} for v in (1.0, 0.95, 0.85, 0.8, 0.7)])
    assert [a.value for s in per_step for a in s] == [1.0, 0.85, 0.7]


@pytest.mark.parametrize("epoch", [-1, 1.5, "3", True])
def test_bad_epoch_is_rejected(epoch):
    with pytest.raises((TypeError, ValueError), match="epoch"):
        step(init(ckptfn.Strategy("val_loss")), {"val_loss": 1.0}, epoch=epoch)


def test_metrics_must_be_a_mapping():
    with pytest.raises(ckptfn.MetricTypeError, match="mapping.*list"):
        step(init(ckptfn.Strategy("val_loss")), [("val_loss", 1.0)])


def test_scan_accepts_any_iterable_and_an_empty_history():
    state = init(ckptfn.Strategy("val_loss"))
    assert scan(state, iter([])) == (state, ())
    final, per_step = scan(state, ({"val_loss": v} for v in (2.0, 1.0)))
    assert final.steps == 2 and len(per_step) == 2


@given(runs())
def test_new_skips_reports_each_strategy_and_reason_once(run):
    config, _, history = run
    _, per_step = scan(init(config), history)
    seen, loud_all, quiet_all = frozenset(), [], []
    for actions in per_step:
        seen, loud, quiet = ckptfn.new_skips(seen, actions)
        loud_all += loud
        quiet_all += quiet
    skips = [a for actions in per_step for a in actions if isinstance(a, Skip)]
    keys = [(s.filename, s.reason) for s in loud_all]
    assert len(keys) == len(set(keys)) and set(keys) == {(s.filename, s.reason) for s in skips} == seen
    assert len(loud_all) + len(quiet_all) == len(skips)
