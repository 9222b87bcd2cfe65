"""Steps and wall time as positions (issue 14): ``Every(n_steps=...)``, ``Every(seconds=...)``,
``global_step`` in every action and state, and the Lightning ``val_check_interval`` case."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckptfn
from ckptfn import Best, CheckpointManager, Config, ConfigError, Enter, Every, Last, Periodic, Save, Skip, Strategy, init, scan, step

from tests.strategies import grid_seconds, non_decreasing_clocks, non_decreasing_steps, runs


def reference_step_saves(n: int, steps: list[int]) -> list[int]:
    """The documented rule, by search: a decision at step s saves when some multiple of n lies
    in (last save, s]; before any save the last save counts as step 0."""
    saved, last = [], 0
    for s in steps:
        if any(m % n == 0 for m in range(last + 1, s + 1)):
            saved.append(s)
            last = s
    return saved


def reference_clock_saves(period: float, clocks: list[float]) -> list[float]:
    """The documented rule, exactly: the first decision saves, then each decision at least
    ``period`` after the previous save."""
    saved, last = [], None
    for t in clocks:
        if last is None or Fraction(t) - Fraction(last) >= Fraction(period):
            saved.append(t)
            last = t
    return saved


def periodic_steps(per_step) -> list[int]:
    return [a.global_step for actions in per_step for a in actions if isinstance(a, Periodic)]


# --- Every(n_steps=...) ------------------------------------------------------------------------


@given(st.integers(1, 40), non_decreasing_steps)
def test_n_steps_saves_at_the_first_decision_at_or_past_each_multiple(n, steps):
    """Any non-decreasing steps with gaps: a save exactly at the first decision at or past each
    multiple of n later than the last save; the state remembers the last save's position."""
    state, saved = init(Every(n_steps=n)), []
    for epoch, global_step in enumerate(steps):
        state, actions = step(state, {}, epoch, global_step=global_step)
        assert all(isinstance(a, Periodic) and (a.epoch, a.global_step) == (epoch, global_step) for a in actions)
        saved += [(a.epoch, a.global_step) for a in actions]
    assert [s for _, s in saved] == reference_step_saves(n, steps)
    assert state.bests[0] == (Last(*saved[-1]) if saved else Last())


@given(st.integers(1, 30), st.integers(1, 40), st.integers(1, 12))
def test_last_is_never_older_than_the_latest_multiple_reached(n, every, decisions):
    """Validation every ``every`` steps with ``Every(n_steps=n)``: after each decision at step s,
    the last periodic save lies in the same block of n steps as s (once s >= n)."""
    state = init(Every(n_steps=n))
    for index in range(decisions):
        s = every * (index + 1)
        state, _ = step(state, {}, global_step=s)
        last = state.bests[0]
        if s >= n:
            assert last.global_step is not None and last.global_step // n == s // n and last.global_step <= s
        else:
            assert last.global_step is None


@given(st.integers(1, 20), st.lists(non_decreasing_steps, min_size=2, max_size=4))
def test_each_step_phase_that_counts_from_zero_again_saves_as_a_fresh_run_would(n, phases):
    """A new phase whose global step counts from 0 again (a new Trainer, a fine-tuning phase):
    it saves as a fresh run would, and its state is the fresh run's."""
    every = Every(n_steps=n)
    state = init(every)
    for steps in phases:
        steps = [s - steps[0] for s in steps]  # this phase counts from 0
        fresh, saved, expected = init(every), [], []
        for epoch, global_step in enumerate(steps):
            state, actions = step(state, {}, epoch, global_step=global_step)
            fresh, fresh_actions = step(fresh, {}, epoch, global_step=global_step)
            saved += [(a.epoch, a.global_step) for a in actions]
            expected += [(a.epoch, a.global_step) for a in fresh_actions]
        assert saved == expected
        assert state.bests[0] == fresh.bests[0]


def test_steps_going_back_to_a_step_after_the_last_save_start_a_new_phase():
    """The issue: a counter going backwards is a new phase and "it saves again" (``due``'s
    docstring: "so last.pt never stays at the old phase's position"). Phase 1 validates at
    steps 20 (saved) and 35; phase 2 counts again and validates at 25: a fresh run saves
    there, so must this one, else last.pt keeps phase 1's step 20 until step 40."""
    every = Every(n_steps=20)
    state, _ = scan(init(every), [{}, {}], global_steps=[20, 35])
    assert state.bests[0] == Last(0, 20)
    _, fresh = step(init(every), {}, 0, global_step=25)
    assert [a.global_step for a in fresh] == [25]
    state, actions = step(state, {}, 0, global_step=25)  # the step went back from 35 to 25
    assert [a.global_step for a in actions] == [25]


def test_the_same_step_decided_twice_is_not_a_new_phase():
    """Repeating the last save's position saves nothing; one step back below it saves again."""
    state, per_step = scan(init(Every(n_steps=10)), [{}] * 4, global_steps=[10, 10, 9, 10])
    assert periodic_steps(per_step) == [10, 10]
    assert [len(a) for a in per_step] == [1, 0, 0, 1]  # 9: a new phase, not due yet; 10: due again


# --- Every(seconds=...) ----------------------------------------------------------------------


@given(grid_seconds, non_decreasing_clocks)
def test_seconds_saves_first_then_never_closer_than_the_period_and_never_late(period, clocks):
    """Non-decreasing clocks: the first decision saves; no two saves are closer than the period;
    no decision at least the period after the last save is skipped (exact arithmetic)."""
    state, saved = init(Every(seconds=period)), []
    for epoch, now in enumerate(clocks):
        state, actions = step(state, {}, epoch, now=now)
        if actions:
            saved.append(now)
        assert state.bests[0].time == (saved[-1] if saved else None)
    assert saved == reference_clock_saves(period, clocks)
    assert saved[:1] == clocks[:1]
    assert all(Fraction(b) - Fraction(a) >= Fraction(period) for a, b in zip(saved, saved[1:]))
    for now in clocks:  # no decision that was due was skipped
        before = [t for t in saved if t <= now]
        assert now in saved or Fraction(now) - Fraction(before[-1]) < Fraction(period)


@given(grid_seconds, non_decreasing_clocks, st.integers(1, 400))
def test_a_clock_going_back_before_the_last_save_saves(period, clocks, back):
    """A clock reading earlier than the last periodic save (another process's clock, a reset):
    the decision saves, as a fresh run's first decision would."""
    state, _ = scan(init(Every(seconds=period)), [{}] * len(clocks), times=clocks)
    last = state.bests[0].time
    state, actions = step(state, {}, now=last - back / 4)
    assert [type(a) for a in actions] == [Periodic]
    assert state.bests[0].time == last - back / 4


def test_a_clock_going_back_after_the_last_save_is_a_new_phase_too():
    """The issue: "time going backwards saves again". Saved at t=0, decided at t=50, then the
    clock reads 10 (it went back 40 s): a fresh run saves at its first decision."""
    every = Every(seconds=60)
    state, per_step = scan(init(every), [{}, {}], times=[0.0, 50.0])
    assert [len(a) for a in per_step] == [1, 0]
    state, actions = step(state, {}, now=10.0)
    assert [type(a) for a in actions] == [Periodic]


def test_seconds_examples():
    """Pinned: every 60 s, decisions at 0, 30, 59.5, 60, 61, 119.75, 120, then the clock resets to 5."""
    state, per_step = scan(init(Every(seconds=60)), [{}] * 8, times=[0, 30, 59.5, 60, 61, 119.75, 120, 5])
    assert [len(a) for a in per_step] == [1, 0, 0, 1, 0, 0, 1, 1]
    assert state.bests[0] == Last(7) and state.bests[0].time == 5.0


def test_a_restored_seconds_state_starts_its_clock_afresh():
    """``Last.time`` is this process's clock: not stored, not compared; the restored state's
    first decision saves (a new process's clock is unrelated to the old one's)."""
    every = Every(seconds=100)
    state, _ = scan(init(every), [{}], times=[1000.0])
    data = json.loads(json.dumps(state.to_dict()))
    assert "time" not in json.dumps(data["strategies"][0]) and data["strategies"][0]["every_seconds"] == 100.0
    restored = ckptfn.restore(every, data)
    assert restored == state and restored.bests[0].time is None
    _, actions = step(restored, {}, now=1001.0)
    assert [type(a) for a in actions] == [Periodic]


# --- the counter must be passed ------------------------------------------------------------


@pytest.mark.parametrize(
    "every, position, needs",
    [
        (Every(n_steps=20, filename="last.ckpt"), {"epoch": 0}, r"every 20 steps \(last.ckpt\) needs the global step: pass global_step="),
        (Every(n_steps=20, filename="last.ckpt"), {"epoch": 0, "now": 5.0}, "needs the global step"),
        (Every(seconds=30, filename="clock.pt"), {"epoch": 0}, r"every 30 seconds \(clock.pt\) needs the clock: pass now="),
        (Every(seconds=30, filename="clock.pt"), {"epoch": 0, "global_step": 10}, "needs the clock"),
    ],
)
def test_a_trigger_without_its_counter_is_a_clear_error_naming_the_strategy(every, position, needs):
    """``Every(n_steps=)`` without ``global_step`` and ``Every(seconds=)`` without ``now`` raise a
    ValueError that names the strategy, even beside a metric strategy that could decide; the
    caller's state is untouched."""
    state = init(Config([Strategy("val_loss"), every]))
    before = state.to_dict()
    with pytest.raises(ValueError, match=needs):
        step(state, {"val_loss": 0.5}, **position)
    assert state.to_dict() == before and state == init(state.config)


def test_the_manager_needs_the_global_step_for_n_steps(tmp_path):
    """``CheckpointManager.update`` passes ``global_step`` on; without it an ``Every(n_steps=)``
    config fails before anything is written."""
    manager = CheckpointManager(tmp_path, [Every(n_steps=5, filename="last.ckpt")])
    with pytest.raises(ValueError, match=r"last.ckpt\) needs the global step"):
        manager.update({}, {"w": torch.zeros(1)}, 0)
    assert list(tmp_path.iterdir()) == []
    assert [p.name for p in manager.update({}, {"w": torch.zeros(1)}, 0, global_step=5)] == ["last.ckpt"]


def test_every_n_epochs_needs_no_step_and_records_it_when_given():
    state, actions = step(init(Every(1)), {}, 3, global_step=77)
    assert actions == (Periodic(Every(1), 3, global_step=77),) and state.bests[0] == Last(3, 77)
    assert step(init(Every(1)), {}, 3)[1] == (Periodic(Every(1), 3),)


# --- the record and plain data ----------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_epochs": 2, "n_steps": 100}, "an Every has exactly one trigger, got n_epochs=2, n_steps=100"),
        ({"n_steps": 1, "seconds": 5}, "an Every has exactly one trigger, got n_steps=1, seconds=5.0"),
        ({"n_epochs": 1, "n_steps": 2, "seconds": 3}, "an Every has exactly one trigger, got n_epochs=1, n_steps=2, seconds=3.0"),
        ({"n_steps": 0}, "n_steps: expected an int >= 1, got int 0"),
        ({"n_steps": 2.5}, "n_steps: expected an int >= 1, got float 2.5"),
        ({"n_steps": True}, "n_steps: expected an int >= 1, got bool True"),
        ({"seconds": 0}, "seconds: expected a finite number of seconds > 0, got float 0.0"),
        ({"seconds": -1.5}, "seconds: expected a finite number of seconds > 0, got float -1.5"),
        ({"seconds": float("inf")}, "seconds: expected a finite number of seconds > 0, got float inf"),
        ({"seconds": float("nan")}, "seconds: expected a finite number of seconds > 0, got float nan"),
        ({"seconds": 10**400}, "seconds: expected a finite number of seconds > 0, got float inf"),
        ({"seconds": "30"}, "seconds: expected a finite number of seconds > 0, got str '30'"),
        ({"seconds": True}, "seconds: expected a finite number of seconds > 0, got bool True"),
    ],
)
def test_every_has_exactly_one_valid_trigger(fields, message):
    with pytest.raises(ConfigError) as info:
        Every(**fields)
    assert str(info.value) == message


def test_every_triggers_describe_themselves():
    """One trigger, its key and its words; ``Every()`` is every epoch."""
    assert Every().trigger == ("n_epochs", 1) and Every().key == "every_n_epochs"
    assert Every(n_steps=20).trigger == ("n_steps", 20) and Every(n_steps=20).key == "every_n_steps"
    assert Every(seconds=90).trigger == ("seconds", 90.0) and Every(seconds=90).key == "every_seconds"
    assert [Every(1).describe(), Every(n_steps=1).describe(), Every(seconds=1).describe(), Every(seconds=1.5).describe()] == [
        "every 1 epoch", "every 1 step", "every 1 second", "every 1.5 seconds"]


def test_from_mapping_reads_every_n_steps_and_every_seconds():
    import numpy as np

    config = Config.from_mapping({"strategies": [
        {"metric_name": "val_loss"},
        {"every_n_steps": np.int64(500), "filename": "last.ckpt"},
        {"every_seconds": 1800, "filename": None, "overwrite": False, "keep": 2},
    ]})
    assert config.strategies[1:] == (Every(n_steps=500, filename="last.ckpt"),
                                     Every(seconds=1800.0, filename="last.pt", overwrite=False, keep=2))
    assert type(config.strategies[1].n_steps) is int and config.strategies[1].n_epochs is None
    assert Config.from_mapping({"every_seconds": 2.5}).strategies == (Every(seconds=2.5),)


@pytest.mark.parametrize(
    "obj, message",
    [
        ([{"every_n_steps": 0}], "[0].every_n_steps: expected an int >= 1, got int 0"),
        ([{"metric_name": "a"}, {"every_n_steps": 2.5}], "[1].every_n_steps: expected an int >= 1, got float 2.5"),
        ([{"every_seconds": 0}], "[0].every_seconds: expected a finite number of seconds > 0, got float 0.0"),
        ([{"every_seconds": "1h"}], "[0].every_seconds: expected a finite number of seconds > 0, got str '1h'"),
        ({"strategies": [{"every_seconds": -3}]}, "strategies[0].every_seconds: expected a finite number of seconds > 0, got float -3.0"),
        ([{"every_n_steps": 5, "every_seconds": 5}], "[0]: an Every has exactly one trigger, got every_n_steps=5, every_seconds=5.0"),
        ([{"every_n_epochs": 1, "every_n_steps": 5}], "[0]: an Every has exactly one trigger, got every_n_epochs=1, every_n_steps=5"),
        ([{"every_n_steps": 5, "metric_name": "a"}], "[0].every_n_steps: a strategy either watches a metric (metric_name) or saves periodically (every_n_steps), not both"),
        ([{"every_seconds": 5, "mode": "max"}], "[0]: unknown key 'mode'; valid keys: every_n_epochs, every_n_steps, every_seconds, filename, overwrite, keep"),
    ],
)
def test_every_mapping_errors_name_the_key_path(obj, message):
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(obj)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("obj", [{"every_n_step": 5}, [{"every_n_step": 5}], {"strategies": [{"every_n_step": 5}]}])
def test_a_misspelt_trigger_key_gets_a_did_you_mean(obj):
    """A typo of a trigger key is suggested wherever the mapping sits (the top-level mapping
    already does; in a list the mapping is taken for a metric strategy and only its keys are
    listed, with no hint)."""
    with pytest.raises(ConfigError, match=r"unknown key 'every_n_step' \(did you mean 'every_n_steps'\?\)"):
        Config.from_mapping(obj)


def test_state_of_step_and_clock_triggers_round_trips():
    """``to_dict`` records the trigger and the last save's epoch and step; ``restore`` reads them back."""
    config = Config([Every(n_steps=20, filename="steps.pt"), Every(seconds=60, filename="clock.pt")])
    state, _ = scan(init(config), [{}] * 3, global_steps=[20, 30, 45], times=[0.0, 30.0, 61.0])
    assert state.bests == (Last(2, 45), Last(2, 45))
    data = json.loads(json.dumps(state.to_dict()))
    assert data["strategies"][0] == {"every_n_steps": 20, "filename": "steps.pt", "overwrite": True, "keep": None,
                                     "last_epoch": 2, "last_global_step": 45, "last_seen": 45}
    assert data["strategies"][1]["last_seen"] is None  # a clock reading is this process's own
    assert data["strategies"][1]["every_seconds"] == 60.0
    assert ckptfn.restore(config, data) == state
    broken = json.loads(json.dumps(data))
    broken["strategies"][0]["last_global_step"] = -1
    with pytest.raises(ConfigError, match=r"^strategies\[0\]\.last_global_step: expected an int >= 0 or None, got -1"):
        ckptfn.restore(config, broken)


# --- global_step in every action and state ------------------------------------------------------


@given(runs(), non_decreasing_steps, st.integers(1, 10))
def test_global_step_is_recorded_in_every_action_and_state(run, steps, n):
    """With global steps passed, every Save/Enter/Skip/Periodic carries the decision's step, and
    each Best, Member and Last holds the step of the decision that chose it."""
    config, _, history = run
    history = history[: len(steps)]
    steps = steps[: len(history)]
    strategies = list(config.strategies)
    strategies[0] = Strategy(strategies[0].metric_name, mode=strategies[0].mode, filename=strategies[0].filename,
                             top_k=3, on_missing="warn")
    full = Config((*strategies, Every(n_steps=n, filename="steps.pt"), Every(2, filename="epochs.pt")), on_missing="warn")
    final, per_step = scan(init(full), history, global_steps=steps)
    for epoch, actions in enumerate(per_step):
        for action in actions:
            assert isinstance(action, (Save, Enter, Skip, Periodic))
            assert (action.epoch, action.global_step) == (epoch, steps[epoch])
    step_of = dict(enumerate(steps))
    for best in final.bests:
        if best.epoch is not None:
            assert best.global_step == step_of[best.epoch]
        for member in getattr(best, "others", ()):
            assert member.global_step == step_of[member.epoch]


def test_only_one_counter_is_enough():
    """Only the global step given (epochs default to the decision count), or only epochs: both work."""
    config = Config([Strategy("val_loss"), Every(n_steps=10)])
    state, per_step = scan(init(config), [{"val_loss": v} for v in (1.0, 0.5)], global_steps=[10, 20])
    assert [(type(a).__name__, a.epoch, a.global_step) for s in per_step for a in s] == [
        ("Save", 0, 10), ("Periodic", 0, 10), ("Save", 1, 20), ("Periodic", 1, 20)]
    assert state.bests == (Best(0.5, 1, 20), Last(1, 20))
    state, per_step = scan(init(Strategy("val_loss")), [{"val_loss": 1.0}], epochs=[4])
    assert state.bests == (Best(1.0, 4),) and per_step[0][0].global_step is None


@pytest.mark.parametrize("global_step", [-1, 1.5, "3", True])
def test_bad_global_step_is_rejected(global_step):
    with pytest.raises((TypeError, ValueError), match="global_step"):
        step(init(Strategy("val_loss")), {"val_loss": 1.0}, global_step=global_step)


@pytest.mark.parametrize("now", [float("nan"), float("inf"), "12:00", True])
def test_bad_clock_is_rejected(now):
    with pytest.raises(TypeError, match="now"):
        step(init(Every(seconds=5)), {}, now=now)


# --- the Lightning val_check_interval case ----------------------------------------------------


def test_validation_every_20_steps_keeps_last_ckpt_at_most_20_steps_old():
    """6 epochs of 20 steps, validation every 20 steps (global steps 20, 40, ..., 120):
    ``Every(n_steps=20, filename="last.ckpt")`` saves at every one of them."""
    config = Config([Strategy("val_loss", filename="best.ckpt"), Every(n_steps=20, filename="last.ckpt")])
    losses = [1.0, 0.8, 0.9, 0.7, 0.75, 0.72]
    state, per_step = scan(init(config), [{"val_loss": v} for v in losses], range(6), global_steps=range(20, 121, 20))
    assert [(a.epoch, a.global_step) for s in per_step for a in s if isinstance(a, Periodic)] == [
        (e, 20 * (e + 1)) for e in range(6)]
    assert state.bests == (Best(0.7, 3, 80), Last(5, 120))


def test_validation_every_20_steps_with_the_manager_writes_last_ckpt_each_time(tmp_path):
    """The same run through ``CheckpointManager``: after each validation the file ``last.ckpt``
    records this very epoch and step; ``best.ckpt`` records the best."""
    manager = CheckpointManager(tmp_path, [Strategy("val_loss", filename="best.ckpt"), Every(n_steps=20, filename="last.ckpt")])
    for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.72]):
        global_step = 20 * (epoch + 1)
        manager.update({"val_loss": loss}, {"w": torch.full((1,), float(epoch))}, epoch, global_step=global_step)
        meta = ckptfn.read_metadata(tmp_path / "last.ckpt")
        assert (meta["epoch"], meta["global_step"]) == (epoch, global_step)
        assert ckptfn.load_checkpoint(tmp_path / "last.ckpt")[0]["w"].item() == float(epoch)
    best = ckptfn.read_metadata(tmp_path / "best.ckpt")
    assert (best["epoch"], best["global_step"]) == (3, 80)
    resumed = ckptfn.restore_from_directory(manager.config, tmp_path)
    assert resumed.bests == (Best(0.7, 3, 80), Last(5, 120))
