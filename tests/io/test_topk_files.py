"""Top-k members as real files (issue 14): ``CheckpointManager`` writes the best at its
filename and the other members under their own names, shares one write among every name of
a snapshot (hard links), deletes leaving members only after the new snapshot is committed,
and rebuilds the set from the files when resuming."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfn
from ckptfn import Best, CheckpointManager, CheckpointWriteError, Config, Every, Member, Strategy
from ckptfn.core.metadata import entry_for
from ckptfn.core.naming import member_of
from ckptfn.core.topk import free_member_name

from tests.strategies import grid_values, modes


def family(directory: pathlib.Path, filename: str) -> set[str]:
    """The names in ``directory`` that belong to the strategy with ``filename``: the file and its members."""
    return {name for name in os.listdir(directory) if name == filename or member_of(name, filename)}


def listed(strategy: Strategy, best: Best) -> set[str]:
    """The names the state says are on disk for ``strategy``."""
    return ({strategy.filename} if best.value is not None else set()) | {m.name for m in best.others}


def payload(epoch: int) -> dict:
    return {"w": torch.full((4,), float(epoch)), "epoch": epoch}


def saved_epoch(path: pathlib.Path) -> int:
    return int(ckptfn.load_checkpoint(path)[0]["w"][0].item())


def choice(path: pathlib.Path, filename: str) -> tuple:
    """``(value, epoch, global_step)`` that the file's own entry for ``filename`` records."""
    entry = entry_for(ckptfn.read_metadata(path), filename)
    return entry["value"], entry["epoch"], entry["global_step"]


def check_files_match_the_state(directory: pathlib.Path, strategy: Strategy, best: Best) -> None:
    """Exactly the files the state lists, each holding the snapshot the state says it holds."""
    assert family(directory, strategy.filename) == listed(strategy, best)
    if best.value is not None:
        assert choice(directory / strategy.filename, strategy.filename) == (best.value, best.epoch, best.global_step)
        assert saved_epoch(directory / strategy.filename) == best.epoch
    for member in best.others:
        assert choice(directory / member.name, strategy.filename) == (member.value, member.epoch, member.global_step)
        assert saved_epoch(directory / member.name) == member.epoch


def same_bests(a, b) -> bool:
    """Bests equal; ``Last.time`` (this process's clock, never stored) is not compared anyway."""
    return tuple(a) == tuple(b)


# --- the directory after each update ----------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(modes, st.integers(2, 4), st.lists(grid_values, min_size=1, max_size=8), st.booleans())
def test_the_directory_holds_exactly_the_members_the_state_lists(mode, k, values, with_last):
    """After every update: the file at ``filename`` and one file per member, no other name of
    that family, each file holding the value, epoch and step the state says; resuming (a new
    manager, or ``restore_from_directory``) rebuilds the same top-k set."""
    strategy = Strategy("acc", mode=mode, top_k=k)
    config = Config([strategy, Every(1, filename="last.pt")] if with_last else [strategy])
    directory = pathlib.Path(tempfile.mkdtemp(prefix="ckptfn-topk-"))
    try:
        manager = CheckpointManager(directory, config)
        for epoch, value in enumerate(values):
            manager.update({"acc": value}, payload(epoch), epoch, global_step=10 * epoch)
            best = manager.state.bests[0]
            check_files_match_the_state(directory, strategy, best)
            assert (best.value is not None) + len(best.others) <= k
            if with_last:
                assert saved_epoch(directory / "last.pt") == epoch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resumed = CheckpointManager(directory, config)
        assert same_bests(resumed.state.bests, manager.state.bests)
        assert same_bests(ckptfn.restore_from_directory(config, directory).bests, manager.state.bests)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("async_save", [False, True])
def test_issue_example_on_disk(tmp_path, async_save):
    """0.50, 0.45, 0.60, 0.55, 0.58 (max, top_k=3): each update writes what enters, and the
    one that leaves is gone afterwards (with ``async_save``, once the save is collected)."""
    manager = CheckpointManager(tmp_path, [Strategy("acc", mode="max", top_k=3)], async_save=async_save)
    written, on_disk = [], []
    for epoch, value in enumerate([0.50, 0.45, 0.60, 0.55, 0.58]):
        written.append([p.name for p in manager.update({"acc": value}, payload(epoch), epoch)])
        manager.wait()
        on_disk.append(sorted(os.listdir(tmp_path)))
    manager.close()
    assert written == [["best_acc.pt"], ["best_acc-epoch=1.pt"], ["best_acc.pt"], ["best_acc-epoch=3.pt"], ["best_acc-epoch=4.pt"]]
    assert on_disk == [
        ["best_acc.pt"],
        ["best_acc-epoch=1.pt", "best_acc.pt"],
        ["best_acc-epoch=0.pt", "best_acc-epoch=1.pt", "best_acc.pt"],
        ["best_acc-epoch=0.pt", "best_acc-epoch=3.pt", "best_acc.pt"],
        ["best_acc-epoch=3.pt", "best_acc-epoch=4.pt", "best_acc.pt"],
    ]
    assert [saved_epoch(tmp_path / n) for n in on_disk[-1]] == [3, 4, 2]
    assert manager.best_values == {"best_acc.pt": 0.60}


# --- hard links -----------------------------------------------------------------------------------


def test_a_member_entering_with_a_periodic_save_is_one_write_with_last_pt(tmp_path):
    """An Enter and a Periodic at the same decision share one inode; so do a Save and a
    Periodic; a best moved aside keeps its inode under its member name."""
    manager = CheckpointManager(tmp_path, [Strategy("acc", mode="max", top_k=3), Every(1, filename="last.pt")])
    manager.update({"acc": 0.5}, payload(0), 0, global_step=100)
    assert os.stat(tmp_path / "best_acc.pt").st_ino == os.stat(tmp_path / "last.pt").st_ino
    first = os.stat(tmp_path / "best_acc.pt").st_ino
    paths = manager.update({"acc": 0.4}, payload(1), 1, global_step=200)
    assert [p.name for p in paths] == ["best_acc-epoch=1-step=200.pt", "last.pt"]
    assert os.stat(paths[0]).st_ino == os.stat(paths[1]).st_ino != first
    assert os.stat(paths[0]).st_nlink == 2
    paths = manager.update({"acc": 0.9}, payload(2), 2, global_step=300)
    assert [p.name for p in paths] == ["best_acc.pt", "last.pt"]
    assert os.stat(tmp_path / "best_acc.pt").st_ino == os.stat(tmp_path / "last.pt").st_ino
    assert os.stat(tmp_path / "best_acc-epoch=0-step=100.pt").st_ino == first  # moved aside, not rewritten
    assert saved_epoch(tmp_path / "best_acc-epoch=0-step=100.pt") == 0


# --- resume -----------------------------------------------------------------------------------


def test_resume_rebuilds_the_top_k_set_and_continues(tmp_path):
    """A restarted manager believes exactly what the files hold, and the next decisions are
    those of the uninterrupted run."""
    config = Config([Strategy("loss", top_k=3), Every(n_steps=50, filename="last.pt")])
    values = [0.9, 0.7, 0.8, 0.95, 0.6, 0.75, 0.65, 0.5]
    whole = CheckpointManager(tmp_path / "whole", config)
    first = CheckpointManager(tmp_path / "split", config)
    for epoch, value in enumerate(values):
        if epoch == 4:
            resumed = CheckpointManager(tmp_path / "split", config, resume=True)
            assert same_bests(resumed.state.bests, first.state.bests)
            first = resumed
        a = [p.name for p in whole.update({"loss": value}, payload(epoch), epoch, global_step=25 * (epoch + 1))]
        b = [p.name for p in first.update({"loss": value}, payload(epoch), epoch, global_step=25 * (epoch + 1))]
        assert a == b
    assert same_bests(first.state.bests, whole.state.bests)
    assert sorted(os.listdir(tmp_path / "split")) == sorted(os.listdir(tmp_path / "whole"))
    assert kept(first.state.bests[0]) == [(0.5, 7), (0.6, 4), (0.65, 6)]


def kept(best: Best) -> list[tuple]:
    return [(best.value, best.epoch)] + [(m.value, m.epoch) for m in best.others]


def write_run(directory: pathlib.Path, strategy: Strategy, values: list[float]) -> CheckpointManager:
    manager = CheckpointManager(directory, [strategy])
    for epoch, value in enumerate(values):
        manager.update({"acc": value}, payload(epoch), epoch)
    return manager


# --- strays and crashes -------------------------------------------------------------------------


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot be pickled")


def test_a_stray_member_is_removed_at_the_next_committed_save_and_never_before(tmp_path):
    """A member nobody keeps (top_k lowered from 3 to 2: the worst file stays behind, as after
    an interrupted prune) is not believed at resume, survives updates that save nothing and a
    save that fails, and is deleted once the strategy's next snapshot is committed."""
    write_run(tmp_path, Strategy("acc", mode="max", top_k=3), [0.5, 0.6, 0.7])
    assert sorted(os.listdir(tmp_path)) == ["best_acc-epoch=0.pt", "best_acc-epoch=1.pt", "best_acc.pt"]
    config = Config([Strategy("acc", mode="max", top_k=2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(tmp_path, config)
    assert manager.state.bests[0] == Best(0.7, 2, None, [Member(0.6, 1, None, "best_acc-epoch=1.pt")])
    assert ckptfn.restore_from_directory(config, tmp_path).bests == manager.state.bests
    stray = tmp_path / "best_acc-epoch=0.pt"
    assert manager.update({"acc": 0.1}, payload(3), 3) == [] and stray.exists()  # no save
    with pytest.raises(CheckpointWriteError):
        manager.update({"acc": 0.65}, {"bad": Unpicklable()}, 4)  # it would enter, but the write fails
    assert stray.exists() and manager.state.bests[0].others == (Member(0.6, 1, None, "best_acc-epoch=1.pt"),)
    assert [p.name for p in manager.update({"acc": 0.65}, payload(5), 5)] == ["best_acc-epoch=5.pt"]
    assert not stray.exists()
    assert sorted(os.listdir(tmp_path)) == ["best_acc-epoch=5.pt", "best_acc.pt"]
    assert kept(manager.state.bests[0]) == [(0.7, 2), (0.65, 5)]  # the 2 best of everything seen


def test_lowering_top_k_from_3_to_2_keeps_the_2_best_after_a_new_best(tmp_path):
    write_run(tmp_path, Strategy("acc", mode="max", top_k=3), [0.5, 0.6, 0.7])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(tmp_path, [Strategy("acc", mode="max", top_k=2)])
    manager.update({"acc": 0.8}, payload(3), 3)
    assert sorted(os.listdir(tmp_path)) == ["best_acc-epoch=2.pt", "best_acc.pt"]
    assert kept(manager.state.bests[0]) == [(0.8, 3), (0.7, 2)]
    check_files_match_the_state(tmp_path, manager.config.strategies[0], manager.state.bests[0])


@pytest.mark.parametrize("link", [os.link, shutil.copy2])
def test_a_leftover_duplicate_of_the_best_under_its_aside_name_is_no_member(tmp_path, link):
    """A crash after the best got its member name (a second link, or a copy) but before the new
    best was installed: at resume the duplicate is not a member (it records the best's own save),
    the next demotion reuses the name, and the set is right afterwards."""
    strategy = Strategy("acc", mode="max", top_k=3)
    before = write_run(tmp_path, strategy, [0.5, 0.7, 0.6]).state
    best = before.bests[0]
    aside = free_member_name(strategy.filename, best.epoch, best.global_step, frozenset(m.name for m in best.others))
    assert aside == "best_acc-epoch=1.pt"
    link(tmp_path / "best_acc.pt", tmp_path / aside)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(tmp_path, [strategy])
    assert manager.state.bests == before.bests
    assert len(manager.state.bests[0].others) == 2  # not 3: the duplicate is no member
    paths = manager.update({"acc": 0.9}, payload(3), 3)
    assert [p.name for p in paths] == ["best_acc.pt"]
    assert kept(manager.state.bests[0]) == [(0.9, 3), (0.7, 1), (0.6, 2)]
    check_files_match_the_state(tmp_path, strategy, manager.state.bests[0])
    assert sorted(os.listdir(tmp_path)) == ["best_acc-epoch=1.pt", "best_acc-epoch=2.pt", "best_acc.pt"]


def test_a_leftover_duplicate_is_pruned_by_the_next_entry(tmp_path):
    """The same leftover, followed by an Enter instead of a new best: the duplicate name is
    deleted with the leaving member, and the best (its other name) is untouched."""
    strategy = Strategy("acc", mode="max", top_k=3)
    write_run(tmp_path, strategy, [0.5, 0.7, 0.6])
    os.link(tmp_path / "best_acc.pt", tmp_path / "best_acc-epoch=1.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(tmp_path, [strategy])
    assert [p.name for p in manager.update({"acc": 0.65}, payload(3), 3)] == ["best_acc-epoch=3.pt"]
    assert sorted(os.listdir(tmp_path)) == ["best_acc-epoch=2.pt", "best_acc-epoch=3.pt", "best_acc.pt"]
    assert saved_epoch(tmp_path / "best_acc.pt") == 1
    check_files_match_the_state(tmp_path, strategy, manager.state.bests[0])


# --- reading members -------------------------------------------------------------------------


def test_every_member_loads_and_its_metadata_says_it_is_a_top_k_member(tmp_path):
    """``load_checkpoint`` of every member; its ``saves`` entry records ``top_k`` and the name it
    was published under (its member name when it entered as a member, the best's filename when
    it was a best moved aside); the newest file's state lists every member by name."""
    strategy = Strategy("acc", mode="max", top_k=4)
    manager = write_run(tmp_path, strategy, [0.5, 0.45, 0.6, 0.55, 0.58])
    best = manager.state.bests[0]
    assert [m.name for m in best.others] == ["best_acc-epoch=4.pt", "best_acc-epoch=3.pt", "best_acc-epoch=0.pt"]
    for member in best.others:
        state_dict, metadata = ckptfn.load_checkpoint(tmp_path / member.name)
        assert state_dict["epoch"] == member.epoch
        entry = entry_for(ckptfn.read_metadata(tmp_path / member.name), strategy.filename)
        assert entry["top_k"] == 4 and entry["value"] == member.value == metadata["saves"][0]["value"]
        entered = member.epoch in (3, 4)
        assert entry["name"] == (member.name if entered else strategy.filename)
        if entered:
            assert entry["kth"] is None or entry["kth"] < member.value
    newest = ckptfn.read_metadata(tmp_path / "best_acc-epoch=4.pt")["manager_state"]["strategies"][0]
    assert [m["name"] for m in newest["top_k_others"]] == [m.name for m in best.others]
    assert ckptfn.read_metadata(tmp_path / "best_acc.pt")["saves"][0]["name"] == "best_acc.pt"


def test_a_deleted_best_file_does_not_let_a_worse_value_become_the_best(tmp_path):
    """The best file moved away by hand, its members still there: resuming keeps the members,
    and the next value, worse than them, must not be published as the best."""
    strategy = Strategy("acc", mode="max", top_k=3)
    write_run(tmp_path, strategy, [0.5, 0.9, 0.8])
    (tmp_path / "best_acc.pt").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(tmp_path, [strategy])
    best = manager.state.bests[0]  # the best member is the best, at its own name
    assert (best.value, best.at, [m.value for m in best.others]) == (0.8, "best_acc-epoch=2.pt", [0.5])
    manager.update({"acc": 0.1}, payload(3), 3)
    values = [v for v, _ in kept(manager.state.bests[0])]
    assert manager.best_values["best_acc.pt"] == max(values), (manager.best_values, values)


def test_after_a_deleted_best_the_next_new_best_keeps_the_old_best_where_it_is(tmp_path):
    strategy = Strategy("acc", mode="max", top_k=3)
    write_run(tmp_path, strategy, [0.5, 0.9, 0.8])
    (tmp_path / "best_acc.pt").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(tmp_path, [strategy])
    manager.update({"acc": 0.95}, payload(3), 3)  # a new best: at best_acc.pt again; 0.8 stays at its name
    best = manager.state.bests[0]
    assert (best.value, best.at, [(m.value, m.name) for m in best.others]) == (
        0.95, None, [(0.8, "best_acc-epoch=2.pt"), (0.5, "best_acc-epoch=0.pt")]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_acc-epoch=0.pt", "best_acc-epoch=2.pt", "best_acc.pt"]
    assert ckptfn.restore_from_directory([strategy], tmp_path).bests == manager.state.bests
