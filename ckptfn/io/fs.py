"""The seam: every call of the library that changes the file system.

Every operation that changes the disk (create, write, fsync, replace, rename,
exchange, link, symlink, unlink, mkdir, rmdir, the directory lock) goes through
one ``FileSystem`` object, so tests can count the operations, fail any one of
them, or stop the protocol right after the k-th (crash-point testing). ``REAL``
is the one the library uses. ``tests/test_purity.py`` checks that no other
module of the library makes such a call itself.

Every temporary entry (a name of ``ckptfn.core.naming.temp_name``'s form) is
locked by its creator from the moment it is created until it is released
(``release``): a shared ``flock`` on an open descriptor of it. A writer that
tidies after dead writers removes a temporary entry only if it can take that lock
(``in_use``), so liveness does not rest on process ids alone, which another PID
namespace (a container, ``unshare -p``) on the same host sees differently.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import pathlib
import stat
import threading
from collections.abc import Iterator
from typing import BinaryIO

from ckptfn.core.naming import parse_temp_name

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

__all__ = ["EXCHANGE_UNSUPPORTED", "LINKS_UNSUPPORTED", "REAL", "FileSystem", "open_regular"]

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

#: errno values meaning "this file system cannot exchange (or rename without replacing) atomically".
EXCHANGE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", 95)})

_COPY_CHUNK = 16 << 20
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2():
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError, ImportError, TypeError):  # not Linux/glibc: no such call
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _rename2(a: pathlib.Path, b: pathlib.Path, flags: int, what: str) -> None:
    function = _renameat2()
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    import ctypes

    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot {what} {a} and {b}: {os.strerror(code)}", str(b))


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading without ever blocking: a FIFO, device or socket planted at a
    checkpoint name is refused (``OSError`` EINVAL) instead of read.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     open_regular(d)
    Traceback (most recent call last):
    ...
    IsADirectoryError: [Errno 21] Is a directory: ...
    """
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    file = open(path, "rb", opener=lambda name, flags: os.open(name, flags | nonblocking))
    try:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or socket is never a checkpoint)", str(path))
    except BaseException:
        file.close()
        raise
    return file


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


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _lock_descriptor(path: pathlib.Path) -> int | None:
    """A read-only descriptor of the entry at ``path`` (never following a symlink, never
    blocking on a FIFO), or None where it cannot be opened."""
    flags = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK
    try:
        return os.open(path, flags | (_O_DIRECTORY if os.path.isdir(path) else 0))
    except OSError:
        return None


def _unlock_and_close(fd: int) -> None:
    """Release a ``flock`` explicitly, then close: a child forked meanwhile holds a copy of the
    descriptor, and closing ours alone would leave the lock held until that child exits."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class _Locks:
    """The shared locks this process holds on its temporary entries, by path."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._guard = threading.Lock()

    def take(self, path: pathlib.Path) -> None:
        if fcntl is None or parse_temp_name(pathlib.Path(path).name) is None:
            return
        fd = _lock_descriptor(path)
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return
        with self._guard:
            old = self._held.pop(str(path), None)
            self._held[str(path)] = fd
        if old is not None:
            os.close(old)

    def release(self, path: pathlib.Path) -> None:
        with self._guard:
            fd = self._held.pop(str(path), None)
        if fd is not None:
            _unlock_and_close(fd)

    def held(self, path: pathlib.Path) -> bool:
        with self._guard:
            return str(path) in self._held


_LOCKS = _Locks()


class FileSystem:
    """The real file system. Subclass and override to count, fail or cut operations.

    ``REAL`` is the instance the library uses; every writer takes an ``fs`` to use
    instead. Here every fsync fails as on a full disk: the write reports the
    error and leaves no partial file behind.

    >>> import errno, os, tempfile, torch, ckptfn
    >>> from ckptfn import kit
    >>> class FullDisk(FileSystem):
    ...     def fsync(self, raw):
    ...         raise OSError(errno.ENOSPC, "No space left on device")
    >>> isinstance(REAL, FileSystem)
    True
    >>> new, actions = ckptfn.step(ckptfn.init(ckptfn.Strategy("val_loss")), {"val_loss": 0.5}, epoch=0)
    >>> snapshot = kit.plan(kit.partition(actions)[0], state=new)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     written = kit.write(directory, snapshot, {"w": torch.zeros(2)}, fs=FullDisk())
    ...     written.paths, written.error, os.listdir(directory)
    ((), CheckpointWriteError('could not write ...best_val_loss.pt: OSError: [Errno 28] No space left on device'), [])
    """

    def mkdir(self, path: pathlib.Path) -> None:
        """Create ``path`` and its missing parents; each new directory's entry is made durable
        (its parent is fsynced), so a first save into a new directory survives a power cut."""
        path = pathlib.Path(path)
        missing = []
        while not os.path.isdir(path):
            missing.append(path)
            if path.parent == path:
                break
            path = path.parent
        for new in reversed(missing):
            try:
                self.make_directory(new)
            except FileExistsError:
                if not os.path.isdir(new):
                    raise
                continue  # made meanwhile by another writer, which makes it durable itself
            self.fsync_dir(new.parent)

    def make_directory(self, path: pathlib.Path) -> None:
        """Create one directory (``FileExistsError`` if the name is taken); a temporary one is
        locked until ``release``."""
        os.mkdir(path)
        _LOCKS.take(path)

    def create(self, path: pathlib.Path) -> _SeamFile:
        """Create ``path`` exclusively for writing (mode 0o666 minus the umask); a temporary
        file is locked until ``release``."""
        raw = open(path, "xb", buffering=0)
        _LOCKS.take(path)
        return _SeamFile(self, raw, path)

    def hold(self, path: pathlib.Path) -> None:
        """Lock the temporary entry at ``path`` (one made by someone else, e.g. DCP's tree)."""
        _LOCKS.take(path)

    def release(self, path: pathlib.Path) -> None:
        """Let go of this process's lock on the temporary entry ``path`` (after it was renamed
        away or removed). A no-op for paths it holds no lock on."""
        _LOCKS.release(path)

    def pid_namespace(self) -> int | None:
        """This process's PID-namespace id (Linux), or None where there is none to tell."""
        try:
            return os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            return None

    def age(self, path: pathlib.Path) -> float:
        """Seconds since the entry at ``path`` last changed (its data or its inode)."""
        import time

        info = os.lstat(path)
        return time.time() - max(info.st_mtime, info.st_ctime)

    def in_use(self, path: pathlib.Path) -> bool:
        """Whether some process (in any PID namespace of this host) holds the lock of the
        temporary entry at ``path``. False where locks are not available."""
        if fcntl is None or _LOCKS.held(path):
            return _LOCKS.held(path)
        fd = _lock_descriptor(path)
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            return error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        finally:
            os.close(fd)  # closing drops the probe's lock
        return False

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

    def rename(self, source: pathlib.Path, target: pathlib.Path) -> None:
        """Rename; for directories this fails if ``target`` is a non-empty directory."""
        os.rename(source, target)

    def rename_exclusive(self, source: pathlib.Path, target: pathlib.Path) -> None:
        """Rename ``source`` to ``target`` only if ``target`` does not exist (``FileExistsError``
        otherwise), atomically (``renameat2(RENAME_NOREPLACE)``) where the platform can; else
        a hard link and an unlink for files, a plain rename for directories (which fails on
        a non-empty one)."""
        try:
            _rename2(source, target, _RENAME_NOREPLACE, "rename without replacing")
            return
        except OSError as error:
            if error.errno == errno.EEXIST:
                raise FileExistsError(errno.EEXIST, "name taken", str(target)) from None
            if error.errno not in EXCHANGE_UNSUPPORTED:
                raise
        if os.path.isdir(source) and not os.path.islink(source):
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "name taken", str(target))
            os.rename(source, target)
            return
        self.link(source, target)  # FileExistsError if taken
        self.unlink(source)

    def exchange(self, a: pathlib.Path, b: pathlib.Path) -> None:
        """Atomically swap the names ``a`` and ``b`` (both must exist); ``OSError`` with an
        errno in ``EXCHANGE_UNSUPPORTED`` where the platform or file system cannot."""
        _rename2(a, b, _RENAME_EXCHANGE, "exchange")

    def rmdir(self, path: pathlib.Path) -> None:
        os.rmdir(path)

    def rmtree(self, path: pathlib.Path) -> None:
        """Remove a directory tree, one operation at a time through this seam (symlinks are
        removed, never followed)."""
        for entry in self.listdir(path):
            child = path / entry
            if os.path.isdir(child) and not os.path.islink(child):
                self.rmtree(child)
            else:
                self.unlink(child)
        self.rmdir(path)

    def link_tree(self, source: pathlib.Path, target: pathlib.Path) -> None:
        """Create ``target`` as a tree of hard links to ``source``'s files (copies where refused),
        every directory of it fsynced."""
        self.make_directory(target)
        for entry in sorted(self.listdir(source)):
            child = source / entry
            if os.path.isdir(child) and not os.path.islink(child):
                self.link_tree(child, target / entry)
                continue
            try:
                self.link(child, target / entry)
            except OSError as error:
                if error.errno not in LINKS_UNSUPPORTED:
                    raise
                self.copy(child, target / entry)
        self.fsync_dir(target)

    @contextlib.contextmanager
    def lock(self, directory: pathlib.Path) -> Iterator[None]:
        """Hold an exclusive ``flock`` on ``directory``: writers of one directory take turns
        to archive-then-replace. The kernel releases it when a writer dies; where there is
        no ``flock``, no lock."""
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            fd = None
        try:
            if fd is not None and fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fd is not None:
                _unlock_and_close(fd)

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
        with open_regular(source) as src:
            with self.create(target) as dst:
                while chunk := src.read(_COPY_CHUNK):
                    dst.write(chunk)
                dst.sync()


REAL = FileSystem()
