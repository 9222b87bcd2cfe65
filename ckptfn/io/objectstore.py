"""The seam for remote checkpoint directories: every call ckptfn makes to an object store.

A checkpoint directory given as an fsspec URL (``s3://bucket/run1``, ``gs://...``,
``memory://run``) is read and written through one ``ObjectStore`` object, as local
directories go through ``ckptfn.io.fs.FileSystem``: tests count its operations or
fail any one of them. ``file://`` URLs are local paths and never come here.

An object store has no rename, no hard links and no directory fsync; it has
atomic whole-object writes (a single PUT, or a completed multipart upload: an
interrupted upload leaves no object) and server-side copies, and (S3 since
December 2020) read-after-write consistency. ``ckptfn.io.remote`` builds the publish
protocol from exactly these.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pathlib
from collections.abc import Iterator
from typing import BinaryIO

__all__ = [
    "BLOCK_SIZE", "ObjectStore", "RangeReader", "RemotePath", "is_remote", "join", "local_path", "location", "store_for",
]

#: Bytes fetched per range request when reading a remote checkpoint's metadata.
BLOCK_SIZE = 1 << 16
#: An incomplete multipart upload this old was abandoned by a killed writer: aborted by the next save.
ABANDONED_AFTER = dt.timedelta(hours=1)


def is_remote(location: object) -> bool:
    """Whether ``location`` is an fsspec URL of a non-local store (``file://`` is local).

    >>> is_remote("s3://bucket/run1"), is_remote("memory://run"), is_remote("file:///tmp/run"), is_remote("/tmp/run")
    (True, True, False, False)
    """
    if not isinstance(location, str) or "://" not in location:
        return False
    protocol = location.split("://", 1)[0]
    return protocol not in ("file", "local") and protocol.replace("+", "").replace("-", "").isalnum()


def local_path(location: str | os.PathLike) -> str | os.PathLike:
    """A ``file://`` URL as a local path; anything else unchanged.

    >>> local_path("file:///tmp/run"), local_path("/tmp/run")
    ('/tmp/run', '/tmp/run')
    """
    if isinstance(location, str) and location.startswith("file://"):
        return location[len("file://"):]
    return location


def join(directory: str, name: str) -> str:
    """The URL of ``name`` inside the remote directory ``directory``.

    >>> join("s3://bucket/run1", "best.pt"), join("s3://bucket/run1/", "best.pt")
    ('s3://bucket/run1/best.pt', 's3://bucket/run1/best.pt')
    """
    return directory.rstrip("/") + "/" + name


class RemotePath(str):
    """A URL that joins and names like a ``pathlib.Path`` (``/``, ``name``, ``parent``), so code that
    handles local paths handles remote ones; it is still the plain URL string.

    >>> run = RemotePath("s3://bucket/run1")
    >>> run / "best.pt", (run / "best.pt").name, (run / "best.pt").parent == run
    ('s3://bucket/run1/best.pt', 'best.pt', True)
    """

    def __truediv__(self, name: object) -> RemotePath:
        return RemotePath(join(self, str(name)))

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.rstrip("/").rsplit("/", 1)[0])


def location(value: str | os.PathLike) -> pathlib.Path | RemotePath:
    """Where checkpoints go: a ``RemotePath`` for an fsspec URL, else a local ``pathlib.Path``
    (``file://`` URLs included).

    >>> location("s3://bucket/run1").name, location("file:///tmp/run1"), location("run1")
    ('run1', PosixPath('/tmp/run1'), PosixPath('run1'))
    """
    if is_remote(value):
        return RemotePath(value)
    return pathlib.Path(local_path(value))


class ObjectStore:
    """fsspec operations on one store, named as the protocol uses them.

    Paths are the store's own (``bucket/run1/best.pt``, no protocol), as fsspec's
    methods take them; ``url`` turns one back into a URL.
    """

    def __init__(self, fs, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol

    def url(self, path: str) -> str:
        return f"{self.protocol}://{path}"

    # --- reading -----------------------------------------------------------------------

    def size(self, path: str) -> int | None:
        """The object's size in bytes; None when there is no object at ``path``."""
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return int(info.get("size") or 0)

    def modified(self, path: str) -> dt.datetime:
        """When the object at ``path`` was last written (UTC)."""
        info = self.fs.info(path)
        for key in ("LastModified", "last_modified", "mtime", "created"):
            value = info.get(key)
            if isinstance(value, dt.datetime):
                return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
            if isinstance(value, (int, float)):
                return dt.datetime.fromtimestamp(value, dt.timezone.utc)
        return dt.datetime.now(dt.timezone.utc)

    def names(self, directory: str) -> list[str]:
        """The object names directly in ``directory`` (empty if there is none)."""
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache(directory)  # read-after-write: list what the store holds now
        try:
            entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return []
        prefix = directory.rstrip("/") + "/"
        return sorted(
            entry["name"][len(prefix):] if entry["name"].startswith(prefix) else entry["name"].rsplit("/", 1)[-1]
            for entry in entries
            if entry.get("type") != "directory"
        )

    @contextlib.contextmanager
    def reader(self, path: str) -> Iterator[BinaryIO]:
        """A seekable file on the object that fetches ``BLOCK_SIZE`` ranges as it is read."""
        with self.fs.open(path, "rb", block_size=BLOCK_SIZE, cache_type="readahead") as file:
            yield file

    def read(self, path: str) -> bytes:
        """The whole object."""
        return self.fs.cat_file(path)

    def read_ranges(self, path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes ``[start, end)`` of each range, fetched concurrently where the store can."""
        if not ranges:
            return []
        starts, ends = [start for start, _ in ranges], [end for _, end in ranges]
        return list(self.fs.cat_ranges([path] * len(ranges), starts, ends))

    # --- writing -------------------------------------------------------------------------

    def upload(self, local: str | os.PathLike, path: str) -> None:
        """Put the local file at ``path``: one atomic object write (PUT or multipart)."""
        self.fs.put_file(os.fspath(local), path)

    def put_bytes(self, data: bytes, path: str) -> None:
        """Put ``data`` at ``path`` in one PUT."""
        self.fs.pipe_file(path, data)

    def copy(self, source: str, target: str) -> None:
        """Server-side copy: ``target`` becomes a complete copy of ``source`` (no bytes uploaded)."""
        self.fs.copy(source, target)

    def remove(self, path: str) -> None:
        """Delete the object at ``path`` (``FileNotFoundError`` if there is none)."""
        self.fs.rm_file(path)

    def abort_abandoned_uploads(self, directory: str, now: dt.datetime) -> int:
        """Abort the incomplete multipart uploads under ``directory`` started more than
        ``ABANDONED_AFTER`` ago (a killed writer's: they hold storage but no object).
        Stores without multipart uploads have none. Returns how many were aborted."""
        call = getattr(self.fs, "call_s3", None)
        if call is None:
            return 0
        bucket, _, prefix = directory.partition("/")
        try:
            listing = call("list_multipart_uploads", Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
        except Exception:  # noqa: BLE001 - a store that cannot list them (permissions): nothing to tidy
            return 0
        aborted = 0
        for upload in listing.get("Uploads", []):
            started = upload.get("Initiated")
            if isinstance(started, dt.datetime) and now - started > ABANDONED_AFTER:
                call("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted


class RangeReader:
    """A read-only, seekable file over an object that serves reads from ranges fetched ahead
    (``prefetch``, one concurrent batch) and fetches a ``BLOCK_SIZE`` range for any miss.
    ``fetched`` counts the bytes asked of the store.

    >>> store, path = store_for("memory://ckptfn-doc/ranges.bin")
    >>> store.put_bytes(bytes(range(256)) * 4, path)
    >>> reader = RangeReader(store, path, 1024)
    >>> reader.prefetch([(1000, 1024)])
    >>> _ = reader.seek(1020); reader.read(4), reader.fetched
    (b'\\xfc\\xfd\\xfe\\xff', 24)
    """

    def __init__(self, store: ObjectStore, path: str, size: int) -> None:
        self.store, self.path, self.size = store, path, size
        self.blocks: list[tuple[int, bytes]] = []
        self.position = 0
        self.fetched = 0

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        wanted = [(max(0, start), min(end, self.size)) for start, end in ranges if start < self.size and end > start]
        wanted = [r for r in wanted if not self._covered(*r)]
        for (start, _), data in zip(wanted, self.store.read_ranges(self.path, wanted)):
            self.blocks.append((start, bytes(data)))
            self.fetched += len(data)

    def _covered(self, start: int, end: int) -> bytes | None:
        for begin, data in self.blocks:
            if begin <= start and end <= begin + len(data):
                return data[start - begin : end - begin]
        return None

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.position, 2: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def read(self, count: int = -1) -> bytes:
        end = self.size if count is None or count < 0 else min(self.size, self.position + count)
        if end <= self.position:
            return b""
        data = self._covered(self.position, end)
        if data is None:
            self.prefetch([(self.position, max(end, self.position + BLOCK_SIZE))])
            data = self._covered(self.position, end)
        self.position = end
        return data

    def close(self) -> None:
        self.blocks.clear()


def store_for(url: str) -> tuple[ObjectStore, str]:
    """The ``ObjectStore`` of ``url`` and the store's path of it (storage options come from
    fsspec's configuration: ``fsspec.config.conf`` or ``FSSPEC_<PROTOCOL>_*`` variables).

    >>> store, path = store_for("memory://ckptfn-doc/run1")
    >>> type(store.fs).__name__, path
    ('MemoryFileSystem', '/ckptfn-doc/run1')
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    protocol = url.split("://", 1)[0]
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()  # read-after-write: never a listing cached by an earlier call
    return ObjectStore(fs, protocol), path
