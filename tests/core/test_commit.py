"""The commit rule: which state a shell keeps after a write (``ckptfn.core.commit``).

The law that matters: whatever happens to a write (success, a failure before any
name, a failure after some names), the state kept agrees with the files. Checked
against a model of the disk: the per-name records the files would hold.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptfn import Best, Every, Last, State, Strategy, init, step
from ckptfn.core.commit import Outcome, commit, roll_back
from ckptfn.core.snapshot import partition
from ckptfn.core.state import fresh

from tests.strategies import mixed_runs


def disk_state(config, disk: dict, steps: int) -> State:
    """What ``restore_from_directory`` reads from files holding ``disk`` (filename -> record)."""
    return State(config, [disk.get(s.filename, fresh(s)) for s in config.strategies], steps)


@given(mixed_runs(max_size=15), st.data())
def test_the_kept_state_always_agrees_with_the_files(run, data):
    config, _, history = run
    state, disk = init(config), {}
    for epoch, metrics in enumerate(history):
        new, actions = step(state, metrics, epoch)
        saves, _ = partition(actions)
        names = tuple(save.filename for save in saves)
        landed = data.draw(st.integers(0, len(names)), label="names published before the write stopped")
        failed = landed < len(names) or (names and data.draw(st.booleans(), label="fails after the last"))
        by_name = dict(zip((s.filename for s in config.strategies), new.bests))
        for name in names[:landed]:  # a file records the best (or last save) it was written with
            disk[name] = by_name[name]
        outcome = Outcome.failure(names, names[:landed]) if failed else Outcome.success(names)
        on_disk = disk_state(config, disk, new.steps) if outcome.touched_disk else None
        state = commit(state, new, outcome, on_disk)
        for strategy, best in zip(config.strategies, state.bests):
            assert best == disk.get(strategy.filename, fresh(strategy)), strategy.filename


@given(mixed_runs(max_size=6))
def test_success_keeps_the_new_state_and_a_failure_before_publishing_keeps_the_old(run):
    config, _, history = run
    old = init(config)
    for epoch, metrics in enumerate(history):
        new, actions = step(old, metrics, epoch)
        names = tuple(s.filename for s in partition(actions)[0])
        assert commit(old, new, Outcome.success(names)) == new
        assert commit(old, new, Outcome.failure(names)) == old
        old = new


@given(mixed_runs(max_size=8), st.data())
def test_roll_back_touches_exactly_the_named_strategies(run, data):
    config, _, history = run
    believed, _ = step(init(config), history[0] if history else {}, 0)
    on_disk = init(config)
    names = data.draw(st.sets(st.sampled_from([s.filename for s in config.strategies])))
    rolled = roll_back(believed, on_disk, names)
    for strategy, mine, kept, disk in zip(config.strategies, believed.bests, rolled.bests, on_disk.bests):
        assert kept == (disk if strategy.filename in names else mine)
    assert rolled.steps == believed.steps and rolled.config == config
    assert roll_back(rolled, on_disk, names) == rolled  # idempotent


def test_outcomes_are_checked():
    with pytest.raises(ValueError, match="were not among the names written"):
        Outcome.failure(["a.pt"], ["b.pt"])
    with pytest.raises(ValueError, match="published every name"):
        Outcome(("a.pt", "b.pt"), True, ("a.pt",))
    assert not Outcome.failure(["a.pt"]).touched_disk and Outcome.failure(["a.pt"], ["a.pt"]).touched_disk


def test_a_failure_after_publishing_needs_the_files():
    config = init([Strategy("val_loss")]).config
    old = State(config)
    new = State(config, [Best(0.5, 0)], 1)
    with pytest.raises(ValueError, match="on_disk"):
        commit(old, new, Outcome.failure(["best_val_loss.pt"], ["best_val_loss.pt"]))
    assert isinstance(fresh(Every()), Last)
