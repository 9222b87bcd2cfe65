"""Hostile files (tests/reliability/hostile.py): nothing runs, nothing outside is touched, nothing hangs.

Each case runs in a forked child with a timeout. The regression tests below pin
the bugs this suite found, each fixed in the library.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest

import ckptfn
from ckptfn import CheckpointError, CheckpointManager
from ckptfn.io.write import write_snapshot
from ckptfn.kit import Target
from ckptfn.io.fs import REAL
from ckptfn.core.naming import archive_name, temp_name
from tests.faults import NoLinksFS
from tests.reliability import hostile
from tests.reliability.common import Tally, clock, dead_pid, in_child, payload


@pytest.mark.parametrize(
    "group, kind, at_least",
    [
        (lambda t, w: hostile.pickles(t, w), hostile.PICKLE, 25),
        (lambda t, w: hostile.bombs(t, w, mib=64), hostile.BOMB, 15),
        (lambda t, w: hostile.symlinks(t, w), hostile.SYMLINK, 17),
        (lambda t, w: hostile.traversals(t), hostile.TRAVERSAL, 18),
        (lambda t, w: hostile.odd_files(t), hostile.ODD, 17),
        (lambda t, w: hostile.endless(t), hostile.ENDLESS, 35),
        (lambda t, w: hostile.allocations(t), hostile.ALLOCATION, 27),
        (lambda t, w: hostile.zips(t), hostile.ZIP, 20),
        (lambda t, w: hostile.trees(t), hostile.TREE, 68),
    ],
    ids=["pickles", "zip bombs", "symlinks", "path traversal", "odd files", "endless metadata", "allocations",
         "zip structure", "DCP trees"],
)
def test_hostile_files(tmp_path, group, kind, at_least):
    tally = Tally()
    group(tally, tmp_path)
    tally.assert_clean()
    assert tally.count("input", kind) >= at_least


def meta(epoch, **extra):
    return {"format": "ckptfn/1", "epoch": epoch, "timestamp": clock(epoch).isoformat(), "saves": [], **extra}


# --- regressions --------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", [ckptfn.load_checkpoint, ckptfn.read_metadata])
def test_regression_a_fifo_at_a_checkpoint_name_is_refused_not_waited_on(tmp_path, reader):
    # open() on a FIFO blocked forever: resuming from a directory with one hung the run
    os.mkfifo(tmp_path / "best.pt")
    os.symlink(tmp_path / "best.pt", tmp_path / "link.pt")
    for name in ("best.pt", "link.pt"):
        outcome, message = in_child(reader, str(tmp_path / name), timeout=20)
        assert outcome == "error" and "CheckpointError" in message and "not a regular file" in message


def test_regression_a_deflated_member_is_refused_before_it_expands(tmp_path):
    # torch.load inflated a 65 KiB file into 64 MiB (1000:1): a zip bomb could exhaust memory
    path = tmp_path / "best.pt"
    path.write_bytes(hostile.deflated_bomb(64))
    assert path.stat().st_size < 1 << 20
    for reader in (ckptfn.load_checkpoint, ckptfn.read_metadata):
        with pytest.raises(CheckpointError, match="compressed"):
            reader(path)


def test_regression_a_tensor_member_claiming_more_than_the_file_is_refused(tmp_path):
    # read_metadata (memory-mapped) accepted a member whose header claimed 4 GiB in a 6 KiB file
    path = tmp_path / "best.pt"
    path.write_bytes(hostile.claim_size(hostile.good_bytes(elements=1024), "data/0", 2**32 - 1))
    with pytest.raises(CheckpointError, match="claims"):
        ckptfn.read_metadata(path)


def test_regression_a_link_at_the_next_archive_name_is_not_taken_for_the_archive(tmp_path):
    # the old version was lost: a planted link best_<stamp>.pt -> best.pt looked like the
    # archive of best.pt (samefile follows links), so best.pt was replaced unarchived
    assert hostile._symlink_at_archive_name() == []
    write_snapshot(tmp_path, [Target("best.pt", False)], payload(0), meta(0))
    (tmp_path / archive_name("best.pt", clock(0))).symlink_to("best.pt")
    write_snapshot(tmp_path, [Target("best.pt", False)], payload(1), meta(1))
    regular = [p for p in tmp_path.iterdir() if not p.is_symlink()]
    assert sorted(ckptfn.read_metadata(p)["epoch"] for p in regular) == [0, 1]


@pytest.mark.parametrize("links", [True, False], ids=["hard links", "no hard links"])
def test_regression_archiving_a_planted_link_never_reads_or_copies_through_it(tmp_path, links):
    # without hard links the archive copy read through the link (copying the outside file
    # into the directory), and reading its metadata through a link to a FIFO hung the save
    outside = tmp_path / "secret.pt"
    secret = hostile.good_bytes(epoch=7)  # a checkpoint saved at clock(7): reading it would name the archive
    outside.write_bytes(secret)
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").symlink_to(outside)
    write_snapshot(run, [Target("best.pt", False)], payload(1), meta(1), fs=REAL if links else NoLinksFS())
    assert outside.read_bytes() == secret and outside.stat().st_nlink == 1
    (kept,) = [p for p in run.iterdir() if p.name != "best.pt"]
    assert kept.is_symlink() and os.readlink(kept) == str(outside)
    assert kept.name != archive_name("best.pt", clock(7))  # named by the link's own mtime, not read through
    assert ckptfn.read_metadata(run / "best.pt")["epoch"] == 1 and not (run / "best.pt").is_symlink()


@pytest.mark.parametrize("timestamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_regression_an_out_of_range_timestamp_does_not_block_archiving(tmp_path, timestamp):
    # OverflowError when converting to UTC: every overwrite=False save of that name failed
    write_snapshot(tmp_path, [Target("best.pt")], payload(0), meta(0, timestamp=timestamp))
    write_snapshot(tmp_path, [Target("best.pt", False)], payload(1), meta(1))
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("mtime", [2**40, -(2**40)], ids=["year 36812", "before year 1"])
def test_regression_an_extreme_mtime_does_not_block_archiving(mtime, monkeypatch):
    # ValueError from datetime.fromtimestamp (tmpfs keeps such mtimes; foreign files may have them)
    if hostile._ram() is None:
        pytest.skip("no tmpfs at /dev/shm: other file systems clamp such mtimes")
    monkeypatch.setattr(tempfile, "tempdir", hostile._ram())
    assert hostile._extreme_mtime(mtime * 10**9) == []


def test_regression_a_best_beyond_float_in_a_file_does_not_crash_resume(tmp_path):
    # OverflowError escaped CheckpointManager(resume=True) for a saved value of 10**400
    entry = {"filename": "best.pt", "metric_name": "val_loss", "mode": "min", "value": 10**400, "epoch": 0}
    write_snapshot(tmp_path, [Target("best.pt")], payload(0), meta(0, saves=[entry]))
    assert CheckpointManager(tmp_path, [hostile.LOSS], resume=True).best_values == {"best.pt": None}


def test_regression_an_unremovable_stale_temp_does_not_block_saves(tmp_path):
    # a directory under a dead writer's temporary name made every save fail (EISDIR in cleanup)
    (tmp_path / temp_name("best.pt", dead_pid(), socket.gethostname(), "ab12")).mkdir()
    start = time.monotonic()
    write_snapshot(tmp_path, [Target("best.pt")], payload(1), meta(1))
    assert ckptfn.read_metadata(tmp_path / "best.pt")["epoch"] == 1 and time.monotonic() - start < 30


def test_regression_the_shared_list_file_no_longer_hangs_resume_inspect_or_an_archiving_save(tmp_path):
    # a 2 KB torch.save file with 80 levels of shared lists hung read_metadata, resume=True/False and an
    # overwrite=False save of that name (each walked 2**80 values); torch.load reads it in 2 ms
    (tmp_path / "best.pt").write_bytes(hostile.torch_saved(x=hostile.shared_lists(80)))
    for reader in ("read_metadata", "CheckpointManager(resume=True)", "CheckpointManager(resume=False)",
                   "save with overwrite=False over it"):
        started = time.monotonic()
        outcome, problems = in_child(hostile.READERS[reader], tmp_path, timeout=30)
        assert outcome == "ok" and problems == [], (reader, outcome, problems)
        assert time.monotonic() - started < 10, reader


def test_regression_bytearray_3_gib_in_a_1_kb_file_is_refused_without_allocating(tmp_path):
    # read_metadata allocated the 3 GiB twice (the allow-listed reader, then torch's fallback) in 9-14 s
    # and returned it as metadata
    data = hostile.allocation_variants()["bytearray(3 GiB) in the metadata (a 1 KB file)"]
    assert len(data) < 4096
    for reader in ("read_metadata", "load_checkpoint", "CheckpointManager(resume=True)"):
        outcome, problems = in_child(hostile._bounded, data, reader, timeout=30)
        assert outcome == "ok" and problems == [], (reader, outcome, problems)
