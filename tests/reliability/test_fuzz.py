"""Bad input (tests/reliability/fuzz.py), reduced example counts; plus the bugs the fuzzers found."""

from __future__ import annotations

import time

import pytest
import torch

import ckptfn
from ckptfn import ConfigError, MetricTypeError, Strategy
from ckptfn.io.write import write_snapshot
from ckptfn.kit import Target
from tests.faults import NoLinksFS
from tests.reliability import fuzz
from tests.reliability.common import Tally, clock, payload


@pytest.mark.parametrize(
    "fuzzer, kind",
    [
        (fuzz.fuzz_configs, fuzz.CONFIG),
        (fuzz.fuzz_states, fuzz.STATE),
        (fuzz.fuzz_metrics, fuzz.METRICS),
        (fuzz.fuzz_filenames, fuzz.FILENAME),
    ],
    ids=["config", "restore", "metrics", "filenames"],
)
def test_fuzzed_input_gives_only_the_documented_errors(fuzzer, kind):
    tally = Tally()
    fuzzer(tally, 200 if fuzzer is not fuzz.fuzz_filenames else 80)
    tally.assert_clean()
    assert tally.count("input", kind) >= 80


def test_mutated_checkpoint_bytes_only_give_checkpoint_errors_in_a_watched_interpreter():
    tally = Tally()
    fuzz.fuzz_mutations(tally, 240)
    tally.assert_clean()
    assert sum(tally.count("input", fuzz.MUTATION.format(kind)) for kind in fuzz.MUTATION_KINDS) == 240


@pytest.mark.parametrize("fuzzer, kind", [(fuzz.fuzz_pickles, fuzz.PICKLES), (fuzz.fuzz_zips, fuzz.ZIPS)],
                         ids=["pickles", "zip structures"])
def test_every_reader_over_fuzzed_pickles_and_zips_in_limited_children(fuzzer, kind):
    tally = Tally()
    outcomes = fuzzer(tally, 200)
    tally.assert_clean()
    assert tally.count("input", kind) == 200
    assert outcomes[("loaded", "loaded")] >= 10 and outcomes[("refused", "refused")] >= 50  # both kinds reached


@pytest.mark.parametrize("sabotage, expected", [("allocate", "MemoryError"), ("hang", "hang"), ("other error", "ValueError")])
def test_the_reader_harness_reports_allocations_hangs_and_undocumented_errors(monkeypatch, sabotage, expected):
    def sabotaged(path):
        if sabotage == "allocate":
            return bytearray(fuzz.FUZZ_MEMORY + (1 << 30))  # past the child's limit: a MemoryError
        if sabotage == "hang":
            time.sleep(3600)
        raise ValueError("not a CheckpointError")

    monkeypatch.setattr(ckptfn, "read_metadata", sabotaged)
    monkeypatch.setattr(fuzz, "FUZZ_SECONDS", 1.0)
    monkeypatch.setattr(fuzz, "FUZZ_SLACK", 0.5)
    monkeypatch.setattr(fuzz, "FUZZ_BATCH", 2)
    tally = Tally()
    fuzz._run_batches(tally, fuzz.ZIPS, [fuzz.base_checkpoint()] * 2, keep=False)
    assert tally.row("input", fuzz.ZIPS).unexpected >= 1
    assert any(expected in problem for problem in tally.problems), tally.problems


@pytest.mark.parametrize("sabotage, expected", [("crash", "died"), ("hang", "hung")])
def test_the_mutation_harness_reports_a_crash_or_a_hang_of_the_interpreter(sabotage, expected):
    tally = Tally()
    fuzz.fuzz_mutations(tally, 30, stall=3.0, sabotage=sabotage)
    assert len(tally.problems) == 1 and expected in tally.problems[0]


# --- regressions: bugs the fuzzers found, fixed in the library ------------------------------------


def test_regression_min_delta_beyond_float_is_a_config_error():
    with pytest.raises(ConfigError, match="min_delta"):
        ckptfn.Config.from_mapping({"metric_name": "val_loss", "min_delta": 10**400})


def test_regression_a_saved_best_beyond_float_is_a_config_error():
    saved = ckptfn.init(Strategy("val_loss")).to_dict()
    saved["strategies"][0].update(best=10**400, best_epoch=0)
    with pytest.raises(ConfigError, match="best"):
        ckptfn.restore(Strategy("val_loss"), saved)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize(
    "make",
    [lambda: torch.empty((), device="meta"), lambda: torch.nested.nested_tensor([torch.ones(1)])],
    ids=["meta tensor", "nested tensor"],
)
def test_regression_a_tensor_without_a_readable_value_is_a_metric_type_error(make):
    # .item() raised RuntimeError / NotImplementedError straight out of step
    with pytest.raises(MetricTypeError, match="val_loss"):
        ckptfn.step(ckptfn.init(Strategy("val_loss")), {"val_loss": make()})


@pytest.mark.parametrize("filename", ["x" * 161 + ".pt", "é" * 81, "\ud800.pt"], ids=["long", "long in bytes", "surrogate"])
def test_regression_names_that_could_never_be_written_are_config_errors(filename):
    with pytest.raises(ConfigError, match="filename"):
        Strategy("val_loss", filename=filename)


def test_the_longest_accepted_name_works_on_every_path_even_archive_copies(tmp_path):
    name = "é" * 77 + "x.pt"  # 159 bytes
    assert len(name.encode()) <= 160
    Strategy("val_loss", filename=name)
    for epoch in range(3):  # archive names and the temporary copies of them fit too
        meta = {"format": "ckptfn/1", "epoch": epoch, "timestamp": clock(epoch).isoformat(), "saves": []}
        write_snapshot(tmp_path, [Target(name, False)], payload(epoch), meta, fs=NoLinksFS())
    assert len(list(tmp_path.iterdir())) == 3 and ckptfn.read_metadata(tmp_path / name)["epoch"] == 2
