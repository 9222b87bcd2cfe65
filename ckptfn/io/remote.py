"""The publish protocol for object stores (S3, GCS, ... through fsspec).

The same guarantee as on a local disk, from what an object store provides (atomic
whole-object writes, server-side copies, read-after-write consistency), for one
snapshot and its targets, in order:

1. Serialize the snapshot once into a local spool file (``torch.save``; a payload
   error leaves the store untouched).
2. For each target: with ``overwrite=False``, first copy the object now at its name
   to its archive name (server-side), and for a top-k ``aside`` to that member
   name; then the new object lands at the name: the first target by one upload (a
   single PUT, or a multipart upload that becomes visible only when completed, so a
   writer killed mid-upload leaves the old object), every further target by a
   server-side copy of the first. Bytes uploaded = 1 x the snapshot, whatever the
   number of names.
3. Only then delete what ``keep`` and ``top_k`` let go (``plan_removals``,
   the same plan as on a disk); a failed delete is a WARNING.

On failure the archive copies of objects that are still current are removed again
(they are duplicates, not versions) and a ``CheckpointWriteError`` says which
names already hold the new snapshot. Incomplete multipart uploads that a killed
writer abandoned (no object, but billed storage) are aborted by a later save once
they are an hour old. There is no directory lock: one writer per directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import pathlib
import tempfile
from collections.abc import Callable, Sequence

from ckptfn.core.errors import CheckpointWriteError
from ckptfn.core.naming import archive_name
from ckptfn.core.retention import archive_moment, plan_removals
from ckptfn.core.snapshot import Target
from ckptfn.io.fs import REAL
from ckptfn.io.objectstore import ObjectStore, RemotePath, store_for
from ckptfn.io.publish import report_published

__all__ = ["ARCHIVE_ATTEMPTS", "publish_remote", "serialize_to_spool"]

logger = logging.getLogger("ckptfn")

ARCHIVE_ATTEMPTS = 10_000


def serialize_to_spool(checkpoint: object, spool: pathlib.Path, on_serialized: Callable[[], object] | None) -> pathlib.Path:
    """``torch.save`` the composed checkpoint into a local file under ``spool`` (through the seam)."""
    import torch

    from ckptfn.io.write import interrupts_deferred

    path = spool / "snapshot.pt"
    with REAL.create(path) as file:
        try:
            with interrupts_deferred():
                torch.save(checkpoint, file)
        except BaseException:
            if file.error is not None:
                raise file.error from None
            raise
        if on_serialized is not None:
            on_serialized()
    return path


class _RemotePublisher:
    """One call's worth of the protocol on an object store."""

    def __init__(self, store: ObjectStore, root: str, progress: list[str]) -> None:
        self.store, self.root, self.progress = store, root.rstrip("/"), progress
        self.archived: list[tuple[str, str]] = []  # (archive path, target filename) made by this call
        self.published: list[str] = []

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def archive(self, filename: str, names: set[str]) -> None:
        final = self.path(filename)
        if self.store.size(final) is None:
            return
        moment = archive_moment(filename, self.store.modified(final), names)
        for clash in range(ARCHIVE_ATTEMPTS):
            candidate = archive_name(filename, moment, clash)
            if candidate in names:
                continue
            self.store.copy(final, self.path(candidate))
            names.add(candidate)
            self.archived.append((self.path(candidate), filename))
            return
        raise CheckpointWriteError(f"{self.store.url(final)}: no free archive name after {ARCHIVE_ATTEMPTS} attempts")

    def set_aside(self, filename: str, aside: str) -> None:
        final = self.path(filename)
        if self.store.size(final) is None:
            return
        self.store.copy(final, self.path(aside))
        self.archived.append((self.path(aside), filename))

    def publish(self, spool: pathlib.Path, targets: Sequence[Target]) -> tuple[str, ...]:
        names = set(self.store.names(self.root))
        first = None
        for target in targets:
            if not target.overwrite:
                self.archive(target.filename, names)
            if target.aside is not None:
                self.set_aside(target.filename, target.aside)
            final = self.path(target.filename)
            self.progress.append(target.filename)  # before: a failure after the request may have landed it
            if first is None:
                self.store.upload(spool, final)
                first = final
            else:
                self.store.copy(first, final)
            self.published.append(final)
        return tuple(self.published)

    def undo(self) -> None:
        """Remove the archive copies of objects this call did not replace (duplicates)."""
        for copy, filename in self.archived:
            if filename in self.progress:
                continue
            with contextlib.suppress(Exception):
                self.store.remove(copy)


def _prune(
    store: ObjectStore, root: str, targets: Sequence[Target], removes: Sequence[str],
    families: Sequence[tuple[str, Sequence[str]]],
) -> None:
    if all(t.keep is None for t in targets) and not removes and not families:
        return
    try:
        names = store.names(root)
    except Exception as error:  # noqa: BLE001 - the snapshot is committed; the next save retries
        logger.warning("could not list %s to remove old checkpoint versions: %s", store.url(root), error)
        return
    for name, why in plan_removals([(t.filename, t.keep) for t in targets], families, removes, names):
        try:
            store.remove(f"{root.rstrip('/')}/{name}")
        except FileNotFoundError:
            continue
        except Exception as error:  # noqa: BLE001 - a warning, never an error: the new snapshot is safe
            logger.warning("could not remove old checkpoint version %s: %s", store.url(f"{root}/{name}"), error)
            continue
        logger.info("removed %s: %s", name, why)


def publish_remote(
    url: str,
    targets: Sequence[Target],
    checkpoint: object,
    *,
    store: ObjectStore | None = None,
    progress: list[str] | None = None,
    removes: Sequence[str] = (),
    families: Sequence[tuple[str, Sequence[str]]] = (),
    on_serialized: Callable[[], object] | None = None,
    on_published: Callable[[], object] | None = None,
    produce: Callable[[pathlib.Path], pathlib.Path] | None = None,
) -> tuple[RemotePath, ...]:
    """Publish the composed ``checkpoint`` under every target in the remote directory ``url``;
    the URLs written. ``store`` (an ``ObjectStore`` whose paths ``url`` names without its
    protocol) replaces the one fsspec gives, for tests. ``produce``, when given, writes the
    file to publish into the local spool directory it is handed and returns its path (``ckptfn
    export``'s safetensors file); ``checkpoint`` is then unused.

    Raises ``CheckpointWriteError`` whose ``published`` lists the URLs already switched.
    """
    progress = progress if progress is not None else []
    if store is None:
        store, root = store_for(url)
    else:
        root = url.split("://", 1)[1]
    publisher = _RemotePublisher(store, root, progress)
    described = ", ".join(store.url(publisher.path(t.filename)) for t in targets)
    with contextlib.suppress(Exception):
        store.abort_abandoned_uploads(root, dt.datetime.now(dt.timezone.utc))
    with tempfile.TemporaryDirectory(prefix="ckptfn-spool-") as spool:
        try:
            if produce is not None:
                spooled = produce(pathlib.Path(spool))
            else:
                spooled = serialize_to_spool(checkpoint, pathlib.Path(spool), on_serialized)
            paths = publisher.publish(spooled, targets)
        except Exception as error:
            publisher.undo()
            raise CheckpointWriteError(
                f"could not write {described}: {type(error).__name__}: {error}",
                tuple(RemotePath(store.url(p)) for p in publisher.published),
            ) from error
        except BaseException:
            publisher.undo()
            raise
    report_published(on_published, described)
    _prune(store, root, targets, removes, families)
    return tuple(RemotePath(store.url(p)) for p in paths)
