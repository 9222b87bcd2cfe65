"""Liveness of writers across PID namespaces: a writer never removes a live writer's temporaries.

Tidying after dead writers used to decide "dead" from the host name and the process
id alone; a writer in another PID namespace of the same host (a container,
``unshare -p``) cannot see our process id, took us for dead and deleted our files
mid-save. Now every temporary entry is locked by its creator for its lifetime.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

import ckptfn
from ckptfn.core.naming import temp_name
from ckptfn.io.fs import FileSystem
from ckptfn.io.publish import sweep

from tests.reliability.common import ROOT

WRITER = textwrap.dedent(
    """
    import json, sys, time, torch, ckptfn
    directory, filename, seconds, elements = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    state = ckptfn.init(ckptfn.Strategy("val_loss", filename=filename))
    payload, saves, failures, epoch, started = {"w": torch.zeros(elements)}, 0, [], 0, time.monotonic()
    while time.monotonic() - started < seconds:
        state, actions = ckptfn.step(state, {"val_loss": 1.0 / (epoch + 1)}, epoch)
        try:
            ckptfn.execute(actions, payload, directory, state=state)
            saves += 1
        except ckptfn.CheckpointWriteError as error:
            failures.append(str(error)[:200])
        epoch += 1
    print(json.dumps({"saves": saves, "failures": len(failures), "first": failures[:1]}))
    """
)


def race(directory: pathlib.Path, python_path: str, seconds: float = 4.0) -> dict:
    """A writer here (big saves) and one in a new PID namespace (small saves), side by side."""
    env = {**os.environ, "PYTHONPATH": python_path}
    here = [sys.executable, "-c", WRITER, str(directory), "a.pt", str(seconds), str(8 << 20)]
    there = ["unshare", "-p", "-f", sys.executable, "-c", WRITER, str(directory), "b.pt", str(seconds), "16"]
    first = subprocess.Popen(here, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=python_path)
    second = subprocess.Popen(there, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=python_path)
    out_first, err_first = first.communicate(timeout=120)
    out_second, err_second = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, (err_first[-1500:], err_second[-1500:])
    return {"here": json.loads(out_first), "there": json.loads(out_second)}


def can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-p", "-f", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_unshare(), reason="needs unshare -p (root on Linux)")
def test_a_writer_in_another_pid_namespace_never_removes_a_live_writers_temporaries(tmp_path):
    tally = race(tmp_path / "run", str(ROOT))
    assert tally["here"]["saves"] >= 5 and tally["there"]["saves"] >= 20, tally  # they really overlapped
    assert tally["here"]["failures"] == 0 and tally["there"]["failures"] == 0, tally
    assert ckptfn.load_checkpoint(tmp_path / "run" / "a.pt")[1]["epoch"] == tally["here"]["saves"] - 1


def test_a_dead_writers_temporaries_are_removed_and_a_locked_one_is_kept(tmp_path):
    """Unit form: the sweep removes a temporary entry only if its lock can be taken."""
    fs = FileSystem()
    host = os.uname().nodename
    dead = tmp_path / temp_name("a.pt", 999_999_999, host, "ab")  # no such pid, nobody holds it
    dead.write_bytes(b"partial")
    locked = tmp_path / temp_name("b.pt", 999_999_998, host, "cd")  # no such pid here, but its lock is held
    with fs.create(locked) as file:  # the seam locks a temporary entry when it creates it
        file.write(b"partial")
    tree = tmp_path / temp_name("c.dcp", 999_999_997, host, "ef")
    fs.make_directory(tree)  # a temporary tree, locked the same way
    sweep(tmp_path)
    assert not dead.exists() and locked.exists() and tree.exists()
    fs.release(locked)
    fs.release(tree)
    sweep(tmp_path)
    assert os.listdir(tmp_path) == []
