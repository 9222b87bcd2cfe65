"""The effectful executor: turn one step's actions into checkpoint files.

The write protocol for one snapshot (one call):

1. Prepare the payload and metadata (``PayloadError`` before any write).
2. Create the directory; remove temporary files left by dead writers on this host.
3. Serialize once into a hidden temporary file in the same directory, fsync it.
4. For each target name, in order: with ``overwrite=False``, first give the file
   currently there a second name (its archive name, a hard link); then atomically
   ``replace`` the target with the new snapshot (for all but the last target a
   fresh hard link of the temporary file, for the last the temporary file itself).
   When any target archives, step 4 holds an exclusive lock on the directory, so
   concurrent writers never replace a version before it is archived.
5. fsync the directory.

A crash at any instant leaves every final name holding either its complete old
file or the complete new one, and every archived version in place. Where the file
system refuses hard links, copies are made instead (same guarantees, more bytes).
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
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import attrs
import torch

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

from ckptfn._actions import Periodic, Save, Skip
from ckptfn._errors import CheckpointError, CheckpointWriteError, MetricWarning
from ckptfn._fs import LINKS_UNSUPPORTED, REAL, FileSystem
from ckptfn._metadata import build_metadata, compose
from ckptfn._naming import archive_name, host_tag, parse_temp_name, temp_name, timestamp_iso
from ckptfn._payload import prepare_payload
from ckptfn._reading import read_metadata
from ckptfn._retention import plan_prune
from ckptfn._state import State
from ckptfn._strategy import check_filename
from ckptfn._version import __version__

__all__ = [
    "Target",
    "execute",
    "log_saves",
    "partition",
    "snapshot_of",
    "versions",
    "write_snapshot",
]

logger = logging.getLogger("ckptfn")


@attrs.frozen
class Target:
    """One name under which a snapshot is published, with its overwrite policy and, for
    ``overwrite=False``, how many versions to keep (None: all)."""

    filename: str = attrs.field(validator=check_filename)  # the same rules as a strategy's filename
    overwrite: bool = True
    keep: int | None = attrs.field(default=None, kw_only=True)


def versions() -> dict[str, str]:
    """Library versions recorded in every file, as plain strings."""
    return {"ckptfn": __version__, "torch": str(torch.__version__)}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _fmt(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.4e}"


class _Writer:
    """One call's worth of the write protocol over a ``FileSystem``."""

    def __init__(self, directory: pathlib.Path, fs: FileSystem) -> None:
        self.directory = directory
        self.fs = fs
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.temps: list[pathlib.Path] = []
        self.published: list[pathlib.Path] = []
        self.archived: list[tuple[pathlib.Path, pathlib.Path]] = []  # (archive, final) made by this call

    def temp_for(self, filename: str) -> pathlib.Path:
        path = self.directory / temp_name(filename, self.pid, self.host, secrets.token_hex(6))
        self.temps.append(path)
        return path

    def undo(self) -> None:
        """Best effort after a failure: remove this call's temporary files, and archive
        names it made for a version that is still current (a duplicate, not a version)."""
        doomed = list(self.temps)
        doomed += [archive for archive, final in self.archived if _same_file(archive, final)]
        for path in doomed:
            try:
                self.fs.unlink(path)
            except BaseException:  # noqa: BLE001 - already failing; never mask the first error
                pass
        self.temps.clear()

    def remove_stale_temps(self) -> None:
        """Remove temporary files of writers on this host whose process is gone."""
        mine = host_tag(self.host)
        for name in self.fs.listdir(self.directory):
            parsed = parse_temp_name(name)
            if parsed is None or parsed[1] != mine or parsed[0] == self.pid:
                continue
            if not self.fs.pid_alive(parsed[0]):
                try:
                    self.fs.unlink(self.directory / name)
                except OSError:
                    pass  # cleaned by another writer, or not removable (a directory): never blocks a save

    def serialize(
        self, checkpoint: dict, first_name: str, on_serialized: Callable[[], object] | None = None
    ) -> pathlib.Path:
        path = self.temp_for(first_name)
        with self.fs.create(path) as file:
            try:
                torch.save(checkpoint, file)
            except BaseException:
                if file.error is not None:
                    raise file.error from None  # the real cause (e.g. ENOSPC), not torch's symptom
                raise
            if on_serialized is not None:
                on_serialized()  # every byte is in the kernel now: the payload's memory is free
            file.sync()
        return path

    def second_name(self, source: pathlib.Path, target: pathlib.Path, *, visible: bool = False) -> None:
        """Give ``source`` the new name ``target`` (hard link, else a copy).

        A copy under a ``visible`` name is made under a temporary name first and
        then renamed, so a crash mid-copy never leaves a partial file there.
        """
        try:
            self.fs.link(source, target)
        except FileExistsError:
            raise
        except OSError as error:
            if error.errno not in LINKS_UNSUPPORTED:
                raise
            if not visible:
                self.fs.copy(source, target)
                return
            copy = self.temp_for(target.name)
            self.fs.copy(source, copy)
            if os.path.lexists(target):  # the name was taken meanwhile (a link would have failed)
                self.fs.unlink(copy)
                self.temps.remove(copy)
                raise FileExistsError(errno.EEXIST, "archive name taken meanwhile", str(target)) from None
            self.fs.replace(copy, target)
            self.temps.remove(copy)

    def archive(self, final: pathlib.Path) -> pathlib.Path | None:
        """Keep the file at ``final`` under its timestamped archive name (no-op if absent)."""
        if not os.path.lexists(final):
            return None
        saved_at = _saved_at(final)
        for clash in range(10_000):
            candidate = self.directory / archive_name(final.name, saved_at, clash)
            if os.path.lexists(candidate):
                if _same_file(candidate, final):
                    return candidate  # archived by an earlier, interrupted attempt
                continue
            try:
                self.second_name(final, candidate, visible=True)
            except FileExistsError:
                continue  # someone took the name meanwhile: try the next one
            self.archived.append((candidate, final))
            self.fs.fsync_dir(self.directory)  # the archive name is durable before the replace
            return candidate
        raise CheckpointWriteError(f"{final}: no free archive name after 10000 attempts")

    def publish(self, temp: pathlib.Path, targets: Sequence[Target]) -> tuple[pathlib.Path, ...]:
        archiving = any(not target.overwrite for target in targets)
        with _directory_lock(self.directory) if archiving else contextlib.nullcontext():
            for index, target in enumerate(targets):
                final = self.directory / target.filename
                if index == len(targets) - 1:
                    source = temp
                else:
                    source = self.temp_for(target.filename)
                    self.second_name(temp, source)
                if not target.overwrite:
                    self.archive(final)
                self.fs.replace(source, final)
                self.published.append(final)
        self.temps.clear()  # every temporary name has been consumed by a replace
        self.fs.fsync_dir(self.directory)
        return tuple(self.published)


@contextlib.contextmanager
def _directory_lock(directory: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory``: writers of one directory take turns to
    archive-then-replace, so none replaces a version another has not archived yet. The
    kernel releases it when a writer dies; where there is no ``flock``, no lock."""
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
            os.close(fd)  # closing releases the lock


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Whether two names are one file. Symlinks are not followed: a link planted at an
    archive name that points at the current file is not an archived version of it."""
    try:
        first, second = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


#: The mtimes a datetime can hold (years 1 to 9999); foreign files may have any.
_MTIME_RANGE = (-62135596800.0, 253402300799.0)


def _saved_at(path: pathlib.Path) -> dt.datetime:
    """When the file at ``path`` was saved (UTC): its metadata timestamp, else its mtime.

    A symlink is never read through (it may point anywhere, e.g. at a FIFO); any
    timestamp or mtime, however odd, gives a usable moment.
    """
    if not os.path.islink(path):
        try:
            stamp = read_metadata(path).get("timestamp")
            moment = dt.datetime.fromisoformat(stamp)
            if moment.tzinfo is not None:
                return moment.astimezone(dt.timezone.utc)  # OverflowError near years 1 and 9999
        except (CheckpointError, TypeError, ValueError, AttributeError, OverflowError):
            pass
    low, high = _MTIME_RANGE
    return dt.datetime.fromtimestamp(min(max(os.lstat(path).st_mtime, low), high), dt.timezone.utc)


def write_snapshot(
    directory: str | os.PathLike,
    targets: Sequence[Target],
    payload: object,
    metadata: Mapping,
    *,
    fs: FileSystem = REAL,
    on_serialized: Callable[[], object] | None = None,
) -> tuple[pathlib.Path, ...]:
    """Write ``{"state_dict": payload, "metadata": metadata}`` once and publish it under every target.

    ``metadata["layout"] == "flat"`` puts the payload's own keys at the top level
    instead (``ckptfn._metadata.compose``; Lightning checkpoints). After the commit,
    archived versions beyond a target's ``keep`` are deleted (``prune_versions``).

    ``on_serialized`` is called as soon as the payload has been handed to the OS,
    before the fsync: from then on the write no longer reads the payload's memory
    (the asynchronous writer reuses its staging buffers for the next snapshot).

    Raises ``PayloadError`` (nothing written) or ``CheckpointWriteError`` whose
    ``published`` attribute lists the names already holding the new snapshot.
    """
    names = [t.filename for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"a snapshot cannot be published twice under one name: {names}")
    if not targets:
        return ()
    checkpoint = compose(prepare_payload(payload), metadata)  # metadata["layout"] may say "flat"
    directory = pathlib.Path(directory)
    writer = _Writer(directory, fs)
    described = ", ".join(str(directory / name) for name in names)
    try:
        fs.mkdir(directory)
        writer.remove_stale_temps()
    except OSError as error:
        raise CheckpointWriteError(
            f"could not write {described}: cannot use checkpoint directory {directory}: {error}"
        ) from error
    try:
        temp = writer.serialize(checkpoint, names[0], on_serialized)
        paths = writer.publish(temp, targets)
    except Exception as error:
        writer.undo()
        raise CheckpointWriteError(
            f"could not write {described}: {type(error).__name__}: {error}", writer.published
        ) from error
    except BaseException:
        writer.undo()
        raise
    prune_versions(directory, targets, fs=fs)  # only now that the new versions are committed
    return paths


def prune_versions(
    directory: pathlib.Path, targets: Sequence[Target], *, fs: FileSystem = REAL
) -> tuple[pathlib.Path, ...]:
    """Delete the archived versions beyond each target's ``keep`` (``ckptfn._retention.plan_prune``).

    Runs after a snapshot is committed and only ever removes archived names, never
    a current one, so a crash here loses no best. A failure to delete is logged as
    a WARNING, not raised: the new checkpoint is safe, and the next save retries.
    """
    if all(target.keep is None for target in targets):
        return ()
    try:
        names = fs.listdir(directory)
    except OSError as error:
        logger.warning("could not list %s to remove old checkpoint versions: %s", directory, error)
        return ()
    removed = []
    for target in targets:
        for name in plan_prune(target.filename, target.keep, names):
            path = directory / name
            try:
                fs.unlink(path)
            except FileNotFoundError:
                continue  # already gone (another writer pruned it)
            except OSError as error:
                logger.warning("could not remove old checkpoint version %s: %s", path, error)
                continue
            removed.append(path)
            logger.info("removed %s: %s keeps %d versions", name, target.filename, target.keep)
    if removed:
        try:
            fs.fsync_dir(directory)
        except OSError as error:
            logger.warning("could not fsync %s after removing old versions: %s", directory, error)
    return tuple(removed)


def partition(actions: Iterable[object]) -> tuple[list[Save | Periodic], list[Skip]]:
    """Split one step's actions into those that write (``Save``, ``Periodic``) and the ``Skip``s."""
    saves, skips = [], []
    for action in actions:
        match action:
            case Save() | Periodic():
                saves.append(action)
            case Skip():
                skips.append(action)
            case _:
                raise TypeError(
                    f"expected Save or Skip (or Periodic) actions, got {type(action).__name__}"
                )
    return saves, skips


def snapshot_of(
    saves: Sequence[Save | Periodic],
    *,
    state: State | None = None,
    metrics: Mapping | None = None,
    now: dt.datetime | None = None,
) -> tuple[list[Target], dict]:
    """The targets and metadata of the snapshot that ``saves`` (one epoch's) ask for."""
    if state is not None and not isinstance(state, State):
        raise TypeError(f"state: expected a ckptfn.State, got {type(state).__name__}")
    epochs = {save.epoch for save in saves}
    if len(epochs) > 1:
        raise ValueError(f"the saves of one execute must share one epoch, got {sorted(epochs)}")
    metadata = build_metadata(
        saves,
        epoch=saves[0].epoch if saves else None,
        timestamp=timestamp_iso(_now() if now is None else now),
        metrics=metrics,
        manager_state=state.to_dict() if state is not None else None,
        versions=versions(),
    )
    targets = [Target(s.filename, s.strategy.overwrite, keep=s.strategy.keep) for s in saves]
    return targets, metadata


def log_saves(saves: Iterable[Save | Periodic]) -> None:
    """One INFO line per save on the ``ckptfn`` logger."""
    for save in saves:
        if type(save) is Periodic:
            logger.info("saved %s: every %d epoch(s), at epoch %d", save.filename, save.strategy.n_epochs, save.epoch)
            continue
        logger.info(
            "saved %s: %s %s (was %s) at epoch %d",
            save.filename,
            save.strategy.metric_name,
            _fmt(save.value),
            _fmt(save.previous),
            save.epoch,
        )


def execute(
    actions: Iterable[Save | Periodic | Skip],
    payload: object,
    directory: str | os.PathLike,
    *,
    state: State | None = None,
    metrics: Mapping | None = None,
    now: dt.datetime | None = None,
) -> tuple[pathlib.Path, ...]:
    """Perform the ``Save`` and ``Periodic`` actions of one ``step``: one write, one name per save.

    ``Skip`` actions write nothing and each gives a ``MetricWarning``. Returns the
    final paths written, in action order. ``state`` (the new ``State``) is stored
    so training can resume; ``metrics`` (this epoch's) are stored as floats;
    ``now`` (timezone-aware) replaces the clock.
    """
    saves, skips = partition(actions)
    for skip in skips:
        warnings.warn(str(skip), MetricWarning, stacklevel=2)
    if not saves:
        return ()
    targets, metadata = snapshot_of(saves, state=state, metrics=metrics, now=now)
    paths = write_snapshot(directory, targets, payload, metadata)
    log_saves(saves)
    return paths
