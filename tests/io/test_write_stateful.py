"""Steps, saves, failed saves and reloads, interleaved: the files always match the bests."""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import shutil
import tempfile
import warnings

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import ckptfn
from ckptfn import CheckpointWriteError, Config, Strategy
from ckptfn.io.write import write_snapshot
from ckptfn.kit import partition
from tests.faults import snapshot_of
from ckptfn.core.metadata import entry_for
from ckptfn.core.naming import archived_of

from tests.faults import MUTATING, FailingFS

CONFIG = Config(
    [
        Strategy("val_loss", filename="best_loss.pt"),
        Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False),
        Strategy("loss_components.concordance", filename="best_concordance.pt", min_delta=0.25),
    ]
)
values = st.integers(-6, 6).map(lambda i: i / 4)


class ExecutorMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="ckptfn-machine-"))
        self.state = ckptfn.init(CONFIG)
        self.clock = 0
        self.versions = {s.filename: 0 for s in CONFIG.strategies}  # publications per name

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    def _metrics(self, data):
        return {
            "val_loss": data.draw(values),
            "val_corr": data.draw(values),
            "loss_components": {"concordance": data.draw(values)},
        }

    def _write(self, data, fs=None):
        new_state, actions = ckptfn.step(self.state, self._metrics(data))
        saves, _ = partition(actions)
        if not saves:
            self.state = new_state
            return
        self.clock += 1
        now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=self.clock)
        targets, metadata = snapshot_of(saves, state=new_state, now=now)
        try:
            kwargs = {} if fs is None else {"fs": fs}
            write_snapshot(self.directory, targets, {"epoch": new_state.steps}, metadata, **kwargs)
        except CheckpointWriteError as error:
            for path in error.published:
                self.versions[path.name] += 1
            if error.published:  # disk moved on for some names: the files are the truth
                self.state = ckptfn.restore_from_directory(CONFIG, self.directory)
            return  # otherwise keep the old state: the next epoch retries
        for save in saves:
            self.versions[save.filename] += 1
        self.state = new_state

    @rule(data=st.data())
    def epoch(self, data):
        self._write(data)

    @rule(data=st.data(), op=st.sampled_from(MUTATING), at=st.integers(0, 3))
    def epoch_whose_write_fails(self, data, op, at):
        self._write(data, FailingFS(op, at))

    @rule()
    def reload_from_disk(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no file may be unreadable
            resumed = ckptfn.restore_from_directory(CONFIG, self.directory)
        assert resumed.bests == self.state.bests

    @invariant()
    def files_match_bests(self):
        for strategy, best in zip(CONFIG.strategies, self.state.bests):
            path = self.directory / strategy.filename
            if best.value is None:
                assert not path.exists()
                continue
            entry = entry_for(ckptfn.read_metadata(path), strategy.filename)
            assert (entry["value"], entry["epoch"]) == (best.value, best.epoch)

    @invariant()
    def no_temporary_files_and_every_version_kept(self):
        names = os.listdir(self.directory)
        assert not [n for n in names if n.startswith(".")]
        for strategy in CONFIG.strategies:
            current = int(strategy.filename in names)
            archived = sum(archived_of(n, strategy.filename) for n in names)
            expected = self.versions[strategy.filename] if not strategy.overwrite else min(1, self.versions[strategy.filename])
            assert current + archived == expected


TestExecutorMachine = ExecutorMachine.TestCase
TestExecutorMachine.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)
