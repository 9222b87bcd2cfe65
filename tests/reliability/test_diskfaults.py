"""Write failures with real causes (tests/reliability/diskfaults.py), through CheckpointManager."""

from __future__ import annotations

import pytest

from tests.reliability import diskfaults
from tests.reliability.common import Tally, Unavailable


def run_or_skip(scenario, *args) -> Tally:
    tally = Tally()
    try:
        scenario(tally, *args)
    except Unavailable as reason:
        pytest.skip(str(reason))
    return tally


def test_full_disk_fails_cleanly_and_the_next_epoch_saves(small_tmpfs):
    tally = run_or_skip(diskfaults.full_disk, small_tmpfs)
    tally.assert_clean()
    assert tally.count("fault", diskfaults.FULL) == 8


def test_read_only_file_system_fails_cleanly_and_recovers(small_tmpfs):
    tally = run_or_skip(diskfaults.read_only, small_tmpfs)
    tally.assert_clean()
    assert tally.count("fault", diskfaults.READ_ONLY) == 2


def test_directory_removed_during_training(tmp_path):
    tally = run_or_skip(diskfaults.directory_removed, tmp_path)
    tally.assert_clean()
    assert tally.count("fault", diskfaults.REMOVED) == 8


def test_permission_denied_even_for_root(tmp_path):
    tally = run_or_skip(diskfaults.permission_denied, tmp_path)
    tally.assert_clean()
    assert tally.count("fault", diskfaults.PERMISSION) == 3
