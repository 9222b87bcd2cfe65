"""Retention (``keep``): at most ``keep`` versions on disk, the newest bests, pruned only after the commit."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfn
from ckptfn import Config, ConfigError, Every, Strategy, execute, init, step
from ckptfn.io.write import write_snapshot
from ckptfn.kit import Target
from tests.faults import snapshot_of
from ckptfn.core.naming import archive_name, archived_of
from ckptfn.core.retention import plan_prune, version_order

from tests.faults import Crash, CrashFS, FailingFS, RecordingFS

UTC = dt.timezone.utc


def clock(epoch: int) -> dt.datetime:
    return dt.datetime(2026, 11, 29, 13, 0, tzinfo=UTC) + dt.timedelta(seconds=epoch)


def versions(directory, filename) -> list[str]:
    """The names holding versions of ``filename``: itself (if present) and its archives."""
    names = os.listdir(directory)
    return [n for n in names if n == filename or archived_of(n, filename)]


def version_epochs(directory, filename) -> list[int]:
    return sorted(ckptfn.read_metadata(directory / name)["epoch"] for name in versions(directory, filename))


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keep, message",
    [
        (0, "keep: expected an int >= 1 or None, got int 0"),
        (-2, "keep: expected an int >= 1 or None, got int -2"),
        (1.5, "keep: expected an int >= 1 or None, got float 1.5"),
        (True, "keep: expected an int >= 1 or None, got bool True"),
        ("3", "keep: expected an int >= 1 or None, got str '3'"),
    ],
)
def test_keep_must_be_a_positive_int_or_none(keep, message):
    with pytest.raises(ConfigError) as info:
        Strategy("val_loss", overwrite=False, keep=keep)
    assert str(info.value) == message


def test_keep_needs_overwrite_false_and_from_mapping_accepts_it():
    with pytest.raises(ConfigError, match=r"^\[0\]\.keep: keep=1 limits the archived versions, so it needs overwrite=False"):
        Config.from_mapping([{"metric_name": "val_loss", "keep": 1}])
    config = Config.from_mapping([{"metric_name": "val_corr", "mode": "max", "overwrite": False, "keep": np.int64(3)}])
    assert config.strategies[0].keep == 3 and type(config.strategies[0].keep) is int
    assert Strategy("val_loss").keep is None


# --- the pure plan -------------------------------------------------------------------------

moments = st.datetimes(min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(UTC))
NOISE = ["best_corr.pt.bak", "best_corr_.pt", "best_corr_20261129T131500123456Z.ckpt", "best_corr_x.pt",
         "best_loss.pt", "best_corr_a_20261129T131500123456Z.pt", ".ckptfn.1.h.ab.best_corr.pt.tmp", "best_corr"]


@given(
    versions_=st.lists(st.tuples(moments, st.integers(0, 3)), unique=True, max_size=12),
    noise=st.lists(st.sampled_from(NOISE) | st.tuples(moments).map(lambda m: archive_name("best_corr_a.pt", m[0]))),
    keep=st.integers(1, 6),
)
def test_plan_prune_deletes_only_the_oldest_archived_versions(versions_, noise, keep):
    filename = "best_corr.pt"
    archived = {archive_name(filename, moment, clash): (moment, clash) for moment, clash in versions_}
    doomed = plan_prune(filename, keep, [*noise, filename, *archived])
    assert filename not in doomed and set(doomed) <= set(archived)
    kept = set(archived) - set(doomed)
    assert len(kept) == min(keep - 1, len(archived))
    assert all(archived[k] > archived[d] for k in kept for d in doomed)  # newer by save time, then clash counter
    assert list(doomed) == sorted(doomed, key=lambda name: archived[name])  # oldest first
    assert all(version_order(name, filename) is not None for name in doomed)


def test_plan_prune_without_keep_deletes_nothing_and_rejects_a_bad_keep():
    names = ["a.pt", archive_name("a.pt", clock(0))]
    assert plan_prune("a.pt", None, names) == ()
    with pytest.raises(ValueError, match="keep"):
        plan_prune("a.pt", 0, names)


# --- on disk -------------------------------------------------------------------------------

grid = st.integers(-6, 6).map(lambda i: i / 4)


@settings(max_examples=25)
@given(
    keep=st.integers(1, 4),
    every_keep=st.integers(1, 3),
    mode=st.sampled_from(["min", "max"]),
    history=st.lists(st.tuples(grid, grid), min_size=1, max_size=10),
)
def test_never_more_than_keep_versions_and_the_kept_are_the_newest_bests(tmp_path_factory, keep, every_keep, mode, history):
    directory = tmp_path_factory.mktemp("keep")
    config = Config([
        Strategy("val_corr", mode=mode, filename="best_corr.pt", overwrite=False, keep=keep),
        Strategy("val_loss", filename="best_loss.pt", overwrite=False),  # archives, never pruned
        Every(2, filename="last.pt", overwrite=False, keep=every_keep),
    ])
    state, saved, loss_saves = init(config), {"best_corr.pt": [], "last.pt": []}, 0
    for epoch, (corr, loss) in enumerate(history):
        state, actions = step(state, {"val_corr": corr, "val_loss": loss})
        execute(actions, {"epoch": epoch}, directory, state=state, now=clock(epoch))
        for action in actions:
            if action.filename in saved:
                saved[action.filename].append((action.epoch, getattr(action, "value", None)))
            loss_saves += action.filename == "best_loss.pt"
        for filename, limit in (("best_corr.pt", keep), ("last.pt", every_keep)):
            on_disk = version_epochs(directory, filename) if saved[filename] else []
            assert len(on_disk) <= limit
            assert on_disk == [e for e, _ in saved[filename][-limit:]]  # the newest versions
        assert len(versions(directory, "best_loss.pt")) == loss_saves  # other names are never pruned
    kept_values = sorted(
        next(e["value"] for e in ckptfn.read_metadata(directory / n)["saves"] if e["filename"] == "best_corr.pt")
        for n in versions(directory, "best_corr.pt")
    )
    all_values = [v for _, v in saved["best_corr.pt"]]
    best_first = sorted(all_values, reverse=mode == "max")
    assert kept_values == sorted(best_first[:keep])  # the kept ones are the best ones
    assert ckptfn.read_metadata(directory / "best_corr.pt")["saves"][0]["value"] == best_first[0]


def test_pruning_keeps_a_snapshot_that_another_name_still_uses(tmp_path):
    config = Config([Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False, keep=1),
                     Strategy("val_loss", filename="best_loss.pt")])
    state = init(config)
    for epoch, (corr, loss) in enumerate([(0.1, 1.0), (0.2, 2.0)]):  # best_loss.pt stays the epoch-0 snapshot
        state, actions = step(state, {"val_corr": corr, "val_loss": loss})
        execute(actions, {"epoch": epoch}, tmp_path, state=state, now=clock(epoch))
    assert sorted(os.listdir(tmp_path)) == ["best_corr.pt", "best_loss.pt"]  # the archive of epoch 0 was pruned
    assert ckptfn.load_checkpoint(tmp_path / "best_loss.pt")[0] == {"epoch": 0}  # its data lives on


def _history_dir(tmp_path, config, history):
    state = init(config)
    for epoch, metrics in enumerate(history):
        state, actions = step(state, metrics)
        execute(actions, {"epoch": epoch}, tmp_path, state=state, now=clock(epoch))
    return state


KEEP2 = Config([Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False, keep=2),
                Strategy("val_loss", filename="best_loss.pt")])
HISTORY = [{"val_corr": 0.1, "val_loss": 1.0}, {"val_corr": 0.2, "val_loss": 0.9}, {"val_corr": 0.3, "val_loss": 0.95}]


def test_a_crash_at_any_point_of_a_save_with_prune_never_loses_the_current_best(tmp_path):
    base = tmp_path / "base"
    state = _history_dir(base, KEEP2, HISTORY)
    assert version_epochs(base, "best_corr.pt") == [1, 2]
    new_state, actions = step(state, {"val_corr": 0.4, "val_loss": 0.5})  # both improve: one snapshot, two names
    targets, metadata = snapshot_of(actions, state=new_state, now=clock(3))
    probe, fs = tmp_path / "probe", RecordingFS()
    shutil.copytree(base, probe)
    write_snapshot(probe, targets, {"epoch": 3}, metadata, fs=fs)
    ops = [op for op, _ in fs.ops]
    assert ops[-2:] == ["unlink", "fsync_dir"] and version_epochs(probe, "best_corr.pt") == [2, 3]
    for cut in range(len(ops) + 1):
        directory = tmp_path / f"cut{cut}"
        shutil.copytree(base, directory)
        try:
            write_snapshot(directory, targets, {"epoch": 3}, metadata, fs=CrashFS(cut))
            completed = True
        except Crash:
            completed = False
        current = ckptfn.read_metadata(directory / "best_corr.pt")["epoch"]  # complete, old or new
        assert current in (2, 3) and ckptfn.read_metadata(directory / "best_loss.pt")["epoch"] in (1, 3)
        on_disk = version_epochs(directory, "best_corr.pt")
        newest = [2, 3] if current == 3 else [1, 2]
        assert set(newest) <= set(on_disk), (cut, on_disk)  # the newest keep versions all survive
        assert len(versions(directory, "best_corr.pt")) <= 2 + 1
        assert completed == (cut >= len(ops)) and (not completed or on_disk == [2, 3])
        # the next save prunes back to keep versions
        later, actions = step(new_state, {"val_corr": 0.5, "val_loss": 0.4})
        execute(actions, {"epoch": 4}, directory, state=later, now=clock(4))
        assert len(versions(directory, "best_corr.pt")) == 2 and version_epochs(directory, "best_corr.pt")[-1] == 4


def test_a_failed_delete_is_a_warning_and_the_next_save_prunes(tmp_path, caplog):
    state = _history_dir(tmp_path, KEEP2, HISTORY)
    new_state, actions = step(state, {"val_corr": 0.4, "val_loss": 2.0})
    targets, metadata = snapshot_of(actions, state=new_state, now=clock(3))
    with caplog.at_level(logging.WARNING, logger="ckptfn"):
        paths = write_snapshot(tmp_path, targets, {"epoch": 3}, metadata, fs=FailingFS("unlink", 0))
    assert [p.name for p in paths] == ["best_corr.pt"]
    assert "could not remove old checkpoint version" in caplog.text and "best_corr_" in caplog.text
    assert version_epochs(tmp_path, "best_corr.pt") == [1, 2, 3]
    later, actions = step(new_state, {"val_corr": 0.5, "val_loss": 3.0})
    execute(actions, {"epoch": 4}, tmp_path, state=later, now=clock(4))
    assert version_epochs(tmp_path, "best_corr.pt") == [3, 4]


def test_targets_without_keep_never_list_or_delete(tmp_path):
    fs = RecordingFS()
    write_snapshot(tmp_path, [Target("a.pt", False)], {}, {"format": "ckptfn/1", "epoch": 0, "saves": []}, fs=fs)
    assert "unlink" not in [op for op, _ in fs.ops]
    assert Target("a.pt", False, keep=2).keep == 2


# --- the order of saves, whatever the wall clock does (issue 13) -------------------------------


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=12), st.integers(1, 4))
@settings(deadline=None, max_examples=40)
def test_keep_retains_the_newest_saves_even_when_the_clock_steps_back(tmp_path_factory, seconds, keep):
    """Archive names follow the order of saves: ``keep`` deletes the oldest saves, never a newer one."""
    directory = tmp_path_factory.mktemp("clock")
    strategy = Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False, keep=keep)
    state = ckptfn.init(strategy)
    for epoch, second in enumerate(seconds):  # a clock that jumps back and forth
        state, actions = ckptfn.step(state, {"val_corr": float(epoch)}, epoch)
        ckptfn.execute(actions, {"epoch": epoch}, directory, state=state, now=clock(second))
    kept = sorted(ckptfn.read_metadata(directory / name)["epoch"] for name in os.listdir(directory))
    assert kept == list(range(len(seconds)))[-keep:]


def test_the_reported_clock_step_keeps_the_two_newest_versions(tmp_path):
    """keep=2, the clock stepped back before 0.7 was saved: 0.7 and 0.8 remain (the old code kept 0.6)."""
    strategy = Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False, keep=2)
    state = ckptfn.init(strategy)
    for epoch, (value, second) in enumerate([(0.6, 100), (0.7, 50), (0.8, 60)]):  # stepped back before 0.7
        state, actions = ckptfn.step(state, {"val_corr": value}, epoch)
        ckptfn.execute(actions, {}, tmp_path, state=state, now=clock(second))
    values = sorted(ckptfn.read_metadata(tmp_path / n)["saves"][0]["value"] for n in os.listdir(tmp_path))
    assert values == [0.7, 0.8]
