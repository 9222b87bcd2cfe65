"""Reading checkpoints back, always with ``torch.load(weights_only=True)``.

There is no switch to turn safe loading off and never a fallback to unsafe
unpickling: a file that needs it is refused with a ``CheckpointError``.
"""

from __future__ import annotations

import errno
import os
import pathlib
import warnings
import zipfile
from collections.abc import Iterable, Mapping


from ckptfn.core.errors import CheckpointError, CheckpointNotFoundError
from ckptfn.io.fs import open_regular
from ckptfn.core.config import as_config
from ckptfn.core.metadata import FORMAT, decompose
from ckptfn.io.peek import peek_metadata
from ckptfn.core.naming import DCP_SUFFIX, dcp_name
from ckptfn.io.dcp import is_sharded_checkpoint, load_consolidated, read_sharded_metadata
from ckptfn.core.state import State, restore_from_saves

_ZIP_MAGIC = b"PK\x03\x04"  # every file torch.save writes (and so every ckptfn file) is a zip archive

__all__ = [
    "load_checkpoint",
    "read_metadata",
    "restore_from_directory",
    "saved_metadata",
    "visible_files",
]


def visible_files(directory: pathlib.Path) -> list[str]:
    """The non-hidden regular files of ``directory`` (temporary files are hidden), sorted."""
    try:
        return sorted(
            entry.name
            for entry in os.scandir(directory)
            if not entry.name.startswith(".") and entry.is_file()
        )
    except OSError:
        return []


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


def _check_members(path: pathlib.Path, file) -> None:
    """Refuse zip members torch.save never writes, before torch allocates memory for them.

    torch.save stores every member uncompressed, inside the file. A compressed
    member could expand a thousandfold (a zip bomb), and a header claiming more
    bytes than the file holds is damage or an attack.
    """
    size = os.fstat(file.fileno()).st_size
    try:
        members = zipfile.ZipFile(file).infolist()
    except Exception as error:  # zipfile raises many types for damaged archives
        raise CheckpointError(f"{path}: not a ckptfn checkpoint (damaged zip archive: {_first_line(error)})") from error
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: zip member {member.filename!r} is compressed, which torch.save never does "
                "(refused: it could be a zip bomb)"
            )
        if member.file_size != member.compress_size or member.header_offset + member.compress_size > size:
            raise CheckpointError(
                f"{path}: zip member {member.filename!r} claims {member.file_size} bytes, more than the "
                f"{size}-byte file holds"
            )


def _checked_file(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as a regular zip file whose members torch.save could have written, else the documented error."""
    path = pathlib.Path(path)
    if not os.path.lexists(path):
        raise _not_found(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with open_regular(path) as file:  # a FIFO planted at a checkpoint name must not block us
            magic = file.read(4)
            if magic == _ZIP_MAGIC:
                _check_members(path, file)
    except OSError as error:
        if error.errno == errno.EINVAL:
            raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket is never a checkpoint)") from None
        raise CheckpointError(f"{path}: cannot be read ({_first_line(error)})") from error
    if magic != _ZIP_MAGIC:
        what = "an empty file" if not magic else "not a torch zip archive"
        raise CheckpointError(f"{path}: not a ckptfn checkpoint ({what})")
    return path


def _torch_load(path: pathlib.Path, **options) -> dict:
    import torch  # here, not at import: reading metadata (ckptfn inspect) does not need torch

    try:
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
    return {"state_dict": parts[0], "metadata": parts[1]}


def _format_of(loaded: object) -> str | None:
    """The ``format`` of a file's ckptfn metadata when it is a ckptfn format other than this one's."""
    metadata = loaded.get("metadata") if isinstance(loaded, dict) else None
    found = metadata.get("format") if isinstance(metadata, dict) else None
    return found if isinstance(found, str) and found.startswith("ckptfn/") and found != FORMAT else None


def _load(path: str | os.PathLike, **options) -> dict:
    return _torch_load(_checked_file(path), **options)


def _is_sharded(path: str | os.PathLike) -> bool:
    """A sharded checkpoint directory (or one named like it, whose errors then say what it lacks)."""
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
    ['epoch', 'format', 'manager_state', 'metrics', 'saves', 'timestamp', 'versions']
    """
    if _is_sharded(path):
        return read_sharded_metadata(path)
    path = _checked_file(path)
    metadata = peek_metadata(path)  # without torch, when the allow-listed reader can vouch for the file
    if metadata is not None:
        return metadata
    return _torch_load(path, map_location="cpu", mmap=True)["metadata"]


#: What to do about a file at a watched name that cannot be judged (unreadable, damaged,
#: foreign, of another ckptfn format): refuse to go on, or warn and treat the name as empty.
UNREADABLE = ("error", "warn")


def saved_metadata(
    directory: str | os.PathLike, filenames: Iterable[str], *, unreadable: str = "error"
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
    directory = pathlib.Path(directory)
    found: dict[str, dict | None] = {}
    for name in filenames:
        candidates = dict.fromkeys((directory / name, directory / dcp_name(name)))
        saved = [meta for path in candidates if (meta := _metadata_or_none(path, unreadable)) is not None]
        found[name] = max(saved, key=lambda meta: str(meta.get("timestamp") or ""), default=None)
    return found


def _metadata_or_none(path: pathlib.Path, unreadable: str) -> dict | None:
    try:
        return read_metadata(path)
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


def restore_from_directory(config: object, directory: str | os.PathLike, *, unreadable: str = "error") -> State:
    """Resume: a ``State`` whose bests are what the checkpoint files in ``directory`` record.

    The files are the truth, not any state saved elsewhere: after a crash between
    two linked writes, no strategy believes in a best that no file holds. A
    strategy whose file is missing or was saved for another metric or mode starts
    fresh. A file that exists but cannot be judged (unreadable, damaged, foreign,
    another ckptfn format) raises a ``CheckpointError`` naming it (see
    ``saved_metadata`` for ``unreadable``).

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
    found = saved_metadata(directory, (s.filename for s in config.strategies), unreadable=unreadable)
    steps = max((_saved_steps(meta) for meta in found.values() if meta), default=0)
    return restore_from_saves(config, found, steps)


def _saved_steps(metadata: Mapping) -> int:
    state = metadata.get("manager_state")
    steps = state.get("steps") if isinstance(state, Mapping) else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0 else 0
