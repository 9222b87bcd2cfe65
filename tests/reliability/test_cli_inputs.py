"""Odd inputs to the real command line (tests/reliability/cli_inputs.py): no traceback, no hang,
one line on stderr and status 2 for a replay error, a row saying why (status 0) for inspect."""

from __future__ import annotations

from tests.reliability import cli_inputs
from tests.reliability.common import Tally


def test_odd_command_line_inputs():
    tally = cli_inputs.run(Tally())
    tally.assert_clean()
    assert tally.count("input", cli_inputs.REPLAY) >= 100
    assert tally.count("input", cli_inputs.INSPECT) >= 60
    assert set(tally.rows) == {("input", cli_inputs.REPLAY), ("input", cli_inputs.INSPECT)}
