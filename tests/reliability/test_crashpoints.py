"""Crash points (tests/reliability/crashpoints.py): cut every save after its k-th operation.

CI runs every cut next to a non-write operation (plus the middle of each run of
writes); ``python tests/reliability/report.py`` runs every k.
"""

from __future__ import annotations

import pytest

from ckptfn.io.write import write_snapshot
from ckptfn.kit import Target
from tests.faults import CrashNoLinksFS, NoLinksFS
from tests.reliability import crashpoints
from tests.reliability.common import clock, inspect, payload


@pytest.mark.parametrize("scenario", crashpoints.SCENARIOS, ids=lambda s: s.name)
def test_every_crash_point_keeps_old_or_new_and_recovers(scenario, tmp_path):
    tally = crashpoints.run_scenario(scenario, tmp_path, exhaustive=False)
    tally.assert_clean()
    assert tally.count("fault", crashpoints.KILLED) >= 8


def test_crash_fs_is_what_a_real_kill_leaves_even_mid_write(tmp_path):
    # the equivalence check is not vacuous: a cut in the middle of the temp file's writes
    scenario = crashpoints.SCENARIOS[1]
    ops = crashpoints.operations(scenario, tmp_path / "count")
    k = ops.index("fsync") - 3
    plan, error = crashpoints._crash_in_process(scenario, k, tmp_path / "sim", len(ops))
    killed, child, kill_error = crashpoints._kill_in_child(scenario, k, tmp_path / "kill", len(ops))
    assert error is None and kill_error is None
    simulated = crashpoints.fingerprint(plan.directory, __import__("os").getpid())
    assert simulated == crashpoints.fingerprint(killed.directory, child)
    partial = [entry for entry in simulated if entry[0].startswith(".ckptfn.<writer>.")]
    assert len(partial) == 1 and partial[0][1] > 0  # a partial temporary file, and only that


def test_regression_archive_copy_is_never_partial_under_its_name(tmp_path):
    # Found by the "no hard links" crash points: the archive copy was written straight
    # under its archive name, so a crash mid-copy left a partial file there forever.
    directory = tmp_path / "run"
    meta = {"format": "ckptfn/1", "epoch": 0, "saves": [], "timestamp": clock(0).isoformat()}
    write_snapshot(directory, [Target("best_corr.pt", False)], payload(0), meta, fs=NoLinksFS())
    meta = {**meta, "epoch": 1, "timestamp": clock(1).isoformat()}
    ops = NoLinksFS()
    write_snapshot(tmp_path / "count", [Target("best_corr.pt", False)], payload(0), meta, fs=NoLinksFS())
    write_snapshot(tmp_path / "count", [Target("best_corr.pt", False)], payload(1), meta, fs=ops)
    for k in range(len(ops.ops)):
        target = tmp_path / f"cut-{k}"
        __import__("shutil").copytree(directory, target)
        try:
            write_snapshot(target, [Target("best_corr.pt", False)], payload(1), meta, fs=CrashNoLinksFS(k))
        except BaseException:  # noqa: BLE001 - the Crash
            pass
        found = inspect(target, [{"metric_name": "m", "filename": "best_corr.pt", "overwrite": False}])
        assert all(holding.problem is None for holding in found.values()), (k, found)
