"""The seam through which the executor touches the file system.

Every operation that changes the disk (create, write, fsync, replace, link,
symlink, unlink, mkdir) goes through one ``FileSystem`` object, so tests can count the
operations, fail any one of them, or stop the protocol right after the k-th
(crash-point testing). ``REAL`` is the one the library uses.
"""

from __future__ import annotations

import errno
import io
import os
import pathlib
import stat
from typing import BinaryIO

__all__ = ["REAL", "FileSystem", "LINKS_UNSUPPORTED"]

#: errno values meaning "this file system cannot make a hard link here".
LINKS_UNSUPPORTED = frozenset(
    code
    for code in (
        errno.EPERM,
        errno.EOPNOTSUPP,
        getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
        errno.EMLINK,
        errno.ENOSYS,
        errno.EXDEV,
    )
)

_COPY_CHUNK = 16 << 20


class _SeamFile(io.RawIOBase):
    """A write-only file whose writes go through the seam (torch.save writes into this)."""

    def __init__(self, fs: FileSystem, raw: BinaryIO, path: pathlib.Path) -> None:
        super().__init__()
        self._fs, self._raw, self.path = fs, raw, path
        #: The first error a write raised. torch.save's zip writer reports a failed
        #: write as an unrelated RuntimeError ("unexpected pos ..."); this keeps the cause.
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self._fs.write(self._raw, data)
        except BaseException as error:
            if self.error is None:
                self.error = error
            raise

    def fileno(self) -> int:
        return self._raw.fileno()

    def sync(self) -> None:
        """Flush and fsync the file's data."""
        self._fs.fsync(self._raw)

    def close(self) -> None:
        if not self.closed:
            try:
                self._raw.close()
            finally:
                super().close()


class FileSystem:
    """The real file system. Subclass and override to count, fail or cut operations."""

    def mkdir(self, path: pathlib.Path) -> None:
        os.makedirs(path, exist_ok=True)

    def create(self, path: pathlib.Path) -> _SeamFile:
        """Create ``path`` exclusively for writing (mode 0o666 minus the umask)."""
        return _SeamFile(self, open(path, "xb", buffering=0), path)

    def write(self, raw: BinaryIO, data) -> int:
        # An unbuffered file may write less than asked (e.g. when the disk is nearly full).
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            written = raw.write(view[done:])
            if not written:
                raise OSError(errno.EIO, "write made no progress")
            done += written
        return done

    def fsync(self, raw: BinaryIO) -> None:
        raw.flush()
        os.fsync(raw.fileno())

    def replace(self, source: pathlib.Path, target: pathlib.Path) -> None:
        os.replace(source, target)

    def link(self, source: pathlib.Path, target: pathlib.Path) -> None:
        """A new name for ``source``; fails with FileExistsError if ``target`` exists. Symlinks are not followed."""
        os.link(source, target, follow_symlinks=False)

    def unlink(self, path: pathlib.Path) -> None:
        os.unlink(path)

    def fsync_dir(self, path: pathlib.Path) -> None:
        """Make the directory's entries durable (where the platform allows fsync on directories)."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
                raise
        finally:
            os.close(fd)

    def listdir(self, path: pathlib.Path) -> list[str]:
        return os.listdir(path)

    def pid_alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by someone else
        except OSError:
            return True  # cannot tell: assume alive, never delete its files
        return True

    def symlink(self, text: str, target: pathlib.Path) -> None:
        """Create ``target`` as a symbolic link holding ``text`` (fails if ``target`` exists)."""
        os.symlink(text, target)

    def copy(self, source: pathlib.Path, target: pathlib.Path) -> None:
        """Copy ``source`` into a new file ``target`` (exclusive create, fsynced), through the seam.

        A symlink is copied as a symlink, never read through; anything else that is
        not a regular file (a FIFO, a device) is refused rather than read.
        """
        if os.path.islink(source):
            self.symlink(os.readlink(source), target)
            return
        nonblocking = getattr(os, "O_NONBLOCK", 0)
        with open(source, "rb", opener=lambda name, flags: os.open(name, flags | nonblocking)) as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                raise OSError(errno.EINVAL, "not a regular file, so it cannot be copied", str(source))
            with self.create(target) as dst:
                while chunk := src.read(_COPY_CHUNK):
                    dst.write(chunk)
                dst.sync()


REAL = FileSystem()
