"""The manager's state never disagrees with the disk (``statedisk.py``), in the pytest-sized run."""

from __future__ import annotations

from tests.reliability import statedisk


def test_state_and_disk_agree_through_interrupts_namespaces_clock_steps_and_earlier_runs():
    tally, unavailable = statedisk.run(epochs=60, seeds=(3,), seconds=3.0, histories=15)
    assert unavailable == {}  # this machine can run every part (unshare -p as root)
    tally.assert_clean()
    assert tally.count("fault", "interrupts (real SIGINTs), sync") >= 5  # they really landed
    assert tally.count("fault", "interrupts (real SIGINTs), async") >= 5
    assert tally.count("fault", "a writer in another PID namespace") >= 3
    assert tally.count("fault", "clock steps back (keep)") == 15
