"""Locks of the seam are released for real, even when a child was forked while they were held."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from ckptfn.core.naming import temp_name
from ckptfn.io.fs import FileSystem

PROBE = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("free")
    except BlockingIOError:
        print("held")
    """
)


def lock_state(path) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=30).stdout.strip()


def with_forked_child(action) -> None:
    """Run ``action`` while a forked child (holding copies of every descriptor) sleeps."""
    child = os.fork()
    if child == 0:  # a long-lived child: a DataLoader worker, a fork pool
        signal.pause()
        os._exit(0)
    try:
        action()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_the_directory_lock_is_free_once_released_though_a_forked_child_lives(tmp_path):
    fs = FileSystem()
    outcome = {}

    def hold_then_release():
        with fs.lock(tmp_path):
            outcome["inside"] = lock_state(tmp_path)
            with_forked_child(lambda: None)  # forked while the lock is held ...
        outcome["after"] = lock_state(tmp_path)  # ... released by the writer all the same

    hold_then_release()
    assert outcome == {"inside": "held", "after": "free"}


def test_a_temporary_entrys_lock_is_free_once_released_though_a_forked_child_lives(tmp_path):
    fs = FileSystem()
    path = tmp_path / temp_name("best.pt", os.getpid(), os.uname().nodename, "ab")
    with fs.create(path) as file:
        file.write(b"data")
    assert lock_state(path) == "held"

    def release_while_a_child_lives():
        fs.release(path)
        assert lock_state(path) == "free"

    with_forked_child(release_while_a_child_lives)
