"""Interrupts: whatever exception leaves ``update`` (a real SIGINT at a random moment), the
manager's state agrees with the files, so carrying on never replaces a better file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import ckptfn

from tests.reliability.common import ROOT

CHILD = textwrap.dedent(
    """
    import json, random, signal, sys
    import torch, ckptfn

    directory, mode, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = [{"metric_name": "val_loss"}, {"metric_name": "val_corr", "mode": "max", "overwrite": False},
              {"every_n_epochs": 1, "filename": "last.pt"}]
    manager = ckptfn.CheckpointManager(directory, config, async_save=mode == "async")
    payload = {"w": torch.zeros(150_000)}
    rng = random.Random(7)
    interrupted = disagreements = saves = 0
    armed = False

    def interrupt(signum, frame):  # Python's own SIGINT behaviour, but only inside update
        if armed:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    print("ready", flush=True)
    for epoch in range(epochs):
        metrics = {"val_loss": rng.random(), "val_corr": rng.random()}
        try:
            armed = True
            saves += bool(manager.update(metrics, payload, epoch))
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            armed = False
        while True:  # interrupted while waiting for a background save, too
            try:
                armed = True
                manager.wait()
                break
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                armed = False
        disagreements += manager.best_values != ckptfn.best_values(ckptfn.restore_from_directory(manager.config, directory))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: shutdown is not under test
    manager.close()
    print(json.dumps({"interrupted": interrupted, "disagreements": disagreements, "saves": saves}), flush=True)
    """
)


def interrupted_run(directory, mode: str, *, epochs: int, seed: int, python_path: str) -> dict:
    """Run the child loop while SIGINTs arrive every few milliseconds; its tally."""
    env = {**os.environ, "PYTHONPATH": python_path}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), mode, str(epochs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=python_path,
    )
    assert child.stdout.readline().strip() == "ready"
    rng, done = random.Random(seed), threading.Event()

    def interrupt():
        while not done.is_set() and child.poll() is None:
            time.sleep(rng.uniform(0.001, 0.012))
            if not done.is_set():
                child.send_signal(signal.SIGINT)

    sender = threading.Thread(target=interrupt, daemon=True)
    sender.start()
    try:
        out, err = child.communicate(timeout=240)
    finally:
        done.set()
        child.kill()
    assert child.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def busy_cpus():
    """Two processes spinning: under load, the narrow windows between two steps of a hand-over widen
    (the race that lost track of a queued background write showed only then)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for spinner in spinners:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_random_sigints_never_leave_the_state_disagreeing_with_the_files(tmp_path, mode, busy_cpus):
    tally = interrupted_run(tmp_path / "run", mode, epochs=120, seed=3, python_path=str(ROOT))
    assert tally["interrupted"] >= 10, tally  # the interrupts really landed
    assert tally["disagreements"] == 0, tally


def test_an_interrupt_inside_the_write_keeps_the_better_file(tmp_path, monkeypatch):
    """The case reported: the file held 0.5, the manager believed 1.0, the next 0.7 replaced it."""
    import ckptfn.io.publish

    manager = ckptfn.CheckpointManager(tmp_path, [{"metric_name": "val_loss"}, {"metric_name": "val_corr", "mode": "max"}])
    manager.update({"val_loss": 1.0, "val_corr": 0.1}, {"w": 1}, 0)
    real = ckptfn.io.publish._FileKind.install
    calls = []

    def interrupted_install(self, publisher, source, final):
        calls.append(final.name)
        if len(calls) == 2:  # best_val_loss.pt already holds 0.5; interrupted before best_val_corr.pt
            raise KeyboardInterrupt
        return real(self, publisher, source, final)

    monkeypatch.setattr(ckptfn.io.publish._FileKind, "install", interrupted_install)
    with pytest.raises(KeyboardInterrupt):
        manager.update({"val_loss": 0.5, "val_corr": 0.2}, {"w": 2}, 1)
    monkeypatch.undo()
    assert manager.best_values == {"best_val_loss.pt": 0.5, "best_val_corr.pt": 0.1}  # what the files hold
    assert manager.update({"val_loss": 0.7, "val_corr": 0.3}, {"w": 3}, 2)[0].name == "best_val_corr.pt"
    assert ckptfn.read_metadata(tmp_path / "best_val_loss.pt")["saves"][0]["value"] == 0.5  # never replaced
