"""Periodic ("last") saves: the ``Every`` record, its rule in ``step``, state, files, manager."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckptfn
from ckptfn import CheckpointManager, Config, ConfigError, Every, Last, Periodic, Save, Strategy, init, scan, step
from ckptfn.io.write import write_snapshot
from tests.faults import snapshot_of

from tests.faults import RecordingFS
from tests.strategies import everys, increasing_epochs, mixed_runs

UTC = dt.timezone.utc


def periodic_epochs(per_step, every) -> list[int]:
    return [a.epoch for actions in per_step for a in actions if isinstance(a, Periodic) and a.strategy == every]


def reference_saves(n: int, epochs: list[int]) -> list[int]:
    """The documented rule, by search: save at an epoch when some g in (last save, epoch] has (g + 1) % n == 0."""
    saved, last = [], -1
    for epoch in epochs:
        if any((g + 1) % n == 0 for g in range(last + 1, epoch + 1)):
            saved.append(epoch)
            last = epoch
    return saved


# --- the rule ------------------------------------------------------------------------------


@given(everys(), st.integers(0, 40))
def test_consecutive_epochs_save_exactly_when_epoch_mod_n_is_n_minus_1(every, epochs):
    _, per_step = scan(init(every), [{}] * epochs)
    assert periodic_epochs(per_step, every) == [e for e in range(epochs) if e % every.n_epochs == every.n_epochs - 1]


@given(everys(), increasing_epochs)
def test_with_gaps_it_saves_at_the_first_validated_epoch_after_each_period(every, epochs):
    state, saved = init(every), []
    for epoch in epochs:
        state, actions = step(state, {}, epoch)
        saved += [a.epoch for a in actions]
        assert all(isinstance(a, Periodic) for a in actions)
    assert saved == reference_saves(every.n_epochs, epochs)
    assert state.bests[0] == Last(saved[-1] if saved else None)  # the state remembers the last save


@given(mixed_runs())
def test_every_never_interferes_with_best_strategies(run):
    config, _, history = run
    metric_only = Config(tuple(s for s in config.strategies if isinstance(s, Strategy)), on_missing=config.on_missing)
    mixed_final, mixed_steps = scan(init(config), history)
    plain_final, plain_steps = scan(init(metric_only), history)
    assert [tuple(a for a in s if not isinstance(a, Periodic)) for s in mixed_steps] == list(plain_steps)
    assert ckptfn.best_values(mixed_final) == ckptfn.best_values(plain_final)
    for every in (s for s in config.strategies if isinstance(s, Every)):  # and metrics never matter to Every
        _, alone = scan(init(every), [{}] * len(history))
        assert periodic_epochs(mixed_steps, every) == periodic_epochs(alone, every)


@given(mixed_runs(), st.data())
def test_resume_from_to_dict_continues_like_the_uninterrupted_run(run, data):
    config, _, history = run
    k = data.draw(st.integers(0, len(history)))
    full_final, full_steps = scan(init(config), history)
    head, head_steps = scan(init(config), history[:k])
    saved = json.loads(json.dumps(head.to_dict(), allow_nan=False))
    resumed_final, tail_steps = scan(ckptfn.restore(config, saved), history[k:])
    assert resumed_final == full_final and head_steps + tail_steps == full_steps


def test_periodic_and_best_saves_come_in_strategy_order():
    config = Config([Every(2, filename="last.pt"), Strategy("val_loss")])
    _, per_step = scan(init(config), [{"val_loss": v} for v in (3.0, 2.0, 4.0, 5.0)])
    names = [[(type(a).__name__, a.filename) for a in actions] for actions in per_step]
    assert names == [[("Save", "best_val_loss.pt")], [("Periodic", "last.pt"), ("Save", "best_val_loss.pt")],
                     [], [("Periodic", "last.pt")]]


# --- the record and plain data -------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_epochs": 0}, "n_epochs: expected an int >= 1, got int 0"),
        ({"n_epochs": 1.5}, "n_epochs: expected an int >= 1, got float 1.5"),
        ({"n_epochs": True}, "n_epochs: expected an int >= 1, got bool True"),
        ({"filename": "a/b.pt"}, "filename: 'a/b.pt' contains a '/'"),
        ({"overwrite": "no"}, "overwrite: expected true or false"),
        ({"keep": 2}, "keep: keep=2 limits the archived versions, so it needs overwrite=False"),
        ({"keep": 0, "overwrite": False}, "keep: expected an int >= 1 or None, got int 0"),
    ],
)
def test_every_validates_itself(fields, message):
    with pytest.raises(ConfigError) as info:
        Every(**fields)
    assert str(info.value).startswith(message), str(info.value)


def test_from_mapping_reads_every_n_epochs():
    config = Config.from_mapping({"enabled": True, "strategies": [
        {"metric_name": "val_loss"},
        {"every_n_epochs": 2, "filename": "last.ckpt", "overwrite": False, "keep": 3},
        {"every_n_epochs": 1, "filename": None},
    ]})
    assert config.strategies[1:] == (Every(2, filename="last.ckpt", overwrite=False, keep=3), Every(1, filename="last.pt"))
    assert Config.from_mapping({"every_n_epochs": 5}).strategies == (Every(5),)
    assert Config.from_mapping([Every(3), {"metric_name": "a"}]).strategies[0] == Every(3)


@pytest.mark.parametrize(
    "obj, message",
    [
        ([{"every_n_epochs": 2, "mode": "max"}], "[0]: unknown key 'mode'; valid keys: every_n_epochs, every_n_steps, every_seconds, filename, overwrite, keep"),
        ([{"every_n_epochs": 0}], "[0].every_n_epochs: expected an int >= 1, got int 0"),
        ([{"metric_name": "a", "every_n_epochs": 1}], "[0].every_n_epochs: a strategy either watches a metric"),
        ([{"every_n_epochs": 1}, {"metric_name": "a", "filename": "last.pt"}], "[1].filename: 'last.pt' is already used by [0]"),
        ({"strategies": [{"every_n_epochs": 1, "keep": 2}]}, "strategies[0].keep: keep=2 limits"),
    ],
)
def test_every_mapping_errors_name_the_key_path(obj, message):
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(obj)
    assert str(info.value).startswith(message), str(info.value)


def test_state_holds_a_last_for_every_and_checks_it():
    config = Config([Strategy("val_loss"), Every(2)])
    assert init(config).bests == (ckptfn.Best(), Last())
    with pytest.raises(ConfigError, match=r"bests\[1\]: expected a Last, got Best"):
        ckptfn.State(config, [ckptfn.Best(), ckptfn.Best()])
    with pytest.raises(ConfigError, match="epoch: expected an int >= 0"):
        Last(-1)


def test_to_dict_of_every_and_restore_by_identity():
    config = Config([Strategy("val_loss"), Every(2, filename="last.pt")])
    state, _ = scan(init(config), [{"val_loss": 1.0}, {"val_loss": 2.0}])
    data = state.to_dict()
    assert data["strategies"][1] == {"every_n_epochs": 2, "filename": "last.pt", "overwrite": True, "keep": None, "last_epoch": 1, "last_global_step": None, "last_seen": 1}
    # a changed period keeps the last save (same file); a renamed file starts fresh
    assert ckptfn.restore([Strategy("val_loss"), Every(3, filename="last.pt")], data).bests[1] == Last(1)
    assert ckptfn.restore([Strategy("val_loss"), Every(2, filename="latest.pt")], data).bests[1] == Last()
    # a metric strategy now at the Every's file name starts fresh, and vice versa
    assert ckptfn.restore([Strategy("val_loss", filename="last.pt")], data).bests == (ckptfn.Best(),)
    assert ckptfn.restore([Every(1, filename="best_val_loss.pt")], data).bests == (Last(),)
    broken = json.loads(json.dumps(data))
    del broken["strategies"][1]["last_epoch"]
    with pytest.raises(ConfigError, match=r"^strategies\[1\]\.last_epoch: required key is missing"):
        ckptfn.restore(config, broken)


def test_state_data_written_before_keep_and_every_existed_still_restores():
    old = {  # State.to_dict() of ckptfn before issue 9: no "keep", no Every entries
        "format": "ckptfn.state/1", "steps": 4, "enabled": True,
        "strategies": [{"metric_name": "val_loss", "mode": "min", "filename": "best_loss.pt", "overwrite": True,
                        "min_delta": 0.0, "best": 0.25, "best_epoch": 3}],
    }
    state = ckptfn.restore([Strategy("val_loss", filename="best_loss.pt"), Every(1)], old)
    assert state.bests == (ckptfn.Best(0.25, 3), Last()) and state.steps == 4


# --- files: one write shared with the bests, metadata, resume from the directory -------------


def test_a_periodic_save_shares_the_one_write_with_best_saves(tmp_path):
    config = Config([Strategy("val_loss", filename="best_loss.pt"), Strategy("val_corr", mode="max", filename="best_corr.pt"),
                     Every(1, filename="last.pt")])
    state, actions = step(init(config), {"val_loss": 0.5, "val_corr": 0.1})
    assert [type(a) for a in actions] == [Save, Save, Periodic]
    fs = RecordingFS()
    targets, metadata = snapshot_of(actions, state=state, now=dt.datetime(2026, 1, 1, tzinfo=UTC))
    paths = write_snapshot(tmp_path, targets, {"w": torch.randn(128, 128)}, metadata, fs=fs)
    assert [p.name for p in paths] == ["best_loss.pt", "best_corr.pt", "last.pt"]
    assert len({p.stat().st_ino for p in paths}) == 1
    assert [op for op, _ in fs.ops].count("create") == 1
    assert sum(args[0] for op, args in fs.ops if op == "write") == paths[0].stat().st_size
    saves = ckptfn.read_metadata(tmp_path / "last.pt")["saves"]
    assert saves[2] == {"every_n_epochs": 1, "filename": "last.pt", "overwrite": True, "epoch": 0, "global_step": None}


def test_restore_from_directory_reads_the_last_periodic_save(tmp_path):
    config = Config([Strategy("val_loss"), Every(2, filename="last.pt")])
    state = init(config)
    for epoch, value in enumerate([1.0, 0.5, 0.7, 0.8, 0.9]):
        state, actions = step(state, {"val_loss": value})
        ckptfn.execute(actions, {"epoch": epoch}, tmp_path, state=state)
    resumed = ckptfn.restore_from_directory(config, tmp_path)
    assert resumed.bests == state.bests == (ckptfn.Best(0.5, 1), Last(3))
    assert resumed.steps == 4  # one past the newest file (epoch 3): the state stored with it
    renamed = ckptfn.restore_from_directory([Strategy("val_loss"), Strategy("x", filename="last.pt")], tmp_path)
    assert renamed.bests[1] == ckptfn.Best()  # last.pt holds no best of "x"


def test_manager_saves_last_every_epoch_and_summarizes_it(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, [{"metric_name": "val_loss", "filename": "best_loss.pt"},
                                           {"every_n_epochs": 1, "filename": "last.pt"}])
    written = [[p.name for p in manager.update({"val_loss": v}, {"epoch": e}, e)] for e, v in enumerate([1.0, 2.0, 0.5])]
    assert written == [["best_loss.pt", "last.pt"], ["last.pt"], ["best_loss.pt", "last.pt"]]
    assert os.stat(tmp_path / "best_loss.pt").st_ino == os.stat(tmp_path / "last.pt").st_ino
    assert manager.best_values == {"best_loss.pt": 0.5}
    assert manager.summary().splitlines()[1] == f"every 1 epoch (last.pt): last saved at epoch 2 -> {tmp_path / 'last.pt'}"
    assert CheckpointManager(tmp_path / "new", [Every(3)]).summary() == "no checkpoints yet (1 strategy)"
    resumed = CheckpointManager(tmp_path, manager.config, resume=True)
    assert resumed.state.bests == manager.state.bests
    caplog.clear()
    CheckpointManager(tmp_path, manager.config, resume=False)
    assert "last.pt (epoch 2) will be replaced (overwrite=True) at the next periodic save" in caplog.text


# --- the epoch counter going backwards (issue 13) ----------------------------------------------


@given(st.integers(1, 5), st.lists(st.integers(2, 12), min_size=2, max_size=4))
def test_each_training_phase_saves_as_a_fresh_run_would(n, phases):
    """Phases count epochs from 0 again (a resumed run, a second phase): each saves like a new run.

    (A phase of one epoch followed by epoch 0 is the same epoch decided twice: no restart to see.)"""
    every = ckptfn.Every(n)
    state = ckptfn.init(every)
    for length in phases:
        fresh, saved, expected = ckptfn.init(every), [], []
        for epoch in range(length):
            state, actions = ckptfn.step(state, {}, epoch)
            fresh, fresh_actions = ckptfn.step(fresh, {}, epoch)
            saved += [a.epoch for a in actions]
            expected += [a.epoch for a in fresh_actions]
        assert saved == expected
        assert state.bests[0] == fresh.bests[0]  # last.pt is this phase's, never the old phase's


def test_last_pt_follows_a_restarted_epoch_counter():
    state = ckptfn.init(ckptfn.Every(1))
    for epoch in range(10):
        state, _ = ckptfn.step(state, {}, epoch)
    state, actions = ckptfn.step(state, {}, 0)  # the counter restarts
    assert [a.epoch for a in actions] == [0] and state.bests[0] == ckptfn.Last(0)
    state, actions = ckptfn.step(state, {}, 0)  # the same epoch twice is not a new one
    assert actions == ()
