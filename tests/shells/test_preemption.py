"""Preemption (``save_on``): a signal is only recorded; the next safe point writes every ``Every``
strategy's file at once and tells the loop to stop.

The laws of the pure decision (``preempt``, ``step(..., preempted=True)``) are properties; the
signal handling is tested in this process with ``os.kill(os.getpid(), ...)``; the end-to-end
cases send real signals to a child training run (tests/distributed/preempted_training.py):
the ``last.pt`` it leaves is complete, records the step it stopped at, and resumes exactly.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import weakref

import pytest
import torch
from hypothesis import given, strategies as st

import ckptfn
from ckptfn import CheckpointManager, ConfigError, Every, Strategy
from ckptfn.core.actions import Periodic
from ckptfn.core.state import Last
from ckptfn.core.step import preempt
from ckptfn.shells.preemption import SignalWatch, signal_names

from tests.distributed import preempted_training as training
from tests.reliability.common import ROOT
from tests.strategies import mixed_runs

CONFIG = [Strategy("val_loss"), Every(n_steps=1000, filename="last.pt")]


@pytest.fixture(autouse=True)
def default_handlers():
    """Every test starts and ends with the default SIGUSR1/SIGTERM handlers (a leak fails the test)."""
    for number in (signal.SIGUSR1, signal.SIGTERM):
        assert signal.getsignal(number) == signal.SIG_DFL
    yield
    leaked = [number for number in (signal.SIGUSR1, signal.SIGTERM) if signal.getsignal(number) != signal.SIG_DFL]
    for number in leaked:
        signal.signal(number, signal.SIG_DFL)
    assert not leaked, f"handlers left installed: {leaked}"


# --- the pure decision ---------------------------------------------------------------------------


@given(mixed_runs(max_size=8), st.data())
def test_preempt_saves_every_every_now_and_touches_nothing_else(run, data):
    config, _, history = run
    state = ckptfn.scan(ckptfn.init(config), history)[0]
    epoch = data.draw(st.one_of(st.none(), st.integers(0, 50)))
    step = data.draw(st.one_of(st.none(), st.integers(0, 10_000)))
    after, actions = preempt(state, epoch, global_step=step, now=5.0)
    at = state.steps if epoch is None else epoch
    everys = [s for s in config.strategies if isinstance(s, Every)]
    assert actions == tuple(Periodic(s, at, global_step=step) for s in everys)  # all of them, in order
    assert after.steps == state.steps  # not a decision
    for strategy, before, now in zip(config.strategies, state.bests, after.bests):
        assert now == (Last(at, step) if isinstance(strategy, Every) else before)


@given(mixed_runs(max_size=8))
def test_a_preempted_step_is_the_step_plus_every_every(run):
    config, _, history = run
    state = ckptfn.scan(ckptfn.init(config), history[:-1])[0] if history else ckptfn.init(config)
    metrics = history[-1] if history else {}
    plain_state, plain = ckptfn.step(state, metrics, global_step=7)
    forced_state, forced = ckptfn.step(state, metrics, global_step=7, preempted=True)
    assert [a for a in forced if not isinstance(a, Periodic)] == [a for a in plain if not isinstance(a, Periodic)]
    assert [a.filename for a in forced if isinstance(a, Periodic)] == [s.filename for s in config.strategies if isinstance(s, Every)]
    assert forced_state.steps == plain_state.steps
    for strategy, plain_best, forced_best in zip(config.strategies, plain_state.bests, forced_state.bests):
        assert forced_best == (Last(state.steps, 7) if isinstance(strategy, Every) else plain_best)


# --- configuration ---------------------------------------------------------------------------


def test_save_on_in_plain_data_and_its_errors():
    config = ckptfn.Config.from_mapping({"save_on": ["SIGTERM", "SIGUSR1"], "strategies": [{"every_n_epochs": 1}]})
    assert config.save_on == ("SIGTERM", "SIGUSR1") and "save_on=('SIGTERM', 'SIGUSR1')" in repr(config)
    cases = {
        "save_on[0]: expected a signal name such as 'SIGTERM', got 'term' (did you mean 'SIGTERM'?)": ["term"],
        "save_on[1]: 'SIGTERM' is listed twice": ["SIGTERM", "SIGTERM"],
        "save_on[0]: 'SIGKILL' cannot be caught": ["SIGKILL"],
        "save_on: expected a list of signal names, got str 'SIGTERM'": "SIGTERM",
        "save_on[0]: expected a signal name such as 'SIGTERM', got int 15": [15],
    }
    for message, save_on in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            ckptfn.Config.from_mapping({"save_on": save_on, "strategies": [{"every_n_epochs": 1}]})
    with pytest.raises(ConfigError, match="save_on: a preemption save writes the config's Every strategies"):
        ckptfn.Config.from_mapping({"save_on": ["SIGTERM"], "strategies": [{"metric_name": "val_loss"}]})
    # disabled: nothing would be saved, so nothing is refused (and no handler is installed)
    ckptfn.Config.from_mapping({"enabled": False, "save_on": ["SIGTERM"], "strategies": [{"metric_name": "val_loss"}]})


def test_the_manager_takes_names_or_numbers_and_adds_them_to_the_configs(tmp_path):
    config = ckptfn.Config(CONFIG, save_on=("SIGUSR1",))
    with CheckpointManager(tmp_path, config, save_on=[signal.SIGTERM, "SIGUSR1"]) as manager:
        assert manager.config.save_on == ("SIGUSR1", "SIGTERM")
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    with pytest.raises(ConfigError, match=r"save_on\[0\]: 'SIGFOO' is not a signal of this platform"):
        CheckpointManager(tmp_path, CONFIG, save_on="SIGFOO")
    with pytest.raises(ConfigError, match=r"save_on\[0\]: 9999 is not a signal number"):
        signal_names([9999])
    with pytest.raises(ConfigError, match="has none; add one, e.g. Every"):
        CheckpointManager(tmp_path, [Strategy("val_loss")], save_on="SIGTERM")
    with CheckpointManager(tmp_path, None, save_on="SIGTERM") as manager:  # checkpointing off: no handler
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and not manager.check_preemption({})


def test_off_the_main_thread_it_is_a_clear_error(tmp_path):
    errors = []

    def build():
        try:
            CheckpointManager(tmp_path, CONFIG, save_on="SIGTERM")
        except RuntimeError as error:
            errors.append(str(error))

    thread = threading.Thread(target=build, name="loader")
    thread.start()
    thread.join()
    assert errors and "only in the main thread (this is 'loader')" in errors[0]


# --- in this process --------------------------------------------------------------------------


def test_a_signal_makes_the_next_update_write_last_at_once_and_stop(tmp_path):
    with CheckpointManager(tmp_path, CONFIG, save_on=("SIGTERM", "SIGUSR1")) as manager:
        assert [p.name for p in manager.update({"val_loss": 1.0}, {"w": torch.zeros(4)}, 0, global_step=10)] == ["best_val_loss.pt"]
        assert manager.preempted is None and not manager.check_preemption({"w": torch.zeros(4)})
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler only records it
        assert not (tmp_path / "last.pt").exists() and manager.preempted is None
        paths = manager.update({"val_loss": 0.5}, {"w": torch.ones(4)}, 0, global_step=20)
        assert [p.name for p in paths] == ["best_val_loss.pt", "last.pt"]  # the best too, one write
        assert os.stat(paths[0]).st_ino == os.stat(paths[1]).st_ino
        record = manager.preempted
        assert record and record.signals == ("SIGUSR1",) and (record.epoch, record.global_step) == (0, 20)
        assert ckptfn.read_metadata(tmp_path / "last.pt")["global_step"] == 20
        assert ckptfn.verify_checkpoint(tmp_path / "last.pt", level="full").ok
        assert manager.state == ckptfn.restore_from_directory(manager.config, tmp_path)
        # honoured: the next update is an ordinary one
        assert manager.update({"val_loss": 0.7}, {"w": torch.ones(4)}, 0, global_step=30) == []
        # between decisions: no metric judged, the decision count stays
        steps = manager.state.steps
        os.kill(os.getpid(), signal.SIGTERM)
        assert manager.check_preemption({"w": torch.full((4,), 2.0)}, global_step=33)
        assert manager.preempted.signals == ("SIGTERM",) and manager.preempted.global_step == 33
        assert manager.state.steps == steps and manager.best_values == {"best_val_loss.pt": 0.5}
        assert ckptfn.load_checkpoint(tmp_path / "last.pt")[0]["w"].tolist() == [2.0] * 4


def test_close_restores_the_previous_handlers_and_chains_to_them_meanwhile(tmp_path):
    heard = []
    previous = lambda number, frame: heard.append(number)  # noqa: E731
    signal.signal(signal.SIGUSR1, previous)
    try:
        manager = CheckpointManager(tmp_path, CONFIG, save_on="SIGUSR1")
        os.kill(os.getpid(), signal.SIGUSR1)
        assert heard == [signal.SIGUSR1] and manager._watch.requested  # recorded, then chained
        manager.update({"val_loss": 1.0}, {"w": 1}, 0, global_step=1)
        manager.close()
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_a_chained_handler_waits_until_the_write_is_done(tmp_path, monkeypatch):
    import ckptfn.shells.manager

    writing, seen = [], []
    real_write = ckptfn.shells.manager.write

    def write_hit_by_a_signal(*args, **kwargs):
        writing.append(True)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-write
        try:
            return real_write(*args, **kwargs)
        finally:
            writing.pop()

    signal.signal(signal.SIGTERM, lambda number, frame: seen.append(bool(writing)))
    try:
        manager = CheckpointManager(tmp_path, CONFIG, save_on="SIGTERM")
        monkeypatch.setattr(ckptfn.shells.manager, "write", write_hit_by_a_signal)
        paths = manager.update({"val_loss": 1.0}, {"w": torch.zeros(2)}, 0, global_step=1)
        assert [p.name for p in paths] == ["best_val_loss.pt"] and seen == [False]  # after the write, before update returned
        assert manager.preempted is None and manager._watch.pending == ("SIGTERM",)  # an ordinary save: still due
        monkeypatch.undo()
        assert [p.name for p in manager.update({"val_loss": 2.0}, {"w": torch.ones(2)}, 0, global_step=2)] == ["last.pt"]
        assert manager.preempted.signals == ("SIGTERM",)
        manager.close()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_forgotten_watch_passes_signals_on_and_close_warns_about_unhonoured_ones(tmp_path, caplog):
    heard = []
    signal.signal(signal.SIGUSR1, lambda number, frame: heard.append(number))
    try:
        manager = CheckpointManager(tmp_path, CONFIG, save_on="SIGUSR1")
        watch = weakref.ref(manager._watch)
        del manager
        gc.collect()  # never closed: its handler stays installed, and behaves as the previous one
        assert watch() is None and signal.getsignal(signal.SIGUSR1).__name__ == "record_signal"
        os.kill(os.getpid(), signal.SIGUSR1)
        assert heard == [signal.SIGUSR1]
        watch = SignalWatch(["SIGUSR1"])
        os.kill(os.getpid(), signal.SIGUSR1)
        with caplog.at_level(logging.WARNING, logger="ckptfn"):
            watch.close()
        assert "SIGUSR1 came after the last safe point" in caplog.text
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_async_save_is_on_disk_when_a_preempted_update_returns(tmp_path):
    with CheckpointManager(tmp_path, CONFIG, save_on="SIGUSR1", async_save=True) as manager:
        manager.update({"val_loss": 1.0}, {"w": torch.zeros(1000)}, 0, global_step=1)
        os.kill(os.getpid(), signal.SIGUSR1)
        paths = manager.update({"val_loss": 2.0}, {"w": torch.ones(1000)}, 0, global_step=2)
        assert [p.name for p in paths] == ["last.pt"] and manager.preempted.global_step == 2
        assert ckptfn.verify_checkpoint(paths[0], level="full").ok  # before wait() or close()


def test_a_single_process_makes_no_collective(tmp_path, monkeypatch):
    def no_collective(*args, **kwargs):
        raise AssertionError("a collective in a single process")

    monkeypatch.setattr(torch.distributed, "all_reduce", no_collective)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", no_collective)
    with CheckpointManager(tmp_path, CONFIG, save_on="SIGUSR1") as manager:
        manager.update({"val_loss": 1.0}, {"w": 1}, 0, global_step=1)
        assert not manager.check_preemption({"w": 1}, global_step=2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert manager.check_preemption({"w": 1}, global_step=3)


# --- real signals to a child training run ------------------------------------------------------------


def start(directory, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "tests.distributed.preempted_training", str(directory), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def signal_when(child, line: str, number: int) -> None:
    """Read the child's output until ``line``, then send it ``number``."""
    for got in child.stdout:
        if got.strip() == line:
            child.send_signal(number)
            return
    raise AssertionError(f"the child ended before printing {line!r}: {child.stderr.read()[-3000:]}")


def finish(child, timeout: float = 60) -> dict:
    try:
        out, err = child.communicate(timeout=timeout)
    finally:
        child.kill()
    assert child.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def reference(steps: int) -> dict:
    """The uninterrupted run, in this process: the state after ``steps`` steps."""
    torch.set_num_threads(1)
    model, optimizer = training.build()
    for step in range(1, steps + 1):
        training.train_step(model, optimizer, step)
    return training.payload(model, optimizer, steps)


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_sigusr1_to_a_training_run_leaves_a_complete_last_that_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    child = start(run)
    signal_when(child, "step 5", signal.SIGUSR1)
    result = finish(child)
    stopped = result["stopped_at"]
    assert result["preempted"] == {"signals": ["SIGUSR1"], "epoch": 0, "global_step": stopped, "paths": result["preempted"]["paths"]}
    assert "last.pt" in result["preempted"]["paths"] and result["handler_restored"]
    assert ckptfn.verify_checkpoint(run / "last.pt", level="full").ok
    saved, metadata = ckptfn.load_checkpoint(run / "last.pt")
    assert metadata["global_step"] == saved["step"] == stopped
    final = torch.load(run / "final0.pt", weights_only=True)
    assert_same(saved, final)  # the file holds the state the run stopped with
    assert_same(final, reference(stopped))  # which is the uninterrupted run's at that step
    # a second process resumes from it, exactly, and carries on as if never stopped
    resumed = finish(start(run, "--resume", "--steps", stopped + 4, "--pause", 0))
    assert resumed["stopped_at"] == stopped + 4 and resumed["preempted"] is None
    assert_same(torch.load(run / "resumed0.pt", weights_only=True), final)
    assert_same(torch.load(run / "final0.pt", weights_only=True), reference(stopped + 4))


def test_sigterm_between_validations_is_saved_by_check_preemption(tmp_path):
    run = tmp_path / "run"
    child = start(run, "--mode", "check", "--every", 50)
    signal_when(child, "step 7", signal.SIGTERM)
    result = finish(child)
    stopped = result["stopped_at"]
    assert result["preempted"]["signals"] == ["SIGTERM"] and result["preempted"]["paths"] == ["last.pt"]
    assert stopped < 50  # between two validations
    assert ckptfn.verify_checkpoint(run / "last.pt", level="full").ok
    assert ckptfn.read_metadata(run / "last.pt")["global_step"] == stopped
    assert_same(ckptfn.load_checkpoint(run / "last.pt")[0], torch.load(run / "final0.pt", weights_only=True))


def test_signals_during_saves_never_interrupt_them_and_are_honoured_after(tmp_path):
    """SIGUSR1 lands inside torch.save of an ordinary save (a 96 MiB payload): that save completes and
    the preemption save follows at the next update. SIGTERM lands inside the preemption save: it
    completes, covers it, and the user's own SIGTERM handler runs after the write."""
    run = tmp_path / "run"
    child = start(run, "--big", 96, "--arm", 2, "--chain", "--pause", 0)
    signal_when(child, "writing 1", signal.SIGUSR1)
    signal_when(child, "writing 2", signal.SIGTERM)
    result = finish(child)
    first, second = result["events"]
    assert first == {"step": 1, "paths": ["best_val_loss.pt"], "complete": [True], "pending": ["SIGUSR1"], "chained": 0, "stopped": False}
    assert second["step"] == 2 and second["stopped"] and "last.pt" in second["paths"] and all(second["complete"])
    assert second["pending"] == []  # the SIGTERM that came during the preemption save is covered by it
    assert result["preempted"]["signals"] == ["SIGUSR1", "SIGTERM"] and result["preempted"]["global_step"] == 2
    assert result["chained"] == [{"signal": "SIGTERM", "inside_write": False}]  # held back until the write was done
    assert ckptfn.verify_checkpoint(run / "last.pt", level="full").ok
    assert ckptfn.load_checkpoint(run / "last.pt")[0]["big"].shape == (96 * 2**18,)


def test_chain_false_records_without_calling_the_previous_handler():
    heard = []
    previous = lambda number, frame: heard.append(number)  # noqa: E731
    signal.signal(signal.SIGUSR1, previous)
    try:
        watch = SignalWatch("SIGUSR1", chain=False)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.pending == ("SIGUSR1",) and heard == []
        watch.honour()
        watch.close()
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
