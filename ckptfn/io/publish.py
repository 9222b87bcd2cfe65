"""The publish protocol: put one complete snapshot under its names, crash-safely.

One algorithm for both kinds of entry, a checkpoint *file* (``best_loss.pt``) and a
sharded checkpoint *tree* (``best_loss.dcp/``); the kinds differ only in how an
entry gets a second name, how it replaces the current one, and how it is removed
(``FILE`` and ``TREE`` below). For one snapshot, one call:

1. Create the directory (each new directory made durable); sweep the temporary
   entries of dead writers on this host (one name grammar, ``ckptfn.core.naming``).
2. The caller produces the snapshot once, complete and fsynced, under a hidden
   temporary name (``produce``).
3. For each target, in order: with ``overwrite=False``, first give the entry
   currently there its archive name (a complete second name, made durable before
   anything else happens; a top-k target's ``aside`` is such a name, chosen by the
   core: the previous best keeps its place among the members); then install the snapshot at the final name atomically
   (a file by ``rename`` over it; a tree by ``rename`` when the name is free, else
   by an atomic exchange, the superseded tree removed only after the exchange is
   durable). Every target but the last gets a fresh second name of the temporary
   entry (hard links, or copies where links are refused); the last takes the
   temporary entry itself. While any target archives, the directory is locked,
   so concurrent writers never replace a version before it is archived.
4. fsync the directory; then delete archived versions beyond each target's
   ``keep``, and the top-k members that left (never a current name; a failure
   there is a warning, not an error).

On failure the call removes its temporary entries and the archive names it made
for versions that are still current, and raises ``CheckpointWriteError`` whose
``published`` lists the names that already hold the new snapshot.

A crash at any instant leaves every final name holding its complete old entry or
the complete new one, and every archived version in place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import pathlib
import secrets
import socket
from collections.abc import Callable, Sequence

from ckptfn.core.errors import CheckpointError, CheckpointWriteError
from ckptfn.core.naming import archive_name, dcp_name, host_tag, member_of, parse_temp_name, temp_name
from ckptfn.core.retention import archive_moment, plan_removals
from ckptfn.core.snapshot import Target
from ckptfn.io.fs import EXCHANGE_UNSUPPORTED, LINKS_UNSUPPORTED, REAL, FileSystem

__all__ = ["FILE", "TREE", "EntryKind", "Publisher", "publish", "prune", "saved_at", "sweep"]

logger = logging.getLogger("ckptfn")

#: How many archive names (``-1``, ``-2``, ...) to try for one save time before giving up.
ARCHIVE_ATTEMPTS = 10_000
#: A temporary entry of a writer whose process id this process cannot judge (another PID
#: namespace, or a name without one) is removed only after this many seconds unchanged and
#: unlocked: a live writer locks its entries the moment it creates them.
STALE_AFTER = 10.0


def _is_tree(path: pathlib.Path) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _identity(path: pathlib.Path) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class EntryKind:
    """What the protocol needs to know about one kind of entry."""

    name = "entry"

    def final_name(self, filename: str) -> str:
        raise NotImplementedError

    def probe(self, path: pathlib.Path) -> pathlib.Path:
        """The file whose identity stands for the entry (a tree: its DCP ``.metadata``)."""
        raise NotImplementedError

    def same(self, a: pathlib.Path, b: pathlib.Path) -> bool:
        """Whether two names are one entry (links of one file; symlinks are not followed)."""
        first, second = _identity(self.probe(a)), _identity(self.probe(b))
        return first is not None and first == second

    def copy_into(self, fs: FileSystem, source: pathlib.Path, target: pathlib.Path) -> None:
        """Create ``target`` (a fresh name) as a complete second name of ``source``."""
        raise NotImplementedError

    def link_exclusive(self, fs: FileSystem, source: pathlib.Path, target: pathlib.Path) -> bool:
        """Give ``source`` the new name ``target`` in one atomic step if this kind and file
        system can (``FileExistsError`` if taken); False where they cannot."""
        return False

    def install(self, publisher: Publisher, source: pathlib.Path, final: pathlib.Path) -> pathlib.Path | None:
        """Make ``source`` the entry at ``final`` in one atomic step; the superseded entry's
        new (hidden) name if it must be removed, else None."""
        raise NotImplementedError

    def remove(self, fs: FileSystem, path: pathlib.Path) -> None:
        raise NotImplementedError


class _FileKind(EntryKind):
    name = "file"

    def final_name(self, filename: str) -> str:
        return filename

    def probe(self, path: pathlib.Path) -> pathlib.Path:
        return path

    def copy_into(self, fs: FileSystem, source: pathlib.Path, target: pathlib.Path) -> None:
        if not self.link_exclusive(fs, source, target):
            fs.copy(source, target)

    def link_exclusive(self, fs: FileSystem, source: pathlib.Path, target: pathlib.Path) -> bool:
        try:
            fs.link(source, target)
        except FileExistsError:
            raise
        except OSError as error:
            if error.errno not in LINKS_UNSUPPORTED:
                raise
            return False
        return True

    def install(self, publisher: Publisher, source: pathlib.Path, final: pathlib.Path) -> None:
        publisher.fs.replace(source, final)
        return None

    def remove(self, fs: FileSystem, path: pathlib.Path) -> None:
        fs.unlink(path)


class _TreeKind(EntryKind):
    name = "tree"

    def final_name(self, filename: str) -> str:
        return dcp_name(filename)

    def probe(self, path: pathlib.Path) -> pathlib.Path:
        return path / ".metadata"

    def copy_into(self, fs: FileSystem, source: pathlib.Path, target: pathlib.Path) -> None:
        fs.link_tree(source, target)

    def install(self, publisher: Publisher, source: pathlib.Path, final: pathlib.Path) -> pathlib.Path | None:
        fs = publisher.fs
        if not os.path.lexists(final):
            try:
                fs.rename(source, final)
                return None
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise  # otherwise the name appeared meanwhile: exchange with it
        try:
            fs.exchange(source, final)
            return source  # it now holds the old tree
        except OSError as error:
            if error.errno not in EXCHANGE_UNSUPPORTED:
                raise
        aside = publisher.new_temp(final.name, "old")  # names the tree it holds, for the sweep
        fs.rename(final, aside)  # the window: final is briefly absent (the sweep moves it back)
        try:
            fs.rename(source, final)
        except BaseException:
            fs.rename(aside, final)
            raise
        return aside

    def remove(self, fs: FileSystem, path: pathlib.Path) -> None:
        fs.rmtree(path)


FILE: EntryKind = _FileKind()
TREE: EntryKind = _TreeKind()


def kind_of(path: pathlib.Path) -> EntryKind:
    """The kind of the entry at ``path`` as it is on disk."""
    return TREE if _is_tree(path) else FILE


# --- save times ------------------------------------------------------------------------------

#: The mtimes a datetime can hold (years 1 to 9999); foreign files may have any.
_MTIME_RANGE = (-62135596800.0, 253402300799.0)


def saved_at(path: pathlib.Path) -> dt.datetime:
    """When the entry at ``path`` was saved (UTC): its metadata timestamp, else its mtime.

    A symlink is never read through (it may point anywhere, e.g. at a FIFO); any
    timestamp or mtime, however odd, gives a usable moment.
    """
    from ckptfn.io.read import read_metadata  # reading imports the DCP reader: only when archiving

    if not os.path.islink(path):
        try:
            moment = dt.datetime.fromisoformat(read_metadata(path).get("timestamp"))
            if moment.tzinfo is not None:
                return moment.astimezone(dt.timezone.utc)  # OverflowError near years 1 and 9999
        except (CheckpointError, TypeError, ValueError, AttributeError, OverflowError):
            pass
    low, high = _MTIME_RANGE
    return dt.datetime.fromtimestamp(min(max(os.lstat(path).st_mtime, low), high), dt.timezone.utc)


# --- one call ---------------------------------------------------------------------------------


class Publisher:
    """One call's worth of the protocol: its temporary entries, what it archived and published."""

    def __init__(
        self, directory: pathlib.Path, kind: EntryKind, fs: FileSystem, progress: list[str] | None = None
    ) -> None:
        self.directory = directory
        self.kind = kind
        self.fs = fs
        self.temps: list[pathlib.Path] = []
        self.published: list[pathlib.Path] = []
        self.archived: list[tuple[pathlib.Path, pathlib.Path]] = []  # (archive, final) made by this call
        #: Target filenames that may hold the new snapshot (each is added just before its install),
        #: for a caller that must know even after an interrupt.
        self.progress = progress if progress is not None else []

    def new_temp(self, name: str, kind: str = "tmp") -> pathlib.Path:
        """A fresh hidden name owned by this call (removed by ``undo`` unless consumed)."""
        token = secrets.token_hex(6)
        path = self.directory / temp_name(name, os.getpid(), socket.gethostname(), token, kind, self.fs.pid_namespace())
        self.temps.append(path)
        return path

    def adopt(self, path: pathlib.Path) -> pathlib.Path:
        """Count an entry made by someone else (DCP's temporary tree) as this call's temporary."""
        self.temps.append(path)
        self.fs.hold(path)
        return path

    def consumed(self, path: pathlib.Path) -> None:
        """``path`` no longer names a temporary entry of this call (it was renamed away)."""
        if path in self.temps:
            self.temps.remove(path)
        self.fs.release(path)

    def add_name(self, source: pathlib.Path, target: pathlib.Path) -> None:
        """Give the entry at ``source`` the visible new name ``target``: complete or absent at
        every instant, ``FileExistsError`` if the name is taken."""
        if self.kind.link_exclusive(self.fs, source, target):
            return
        staging = self.new_temp(target.name)
        self.kind.copy_into(self.fs, source, staging)
        try:
            self.fs.rename_exclusive(staging, target)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            self._remove_quietly(staging)
            self.consumed(staging)
            raise FileExistsError(errno.EEXIST, "name taken meanwhile", str(target)) from None
        self.consumed(staging)

    def archive(self, final: pathlib.Path) -> pathlib.Path | None:
        """Keep the entry at ``final`` under its timestamped archive name (no-op if absent)."""
        if not os.path.lexists(final):
            return None
        moment = archive_moment(final.name, saved_at(final), self.fs.listdir(self.directory))
        for clash in range(ARCHIVE_ATTEMPTS):
            candidate = self.directory / archive_name(final.name, moment, clash)
            if os.path.lexists(candidate):
                if self.kind.same(candidate, final):
                    return candidate  # archived by an earlier, interrupted attempt
                continue
            try:
                self.add_name(final, candidate)
            except FileExistsError:
                continue  # someone took the name meanwhile: try the next one
            self.archived.append((candidate, final))
            self.fs.fsync_dir(self.directory)  # the archive name is durable before the replace
            return candidate
        raise CheckpointWriteError(f"{final}: no free archive name after {ARCHIVE_ATTEMPTS} attempts")

    def set_aside(self, final: pathlib.Path, aside: pathlib.Path) -> pathlib.Path | None:
        """Give the entry at ``final`` the exact second name ``aside`` (no-op if absent): a
        top-k best becoming a member. An entry already at ``aside`` is a member nobody keeps
        (its deletion was interrupted), unless it is this very entry (a move interrupted)."""
        if not os.path.lexists(final):
            return None
        if os.path.lexists(aside):
            if self.kind.same(aside, final):
                return aside
            self.kind.remove(self.fs, aside)
        self.add_name(final, aside)
        self.archived.append((aside, final))
        self.fs.fsync_dir(self.directory)  # the member name is durable before the replace
        return aside

    def publish(self, temp: pathlib.Path, targets: Sequence[Target]) -> tuple[pathlib.Path, ...]:
        """Install the complete temporary entry ``temp`` under every target's name."""
        archiving = any(not target.overwrite or target.aside is not None for target in targets)
        with self.fs.lock(self.directory) if archiving else contextlib.nullcontext():
            for index, target in enumerate(targets):
                final = self.directory / self.kind.final_name(target.filename)
                if index == len(targets) - 1:
                    source = temp
                else:
                    source = self.new_temp(final.name)
                    self.kind.copy_into(self.fs, temp, source)
                if not target.overwrite:
                    self.archive(final)
                if target.aside is not None:
                    self.set_aside(final, self.directory / self.kind.final_name(target.aside))
                # recorded before the install: an interrupt raised as the rename returns must not
                # hide that the name may have moved (over-reporting only makes callers read the files)
                self.progress.append(target.filename)
                superseded = self.kind.install(self, source, final)
                self.consumed(source)
                self.published.append(final)
                if superseded is not None:
                    self.fs.fsync_dir(self.directory)  # the new entry is durable before the old one goes
                    self._drop(superseded)
                    self.fs.release(superseded)
        self.fs.fsync_dir(self.directory)
        return tuple(self.published)

    def _drop(self, superseded: pathlib.Path) -> None:
        """Remove a superseded entry; a failure only leaves a hidden entry for a later sweep."""
        try:
            self.kind.remove(self.fs, superseded)
        except OSError as error:
            logger.warning("could not remove the superseded checkpoint %s: %s", superseded, error)

    def _remove_quietly(self, path: pathlib.Path) -> None:
        try:
            kind_of(path).remove(self.fs, path)
        except BaseException:  # noqa: BLE001 - already failing; never mask the first error
            pass

    def undo(self) -> None:
        """Best effort after a failure: remove this call's temporary entries, and archive
        names it made for an entry that is still current (a duplicate, not a version)."""
        doomed = list(self.temps) + [a for a, final in self.archived if self.kind.same(a, final)]
        for path in doomed:
            if os.path.lexists(path):
                self._remove_quietly(path)
            self.fs.release(path)
        self.temps.clear()


def publish(
    directory: str | os.PathLike,
    targets: Sequence[Target],
    kind: EntryKind,
    produce: Callable[[Publisher], pathlib.Path],
    *,
    fs: FileSystem = REAL,
    progress: list[str] | None = None,
    removes: Sequence[str] = (),
    families: Sequence[tuple[str, Sequence[str]]] = (),
    on_published: Callable[[], object] | None = None,
) -> tuple[pathlib.Path, ...]:
    """Run the protocol: ``produce(publisher)`` writes the snapshot under a temporary name
    of the publisher's (``new_temp`` or ``adopt``) and returns it; it is then published
    under every target, ``on_published()`` is called, and old versions are pruned
    (``removes`` and ``families``: see ``prune``). ``progress`` (if given) receives
    each target's filename just before its name may hold the new snapshot.

    Raises ``CheckpointWriteError`` (``published``: the names already switched).
    """
    directory = pathlib.Path(directory)
    finals = [kind.final_name(target.filename) for target in targets]
    if len(set(finals)) != len(finals):
        raise ValueError(f"a snapshot cannot be published twice under one name: {finals}")
    if not targets:
        return ()
    described = ", ".join(str(directory / name) for name in finals)
    try:
        fs.mkdir(directory)
        sweep(directory, fs)
    except OSError as error:
        raise CheckpointWriteError(
            f"could not write {described}: cannot use checkpoint directory {directory}: {error}"
        ) from error
    publisher = Publisher(directory, kind, fs, progress)
    try:
        temp = produce(publisher)
        paths = publisher.publish(temp, targets)
    except Exception as error:
        publisher.undo()
        raise CheckpointWriteError(
            f"could not write {described}: {type(error).__name__}: {error}", publisher.published
        ) from error
    except BaseException:
        publisher.undo()
        raise
    report_published(on_published, described)
    prune(directory, targets, kind, fs=fs, removes=removes, families=families)  # only now: committed
    return paths


def report_published(on_published: Callable[[], object] | None, described: str) -> None:
    """Call ``on_published`` (the shell's "saved" lines); the snapshot is committed, so a failure
    there is a WARNING, never an error."""
    if on_published is None:
        return
    try:
        on_published()
    except Exception as error:  # noqa: BLE001 - a report never undoes a commit
        logger.warning("could not report the save of %s: %s: %s", described, type(error).__name__, error)


def prune(
    directory: pathlib.Path, targets: Sequence[Target], kind: EntryKind, *, fs: FileSystem = REAL,
    removes: Sequence[str] = (), families: Sequence[tuple[str, Sequence[str]]] = (),
) -> tuple[pathlib.Path, ...]:
    """Delete what ``ckptfn.core.retention.plan_removals`` lets go: the archived versions beyond each target's ``keep``,
    the top-k members in ``removes``, and for each ``(filename, kept)`` of ``families`` any
    member of ``filename`` not in ``kept`` (``ckptfn.core.retention.plan_member_prune``).

    Runs after a snapshot is committed and only ever removes archived names and members
    that left, never a current one, so a crash here loses no best. A failure to list or
    delete is logged as a WARNING, not raised: the new checkpoint is safe, and the next
    save retries.
    """
    if all(target.keep is None for target in targets) and not removes and not families:
        return ()
    try:
        names = fs.listdir(directory)
    except OSError as error:
        logger.warning("could not list %s to remove old checkpoint versions: %s", directory, error)
        return ()
    removed = []
    versions = [(kind.final_name(t.filename), t.keep) for t in targets]
    members = [(kind.final_name(f), [kind.final_name(n) for n in kept]) for f, kept in families]
    for name, why in plan_removals(versions, members, [kind.final_name(n) for n in removes], names):
        path = directory / name
        try:
            kind.remove(fs, path)
        except FileNotFoundError:
            continue  # already gone (another writer pruned it)
        except OSError as error:
            logger.warning("could not remove old checkpoint version %s: %s", path, error)
            continue
        removed.append(path)
        logger.info("removed %s: %s", name, why)
    if removed:
        try:
            fs.fsync_dir(directory)
        except OSError as error:
            logger.warning("could not fsync %s after removing old versions: %s", directory, error)
    return tuple(removed)


def sweep(directory: str | os.PathLike, fs: FileSystem = REAL) -> None:
    """Tidy ``directory`` after dead writers on this host: remove their temporary entries
    (files and trees alike), and move an entry they had moved aside back to its name if
    that name is empty (a crash in the non-atomic fallback's window).

    A writer is dead when nobody holds the lock of its temporary entry
    (``FileSystem.in_use``) and either its name says it ran in this PID namespace and its
    process id names no live process, or (another namespace, or no namespace in the name)
    the entry has not changed for ``STALE_AFTER`` seconds: process ids mean nothing across
    namespaces (containers, ``unshare -p``), so a live writer there keeps its files.

    Raises ``OSError`` if the directory cannot be listed (other than not existing).
    """
    directory = pathlib.Path(directory)
    try:
        names = fs.listdir(directory)
    except FileNotFoundError:
        return
    mine, here = host_tag(socket.gethostname()), fs.pid_namespace()
    for name in sorted(names, key=lambda n: n.endswith(".tmp")):  # asides first
        parsed = parse_temp_name(name)
        if parsed is None or parsed[1] != mine:
            continue
        path, final = directory / name, directory / parsed[2]
        try:
            if fs.in_use(path):
                continue  # a live writer holds it
            if parsed[4] is not None and parsed[4] == here:
                if fs.pid_alive(parsed[0]):  # our own pid is alive
                    continue
            elif parsed[4] is not None or fs.pid_alive(parsed[0]):
                if fs.age(path) < STALE_AFTER:  # a pid we cannot judge: only an old, unlocked entry is dead
                    continue
        except OSError:
            continue  # gone meanwhile
        try:
            if parsed[3] == "old" and not os.path.lexists(final):
                fs.rename(path, final)
            else:
                kind_of(path).remove(fs, path)
        except OSError:
            pass  # tidied by another writer, or not removable: never blocks a save
