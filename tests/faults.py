"""File systems for fault injection, built on the executor's seam (ckptfn.io.fs.FileSystem), and hostile payloads."""

from __future__ import annotations

import errno
import os
import signal

from ckptfn.io.fs import FileSystem

MUTATING = ("mkdir", "create", "write", "fsync", "replace", "link", "unlink", "fsync_dir")


class Crash(BaseException):
    """The simulated machine stopped: nothing after this runs (not even cleanup)."""


class RecordingFS(FileSystem):
    """Records every mutating operation as ``(name, args)``."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, tuple]] = []

    def _before(self, name: str, args: tuple) -> None:
        self.ops.append((name, args))

    def mkdir(self, path):
        self._before("mkdir", (path,))
        return super().mkdir(path)

    def create(self, path):
        self._before("create", (path,))
        return super().create(path)

    def write(self, raw, data):
        self._before("write", (len(data),))
        return super().write(raw, data)

    def fsync(self, raw):
        self._before("fsync", ())
        return super().fsync(raw)

    def replace(self, source, target):
        self._before("replace", (source, target))
        return super().replace(source, target)

    def link(self, source, target):
        self._before("link", (source, target))
        return super().link(source, target)

    def symlink(self, text, target):
        self._before("symlink", (text, target))
        return super().symlink(text, target)

    def unlink(self, path):
        self._before("unlink", (path,))
        return super().unlink(path)

    def fsync_dir(self, path):
        self._before("fsync_dir", (path,))
        return super().fsync_dir(path)


class FailingFS(RecordingFS):
    """Raises ``error`` at the ``at``-th call of operation ``op`` (0-based); everything else is real."""

    def __init__(self, op: str, at: int = 0, error: BaseException | None = None) -> None:
        super().__init__()
        self.op, self.at, self.seen = op, at, 0
        self.error = error or OSError(errno.ENOSPC, "No space left on device (injected)")

    def _before(self, name, args):
        super()._before(name, args)
        if name == self.op:
            self.seen += 1
            if self.seen - 1 == self.at:
                raise self.error


class CrashFS(RecordingFS):
    """Performs the first ``stop_after`` mutating operations, then crashes on the next and every later one."""

    def __init__(self, stop_after: int) -> None:
        super().__init__()
        self.stop_after = stop_after

    def _before(self, name, args):
        if len(self.ops) >= self.stop_after:
            raise Crash(f"crashed before {name} (operation {len(self.ops)})")
        super()._before(name, args)


class NoLinksFS(RecordingFS):
    """A file system that refuses hard links (like FAT or some network mounts)."""

    def link(self, source, target):
        self._before("link", (source, target))
        raise OSError(errno.EPERM, "Operation not permitted (no hard links here)")


# --- added for the reliability suite (tests/reliability/) ------------------------------------


class KillFS(RecordingFS):
    """Performs the first ``stop_after`` mutating operations, then the process SIGKILLs itself.

    A real crash at exactly the point where ``CrashFS(stop_after)`` raises ``Crash``:
    run it in a forked child and compare what the two leave on disk.
    """

    def __init__(self, stop_after: int) -> None:
        super().__init__()
        self.stop_after = stop_after

    def _before(self, name, args):
        if len(self.ops) >= self.stop_after:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._before(name, args)


class CrashNoLinksFS(CrashFS, NoLinksFS):
    """``CrashFS`` on a file system without hard links (archives and extra names are copies)."""


class KillNoLinksFS(KillFS, NoLinksFS):
    """``KillFS`` on a file system without hard links."""


class HookFS(RecordingFS):
    """Calls ``hook()`` just before the ``at``-th call of operation ``op`` (0-based), then carries on."""

    def __init__(self, op: str, at: int, hook) -> None:
        super().__init__()
        self.op, self.at, self.seen, self.hook = op, at, 0, hook

    def _before(self, name, args):
        if name == self.op:
            self.seen += 1
            if self.seen - 1 == self.at:
                self.hook()
        super()._before(name, args)


class RunsACommand:
    """Unpickling this would create ``marker`` (through os.system) if a loader let it run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def snapshot_of(saves, *, state=None, metrics=None, now=None) -> tuple[list, dict]:
    """``(targets, metadata)`` of the snapshot the shells would plan for ``saves``."""
    from ckptfn.kit import plan

    snapshot = plan(list(saves), state=state, metrics=metrics, now=now)
    return list(snapshot.targets), dict(snapshot.metadata)
