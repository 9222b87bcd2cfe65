"""What a sharded checkpoint tree must be before DCP reads any of it.

DCP opens the files its ``.metadata`` names and unpickles values stored inside them;
a hostile or damaged tree must never make it read outside the tree, block on a FIFO,
allocate on a file's say-so or load another run's tensors. ``check_entries`` checks
the tree's listing, ``check_dcp_metadata`` every record DCP's metadata names (a
plain file name inside the tree, a regular file, offsets within it, tensor sizes that
fit their shards), and ``check_blob`` each stored value as a checkpoint file is
checked (``ckptfn.io.archive``, ``ckptfn.io.peek``). Every refusal is ``Unsafe``, which
the readers turn into a ``CheckpointError`` naming the tree.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import stat
import types

from ckptfn.core.errors import CheckpointError
from ckptfn.core.metadata import MAX_DEPTH
from ckptfn.io.archive import Damaged, Window, check_archive, read_at
from ckptfn.io.fs import open_regular
from ckptfn.io.peek import scan

__all__ = ["DCP_METADATA", "Unsafe", "check_blob", "check_dcp_metadata", "check_entries", "open_in_tree", "read_in_tree"]

#: DCP's own metadata file inside a tree.
DCP_METADATA = ".metadata"


class Unsafe(Exception):
    """A file of the tree is not a regular file inside it (the message says which and why)."""


def open_in_tree(tree: pathlib.Path, name: object) -> tuple[io.BufferedReader, int]:
    """``tree/name`` opened for reading, with its size, if it is a regular file directly inside
    ``tree``: ``name`` one plain file name (no separator, not ``..``, not absolute), the entry
    no symlink, FIFO or device (checked on the open file too, so a swap after the check is caught)."""
    if type(name) is not str or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise Unsafe(f"{tree}: {name!r:.200} is not the name of a file inside the tree")
    path = tree / name
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise Unsafe(f"{path}: missing") from None
    except OSError as error:
        raise Unsafe(f"{path}: cannot be read ({error.strerror or error})") from None
    if stat.S_ISLNK(before.st_mode):
        raise Unsafe(f"{path}: is a symlink (a tree's files are never links: it could point at another run's files)")
    if not stat.S_ISREG(before.st_mode):
        raise Unsafe(f"{path}: not a regular file (a FIFO, device or socket is never part of a checkpoint)")
    try:
        file = open_regular(path)
    except OSError as error:
        raise Unsafe(f"{path}: cannot be read ({error.strerror or error})") from None
    after = os.fstat(file.fileno())
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        file.close()
        raise Unsafe(f"{path}: was replaced while being opened")
    return file, after.st_size


def read_in_tree(tree: pathlib.Path, name: str, limit: int) -> bytes:
    """The bytes of ``tree/name`` (see ``open_in_tree``), at most ``limit`` of them."""
    file, size = open_in_tree(tree, name)
    with file:
        if size > limit:
            raise Unsafe(f"{tree / name}: {size} bytes, more than the {limit} it may hold")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise Unsafe(f"{tree / name}: more than the {limit} bytes it may hold")
    return data


def check_entries(tree: pathlib.Path) -> None:
    """Every entry of a tree is a regular file (DCP writes nothing else): a symlink, FIFO, device or
    folder there is refused before any reader opens it."""
    try:
        entries = list(os.scandir(tree))
    except OSError as error:
        raise CheckpointError(f"{tree}: cannot be listed ({error.strerror or error})") from None
    for entry in entries:
        if entry.is_symlink():
            raise CheckpointError(f"{tree / entry.name}: is a symlink (a tree's files are never links: it could point "
                                  "at another run's files)")
        if not entry.is_file(follow_symlinks=False):
            raise CheckpointError(f"{tree / entry.name}: not a regular file (a FIFO, device, socket or folder is never "
                                  "part of a sharded checkpoint)")


#: Every global DCP's ``.metadata`` may name, exactly: what DCP writes for plain and sharded
#: tensors and byte values (``tests/io/test_dcp.py`` lists them from real saves), besides
#: torch sizes, dtypes and layouts, paths and ``OrderedDict``.
def check_blob(file, where: str, offset: int, length: int) -> None:
    """One value of a shard file (a ``torch.save`` archive DCP will ``torch.load``), vetted as a
    checkpoint file is: its zip structure, and a ``data.pkl`` that asks torch to allocate nothing
    on its say-so (``ckptfn.io.peek``)."""
    window = Window(file, offset, length)
    try:
        archive = check_archive(window, length)
        member = archive.prefix + "data.pkl"
        scan(read_at(window, *archive.members[member]), f"{where}: {member}", archive.records())
    except Damaged as error:
        raise CheckpointError(f"{where}: not a torch.save archive ({error})") from None
    except CheckpointError as error:
        raise CheckpointError(f"{where}: {error}" if not str(error).startswith(where) else str(error)) from None


def _product(numbers: object) -> int:
    total = 1
    for number in numbers:
        if type(number) is not int or number < 0:
            raise Unsafe(f"size {tuple(numbers)!r:.80} is not made of non-negative ints")
        total *= number
    return total


def check_dcp_metadata(tree: pathlib.Path, metadata: object, classes: types.SimpleNamespace) -> None:
    """Refuse a ``.metadata`` that would make DCP open a file outside the tree (or a link, FIFO
    or device in it), read outside a file, decompress, allocate more than the shard files hold,
    or build a list longer than the checkpoint has values."""
    if type(metadata) is not classes.Metadata:
        raise Unsafe(f"holds a {type(metadata).__name__}, not DCP's Metadata")
    storage, tensors, planner_data = metadata.storage_data, metadata.state_dict_metadata, metadata.planner_data
    if type(storage) is not dict or type(tensors) is not dict or not isinstance(planner_data, (dict, type(None))):
        raise Unsafe("its storage_data, state_dict_metadata or planner_data is not a dict")
    files: dict[str, int] = {}
    stored: collections.Counter = collections.Counter()
    for index, info in storage.items():
        if type(index) is not classes.MetadataIndex or type(info) is not classes.StorageInfo:
            raise Unsafe(f"storage_data maps {type(index).__name__} to {type(info).__name__}")
        if info.transform_descriptors:
            raise Unsafe(
                f"{index.fqn!r:.80} is stored through DCP extensions {info.transform_descriptors!r:.80} (ckptfn writes none)"
            )
        name = info.relative_path
        if name not in files:
            file, files[name] = open_in_tree(tree, name)
            file.close()
        if not (type(info.offset) is int and type(info.length) is int and 0 <= info.offset
                and 0 <= info.length <= files[name] - info.offset):
            raise Unsafe(f"{index.fqn!r:.80}: bytes {info.offset!r:.20}+{info.length!r:.20} lie outside {tree / name}")
        stored[index.fqn] += info.length
    for fqn, entry in tensors.items():
        if type(entry) is classes.BytesStorageMetadata:
            continue
        if type(entry) is not classes.TensorStorageMetadata or type(entry.chunks) is not list:
            raise Unsafe(f"{fqn!r:.80}: {type(entry).__name__} is not a DCP storage record")
        numel = _product(entry.size)
        held = sum(_product(chunk.sizes) for chunk in entry.chunks)
        itemsize = getattr(entry.properties.dtype, "itemsize", 1)
        if numel > held or held * itemsize > stored[fqn]:
            raise Unsafe(
                f"{fqn!r:.80}: a tensor of {numel} elements in chunks of {held}, but its shards hold {stored[fqn]} bytes"
            )
    for fqn, where in (planner_data or {}).items():
        if type(where) not in (tuple, list) or not 0 < len(where) <= MAX_DEPTH:
            raise Unsafe(f"planner_data[{fqn!r:.80}] is not a key path of at most {MAX_DEPTH} keys")
        for key in where:
            if not (type(key) is str or (type(key) is int and 0 <= key < len(tensors))):
                raise Unsafe(f"planner_data[{fqn!r:.80}]: key {key!r:.40} (a list index must be below {len(tensors)})")
