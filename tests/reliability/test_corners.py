"""Asynchronous and distributed corners (tests/reliability/corners.py), at the pytest size."""

from __future__ import annotations

from tests.reliability import corners
from tests.shells import forking, tensor_kinds
from tests.distributed import workers


def test_fork_payload_kinds_and_misconfigured_ranks_are_all_clean():
    tally = corners.run(examples=30)
    tally.assert_clean()
    assert tally.count("fault", corners.FORK) == len(forking.SCENARIOS)
    assert tally.count("input", corners.PAYLOADS) == len(tensor_kinds.REGRESSIONS) + 30
    assert tally.count("input", corners.RANKS) == len(workers.MISCONFIGURED)
