"""Concurrency (tests/reliability/concurrency.py): two writers on one directory, a reader polling."""

from __future__ import annotations

import threading

import pytest

import ckptfn
from ckptfn.io.write import write_snapshot
from ckptfn.kit import Target
from ckptfn.core.naming import archived_of
from tests.faults import HookFS
from tests.reliability import concurrency
from tests.reliability.common import Tally, clock, payload


@pytest.mark.parametrize(
    "kind, prefixes",
    [(concurrency.DIFFERENT, ("a_", "b_")), (concurrency.SAME, ("shared_", "shared_"))],
    ids=["different filenames", "same filename"],
)
def test_two_writers_every_file_always_loads(tmp_path, kind, prefixes):
    tally = Tally()
    superseded = concurrency.phase(tally, kind, tmp_path, prefixes, seconds=2.0, elements=1 << 16)
    tally.assert_clean()
    assert tally.count("fault", kind) >= 10  # the reader really read while they wrote
    assert superseded == 0  # with the directory lock no version is replaced before it is archived


def test_regression_a_concurrent_archive_writer_never_supersedes_a_version(tmp_path):
    # Found by the same-filename phase: writer A archived the current file, then writer B
    # archived (the same file) and replaced it, then A replaced B's new file: B's version
    # was never archived. Archive-then-replace now holds a lock on the directory.
    meta = lambda epoch: {"format": "ckptfn/1", "epoch": epoch, "timestamp": clock(epoch).isoformat(), "saves": []}
    target = [Target("best_corr.pt", False)]
    write_snapshot(tmp_path, target, payload(0), meta(0))
    other = threading.Thread(target=write_snapshot, args=(tmp_path, target, payload(2), meta(2)))

    def writer_b_runs_meanwhile():
        other.start()
        other.join(timeout=1.0)  # without a lock B finishes here; with it, B waits for A

    write_snapshot(tmp_path, target, payload(1), meta(1), fs=HookFS("replace", 0, writer_b_runs_meanwhile))
    other.join()
    names = [n for n in tmp_path.iterdir() if n.name == "best_corr.pt" or archived_of(n.name, "best_corr.pt")]
    assert sorted(ckptfn.read_metadata(n)["epoch"] for n in names) == [0, 1, 2]
