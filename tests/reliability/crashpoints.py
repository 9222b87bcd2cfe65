"""Every crash point, deterministically (CrashMonkey/ALICE style).

For each scenario the save protocol is cut right after its k-th mutating
file-system operation, for every k from 0 to the number of operations:

1. in-process with ``CrashFS(k)``, which raises the ``BaseException`` ``Crash`` so
   that no cleanup code can "help";
2. in a forked child with ``KillFS(k)``, which SIGKILLs itself at the same
   operation: a real crash. The two directories must be identical (names with the
   writer's pid normalized, contents, hard-link structure), which shows that what
   ``CrashFS`` leaves is exactly what a real crash at that point leaves.

At every cut the invariants are checked: every configured name is absent (never
saved) or a complete, loadable file holding the old or the new snapshot; no
archived version is lost; resuming from the directory yields bests that match the
files. Then a new ``CheckpointManager(resume=True)`` continues from the killed
child's directory: a worse epoch replaces nothing, a better one saves every name
and removes the dead writer's temporary files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import socket
import stat
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping

import ckptfn
from ckptfn import Config, Strategy, init, step
from ckptfn.io.write import write_snapshot
from ckptfn.kit import Target, partition
from ckptfn.kit import plan as plan_of
from ckptfn.io.fs import REAL
from ckptfn.core.naming import member_of, parse_temp_name, temp_name
from ckptfn.core.state import State

from tests.faults import Crash, CrashFS, CrashNoLinksFS, KillFS, KillNoLinksFS, NoLinksFS, RecordingFS
from tests.reliability.common import (
    Holding,
    Tally,
    clock,
    dead_pid,
    file_bests,
    inspect,
    payload,
    resumed_bests,
    temps_of,
    versions,
    wait_for,
)

SECTION = "fault"
SIMULATED = "crash point, simulated (CrashFS)"
KILLED = "crash point, real SIGKILL at the same op"
RECOVERED = "resume + continue after a crash point"

LOSS = Strategy("val_loss", filename="best_loss.pt")
CONCORDANCE = Strategy("loss_components.concordance", filename="best_concordance.pt")
CORR = Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False)
THREE = (LOSS, CONCORDANCE, CORR)
TOPK = Strategy("val_acc", mode="max", filename="best_acc.pt", top_k=3)
TOPK_HISTORY = ({"val_acc": 0.5, "val_loss": 1.0}, {"val_acc": 0.45, "val_loss": 2.0}, {"val_acc": 0.6, "val_loss": 3.0})  # full: 0.6 at best_acc.pt, 0.5, 0.45


def metrics(loss: float, concordance: float, corr: float) -> dict:
    return {"val_loss": loss, "loss_components": {"concordance": concordance}, "val_corr": corr}


@dataclasses.dataclass(frozen=True)
class Scenario:
    """Epochs saved before (``history``), then the epoch whose save is cut (``cut``)."""

    name: str
    strategies: tuple[Strategy, ...]
    history: tuple[Mapping, ...]
    cut: Mapping
    links: bool = True
    stale: bool = False
    new_directory: bool = False

    @property
    def config(self) -> Config:
        return Config(self.strategies)


SCENARIOS = (
    Scenario("first save", (LOSS,), (), {"val_loss": 1.0}, new_directory=True),
    Scenario("overwrite", (LOSS,), ({"val_loss": 1.0},), {"val_loss": 0.5}),
    Scenario("archive, overwrite=False", (CORR,), ({"val_corr": 0.1}, {"val_corr": 0.2}), {"val_corr": 0.3}),
    Scenario("three strategies, one write", THREE, (metrics(1.0, 0.9, 0.1), metrics(1.1, 0.95, 0.2)), metrics(0.5, 0.5, 0.5)),
    Scenario("stale-temp cleanup", (LOSS,), ({"val_loss": 1.0},), {"val_loss": 0.5}, stale=True),
    Scenario("top-k: a new best moves the old one aside, the worst leaves", (TOPK,), TOPK_HISTORY, {"val_acc": 0.7}),
    Scenario("top-k: a member enters, the worst leaves", (TOPK, LOSS), TOPK_HISTORY, {"val_acc": 0.55, "val_loss": 1.0}),
    Scenario(
        "three strategies, no hard links",
        THREE,
        (metrics(1.0, 0.9, 0.1), metrics(1.1, 0.95, 0.2)),
        metrics(0.5, 0.5, 0.5),
        links=False,
    ),
)

WORSE = {**metrics(1e6, 1e6, -1e6), "val_acc": -1e6}  # worse than any best of any scenario
BETTER = {**metrics(-1e6, -1e6, 1e6), "val_acc": 1e6}  # better than any


@dataclasses.dataclass(frozen=True)
class Plan:
    """A prepared directory and the save to cut in it."""

    directory: pathlib.Path
    before: State
    after: State
    targets: tuple[Target, ...]
    metadata: Mapping
    epoch: int
    planted: Mapping[str, str]  # temp name -> "dead" / "live" / "foreign"
    removes: tuple[str, ...] = ()  # top-k members that leave
    families: tuple = ()  # top-k (filename, kept members)


_DEAD: list[int] = []


def _dead() -> int:
    if not _DEAD:
        _DEAD.append(dead_pid())
    return _DEAD[0]


def _plant_temps(directory: pathlib.Path) -> dict[str, str]:
    host = socket.gethostname()
    planted = {
        temp_name("best_loss.pt", _dead(), host, "aa01"): "dead",
        temp_name("best_loss.pt", _dead(), host, "aa02"): "dead",
        temp_name("best_loss.pt", os.getppid(), host, "bb01"): "live",  # our parent outlives every cut
        temp_name("best_loss.pt", _dead(), "some-other-host", "cc01"): "foreign",
    }
    for name in planted:
        (directory / name).write_bytes(b"partial data of another writer")
    return planted


def prepare(scenario: Scenario, base: pathlib.Path) -> Plan:
    """Build the directory as the scenario's history left it; return the save to cut."""
    base.mkdir(parents=True, exist_ok=True)
    directory = base / "run"
    state = init(scenario.config)
    fs = REAL if scenario.links else NoLinksFS()
    if not scenario.new_directory:
        directory.mkdir(parents=True)
    for epoch, values in enumerate(scenario.history):
        state, actions = step(state, values, epoch)
        saves, _ = partition(actions)
        if saves:
            snapshot = plan_of(saves, state=state, metrics=values, now=clock(epoch))
            write_snapshot(directory, snapshot.targets, payload(epoch), snapshot.metadata, fs=fs,
                           removes=snapshot.removes, families=snapshot.families)
    planted = _plant_temps(directory) if scenario.stale else {}
    epoch = len(scenario.history)
    after, actions = step(state, scenario.cut, epoch)
    saves, _ = partition(actions)
    snapshot = plan_of(saves, state=after, metrics=scenario.cut, now=clock(epoch))
    return Plan(directory, state, after, tuple(snapshot.targets), dict(snapshot.metadata), epoch, planted,
                snapshot.removes, snapshot.families)


def _save(plan: Plan, fs) -> None:
    write_snapshot(plan.directory, plan.targets, payload(plan.epoch), plan.metadata, fs=fs,
                   removes=plan.removes, families=plan.families)


def top_k_sets(state: State) -> dict[str, frozenset]:
    """filename -> the set of (value, epoch) a top-k strategy keeps (the best and its members)."""
    sets = {}
    for strategy, best in zip(state.config.strategies, state.bests):
        if getattr(strategy, "top_k", 1) > 1:
            head = {(best.value, best.epoch)} if best.value is not None else set()
            sets[strategy.filename] = frozenset(head | {(m.value, m.epoch) for m in best.others})
    return sets


def operations(scenario: Scenario, scratch: pathlib.Path) -> list[str]:
    """The mutating operations of the scenario's save, in order."""
    plan = prepare(scenario, scratch)
    fs = RecordingFS() if scenario.links else NoLinksFS()
    _save(plan, fs)
    shutil.rmtree(scratch)
    return [name for name, _ in fs.ops]


def fingerprint(directory: pathlib.Path, writer: int) -> tuple:
    """What a directory holds, with the writer's pid and random tokens normalized away."""
    if not directory.exists():
        return ("no directory",)
    names = sorted(os.listdir(directory))
    stats = {name: os.lstat(directory / name) for name in names}
    sharing = Counter((s.st_dev, s.st_ino) for s in stats.values())
    entries = []
    for name in names:
        info = stats[name]
        shown = name
        parsed = parse_temp_name(name)
        if parsed is not None and parsed[0] == writer:
            shown = ".ckptfn.<writer>." + name.split(".", 5)[5]
        if stat.S_ISLNK(info.st_mode):
            content = "symlink to " + os.readlink(directory / name)
        else:
            content = hashlib.sha256((directory / name).read_bytes()).hexdigest()[:16]
        entries.append((shown, info.st_size, content, sharing[(info.st_dev, info.st_ino)]))
    return tuple(sorted(entries))


def check_cut(tally: Tally, kind: str, scenario: Scenario, plan: Plan, before: Mapping[str, Holding], where: str) -> dict:
    """The invariants at one cut point; returns what the directory holds."""
    config = scenario.config
    after = inspect(plan.directory, config)
    for name, holding in after.items():
        if holding.problem:
            tally.problem(SECTION, kind, "corruption", f"{where}: {name} {holding.problem}")
    cut_names = {target.filename for target in plan.targets}
    for strategy in config.strategies:
        name = strategy.filename
        old = before[name].epoch if name in before else None
        now = after[name].epoch if name in after else None
        allowed = {old} | ({plan.epoch} if name in cut_names else set())
        if now not in allowed:
            category = "lost" if now is None else "corruption"
            tally.problem(SECTION, kind, category, f"{where}: {name} holds epoch {now}, expected one of {sorted(allowed, key=str)}")
        if not strategy.overwrite:
            kept, now_versions = set(versions(before, name)), set(versions(after, name))
            if kept - now_versions:
                tally.problem(SECTION, kind, "lost", f"{where}: archived versions {sorted(kept - now_versions)} of {name} are gone")
            if now_versions - kept - {plan.epoch}:
                tally.problem(SECTION, kind, "corruption", f"{where}: unknown versions {sorted(now_versions - kept)} of {name}")
    for name, role in plan.planted.items():
        if role != "dead" and not (plan.directory / name).exists():
            tally.problem(SECTION, kind, "lost", f"{where}: the {role} writer's temporary file {name} was removed")
    try:
        resumed, managed = resumed_bests(config, plan.directory)
    except Exception as error:  # noqa: BLE001
        tally.problem(SECTION, kind, "unexpected", f"{where}: resume failed: {type(error).__name__}: {error}")
        return after
    on_disk = file_bests(after, config)
    if resumed != on_disk or managed != on_disk:
        tally.problem(SECTION, kind, "corruption", f"{where}: resumed bests {resumed} / {managed} but the files hold {on_disk}")
    old_sets, new_sets = top_k_sets(plan.before), top_k_sets(plan.after)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        disk_sets = top_k_sets(ckptfn.restore_from_directory(config, plan.directory))
    for name, kept in disk_sets.items():  # the top k read back is the old one or the new one, never less
        if kept not in (old_sets[name], new_sets[name]):
            category = "lost" if (old_sets[name] & new_sets[name]) - kept else "corruption"
            tally.problem(SECTION, kind, category, f"{where}: the top-k of {name} reads back as {sorted(kept)}, "
                          f"neither {sorted(old_sets[name])} nor {sorted(new_sets[name])}")
        strategy = next(s for s in config.strategies if s.filename == name)
        files = [n for n in os.listdir(plan.directory) if n == name or member_of(n, name)]
        if len(files) > strategy.top_k + 1:
            tally.problem(SECTION, kind, "corruption", f"{where}: {len(files)} files of the top-{strategy.top_k} of {name}: {sorted(files)}")
    return after


def recover(tally: Tally, scenario: Scenario, plan: Plan, crashed: Mapping[str, Holding], writer: int, where: str) -> None:
    """Continue from a crashed directory with a new manager, as a restarted run would."""
    config = scenario.config
    present = {s.filename for s in config.strategies if s.filename in crashed}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manager = ckptfn.CheckpointManager(plan.directory, config, resume=True)
        written = {p.name for p in manager.update(WORSE, payload(90), 90)}
        replaced = written & present
        if replaced or written != {s.filename for s in config.strategies} - present:
            tally.problem(SECTION, RECOVERED, "lost", f"{where}: a worse epoch wrote {sorted(written)} over {sorted(replaced)}")
        written = manager.update(BETTER, payload(91), 91)
    if sorted(p.name for p in written) != sorted(s.filename for s in config.strategies):
        tally.problem(SECTION, RECOVERED, "unexpected", f"{where}: a better epoch wrote only {written}")
    after = inspect(plan.directory, config)
    for name, holding in after.items():
        if holding.problem:
            tally.problem(SECTION, RECOVERED, "corruption", f"{where}: {name} {holding.problem}")
    for strategy in config.strategies:
        if strategy.filename not in after or after[strategy.filename].epoch != 91:
            tally.problem(SECTION, RECOVERED, "unexpected", f"{where}: {strategy.filename} does not hold the new best")
        if not strategy.overwrite:
            missing = set(versions(crashed, strategy.filename)) - set(versions(after, strategy.filename))
            if missing:
                tally.problem(SECTION, RECOVERED, "lost", f"{where}: versions {sorted(missing)} of {strategy.filename} lost")
    if temps_of(plan.directory, writer):
        tally.problem(SECTION, RECOVERED, "unexpected", f"{where}: the crashed writer's temporary files were not removed")
    for name, role in plan.planted.items():
        if (role == "dead") == (plan.directory / name).exists():
            tally.problem(SECTION, RECOVERED, "unexpected", f"{where}: the {role} temporary file {name} was handled wrongly")


def _crash_in_process(scenario: Scenario, k: int, base: pathlib.Path, total: int) -> tuple[Plan, str | None]:
    plan = prepare(scenario, base)
    fs = CrashFS(k) if scenario.links else CrashNoLinksFS(k)
    try:
        _save(plan, fs)
    except Crash:
        return plan, None if k < total else "crashed although every operation was allowed"
    except Exception as error:  # noqa: BLE001
        return plan, f"{type(error).__name__}: {error}"
    return plan, None if k == total else "finished although it should have crashed"


def _kill_in_child(scenario: Scenario, k: int, base: pathlib.Path, total: int) -> tuple[Plan, int, str | None]:
    plan = prepare(scenario, base)
    pid = os.fork()
    if pid == 0:  # the child: save until KillFS kills us
        code = 0
        try:
            _save(plan, KillFS(k) if scenario.links else KillNoLinksFS(k))
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    status = wait_for(pid, timeout=60)
    if status is None:
        return plan, pid, "the child hung"
    if k < total and not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9):
        return plan, pid, f"the child was not killed (status {status})"
    if k == total and not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        return plan, pid, f"the full save failed in the child (status {status})"
    return plan, pid, None


def cut_points(ops: list[str], exhaustive: bool = True) -> list[int]:
    """Every k from 0 to len(ops); or, not ``exhaustive``, every k next to an operation that
    is not a ``write`` plus the middle of each run of writes (the writes of one file are alike).

    >>> cut_points(["mkdir", "create", "write", "write", "write", "write", "fsync"], exhaustive=False)
    [0, 1, 2, 3, 5, 6, 7]
    """
    total = len(ops)
    if exhaustive:
        return list(range(total + 1))
    keep = {0, total}
    run_start = None
    for k, op in enumerate(ops + ["end"]):
        if op == "write":
            run_start = k if run_start is None else run_start
            continue
        if run_start is not None:
            keep.update({run_start, run_start + 1, (run_start + k) // 2 + 1, k})
            run_start = None
        keep.update({k, k + 1})
    return sorted(k for k in keep if k <= total)


def run_scenario(
    scenario: Scenario, workdir: pathlib.Path, *, kill: bool = True, exhaustive: bool = True, tally: Tally | None = None
) -> Tally:
    """Cut the scenario's save after every k; check invariants, equivalence and recovery."""
    tally = tally or Tally()
    ops = operations(scenario, workdir / "count")
    total = len(ops)
    before = _before(scenario, workdir / "before")
    for k in cut_points(ops, exhaustive):
        where = f"{scenario.name}, cut after {k}/{total} ops" + (f" (before {ops[k]})" if k < total else " (complete)")
        simulated = workdir / f"sim-{k}"
        tally.tried(SECTION, SIMULATED)
        plan, error = _crash_in_process(scenario, k, simulated, total)
        if error:
            tally.problem(SECTION, SIMULATED, "unexpected", f"{where}: {error}")
        if not kill:
            check_cut(tally, SIMULATED, scenario, plan, before, where)
            shutil.rmtree(simulated)
            continue
        tally.tried(SECTION, KILLED)
        killed, child, error = _kill_in_child(scenario, k, workdir / f"kill-{k}", total)
        if error:
            tally.problem(SECTION, KILLED, "unexpected", f"{where}: {error}")
        simulated_state, killed_state = fingerprint(plan.directory, os.getpid()), fingerprint(killed.directory, child)
        if simulated_state != killed_state:
            tally.problem(
                SECTION, KILLED, "unexpected", f"{where}: CrashFS left {simulated_state}, a real kill left {killed_state}"
            )
            check_cut(tally, SIMULATED, scenario, plan, before, where)
        # otherwise the two directories are the same: the invariants are checked once, on the killed one
        crashed = check_cut(tally, KILLED, scenario, killed, before, where)
        tally.tried(SECTION, RECOVERED)
        try:
            recover(tally, scenario, killed, crashed, child, where)
        except Exception as error:  # noqa: BLE001
            tally.problem(SECTION, RECOVERED, "unexpected", f"{where}: {type(error).__name__}: {error}")
        shutil.rmtree(workdir / f"kill-{k}")
        shutil.rmtree(simulated)
    shutil.rmtree(workdir / "before")
    return tally


def _before(scenario: Scenario, base: pathlib.Path) -> dict[str, Holding]:
    """What the directory holds before the cut save (prepared separately, untouched)."""
    plan = prepare(scenario, base)
    return inspect(plan.directory, scenario.config)


def scratch_space() -> str | None:
    """A RAM-backed directory when there is one: cuts are about order, not media, and fsync is slow."""
    shm = pathlib.Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def run(scenarios=SCENARIOS, *, kill: bool = True, exhaustive: bool = True) -> Tally:
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="ckptfn-crashpoints-", dir=scratch_space()) as work:
        for index, scenario in enumerate(scenarios):
            workdir = pathlib.Path(work) / str(index)
            workdir.mkdir()
            run_scenario(scenario, workdir, kill=kill, exhaustive=exhaustive, tally=tally)
    return tally
