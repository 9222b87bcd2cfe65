"""Reading checkpoints back, always with ``torch.load(weights_only=True)``.

There is no switch to turn safe loading off and never a fallback to unsafe
unpickling: a file that needs it is refused with a ``CheckpointError``.

Every file is vetted before torch (or anything else) reads it (``ckptfn.io.peek``):
a regular file, never a FIFO or device; a zip archive whose every record torch.save
could have written (headers checked against the central directory, no data read);
a ``data.pkl`` that asks for nothing on its own say-so (no ``bytearray(3 GiB)``, no
tensor past its record) and holds bounded metadata (no cycles, at most
``MAX_DEPTH`` levels and ``MAX_VALUES`` values). So ``read_metadata`` accepts a file
only if ``load_checkpoint`` loads it, both answer within time and memory bounded by
the file's own size, and resume never adopts a best it cannot load.
"""

from __future__ import annotations

import errno
import os
import pathlib
import warnings
from collections.abc import Iterable, Mapping

from ckptfn.core.errors import CheckpointError, CheckpointNotFoundError
from ckptfn.io.fs import open_regular
from ckptfn.io.objectstore import RangeReader, is_remote, join, local_path, store_for
from ckptfn.core.config import as_config
from ckptfn.core.metadata import FORMAT, decompose
from ckptfn.io.archive import Damaged, check_archive, ranges_to_read, read_at
from ckptfn.io.peek import Scanned, checked_metadata, metadata_of, scan
from ckptfn.core.naming import DCP_SUFFIX, dcp_name, member_of, split_suffix
from ckptfn.io.dcp import is_sharded_checkpoint, load_consolidated, read_sharded_metadata
from ckptfn.core.state import State, restore_from_saves

_ZIP_MAGIC = b"PK\x03\x04"  # every file torch.save writes (and so every ckptfn file) is a zip archive

__all__ = [
    "load_checkpoint",
    "read_metadata",
    "restore_from_directory",
    "saved_metadata",
    "scan_remote",
    "visible_files",
]


def visible_files(directory: pathlib.Path) -> list[str]:
    """The non-hidden regular files of ``directory`` (temporary files are hidden), sorted."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    return sorted(entry.name for entry in entries if not entry.name.startswith(".") and _is_file(entry))


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # one entry that cannot be examined (a symlink loop, say) hides no other
        return False


def _not_found(path: pathlib.Path) -> CheckpointNotFoundError:
    directory = path.parent
    if not directory.is_dir():
        message = f"{path}: no such checkpoint (directory {directory} does not exist)"
    else:
        present = visible_files(directory)
        listing = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "")
        message = f"{path}: no such checkpoint; {directory} holds: {listing or 'no checkpoint files'}"
        sharded = directory / dcp_name(path.name)
        if sharded != path and sharded.is_dir():
            message += (
                f"; a sharded checkpoint is at {sharded} (ckptfn.load_checkpoint({str(sharded)!r}) loads it whole, "
                "ckptfn.load_sharded(path, state_dict) into a sharded state dict)"
            )
    return CheckpointNotFoundError(message, str(path))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return f"{type(error).__name__}: {line[:200]}" if line else type(error).__name__


def _checked_stream(label: object, file, size: int) -> tuple[Scanned, str]:
    """The allow-listed scan of the zip at ``file`` (``size`` bytes), or the documented error;
    and the name of its ``data.pkl``. Reads the zip's directory and that one member."""
    magic = file.read(4)
    if magic != _ZIP_MAGIC:
        what = "an empty file" if not magic else "not a torch zip archive"
        raise CheckpointError(f"{label}: not a ckptfn checkpoint ({what})")
    try:
        archive = check_archive(file, size)
    except Damaged as error:
        raise CheckpointError(f"{label}: not a ckptfn checkpoint (damaged zip archive: {error})") from None
    except CheckpointError as error:
        raise CheckpointError(f"{label}: {error}") from None
    member = archive.prefix + "data.pkl"
    try:
        data = read_at(file, *archive.members[member])
    except Damaged as error:
        raise CheckpointError(f"{label}: cannot be read ({error})") from None
    scanned = scan(data, f"{label}: {member}", archive.records())
    parts = decompose(scanned.loaded)
    if parts is not None:  # unbounded metadata is refused before torch spends time on it
        checked_metadata(parts[1], f"{label}: {member}")
    return scanned, member


def _checked_file(path: str | os.PathLike) -> tuple[pathlib.Path, Scanned, str]:
    """``path`` as a regular zip file whose structure torch.save could have written and whose
    ``data.pkl`` the allow-listed scan accepts (``ckptfn.io.peek.scan``: nothing torch would
    allocate on the pickle's say-so, no tensor past its record, bounded metadata), all read
    through one open file; else the documented error. Returns the path, the scan and the
    name of ``data.pkl``.

    torch.save stores every member uncompressed, inside the file, under one folder,
    with a local header that agrees with the central directory. A compressed
    member could expand a thousandfold (a zip bomb); a header claiming more bytes
    than the file holds, members that overlap or a local header that disagrees
    with the central directory is damage or an attack, and so is a missing
    ``data.pkl`` or ``version`` record. Headers and sizes are checked, never the
    data: the cost is one small read per member.
    """
    path = pathlib.Path(path)
    if not os.path.lexists(path):
        raise _not_found(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with open_regular(path) as file:  # a FIFO planted at a checkpoint name must not block us
            scanned, member = _checked_stream(path, file, os.fstat(file.fileno()).st_size)
    except OSError as error:
        if error.errno == errno.EINVAL:
            raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket is never a checkpoint)") from None
        raise CheckpointError(f"{path}: cannot be read ({_first_line(error)})") from error
    return path, scanned, member


#: Bytes fetched from the end of a remote checkpoint first: the end record and the central directory.
REMOTE_TAIL = 1 << 16


def scan_remote(url: str):
    """``(store, store path, scan, member)`` of a remote checkpoint, fetching only the zip's
    directory and ``data.pkl`` (range requests of ``BLOCK_SIZE``); else the documented error."""
    store, key = store_for(url)
    try:
        size = store.size(key)
        if size is None:
            raise CheckpointNotFoundError(f"{url}: no such checkpoint", url)
        reader = RangeReader(store, key, size)
        reader.prefetch([(size - REMOTE_TAIL, size)])  # the end record and (usually) the central directory
        reader.prefetch(ranges_to_read(reader, size))  # then every local header and small member, in one batch
        reader.seek(0)
        scanned, member = _checked_stream(url, reader, size)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - the store's errors (network, permissions) as one kind
        raise CheckpointError(f"{url}: cannot be read ({_first_line(error)})") from error
    return store, key, scanned, member


def _torch_load(path: pathlib.Path | str, **options) -> dict:
    """torch's ``weights_only`` loader, over a file ``_checked_file`` (or, for a URL,
    ``scan_remote``) has vetted; a remote object is read whole into memory first."""
    import io

    import torch  # here, not at import: reading metadata (ckptfn inspect) does not need torch

    try:
        if is_remote(path):
            options.pop("mmap", None)
            store, key = store_for(path)
            loaded = torch.load(io.BytesIO(store.read(key)), weights_only=True, **options)
        else:
            loaded = torch.load(path, weights_only=True, **options)
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"{path}: cannot be loaded safely ({_first_line(error)})") from error
    parts = decompose(loaded)  # the nested layout, or the flat one of Lightning checkpoints
    if parts is None:
        newer = _format_of(loaded)
        if newer is not None:
            raise CheckpointError(
                f"{path}: written by another version of ckptfn (format {newer!r}; this version reads {FORMAT!r})"
            )
        raise CheckpointError(
            f"{path}: not a ckptfn checkpoint (no {FORMAT!r} metadata); "
            "a plain torch.save file loads with torch.load(path, weights_only=True)"
        )
    checked_metadata(parts[1], str(path))
    return {"state_dict": parts[0], "metadata": parts[1]}


def _format_of(loaded: object) -> str | None:
    """The ``format`` of a file's ckptfn metadata when it is a ckptfn format other than this one's."""
    metadata = loaded.get("metadata") if isinstance(loaded, dict) else None
    found = metadata.get("format") if isinstance(metadata, dict) else None
    return found if isinstance(found, str) and found.startswith("ckptfn/") and found != FORMAT else None


def _load(path: str | os.PathLike, **options) -> dict:
    if is_remote(path):
        scan_remote(path)
        return _torch_load(path, **options)
    return _torch_load(_checked_file(path)[0], **options)


def _is_sharded(path: str | os.PathLike) -> bool:
    """A sharded checkpoint directory (or one named like it, whose errors then say what it lacks)."""
    if is_remote(path):
        return False
    return is_sharded_checkpoint(path) or (os.path.isdir(path) and pathlib.Path(path).suffix == DCP_SUFFIX)


def load_checkpoint(path: str | os.PathLike, map_location: object = "cpu") -> tuple[object, dict]:
    """``(state_dict, metadata)`` of a ckptfn checkpoint, loaded with ``weights_only=True``.

    Raises ``CheckpointNotFoundError`` (listing what the directory does hold) or
    ``CheckpointError`` for corrupt, foreign or unsafe files. A sharded checkpoint
    directory (``best_loss.dcp``) is loaded whole, into plain CPU tensors, in this
    process; to load it into sharded tensors use ``ckptfn.load_sharded``.

    >>> import tempfile, torch, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     manager = ckptfn.CheckpointManager(directory, ckptfn.Strategy("val_loss"))
    ...     _ = manager.update({"val_loss": 0.5}, {"w": torch.ones(2)}, epoch=3)
    ...     state_dict, metadata = load_checkpoint(f"{directory}/best_val_loss.pt")
    >>> state_dict, metadata["epoch"], metadata["saves"][0]["value"]
    ({'w': tensor([1., 1.])}, 3, 0.5)
    """
    path = local_path(path)
    if _is_sharded(path):
        return load_consolidated(path)
    loaded = _load(path, map_location=map_location)
    return loaded["state_dict"], loaded["metadata"]


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint (file or sharded directory) without reading its tensor data.

    The record ``load_checkpoint`` returns too: format, epoch, timestamp, saves (one
    entry per strategy the file was saved for), metrics, manager_state and versions.

    >>> import tempfile, torch, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     manager = ckptfn.CheckpointManager(directory, ckptfn.Strategy("val_loss"))
    ...     _ = manager.update({"val_loss": 0.5}, {"w": torch.ones(1000)}, epoch=3)
    ...     metadata = read_metadata(f"{directory}/best_val_loss.pt")
    >>> metadata["epoch"], [(save["metric_name"], save["value"]) for save in metadata["saves"]]
    (3, [('val_loss', 0.5)])
    >>> sorted(metadata)
    ['epoch', 'format', 'global_step', 'manager_state', 'metrics', 'saves', 'timestamp', 'versions']
    """
    path = local_path(path)
    if is_remote(path):  # the zip's directory and data.pkl only, by range requests
        _, _, scanned, member = scan_remote(path)
        metadata = metadata_of(scanned, f"{path}: {member}")
        return metadata if metadata is not None else _torch_load(path, map_location="cpu")["metadata"]
    if _is_sharded(path):
        return read_sharded_metadata(path)
    path, scanned, member = _checked_file(path)  # refuses what torch would allocate on the pickle's say-so
    metadata = metadata_of(scanned, f"{path}: {member}")
    if metadata is not None:  # plain data, nothing foreign: no need for torch
        return metadata
    return _torch_load(path, map_location="cpu", mmap=True)["metadata"]


#: What to do about a file at a watched name that cannot be judged (unreadable, damaged,
#: foreign, of another ckptfn format): refuse to go on, or warn and treat the name as empty.
UNREADABLE = ("error", "warn")


#: How much of a best ``restore_from_directory`` checks before trusting it: ``"structure"`` (what
#: ``read_metadata`` checks: the zip structure and the metadata) or ``"full"`` (every record's CRC32
#: and a ``weights_only`` load, ``ckptfn.verify_checkpoint``).
VERIFY_LEVELS = ("structure", "full")


def saved_metadata(
    directory: str | os.PathLike, filenames: Iterable[str], *, unreadable: str = "error", verify: str = "structure"
) -> dict[str, dict | None]:
    """The metadata of each named file in ``directory``; None when there is none.

    A name's sharded checkpoint (``best_loss.pt`` -> ``best_loss.dcp/``) counts too;
    when both exist the newer one (by metadata timestamp) is the truth. A file that
    exists but cannot be judged is never taken for "absent" (the next save would
    replace it): ``unreadable="error"`` raises a ``CheckpointError`` naming it;
    ``"warn"`` (only where a better error is already being raised) warns instead.
    """
    if unreadable not in UNREADABLE:
        raise ValueError(f"unreadable: expected one of {UNREADABLE}, got {unreadable!r}")
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify: expected one of {VERIFY_LEVELS}, got {verify!r}")
    directory = local_path(directory)
    found: dict[str, dict | None] = {}
    if is_remote(directory):
        for name in filenames:
            found[name] = _metadata_or_none(join(directory, name), unreadable, verify)
        return found
    directory = pathlib.Path(directory)
    for name in filenames:
        candidates = dict.fromkeys((directory / name, directory / dcp_name(name)))
        saved = [meta for path in candidates if (meta := _metadata_or_none(path, unreadable, verify)) is not None]
        found[name] = max(saved, key=lambda meta: str(meta.get("timestamp") or ""), default=None)
    return found


def _metadata_or_none(path: pathlib.Path, unreadable: str, verify: str = "structure") -> dict | None:
    try:
        metadata = read_metadata(path)
        if verify == "full":
            from ckptfn.io.verify import verify_checkpoint  # it reads metadata through this module

            verify_checkpoint(path, level="full").raise_error()
        return metadata
    except CheckpointNotFoundError:
        return None
    except CheckpointError as error:
        if unreadable == "error":
            raise CheckpointError(
                f"cannot judge the checkpoint at a watched name, so it is never replaced: {error}. "
                "Move it away (or delete it), then start again"
            ) from error
        warnings.warn(f"ignoring unreadable checkpoint: {error}", stacklevel=4)
        return None


def restore_from_directory(
    config: object, directory: str | os.PathLike, *, unreadable: str = "error", verify: str = "structure"
) -> State:
    """Resume: a ``State`` whose bests are what the checkpoint files in ``directory`` record.

    The files are the truth, not any state saved elsewhere: after a crash between
    two linked writes, no strategy believes in a best that no file holds. A
    strategy whose file is missing or was saved for another metric or mode starts
    fresh. A file that exists but cannot be judged (unreadable, damaged, foreign,
    another ckptfn format) raises a ``CheckpointError`` naming it (see
    ``saved_metadata`` for ``unreadable``). ``verify="full"`` also checks every record's
    CRC32 of each best before trusting it (``ckptfn.verify_checkpoint``): a bit flip in
    tensor data, which ``torch.load`` never notices, is then refused like any damage.

    >>> import tempfile, torch, ckptfn
    >>> config = [ckptfn.Strategy("val_loss"), ckptfn.Strategy("val_acc", mode="max")]
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     manager = ckptfn.CheckpointManager(directory, config[:1])  # val_acc never saved
    ...     _ = manager.update({"val_loss": 0.5}, {"w": torch.ones(2)}, epoch=3)
    ...     state = restore_from_directory(config, directory)
    >>> state.bests, state.steps  # steps: one past the newest file's epoch
    ((Best(value=0.5, epoch=3), Best(value=None, epoch=None)), 4)
    """
    config = as_config(config)
    names = [s.filename for s in config.strategies] + member_files(config, directory)
    found = saved_metadata(directory, names, unreadable=unreadable, verify=verify)
    steps = max((_saved_steps(meta) for meta in found.values() if meta), default=0)
    return restore_from_saves(config, found, steps)


def member_files(config: object, directory: str | os.PathLike) -> list[str]:
    """The names in ``directory`` of the top-k members of ``config``'s strategies (file form:
    a sharded member ``best-epoch=3.dcp`` of ``best.pt`` is listed as ``best-epoch=3.pt``).

    >>> import pathlib, tempfile, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     for name in ("best_acc.pt", "best_acc-epoch=2.pt", "best_acc-epoch=3.dcp", "notes.txt"):
    ...         _ = pathlib.Path(directory, name).write_bytes(b"")
    ...     member_files(ckptfn.Strategy("acc", top_k=3), directory)
    ['best_acc-epoch=2.pt', 'best_acc-epoch=3.pt']
    """
    families = [s.filename for s in as_config(config).strategies if getattr(s, "top_k", 1) > 1]
    if not families:
        return []
    directory = local_path(directory)
    try:
        if is_remote(directory):
            store, root = store_for(directory)
            listed = store.names(root)
        else:
            listed = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise CheckpointError(f"cannot list the checkpoint directory {directory}: {error}") from error
    found = set()
    for filename in families:
        suffix = split_suffix(filename)[1]
        tree = dcp_name(filename)
        for name in listed:
            if member_of(name, filename):
                found.add(name)
            elif member_of(name, tree):
                found.add(split_suffix(name)[0] + suffix)
    return sorted(found)


def _saved_steps(metadata: Mapping) -> int:
    state = metadata.get("manager_state")
    steps = state.get("steps") if isinstance(state, Mapping) else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0 else 0
