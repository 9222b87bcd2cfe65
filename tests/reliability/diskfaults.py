"""Write failures with real causes, through ``CheckpointManager``: full disk, read-only
file system, directory removed during training, permission denied.

Every failure must be a ``CheckpointWriteError`` naming the path, with the real
cause; the previous files byte-identical, no temporary file left, the manager's
state unchanged; and once the cause is gone the next epoch saves normally.

We run as root, so ``chmod`` stops nothing. Real refusals come from a tmpfs
remounted read-only, ``chattr +i`` (immutable: even root gets EPERM) and a forked
child that drops to an unprivileged uid (EACCES from plain permissions). Where
the machine cannot do one of these, the scenario raises ``Unavailable`` with the
reason (pytest turns it into a skip).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import pathlib
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

import ckptfn
import ckptfn.shells.manager
from ckptfn import CheckpointManager, CheckpointWriteError, Strategy
from ckptfn.io.write import write_snapshot
from ckptfn.kit import Target
from ckptfn.core.naming import archived_of

from tests.faults import HookFS, NoLinksFS
from tests.reliability.common import Tally, Unavailable, clock, in_child, run_quietly, temps, visible

SECTION = "fault"
FULL = "disk full (small tmpfs)"
READ_ONLY = "read-only file system (tmpfs remounted ro)"
REMOVED = "directory removed during training"
PERMISSION = "permission denied (chattr +i, unprivileged uid)"

CONFIG = (
    Strategy("val_loss", filename="best_loss.pt"),
    Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False),
)


def metrics(epoch: int) -> dict:
    """Every epoch improves both strategies."""
    return {"val_loss": 1.0 / (epoch + 1), "val_corr": float(epoch)}


def big_payload(epoch: int, mib: float) -> dict:
    return {"model": {"w": torch.full((int(mib * (1 << 18)),), float(epoch))}, "epoch": epoch}


def files_of(directory: pathlib.Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in visible(directory)}


class Checker:
    """Checks one failing epoch of a manager against what was on disk before it."""

    def __init__(self, tally: Tally, kind: str, manager: CheckpointManager) -> None:
        self.tally, self.kind, self.manager = tally, kind, manager
        self.directory = manager.output_dir

    def failing_epoch(self, epoch: int, mib: float, cause: Callable[[BaseException], bool], where: str) -> None:
        """Run an improving epoch that must fail; check the failure left everything as it was."""
        self.tally.tried(SECTION, self.kind)
        before_files, before_state = files_of(self.directory), self.manager.state
        try:
            self.manager.update(metrics(epoch), big_payload(epoch, mib), epoch)
        except CheckpointWriteError as error:
            chain = _causes(error)
            if not any(cause(link) for link in chain):
                self.problem("unexpected", f"{where}: the cause is not the real one: {[repr(c) for c in chain]}")
            if not any(str(self.directory / s.filename) in str(error) for s in CONFIG):
                self.problem("unexpected", f"{where}: the error does not name the file: {error}")
        except Exception as error:  # noqa: BLE001
            self.problem("unexpected", f"{where}: {type(error).__name__}: {error}")
            return
        else:
            self.problem("unexpected", f"{where}: the save succeeded although it had to fail")
            return
        after = files_of(self.directory) if self.directory.exists() else {}
        for name, content in before_files.items():
            if name not in after:
                self.problem("lost", f"{where}: {name} is gone")
            elif after[name] != content:
                self.problem("corruption", f"{where}: {name} changed")
        if set(after) - set(before_files):
            self.problem("corruption", f"{where}: new files {sorted(set(after) - set(before_files))}")
        if temps(self.directory):
            self.problem("unexpected", f"{where}: temporary files left: {temps(self.directory)}")
        if self.manager.state != before_state:
            self.problem("unexpected", f"{where}: the manager's state changed")

    def saving_epoch(self, epoch: int, mib: float, where: str) -> None:
        """Run an improving epoch that must save normally."""
        kept = {name: content for name, content in files_of(self.directory).items() if name != "best_loss.pt"}
        try:
            written = self.manager.update(metrics(epoch), big_payload(epoch, mib), epoch)
        except Exception as error:  # noqa: BLE001
            self.problem("unexpected", f"{where}: the next epoch did not save: {type(error).__name__}: {error}")
            return
        if sorted(p.name for p in written) != sorted(s.filename for s in CONFIG):
            self.problem("unexpected", f"{where}: the next epoch wrote {written}")
        for strategy in CONFIG:
            state_dict, metadata = ckptfn.load_checkpoint(self.directory / strategy.filename)
            if metadata["epoch"] != epoch or not bool(torch.all(state_dict["model"]["w"] == epoch)):
                self.problem("corruption", f"{where}: {strategy.filename} does not hold epoch {epoch}")
        after = files_of(self.directory)
        archived = {content for name, content in after.items() if archived_of(name, "best_corr.pt")}
        for name, content in kept.items():  # every earlier version of best_corr.pt is archived
            if content not in archived and after.get(name) != content:
                self.problem("lost", f"{where}: the version that was {name} is not kept")

    def problem(self, category: str, message: str) -> None:
        self.tally.problem(SECTION, self.kind, category, message)


def _causes(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _errno(code: int) -> Callable[[BaseException], bool]:
    return lambda error: isinstance(error, OSError) and error.errno == code


def _fill(point: pathlib.Path, leave: int) -> pathlib.Path:
    """A filler file that leaves about ``leave`` bytes free on the mount at ``point``."""
    filler = point / "filler"
    stats = os.statvfs(point)
    free = stats.f_bavail * stats.f_frsize
    with open(filler, "ab") as file:
        file.write(b"\0" * max(0, free - leave))
    return filler


def full_disk(tally: Tally, mount: Callable[[str], pathlib.Path]) -> None:
    """Fill a small tmpfs so saves fail at different points of the write, then free it."""
    point = mount("24m")
    directory = point / "run"
    manager = CheckpointManager(directory, CONFIG)
    check = Checker(tally, FULL, manager)
    epoch = 0
    check.saving_epoch(epoch, 1, "first save")
    for leave_kib in (0, 4, 64, 512, 1024, 1536, 2000):
        epoch += 1
        filler = _fill(point, leave_kib << 10)
        check.failing_epoch(epoch, 2, _errno(errno.ENOSPC), f"{leave_kib} KiB free, 2 MiB to write")
        filler.unlink()
        epoch += 1
        check.saving_epoch(epoch, 2, f"after freeing the space ({leave_kib} KiB case)")
    # the archive copy on a file system without hard links fills the disk
    tally.tried(SECTION, FULL)
    before = files_of(directory)
    filler = _fill(point, 1 << 20)
    meta = {"format": "ckptfn/1", "epoch": 99, "timestamp": clock(99).isoformat(), "saves": []}
    try:
        write_snapshot(directory, [Target("best_corr.pt", False)], big_payload(99, 0.25), meta, fs=NoLinksFS())
        check.problem("unexpected", "an archive copy of a 2 MiB file fitted in 1 MiB")
    except CheckpointWriteError as error:
        if not any(_errno(errno.ENOSPC)(link) for link in _causes(error)):
            check.problem("unexpected", f"archive copy on a full disk: not ENOSPC: {error}")
    if files_of(directory) != before or temps(directory):
        check.problem("corruption", "a failed archive copy left a changed, partial or temporary file")
    filler.unlink()


@contextlib.contextmanager
def _remounted(point: pathlib.Path, option: str) -> Iterator[None]:
    result = run_quietly("mount", "-o", f"remount,{option}", str(point))
    if result.returncode != 0:
        raise Unavailable(f"cannot remount {point} {option}: {result.stderr.strip()}")
    try:
        yield
    finally:
        run_quietly("mount", "-o", "remount,rw", str(point))


def read_only(tally: Tally, mount: Callable[[str], pathlib.Path]) -> None:
    point = mount("16m")
    directory = point / "run"
    manager = CheckpointManager(directory, CONFIG)
    check = Checker(tally, READ_ONLY, manager)
    check.saving_epoch(0, 1, "first save")
    check.saving_epoch(1, 1, "second save")
    with _remounted(point, "ro"):
        check.failing_epoch(2, 1, _errno(errno.EROFS), "read-only mount")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            resumed = CheckpointManager(directory, CONFIG, resume=True)  # reading still works
        if resumed.best_values != manager.best_values:
            check.problem("corruption", f"resume on the read-only mount: {resumed.best_values} != {manager.best_values}")
        tally.tried(SECTION, READ_ONLY)
        fresh = CheckpointManager(point / "new_run", CONFIG)
        try:
            fresh.update(metrics(0), big_payload(0, 0.1), 0)
            check.problem("unexpected", "created a directory on a read-only mount")
        except CheckpointWriteError as error:
            if str(point / "new_run") not in str(error) or "Read-only" not in str(error):
                check.problem("unexpected", f"a missing directory on a read-only mount: unclear error {error}")
    check.saving_epoch(3, 1, "after remounting read-write")


def _patched_writes(fs) -> contextlib.AbstractContextManager:
    """Route the manager's writes through ``fs`` (as tests/shells/test_manager.py does)."""
    original = ckptfn.io.write.write_snapshot

    @contextlib.contextmanager
    def patch():
        ckptfn.io.write.write_snapshot = functools.partial(write_snapshot, fs=fs)
        try:
            yield
        finally:
            ckptfn.io.write.write_snapshot = original

    return patch()


def directory_removed(tally: Tally, base: pathlib.Path) -> None:
    directory = base / "removed" / "run"
    manager = CheckpointManager(directory, CONFIG)
    check = Checker(tally, REMOVED, manager)
    check.saving_epoch(0, 0.25, "first save")
    # between epochs: the next save recreates the directory and writes complete files
    tally.tried(SECTION, REMOVED)
    shutil.rmtree(directory)
    check.saving_epoch(1, 0.25, "directory removed between epochs")
    # during a write, at every step of the protocol after the directory exists
    for op, at in (("write", 0), ("fsync", 0), ("link", 0), ("replace", 0), ("replace", 1), ("fsync_dir", 0)):
        epoch = manager.state.steps
        hook = HookFS(op, at, lambda: shutil.rmtree(directory))
        tally.tried(SECTION, REMOVED)
        before_state = manager.state
        with _patched_writes(hook):
            try:
                manager.update(metrics(epoch), big_payload(epoch, 0.25), epoch)
                raised = None
            except CheckpointWriteError as error:
                raised = error
            except Exception as error:  # noqa: BLE001
                check.problem("unexpected", f"removed before {op} #{at}: {type(error).__name__}: {error}")
                continue
        if raised is not None:
            if manager.state != before_state and not raised.published:
                check.problem("unexpected", f"removed before {op} #{at}: the state changed although nothing was published")
            if str(directory) not in str(raised):
                check.problem("unexpected", f"removed before {op} #{at}: the error does not name the path: {raised}")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            on_disk = CheckpointManager(directory, CONFIG, resume=True).best_values
        believed = {name: value for name, value in manager.best_values.items() if on_disk[name] is not None}
        if {k: v for k, v in on_disk.items() if v is not None} != believed:
            check.problem("corruption", f"removed before {op} #{at}: files hold {on_disk}, the manager believes {manager.best_values}")
        epoch = manager.state.steps
        check.saving_epoch(epoch, 0.25, f"after a removal before {op} #{at}")
    # racing a real removal from another thread while an 8 MiB write runs
    epoch = manager.state.steps
    tally.tried(SECTION, REMOVED)
    stop = threading.Event()

    def remover():
        while not stop.is_set():
            if temps(directory):
                shutil.rmtree(directory, ignore_errors=True)
                return

    thread = threading.Thread(target=remover)
    thread.start()
    try:
        manager.update(metrics(epoch), big_payload(epoch, 8), epoch)
    except CheckpointWriteError:
        pass
    except Exception as error:  # noqa: BLE001
        check.problem("unexpected", f"racing removal: {type(error).__name__}: {error}")
    finally:
        stop.set()
        thread.join()
    check.saving_epoch(manager.state.steps, 0.25, "after a racing removal")


def _chattr(path: pathlib.Path, flag: str) -> None:
    result = run_quietly("chattr", flag, str(path))
    if result.returncode != 0:
        raise Unavailable(f"chattr {flag} {path} failed: {result.stderr.strip() or result.returncode}")


def permission_denied(tally: Tally, base: pathlib.Path) -> None:
    # under /tmp itself, so that an unprivileged uid can reach it (pytest's base is root-only)
    top = pathlib.Path(tempfile.mkdtemp(prefix="ckptfn-denied-"))
    try:
        os.chmod(top, 0o755)
        _permission_denied(tally, top / "run")
    finally:
        for path in (top / "run", top / "run" / "best_loss.pt"):
            if path.exists():
                run_quietly("chattr", "-i", str(path))
        shutil.rmtree(top, ignore_errors=True)


def _permission_denied(tally: Tally, directory: pathlib.Path) -> None:
    manager = CheckpointManager(directory, CONFIG)
    check = Checker(tally, PERMISSION, manager)
    check.saving_epoch(0, 0.25, "first save")
    if shutil.which("chattr") is None:
        raise Unavailable("no chattr command")
    for target, where in ((directory, "immutable directory"), (directory / "best_loss.pt", "immutable best_loss.pt")):
        _chattr(target, "+i")
        try:
            check.failing_epoch(manager.state.steps, 0.25, _errno(errno.EPERM), where)
        finally:
            _chattr(target, "-i")
        check.saving_epoch(manager.state.steps, 0.25, f"after chattr -i ({where})")
    # an unprivileged process: the directory belongs to root and is not writable by others
    os.chmod(directory, 0o755)
    tally.tried(SECTION, PERMISSION)
    before = files_of(directory)
    outcome, value = in_child(_save_as_nobody, str(directory), manager.state.steps)
    if outcome != "ok":
        check.problem("unexpected", f"unprivileged save: {outcome} {value}")
    elif value:
        check.problem("unexpected", f"unprivileged save: {value}")
    if files_of(directory) != before or temps(directory):
        check.problem("corruption", "an unprivileged, refused save changed the directory")
    check.saving_epoch(manager.state.steps, 0.25, "as root again")


def _save_as_nobody(directory: str, epoch: int) -> str | None:
    """In a forked child: drop to uid/gid 65534, resume, try to save. None when all is as expected."""
    os.setgid(65534)
    os.setuid(65534)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manager = CheckpointManager(directory, CONFIG, resume=True)  # the files are readable
    if manager.best_values["best_loss.pt"] is None:
        return "resume could not read the files"
    try:
        # a small payload: no parallel torch op in a forked child (its OpenMP pool did not survive the fork)
        manager.update(metrics(epoch), big_payload(epoch, 0.001), epoch)
    except CheckpointWriteError as error:
        if not any(_errno(errno.EACCES)(link) for link in _causes(error)) or directory not in str(error):
            return f"unclear error: {error}"
        return None
    return "an unprivileged process wrote into root's directory"


def run(tally: Tally, mount: Callable[[str], pathlib.Path], base: pathlib.Path) -> dict[str, str]:
    """All four scenarios; returns the ones this machine cannot run, with the reason."""
    unavailable = {}
    for name, scenario, where in (
        ("disk full", full_disk, mount),
        ("read-only", read_only, mount),
        ("directory removed", directory_removed, base),
        ("permission denied", permission_denied, base),
    ):
        try:
            scenario(tally, where)
        except Unavailable as reason:
            unavailable[name] = str(reason)
    return unavailable
