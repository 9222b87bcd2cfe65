"""The reliability suite: crash points, kills, full disks, hostile input and races.

Every module runs one family of faults or bad inputs and returns a ``Tally`` of
what it tried and what went wrong. ``tests/reliability/test_*.py`` run reduced
versions inside pytest; ``python tests/reliability/report.py`` runs the full set
and prints one table; ``python tests/reliability/kill.py --trials 100`` runs the
kill test alone.
"""
