"""Verifying checkpoints: is every byte still the one written, and does the file load safely?

torch writes a CRC32 of every zip record but never checks one when it loads, so a
flipped bit in tensor data loads silently. ``verify_checkpoint`` checks what can
be checked, reading in bounded chunks (memory stays at a few MiB whatever the
size of the checkpoint). Two levels:

``"structure"`` (cheap; what resume relies on by default): a file is a regular
zip file whose records torch.save could have written and whose ckptfn metadata
reads (``read_metadata``). A sharded tree (``.dcp``): its ``ckptfn.json`` and
DCP's ``.metadata`` read (the allow-listed unpickler), every tensor chunk and
value has a storage record, and every record lies within a regular file inside
the tree.

``"full"``: the structure, then every byte the records hold is read. In a file,
each record's local header must agree with the central directory (name, method,
flags, time, version, sizes; the data descriptor too) and its bytes must hash to
the central directory's CRC32; then the file must load with
``torch.load(weights_only=True, mmap=True)``. In a tree, each storage record that
is a ``torch.save`` archive (DCP's default format) is checked the same way, and
every non-tensor value must load with ``weights_only=True``.

Not checked, because nothing records them: bytes no reader uses (the extra fields
of local headers, which hold torch's alignment padding; the central directory's
"version made by", disk number and file attributes), and the data of files
written with ``checksums=False`` (their CRC fields are 0): those are
read in full (an unreadable sector is found) but a flipped bit cannot be seen, so
the verdict stays ok with a note saying so. Tensor records of a tree are
CRC-checked but not loaded (that would take the whole shard's memory).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import pathlib
import stat
from collections.abc import Iterable, Iterator

import attrs

from ckptfn.core.errors import CheckpointError, CheckpointNotFoundError
from ckptfn.core.naming import DCP_SUFFIX
from ckptfn.io.dcp import is_sharded_checkpoint
from ckptfn.io.fs import open_regular
from ckptfn.io.objectstore import is_remote, join, local_path, store_for
from ckptfn.io.archive import Window
from ckptfn.io.read import read_metadata
from ckptfn.io.records import (
    CHUNK,
    CRC32_IMPLEMENTATION,
    ZIP_MAGIC,
    Unreadable,
    check_records,
    describe,
    hash_range,
    no_checksums_note,
    open_archive,
    read_range,
    without_path,
)

__all__ = ["CRC32_IMPLEMENTATION", "LEVELS", "Verdict", "checkpoints_in", "verify_checkpoint", "verify_checkpoints"]

#: The verification levels, cheapest first.
LEVELS = ("structure", "full")

#: File name suffixes of checkpoint files (besides any file starting with the zip magic).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")

_CHECKS = ("structure", "crc32", "read", "load")  # what a Verdict says was checked, in this order


@attrs.frozen
class Verdict:
    """What verifying one checkpoint (a file or a sharded tree) found.

    ``ok`` is True when nothing is damaged: ``problems`` is empty (each names the
    record and offset it is about). ``notes`` say what could not be checked,
    ``checked`` what was: ``structure``, ``crc32`` (``records`` records hashed and
    compared), ``read`` (``bytes_read`` bytes, every byte the records hold) and
    ``load`` (``weights_only=True``).

    >>> import tempfile, torch, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     manager = ckptfn.CheckpointManager(directory, ckptfn.Strategy("val_loss"))
    ...     (path,) = manager.update({"val_loss": 0.5}, {"w": torch.ones(1000)}, epoch=0)
    ...     verdict = verify_checkpoint(path)
    ...     verdict.raise_error()  # nothing to raise
    >>> verdict.ok, verdict.checked, verdict.records, verdict.problems
    (True, ('structure', 'crc32', 'read', 'load'), 7, ())
    >>> Verdict("best.pt", "full", problems=["'archive/data/0': CRC32 mismatch"]).raise_error()
    Traceback (most recent call last):
    ...
    ckptfn.CheckpointError: best.pt: damaged: 'archive/data/0': CRC32 mismatch
    """

    path: str = attrs.field(converter=str)
    level: str
    checked: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    problems: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    notes: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    records: int = 0
    bytes_read: int = 0
    ok: bool = attrs.field(init=False)

    @ok.default
    def _no_problems(self) -> bool:
        return not self.problems

    def raise_error(self) -> None:
        """Raise a ``CheckpointError`` naming every problem, if there is any."""
        if self.problems:
            raise CheckpointError(f"{self.path}: damaged: " + "; ".join(self.problems))


@attrs.define
class _Tally:
    """What a verification has found so far (one per checkpoint; mutable while it runs)."""

    checked: list[str] = attrs.Factory(list)
    problems: list[str] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)
    records: int = 0
    unchecked: int = 0  # records whose bytes were read but that carry no checksum
    bytes_read: int = 0
    buffer: memoryview = attrs.Factory(lambda: memoryview(bytearray(CHUNK)))

    def did(self, check: str) -> None:
        if check not in self.checked:
            self.checked.append(check)

    def verdict(self, path: pathlib.Path, level: str) -> Verdict:
        checked = sorted(self.checked, key=_CHECKS.index)
        return Verdict(str(path), level, checked, self.problems, self.notes, self.records, self.bytes_read)


# --- files -------------------------------------------------------------------------------------


def _check_load(path: pathlib.Path | str, tally: _Tally) -> None:
    """The file loads with ``weights_only=True``; ``mmap`` so that no tensor's bytes are read into
    memory (a remote object is read into memory: there is nothing to map)."""
    import io

    import torch  # here, not at import: the structure level needs no torch

    try:
        if is_remote(path):
            store, key = store_for(path)
            torch.load(io.BytesIO(store.read(key)), map_location="cpu", weights_only=True)
        else:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for damaged files
        tally.problems.append(f"does not load with torch.load(weights_only=True): {describe(error)}")
    tally.did("load")


@contextlib.contextmanager
def _opened(path: pathlib.Path | str):
    """``(file, length)`` of a local file (never blocking on a FIFO) or a remote object."""
    if is_remote(path):
        store, key = store_for(path)
        length = store.size(key)
        if length is None:
            raise FileNotFoundError(f"no object at {path}")
        with store.reader(key) as file:
            yield file, length
        return
    with open_regular(path) as file:
        yield file, os.fstat(file.fileno()).st_size


def _verify_file(path: pathlib.Path | str, level: str) -> Verdict:
    tally = _Tally()
    try:
        read_metadata(path)
    except CheckpointError as error:
        tally.problems.append(without_path(path, error))
    tally.did("structure")
    if level == "full":
        try:
            with _opened(path) as (file, length):
                members = open_archive(file, 0, length)
                if members is not None:
                    check_records(file, 0, length, members, tally)
                elif not tally.problems:  # pragma: no cover - read_metadata refuses such a file first
                    tally.problems.append("damaged zip archive: its central directory does not parse")
        except OSError as error:
            if not tally.problems:
                tally.problems.append(f"cannot be read ({describe(error)})")
        no_checksums_note(tally, "a file")
        if not tally.problems:  # loading a damaged file would only repeat the news
            _check_load(path, tally)
    return tally.verdict(path, level)


# --- sharded trees -----------------------------------------------------------------------------


@attrs.frozen
class _Item:
    """One storage record of a DCP tree: a value's bytes at ``[offset, offset + length)`` of a shard file."""

    file: str
    offset: int
    length: int
    fqn: str
    is_bytes: bool
    transformed: bool


def _dcp_metadata(path: pathlib.Path) -> object:
    """DCP's ``.metadata`` of the tree, through the one allow-listed unpickler."""
    from ckptfn.io.dcp import _dcp  # the safe reader load_sharded uses

    return _dcp().reader(path).read_metadata()


def _items(metadata: object, tally: _Tally) -> list[_Item]:
    """The storage records of a DCP tree's metadata; a chunk or value that has none is a problem."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    storage = metadata.storage_data
    for fqn, entry in metadata.state_dict_metadata.items():
        keys = [MetadataIndex(fqn)] if isinstance(entry, BytesStorageMetadata) else [
            MetadataIndex(fqn, chunk.offsets) for chunk in entry.chunks
        ]
        for key in keys:
            if key not in storage:
                where = "" if key.offset is None else f" (chunk at {list(key.offset)})"
                tally.problems.append(f"{fqn!r}{where}: DCP's .metadata records no storage for it")
    kinds = {fqn: isinstance(entry, BytesStorageMetadata) for fqn, entry in metadata.state_dict_metadata.items()}
    items = []
    for key, info in storage.items():
        if not all(type(value) is int for value in (info.offset, info.length)):
            extent = f"({info.offset!r}, {info.length!r})"
            tally.problems.append(f"{key.fqn!r}: DCP's .metadata records a malformed extent {extent}")
            continue
        items.append(_Item(str(info.relative_path), info.offset, info.length, key.fqn, kinds.get(key.fqn, False),
                           bool(getattr(info, "transform_descriptors", None))))
    return sorted(items, key=lambda item: (item.file, item.offset, item.length, item.fqn))


def _inside(name: str) -> bool:
    """Whether a shard file name stays inside the tree (relative, no ``..``).

    >>> _inside("__0_0.distcp"), _inside("../x"), _inside("/etc/passwd"), _inside("")
    (True, False, False, False)
    """
    parts = pathlib.PurePosixPath(name).parts
    return bool(parts) and not name.startswith("/") and ".." not in parts


def _open_shard(tree: pathlib.Path, name: str, users: int, tally: _Tally) -> io.BufferedReader | None:
    """A shard file, open; None (and a problem) when it is missing, elsewhere or not a regular file."""
    label = f"{name!r} (holding {users} records)"
    if not _inside(name):
        tally.problems.append(f"{label}: DCP's .metadata names a file outside the checkpoint")
        return None
    try:
        if not stat.S_ISREG(os.lstat(tree / name).st_mode):
            tally.problems.append(f"{label}: not a regular file")
            return None
        return open_regular(tree / name)
    except FileNotFoundError:
        tally.problems.append(f"{label}: missing")
    except OSError as error:
        tally.problems.append(f"{label}: cannot be opened ({describe(error)})")
    return None


def _check_item(file: io.BufferedReader, item: _Item, tally: _Tally, level: str) -> None:
    """One storage record: within its file; at the full level, its bytes (CRC32s, for an archive) and load."""
    size = os.fstat(file.fileno()).st_size
    label = f"{item.file!r} record {item.fqn!r} (bytes {item.offset}-{item.offset + item.length})"
    if item.offset < 0 or item.length < 0 or item.offset + item.length > size:
        tally.problems.append(f"{label}: lies beyond the end of the {size}-byte file")
        return
    if level != "full":
        return
    archive = not item.transformed and read_range(file, item.offset, min(4, item.length)) == ZIP_MAGIC
    members = open_archive(file, item.offset, item.length) if archive else None
    if members is None:
        if archive:
            tally.problems.append(f"{label}: damaged torch.save archive (its central directory does not parse)")
        try:
            hash_range(file, item.offset, item.length, tally)
        except Unreadable as error:
            tally.problems.append(f"{label}: {error}")
        tally.did("read")
        return
    before = len(tally.problems)
    check_records(file, item.offset, item.length, members, tally, where=f"{label}: ")
    if item.is_bytes and len(tally.problems) == before:
        _check_value_loads(file, item, tally, label)


def _check_value_loads(file: io.BufferedReader, item: _Item, tally: _Tally, label: str) -> None:
    """A non-tensor value loads with ``weights_only=True`` (as ``load_sharded`` will load it)."""
    import torch  # here, not at import: the structure level needs no torch

    try:
        torch.load(Window(file, item.offset, item.length), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for damaged bytes
        tally.problems.append(f"{label}: does not load with torch.load(weights_only=True): {describe(error)}")
    tally.did("load")


def _verify_tree(path: pathlib.Path, level: str) -> Verdict:
    tally = _Tally()
    tally.did("structure")
    try:
        read_metadata(path)
    except CheckpointError as error:
        tally.problems.append(without_path(path, error))
    try:
        items = _items(_dcp_metadata(path), tally)
    except Exception as error:  # noqa: BLE001 - a damaged pickle raises many types
        if (path / ".metadata").is_file():  # else read_metadata said it already
            tally.problems.append(f"'.metadata': cannot be read ({describe(error)})")
        return tally.verdict(path, level)
    for name, group in itertools.groupby(items, key=lambda item: item.file):
        group = list(group)
        file = _open_shard(path, name, len(group), tally)
        if file is None:
            continue
        with file:
            for item in group:
                _check_item(file, item, tally, level)
    if level == "full":
        no_checksums_note(tally, "a tree")
    return tally.verdict(path, level)


# --- the entry points --------------------------------------------------------------------------


def _is_tree(path: pathlib.Path) -> bool:
    return path.is_dir() and (path.suffix == DCP_SUFFIX or is_sharded_checkpoint(path))


def verify_checkpoint(path: str | os.PathLike, *, level: str = "full") -> Verdict:
    """Verify one checkpoint, a file or a sharded tree (``.dcp``): a ``Verdict``, never raised.

    ``level="full"`` (default) reads every byte and compares every record's CRC32
    (see the module's docstring for what each level checks); ``"structure"`` checks
    the zip directory and metadata only. Memory stays bounded (chunks of 1 MiB;
    loading maps the file). Raises ``CheckpointNotFoundError`` when nothing is at
    ``path``, ``ValueError`` for an unknown level.

    >>> import pathlib, tempfile, torch, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     manager = ckptfn.CheckpointManager(directory, ckptfn.Strategy("val_loss"))
    ...     (path,) = manager.update({"val_loss": 0.5}, {"w": torch.zeros(1000)}, epoch=0)
    ...     data = bytearray(path.read_bytes())
    ...     data[data.index(bytes(4000)) + 1234] ^= 0x10  # one flipped bit in the tensor's bytes
    ...     _ = path.write_bytes(data)
    ...     loaded = torch.load(path, weights_only=True)  # torch does not notice
    ...     verdict = verify_checkpoint(path)
    >>> verdict.ok
    False
    >>> print(*verdict.problems)
    'archive/data/0': CRC32 mismatch: its 4000 bytes at offset ... hash to 0x..., the central directory records 0x...
    """
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    path = local_path(path)
    if is_remote(path):
        store, key = store_for(path)
        if store.size(key) is None:
            raise CheckpointNotFoundError(f"{path}: no such checkpoint", path)
        return _verify_file(path, level)
    path = pathlib.Path(path)
    if not os.path.lexists(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint", str(path))
    return _verify_tree(path, level) if _is_tree(path) else _verify_file(path, level)


def _looks_like_checkpoint(path: pathlib.Path) -> bool:
    """A ``.pt``/``.pth``/``.ckpt`` name, or a regular file that starts like a zip archive."""
    if path.suffix in CHECKPOINT_SUFFIXES:
        return True
    try:
        with open_regular(path) as file:
            return file.read(4) == ZIP_MAGIC
    except OSError:
        return False


def checkpoints_in(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The checkpoints directly inside ``directory``: checkpoint files and sharded trees, sorted.

    Hidden names (temporary files and trees) are skipped, and so are files that are
    neither named like a checkpoint (``.pt``, ``.pth``, ``.ckpt``) nor zip archives.

    >>> import tempfile, torch, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     config = [ckptfn.Strategy("val_loss"), ckptfn.Every(1, filename="last.pt")]
    ...     manager = ckptfn.CheckpointManager(directory, config)
    ...     _ = manager.update({"val_loss": 0.5}, {"w": torch.ones(2)}, epoch=0)
    ...     _ = pathlib.Path(directory, "notes.txt").write_text("not a checkpoint")
    ...     [path.name for path in checkpoints_in(directory)]
    ['best_val_loss.pt', 'last.pt']
    """
    directory = pathlib.Path(directory)
    found = []
    for entry in sorted(os.scandir(directory), key=lambda entry: entry.name):
        path = directory / entry.name
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _is_tree(path):
                found.append(path)
        elif entry.is_file() and _looks_like_checkpoint(path):
            found.append(path)
    return found


def _verify_remote(url: str, level: str) -> Iterator[Verdict]:
    """A remote object, or each checkpoint-named object of a remote directory."""
    store, key = store_for(url)
    if store.size(key) is not None:
        yield verify_checkpoint(url, level=level)
        return
    for name in store.names(key):
        if not name.startswith(".") and pathlib.PurePosixPath(name).suffix in CHECKPOINT_SUFFIXES:
            yield verify_checkpoint(join(url, name), level=level)


def verify_checkpoints(paths: Iterable[str | os.PathLike], *, level: str = "full") -> Iterator[Verdict]:
    """``verify_checkpoint`` of each path in turn; a directory that is not a sharded tree
    stands for the checkpoints in it (``checkpoints_in``). A checkpoint that vanishes
    from a listed directory before its turn (pruned by a running training) is skipped.

    >>> import tempfile, torch, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     manager = ckptfn.CheckpointManager(directory, ckptfn.Strategy("val_loss"), sharded=True)
    ...     _ = manager.update({"val_loss": 0.5}, {"w": torch.ones(8)}, epoch=0)
    ...     [(pathlib.Path(v.path).name, v.ok) for v in verify_checkpoints([directory])]
    [('best_val_loss.dcp', True)]
    """
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    for path in paths:
        if is_remote(local_path(path)):
            yield from _verify_remote(local_path(path), level)
            continue
        path = pathlib.Path(local_path(path))
        if not path.is_dir() or _is_tree(path):
            yield verify_checkpoint(path, level=level)
            continue
        for found in checkpoints_in(path):
            try:
                yield verify_checkpoint(found, level=level)
            except CheckpointNotFoundError:
                continue

