"""Shared pieces of the reliability suite: the tally, payloads, and what a directory holds."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch

import ckptfn
from ckptfn import CheckpointError
from ckptfn.core.config import Config, as_config
from ckptfn.core.metadata import entry_for
from ckptfn.core.naming import archived_of, member_of, parse_temp_name

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository: children import ckptfn and tests from here
UTC = dt.timezone.utc
CATEGORIES = ("unexpected", "corruption", "lost")


def clock(second: int) -> dt.datetime:
    """A fixed, distinct save time per epoch (so two runs of one scenario write identical bytes)."""
    return dt.datetime(2026, 1, 1, tzinfo=UTC) + dt.timedelta(seconds=second)


# --- the tally ---------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    tried: int = 0
    unexpected: int = 0
    corruption: int = 0
    lost: int = 0


@dataclasses.dataclass
class Tally:
    """What a run tried, per (section, kind), and every problem it met.

    ``section`` is ``"fault"`` or ``"input"``. A problem is an unexpected
    exception (or crash, or hang), a corruption (a file under a final or archive
    name that does not load, or holds the wrong snapshot) or lost data (a
    version that was on disk and is gone, or a best that got worse).
    """

    rows: dict[tuple[str, str], Row] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)

    def row(self, section: str, kind: str) -> Row:
        return self.rows.setdefault((section, kind), Row())

    def tried(self, section: str, kind: str, count: int = 1) -> None:
        self.row(section, kind).tried += count

    def problem(self, section: str, kind: str, category: str, message: str) -> None:
        if category not in CATEGORIES:
            raise ValueError(f"unknown problem category {category!r}")
        row = self.row(section, kind)
        setattr(row, category, getattr(row, category) + 1)
        self.problems.append(f"[{kind}] {category}: {message}")

    def merge(self, other: Tally) -> Tally:
        for key, row in other.rows.items():
            mine = self.rows.setdefault(key, Row())
            for field in dataclasses.fields(Row):
                setattr(mine, field.name, getattr(mine, field.name) + getattr(row, field.name))
        self.problems.extend(other.problems)
        return self

    def count(self, section: str, kind: str) -> int:
        return self.rows.get((section, kind), Row()).tried

    def assert_clean(self) -> None:
        """Fail (for pytest) with the first problems, if there are any."""
        if self.problems:
            shown = "\n".join(self.problems[:15])
            more = f"\n... and {len(self.problems) - 15} more" if len(self.problems) > 15 else ""
            raise AssertionError(f"{len(self.problems)} reliability problems:\n{shown}{more}")


@contextlib.contextmanager
def unexpected_exceptions(tally: Tally, section: str, kind: str, what: str) -> Iterator[None]:
    """Record any exception escaping the block as an unexpected one (and carry on)."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - that is the point: nothing but the expected may escape
        tally.problem(section, kind, "unexpected", f"{what}: {type(error).__name__}: {error}")


# --- payloads ----------------------------------------------------------------------------


def payload(epoch: int, elements: int = 64) -> dict:
    """A small training-like payload that says which epoch it belongs to in every tensor."""
    return {
        "model": {"w": torch.full((elements,), float(epoch)), "b": torch.full((3,), float(epoch))},
        "optimizer": {"step": epoch},
        "epoch": epoch,
    }


def payload_problem(state_dict: object, metadata: Mapping) -> str | None:
    """Why a loaded checkpoint is not one consistent snapshot (None when it is)."""
    epoch = metadata.get("epoch")
    try:
        if state_dict["epoch"] != epoch or state_dict["optimizer"]["step"] != epoch:
            return f"payload epoch {state_dict['epoch']} but metadata epoch {epoch}"
        for name, tensor in state_dict["model"].items():
            if not bool(torch.all(tensor == float(epoch))):
                return f"tensor {name} does not belong to epoch {epoch}"
    except (KeyError, TypeError) as error:
        return f"payload has an unexpected shape ({error!r})"
    return None


# --- what a directory holds ----------------------------------------------------------------


def visible(directory: pathlib.Path) -> list[str]:
    """Every non-hidden entry (files, links, anything), sorted."""
    try:
        return sorted(name for name in os.listdir(directory) if not name.startswith("."))
    except FileNotFoundError:
        return []


def temps(directory: pathlib.Path) -> list[str]:
    """The ckptfn temporary files in ``directory``."""
    try:
        return sorted(name for name in os.listdir(directory) if parse_temp_name(name) is not None)
    except FileNotFoundError:
        return []


def temps_of(directory: pathlib.Path, pid: int) -> list[str]:
    return [name for name in temps(directory) if parse_temp_name(name)[0] == pid]


def owner_of(name: str, config: Config) -> str | None:
    """The configured filename that ``name`` is (or is an archived version or a top-k member of), else None."""
    for strategy in config.strategies:
        if name == strategy.filename or archived_of(name, strategy.filename):
            return strategy.filename
        if getattr(strategy, "top_k", 1) > 1 and member_of(name, strategy.filename):
            return strategy.filename
    return None


@dataclasses.dataclass(frozen=True)
class Holding:
    """One visible file: which epoch's snapshot it holds (None: does not load) and why not."""

    name: str
    epoch: int | None
    metadata: Mapping | None
    problem: str | None


def inspect(directory: pathlib.Path, config: object, check: Callable = payload_problem) -> dict[str, Holding]:
    """Load every visible file of ``directory`` with ``load_checkpoint`` and check its payload."""
    config = as_config(config)
    found = {}
    for name in visible(directory):
        path = directory / name
        if owner_of(name, config) is None:
            found[name] = Holding(name, None, None, "a file under a name ckptfn never uses")
            continue
        try:
            state_dict, metadata = ckptfn.load_checkpoint(path)
        except CheckpointError as error:
            found[name] = Holding(name, None, None, f"does not load: {error}")
            continue
        found[name] = Holding(name, metadata.get("epoch"), metadata, check(state_dict, metadata))
    return found


def versions(holdings: Mapping[str, Holding], filename: str) -> list[int]:
    """The epochs held under ``filename`` and its archive names (with repeats), sorted."""
    return sorted(
        h.epoch
        for name, h in holdings.items()
        if h.epoch is not None and (name == filename or archived_of(name, filename))
    )


def file_bests(holdings: Mapping[str, Holding], config: object) -> dict[str, float | None]:
    """filename -> the value its file records for its own strategy (None when absent)."""
    bests = {}
    for strategy in as_config(config).strategies:
        holding = holdings.get(strategy.filename)
        entry = entry_for(holding.metadata, strategy.filename) if holding and holding.metadata else None
        bests[strategy.filename] = entry["value"] if entry else None
    return bests


def resumed_bests(config: object, directory: pathlib.Path) -> tuple[dict, dict]:
    """The bests of ``restore_from_directory`` and of ``CheckpointManager(resume=True)``.

    Warnings are errors here: after any fault no configured file may be unreadable.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = ckptfn.restore_from_directory(config, directory)
        manager = ckptfn.CheckpointManager(directory, config, resume=True)
    return ckptfn.best_values(state), manager.best_values


def better(mode: str, a: float, b: float) -> bool:
    return a < b if mode == "min" else a > b


# --- processes and mounts --------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (for planting stale temporary files)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def wait_for(pid: int, timeout: float) -> int | None:
    """``waitpid`` status of child ``pid``, or None (after killing it) when it outlives ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.002)


def run_quietly(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True)


class Mounts:
    """Small tmpfs mounts made outside pytest (``report.py``); the same as the ``small_tmpfs`` fixture."""

    def __init__(self, base: pathlib.Path) -> None:
        self.base = base
        self.points: list[pathlib.Path] = []

    def __call__(self, size: str = "4m") -> pathlib.Path:
        point = self.base / f"tmpfs-{uuid.uuid4().hex[:6]}"
        point.mkdir(parents=True)
        result = run_quietly("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point))
        if result.returncode != 0:
            raise Unavailable(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
        self.points.append(point)
        return point

    def close(self) -> None:
        for point in self.points:
            run_quietly("umount", "-l", str(point))
        self.points.clear()


class Unavailable(Exception):
    """This machine cannot run a scenario (e.g. no mount permission); the reason says why."""


def in_child(function: Callable, *args, timeout: float = 60.0) -> tuple[str, object]:
    """Run ``function(*args)`` in a forked child, so a hang, a crash or a side effect stays there.

    Returns ``("ok", result)``, ``("error", "Type: message")``, ``("crash", wait status)``
    or ``("hang", None)`` (the child is killed after ``timeout`` seconds). ``result``
    travels as JSON (``repr`` for what JSON cannot hold). The child must not run
    parallel torch operations: the parent's OpenMP threads do not survive a fork.
    """
    import json
    import select

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            outcome = ["ok", function(*args)]
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            outcome = ["error", f"{type(error).__name__}: {error}"]
        try:
            os.write(write_end, json.dumps(outcome, default=repr).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                break
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    status = wait_for(pid, timeout=max(0.0, deadline - time.monotonic()) + 5)
    if status is None:
        return "hang", None
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0) or not chunks:
        return "crash", status
    kind, value = json.loads(b"".join(chunks))
    return kind, value


def forkserver():
    """A multiprocessing context whose children fork from a server that has imported torch and
    ckptfn but never run a parallel op (forking this process could deadlock its OpenMP pool)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "ckptfn", "s3fs", "tests.reliability.kill", "tests.reliability.concurrency",
                                   "tests.reliability.objectstore"])  # (a module that is not installed is skipped)
    return context
