"""Run a function on 2 CPU ranks with a gloo process group, with a hard timeout.

Workers are forked from a forkserver that has imported torch, DCP and FSDP once
(``set_forkserver_preload``), so each test pays for process-group setup, not for
importing torch again. The rendezvous is a ``file://`` store in the test's
temporary directory: no fixed port, so tests never collide.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import signal
import time
import traceback

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

PRELOAD = [
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch.distributed.checkpoint.state_dict",
    "torch._dynamo",  # FSDP2 imports it on first use: seconds, paid once in the forkserver
    "ckptfn",
    "tests.distributed.workers",
]
#: Collectives give up after this long (a bug then fails the test instead of hanging it).
COLLECTIVE_TIMEOUT = dt.timedelta(seconds=20)



def start_forkserver() -> None:
    """Start the forkserver with ``PRELOAD`` imported, and return once it runs. (If another test
    module started it first, without these modules, each run imports them itself: slower, same result.)"""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    process = context.Process(target=os.getpid)
    process.start()  # returns once the forkserver has imported everything and forked
    process.join()


class RanksFailed(AssertionError):
    """A rank raised, died or the run timed out; ``exitcodes`` maps rank -> exit code."""

    def __init__(self, message: str, exitcodes: dict[int, int | None]) -> None:
        super().__init__(message)
        self.exitcodes = exitcodes


def _entry(rank: int, world: int, store: str, results: str, worker, args: tuple) -> None:
    if store:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
        )
    try:
        result = worker(rank, world, *args)
    except BaseException:
        pathlib.Path(results, f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        try:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - the group may be broken by the failure being reported
            pass
    torch.save(result, os.path.join(results, f"rank{rank}.pt"))


def run_ranks(
    directory: pathlib.Path, worker, *args, world: int = 2, timeout: float = 45.0, init: bool = True
) -> list[object]:
    """``worker(rank, world, *args)`` on ``world`` ranks; each rank's return value (plain data).
    ``init=False``: the worker initializes the process group itself (like a torchrun script).

    Raises ``RanksFailed`` if any rank raised or died, or when ``timeout`` seconds
    pass (then every rank is killed): a hang fails the test, it never blocks CI.
    """
    run = pathlib.Path(directory) / f"ranks-{time.monotonic_ns()}"
    run.mkdir(parents=True)
    context = mp.start_processes(
        _entry,
        args=(world, str(run / "store") if init else "", str(run), worker, args),
        nprocs=world,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise RanksFailed(f"ranks still running after {timeout:.0f} s (a hang?)", _codes(context))
    except ProcessException as error:
        errors = "\n".join(p.read_text() for p in sorted(run.glob("rank*.error")))
        raise RanksFailed(f"{error}\n{errors}", _codes(context)) from None
    finally:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join()
    return [torch.load(run / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def _codes(context) -> dict[int, int | None]:
    return {rank: process.exitcode for rank, process in enumerate(context.processes)}


def visible(directory) -> list[str]:
    """The names in ``directory`` a user sees (no hidden temporary files or trees)."""
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def hidden(directory) -> list[str]:
    """The hidden names in ``directory``: temporary files or trees left behind."""
    return sorted(name for name in os.listdir(directory) if name.startswith("."))
