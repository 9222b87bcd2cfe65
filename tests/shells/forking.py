"""Fork a process while its asynchronous save is in flight, in a fresh interpreter under a timeout.

Shared by tests/shells/test_fork.py and tests/reliability/corners.py. ``check``
runs one scenario and returns what went wrong (empty: nothing), so a hang, a
child that never exits or a damaged parent save is reported, never waited for.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import torch

import ckptfn

REPO = pathlib.Path(__file__).resolve().parents[2]

#: The parent starts an async save held inside its write (at the temporary file's fsync), forks, and
#: waits up to CHILD_SECONDS for the child to exit; then it lets the save finish.
SCENARIO = textwrap.dedent(
    """
    import functools, os, pathlib, sys, threading, time
    import torch, ckptfn
    from ckptfn.io.fs import FileSystem
    from ckptfn.io.write import write_snapshot

    out, scenario, CHILD_SECONDS = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    if os.environ.get("CKPTFN_TEST_FORGET_NOTHING"):  # the self-test: the old behaviour, without the fork handler
        import ckptfn.shells.background
        ckptfn.shells.background.AsyncExecutor._forget_the_parents_save = lambda executor: None

    class HeldOnce(FileSystem):
        # The first fsync waits for the gate: the parent's save is in flight while it forks.
        def __init__(self):
            self.armed, self.reached, self.gate = True, threading.Event(), threading.Event()

        def fsync(self, raw):
            if self.armed:
                self.armed = False
                self.reached.set()
                self.gate.wait(60)
            return super().fsync(raw)

    fs = HeldOnce()
    ckptfn.io.write.write_snapshot = functools.partial(write_snapshot, fs=fs)
    manager = ckptfn.CheckpointManager(out / "parent", [{"metric_name": "val_loss"}], async_save=True)
    manager.update({"val_loss": 0.5}, {"w": torch.arange(1000.0)}, 0)
    assert fs.reached.wait(30), "the parent's save never started"
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # the child: only this thread exists here
        if scenario == "save":
            own = ckptfn.CheckpointManager(out / "child", [{"metric_name": "val_loss"}], async_save=True)
            own.update({"val_loss": 0.3}, {"w": torch.full((4,), 7.0)}, 0)
            own.update({"val_loss": 0.2}, {"w": torch.full((4,), 8.0)}, 1)  # waits for its own first save only
            state = ckptfn.init(ckptfn.Strategy("val_loss"))
            state, actions = ckptfn.step(state, {"val_loss": 0.1}, 0)
            manager._writer.submit(actions, {"w": torch.full((2,), 9.0)}, out / "inherited", state=state)
            print("child: saves handed over", flush=True)  # the exit hook finishes them
        sys.exit(0)  # a normal interpreter exit: atexit hooks run
    deadline = time.monotonic() + CHILD_SECONDS
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if done:
        print(f"child exited with status {os.waitstatus_to_exitcode(status)}", flush=True)
    else:
        print(f"child still running after {CHILD_SECONDS} s", flush=True)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    fs.gate.set()
    manager.close()
    print("parent best:", manager.best_values, flush=True)
    """
)


SCENARIOS = ("exit", "save")


def run_scenario(directory: pathlib.Path, scenario: str, child_seconds: float = 20) -> subprocess.CompletedProcess:
    """Run ``scenario`` ("exit": the child just exits; "save": the child saves asynchronously with a
    manager of its own and with the writer it inherited, then exits) with its files in ``directory``;
    the parent kills a child still running after ``child_seconds``."""
    return subprocess.run(
        [sys.executable, "-c", SCENARIO, str(directory), scenario, str(child_seconds)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def _loads(path: pathlib.Path, expected: torch.Tensor, epoch: int | None = None) -> str | None:
    try:
        state_dict, metadata = ckptfn.load_checkpoint(path)
    except Exception as error:  # noqa: BLE001 - reported
        return f"{path.name} in {path.parent.name}/ does not load: {type(error).__name__}: {error}"
    if not torch.equal(state_dict["w"], expected) or (epoch is not None and metadata["epoch"] != epoch):
        return f"{path.parent.name}/{path.name} holds epoch {metadata['epoch']} {state_dict['w'][:4].tolist()}..."
    return None


def check(directory: pathlib.Path, scenario: str) -> list[tuple[str, str]]:
    """Run ``scenario``; each problem as ``(category, message)``: "unexpected" (a hang, a child that
    does not exit, a failed run), "corruption" (a file that does not load or holds the wrong data)."""
    try:
        result = run_scenario(directory, scenario)
    except subprocess.TimeoutExpired:
        return [("unexpected", f"{scenario}: the parent did not finish in 120 s")]
    out = result.stdout
    if result.returncode != 0:
        return [("unexpected", f"{scenario}: exit status {result.returncode}: {result.stderr[-600:]}")]
    problems = []
    if "child exited with status 0" not in out:
        problems.append(("unexpected", f"{scenario}: the child did not exit normally: {out.strip()!r}"))
    if "parent best: {'best_val_loss.pt': 0.5}" not in out:
        problems.append(("unexpected", f"{scenario}: the parent's best is not its save: {out.strip()!r}"))
    found = _loads(directory / "parent" / "best_val_loss.pt", torch.arange(1000.0), epoch=0)
    if found:
        problems.append(("corruption", found))
    left = sorted(p.name for p in (directory / "parent").iterdir()) if (directory / "parent").is_dir() else []
    if left != ["best_val_loss.pt"]:
        problems.append(("unexpected", f"{scenario}: the parent's directory holds {left}"))
    if scenario == "exit" and (directory / "child").exists():
        problems.append(("unexpected", "the child wrote files: the parent's save is the parent's"))
    if scenario == "save":
        if "child: saves handed over" not in out:
            problems.append(("unexpected", f"the child could not hand its saves over: {out.strip()!r}"))
        for found in (
            _loads(directory / "child" / "best_val_loss.pt", torch.full((4,), 8.0), epoch=1),
            _loads(directory / "inherited" / "best_val_loss.pt", torch.full((2,), 9.0)),
        ):
            if found:
                problems.append(("corruption", found))
    return problems
