"""Power loss, not only process crashes: the persistence-model checker (``powerloss.py``).

Every on-disk state a power cut may leave during each save scenario, under strict POSIX
and under ordered journaling, recovered and checked; and the checker's self-test: broken
protocols (each one a real bug of an earlier version) must be caught.
"""

from __future__ import annotations

import warnings

import pytest

from tests.reliability import powerloss


def test_no_power_cut_leaves_a_bad_state_in_any_scenario_under_either_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resuming from a crash state warns about torn files it skips
        tally = powerloss.run()
    tally.assert_clean()
    strict, ordered = (tally.count("fault", f"power loss, {model}") for model in powerloss.MODELS)
    assert strict >= 200 and ordered >= 100, "the scenarios really enumerate distinct states"


@pytest.mark.parametrize("broken, scenario", list(powerloss.BROKEN.items()), ids=lambda x: getattr(x, "__name__", x))
def test_the_checker_catches_a_broken_protocol(broken, scenario):
    (chosen,) = [s for s in powerloss.SCENARIOS if s.name == scenario]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tally = powerloss.run(scenarios=[chosen], recorder_type=broken)
    assert tally.problems, f"{broken.__name__} went unnoticed in {scenario!r}"


def test_the_model_of_a_fresh_directory_is_durable_and_records_each_operation(tmp_path):
    (tmp_path / "run").mkdir()
    recorder = powerloss.Recorder(tmp_path)
    recorder.mkdir(tmp_path / "run" / "sub")  # a new directory: made, then its parent fsynced
    assert len(recorder.states) == 3
    made, synced = recorder.states[1], recorder.states[2]
    run = made.nodes[made.lookup(("run",))]
    assert "sub" in run.entries and "sub" not in run.durable_entries  # made, not durable yet
    assert "sub" in synced.nodes[synced.lookup(("run",))].durable_entries
