"""Writing a snapshot: serialize it once, publish it with the one protocol.

``write`` is the one write function of the library: every shell (the manager,
the background writer, the distributed coordinator, the Lightning callback,
``execute``) hands it a planned ``Snapshot`` and gets back a ``Written``: the
paths, the ``Outcome`` to give the pure commit rule (``ckptfn.core.commit``),
and the error to raise once the state is committed. ``write_snapshot`` (files)
and ``commit_tree`` (sharded trees) are the two producers under it; both publish
through ``ckptfn.io.publish``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import pathlib
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import attrs
import torch

from ckptfn._version import __version__
from ckptfn.core.commit import Outcome
from ckptfn.core.errors import CheckpointWriteError
from ckptfn.core.metadata import compose
from ckptfn.core.snapshot import Snapshot, Target
from ckptfn.core.summary import save_line
from ckptfn.io import torch_internals
from ckptfn.io.fs import REAL, FileSystem
from ckptfn.io.objectstore import is_remote, location
from ckptfn.io.payload import prepare_payload
from ckptfn.io.publish import FILE, TREE, Publisher, publish

__all__ = [
    "Written", "commit_tree", "serialization_context", "versions", "write", "write_remote_snapshot", "write_snapshot",
]

logger = logging.getLogger("ckptfn")

#: The name of the metadata record inside a sharded checkpoint tree.
TREE_METADATA = "ckptfn.json"


def versions() -> dict[str, str]:
    """Library versions recorded in every file, as plain strings.

    >>> sorted(versions())
    ['ckptfn', 'torch']
    """
    return {"ckptfn": __version__, "torch": str(torch.__version__)}


def serialization_context(checksums: bool = True) -> contextvars.Context:
    """A copy of the caller's context to run one write in; without CRC32s if ``checksums`` is False.

    Writes always run in such a copy, also on the background thread, so torch's
    per-context serialization settings of the caller (``set_crc32_options``,
    storage alignment) apply to its saves as they would synchronously.

    >>> import torch
    >>> torch.serialization.get_crc32_options()
    True
    >>> serialization_context(checksums=False).run(torch.serialization.get_crc32_options)
    False
    >>> torch.serialization.get_crc32_options()  # the caller's setting is untouched
    True
    """
    context = contextvars.copy_context()
    if not checksums:
        if not torch_internals.crc32_setting_is_per_context():
            raise NotImplementedError(
                f"checksums=False needs torch's serialization config to be per context (torch >= 2.13); "
                f"in torch {torch.__version__} it is process-global, so turning CRC32 off for one save "
                "would turn it off for every save running at the same time"
            )
        context.run(torch_internals.disable_crc32)
    return context


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT while the block runs (main thread only), then deliver it as it came.

    ``torch.save`` calls back into Python to write each chunk; a ``KeyboardInterrupt``
    raised inside such a callback unwinds through torch's C++ writer and can abort the
    whole process (a notebook kernel included). Deferred, it is raised when the block
    ends, where the protocol's own cleanup handles it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers only ever run on the main thread
        return
    pending: list[tuple[int, object]] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: pending.append((number, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and callable(previous):
            previous(*pending[0])  # Python's default handler raises KeyboardInterrupt here


def write_snapshot(
    directory: str | os.PathLike,
    targets: Sequence[Target],
    payload: object,
    metadata: Mapping,
    *,
    fs: FileSystem = REAL,
    on_serialized: Callable[[], object] | None = None,
    progress: list[str] | None = None,
    removes: Sequence[str] = (),
    families: Sequence[tuple[str, Sequence[str]]] = (),
    on_published: Callable[[], object] | None = None,
) -> tuple[pathlib.Path, ...]:
    """Write ``{"state_dict": payload, "metadata": metadata}`` once into a file and publish
    it under every target (then prune: ``removes``, ``families``, see ``ckptfn.io.publish.prune``).

    ``metadata["layout"] == "flat"`` puts the payload's own keys at the top level
    instead (``ckptfn.core.metadata.compose``; Lightning checkpoints).
    ``on_serialized`` is called as soon as the payload has been handed to the OS,
    before the fsync: from then on the write no longer reads the payload's memory
    (the background writer reuses its staging buffers for the next snapshot).

    Raises ``PayloadError`` (nothing written) or ``CheckpointWriteError`` whose
    ``published`` attribute lists the names already holding the new snapshot.
    """
    names = [target.filename for target in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"a snapshot cannot be published twice under one name: {names}")
    if not targets:
        return ()
    checkpoint = compose(prepare_payload(payload), metadata)  # PayloadError before any write

    def serialize(publisher: Publisher) -> pathlib.Path:
        path = publisher.new_temp(names[0])
        with publisher.fs.create(path) as file:
            try:
                with interrupts_deferred():
                    torch.save(checkpoint, file)
            except BaseException:
                if file.error is not None:
                    raise file.error from None  # the real cause (e.g. ENOSPC), not torch's symptom
                raise
            if on_serialized is not None:
                on_serialized()  # every byte is in the kernel now: the payload's memory is free
            file.sync()
        return path

    return publish(
        directory, targets, FILE, serialize, fs=fs, progress=progress,
        removes=removes, families=families, on_published=on_published,
    )


def commit_tree(
    directory: str | os.PathLike,
    temp: str | os.PathLike,
    targets: Sequence[Target],
    metadata: Mapping,
    *,
    fs: FileSystem = REAL,
    progress: list[str] | None = None,
    removes: Sequence[str] = (),
    families: Sequence[tuple[str, Sequence[str]]] = (),
    on_published: Callable[[], object] | None = None,
) -> tuple[pathlib.Path, ...]:
    """Publish the complete DCP tree ``temp`` (written by ``ckptfn.io.dcp.write_shards``)
    under every target's ``.dcp`` name, with ``ckptfn.json`` added (rank 0 only).

    Raises ``CheckpointWriteError`` whose ``published`` lists the names already switched.
    """
    import json

    data = json.dumps(dict(metadata), indent=1).encode("utf-8")

    def add_metadata(publisher: Publisher) -> pathlib.Path:
        tree = publisher.adopt(pathlib.Path(temp))
        with publisher.fs.create(tree / TREE_METADATA) as file:
            file.write(data)
            file.sync()
        publisher.fs.fsync_dir(tree)
        return tree

    try:
        return publish(
            directory, targets, TREE, add_metadata, fs=fs, progress=progress,
            removes=removes, families=families, on_published=on_published,
        )
    except BaseException:
        if os.path.lexists(temp):  # never adopted, or left holding a superseded tree: garbage either way
            try:
                fs.rmtree(pathlib.Path(temp))
            except BaseException:  # noqa: BLE001 - already failing; a later sweep removes it
                pass
        raise
    finally:
        fs.release(pathlib.Path(temp))  # consumed, removed or left for a sweep: never held


@attrs.frozen
class Written:
    """What ``write`` did: the paths holding the new snapshot, the ``Outcome`` for the
    commit rule, and the error to raise after committing (None on success).

    >>> import pathlib
    >>> ok = Written([pathlib.Path("ckpt/best_val_loss.pt")], Outcome.success(["best_val_loss.pt"]))
    >>> ok.outcome.succeeded, ok.raise_error()
    (True, None)
    >>> failed = Written([], Outcome.failure(["best_val_loss.pt"]), OSError("disk full"))
    >>> failed.outcome.touched_disk  # nothing was published: the old state stays
    False
    >>> failed.raise_error()
    Traceback (most recent call last):
    ...
    OSError: disk full
    """

    paths: tuple[pathlib.Path, ...] = attrs.field(converter=tuple)  # URL strings for a remote directory
    outcome: Outcome
    error: BaseException | None = attrs.field(default=None, eq=False)

    def raise_error(self) -> None:
        """Raise the write's error, if any (after the shell committed its state)."""
        if self.error is not None:
            raise self.error


def write_remote_snapshot(
    url: str,
    targets: Sequence[Target],
    payload: object,
    metadata: Mapping,
    *,
    store: object = None,
    on_serialized: Callable[[], object] | None = None,
    progress: list[str] | None = None,
    removes: Sequence[str] = (),
    families: Sequence[tuple[str, Sequence[str]]] = (),
    on_published: Callable[[], object] | None = None,
) -> tuple[pathlib.Path, ...]:
    """``write_snapshot`` for a remote directory: the same snapshot, published by the object-store
    protocol (``ckptfn.io.remote``); the paths are ``RemotePath`` URLs. ``store``: an ``ObjectStore``
    to use instead of the one fsspec gives (tests)."""
    from ckptfn.io.objectstore import ObjectStore
    from ckptfn.io.remote import publish_remote

    checkpoint = compose(prepare_payload(payload), metadata)  # PayloadError before any request
    return publish_remote(
        url, targets, checkpoint, store=store if isinstance(store, ObjectStore) else None, progress=progress,
        removes=removes, families=families, on_serialized=on_serialized, on_published=on_published,
    )


def write(
    directory: str | os.PathLike,
    snapshot: Snapshot,
    payload: object,
    *,
    tree: str | os.PathLike | None = None,
    fs: FileSystem | None = None,
    on_serialized: Callable[[], object] | None = None,
) -> Written:
    """Write ``snapshot`` with ``payload`` into ``directory`` and say what happened.

    ``tree``: the temporary DCP tree already holding the payload's shards (a sharded
    save; ``payload`` is then unused). Never raises for a failed write, not even for
    an interrupt (``KeyboardInterrupt``): the failure is in ``Written.error``, and
    ``Written.outcome`` says which names hold the new snapshot, so the shell can keep
    the right state (``ckptfn.core.commit.commit``) and then ``raise_error()``.
    On success each save is logged on the ``ckptfn`` logger.

    >>> import datetime as dt, tempfile, ckptfn
    >>> from ckptfn.kit import commit, partition, plan_snapshot
    >>> old = ckptfn.init(ckptfn.Strategy("val_loss"))
    >>> new, actions = ckptfn.step(old, {"val_loss": 0.5}, epoch=0)
    >>> snapshot = plan_snapshot(partition(actions)[0], now=dt.datetime.now(dt.timezone.utc),
    ...                          versions=versions(), state=new)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     written = write(directory, snapshot, {"w": torch.zeros(2)})
    ...     kept = commit(old, new, written.outcome)
    ...     written.raise_error()  # nothing to raise
    ...     [path.name for path in written.paths], kept == new
    (['best_val_loss.pt'], True)
    """
    progress: list[str] = []
    remote = is_remote(directory)
    directory = location(directory)  # a RemotePath joins and names like a Path: one outcome rule below
    seam = {} if fs is None else {"store" if remote else "fs": fs}

    def say_saved() -> None:  # before the prune's "removed" lines
        for save in snapshot.saves:
            logger.info("%s", save_line(save))

    after = {"removes": snapshot.removes, "families": snapshot.families, "on_published": say_saved}
    try:
        if remote and tree is not None:
            raise CheckpointWriteError(f"{directory}: sharded (DCP) checkpoints need a local or shared file system path")
        if remote:
            paths = write_remote_snapshot(
                directory, snapshot.targets, payload, snapshot.metadata, on_serialized=on_serialized,
                progress=progress, **after, **seam,
            )
        elif tree is None:
            paths = write_snapshot(
                directory, snapshot.targets, payload, snapshot.metadata, on_serialized=on_serialized,
                progress=progress, **after, **seam,
            )
        else:
            paths = commit_tree(
                directory, tree, snapshot.targets, snapshot.metadata, progress=progress, **after, **seam
            )
    except BaseException as error:  # noqa: BLE001 - handed back; the shell raises it after committing
        kind = TREE if tree is not None else FILE
        if isinstance(error, Exception):  # the protocol says exactly which names hold the new snapshot
            published = tuple(getattr(error, "published", ()))
            landed = {path.name for path in published}
            names = [t.filename for t in snapshot.targets if kind.final_name(t.filename) in landed]
        else:  # an interrupt: every name whose install began may have moved
            names = [t.filename for t in snapshot.targets if t.filename in progress]
            published = tuple(directory / kind.final_name(name) for name in names)
        return Written(published, Outcome.failure(snapshot.filenames, names), error)
    return Written(paths, Outcome.success(snapshot.filenames))
