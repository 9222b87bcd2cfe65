"""Reading checkpoints back, always with ``torch.load(weights_only=True)``.

There is no switch to turn safe loading off and never a fallback to unsafe
unpickling: a file that needs it is refused with a ``CheckpointError``.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from collections.abc import Iterable, Mapping

import torch

from ckptfn._errors import CheckpointError, CheckpointNotFoundError
from ckptfn._config import as_config
from ckptfn._metadata import FORMAT
from ckptfn._state import State, restore_from_saves

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
    return CheckpointNotFoundError(message, str(path))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return f"{type(error).__name__}: {line[:200]}" if line else type(error).__name__


def _load(path: str | os.PathLike, **options) -> dict:
    path = pathlib.Path(path)
    if not os.path.lexists(path):
        raise _not_found(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({_first_line(error)})") from error
    if magic != _ZIP_MAGIC:
        what = "an empty file" if not magic else "not a torch zip archive"
        raise CheckpointError(f"{path}: not a ckptfn checkpoint ({what})")
    try:
        loaded = torch.load(path, weights_only=True, **options)
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"{path}: cannot be loaded safely ({_first_line(error)})") from error
    if not (
        isinstance(loaded, dict)
        and set(loaded) == {"state_dict", "metadata"}
        and isinstance(loaded["metadata"], Mapping)
        and loaded["metadata"].get("format") == FORMAT
    ):
        raise CheckpointError(
            f"{path}: not a ckptfn checkpoint (no {FORMAT!r} metadata); "
            "a plain torch.save file loads with torch.load(path, weights_only=True)"
        )
    return loaded


def load_checkpoint(path: str | os.PathLike, map_location: object = "cpu") -> tuple[object, dict]:
    """``(state_dict, metadata)`` of a ckptfn checkpoint, loaded with ``weights_only=True``.

    Raises ``CheckpointNotFoundError`` (listing what the directory does hold) or
    ``CheckpointError`` for corrupt, foreign or unsafe files.
    """
    loaded = _load(path, map_location=map_location)
    return loaded["state_dict"], loaded["metadata"]


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint without reading its tensor data (memory-mapped load)."""
    return _load(path, map_location="cpu", mmap=True)["metadata"]


def saved_metadata(directory: str | os.PathLike, filenames: Iterable[str]) -> dict[str, dict | None]:
    """The metadata of each named file in ``directory``; None when missing or unreadable.

    An unreadable file gives a ``UserWarning`` naming it: the strategy that owns
    it starts fresh, and the file is left untouched.
    """
    directory = pathlib.Path(directory)
    found: dict[str, dict | None] = {}
    for name in filenames:
        path = directory / name
        try:
            found[name] = read_metadata(path)
        except CheckpointNotFoundError:
            found[name] = None
        except CheckpointError as error:
            warnings.warn(f"ignoring unreadable checkpoint while resuming: {error}", stacklevel=3)
            found[name] = None
    return found


def restore_from_directory(config: object, directory: str | os.PathLike) -> State:
    """Resume: a ``State`` whose bests are what the checkpoint files in ``directory`` record.

    The files are the truth, not any state saved elsewhere: after a crash between
    two linked writes, no strategy believes in a best that no file holds. A
    strategy whose file is missing, unreadable or was saved for another metric or
    mode starts fresh.
    """
    config = as_config(config)
    found = saved_metadata(directory, (s.filename for s in config.strategies))
    steps = max((_saved_steps(meta) for meta in found.values() if meta), default=0)
    return restore_from_saves(config, found, steps)


def _saved_steps(metadata: Mapping) -> int:
    state = metadata.get("manager_state")
    steps = state.get("steps") if isinstance(state, Mapping) else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0 else 0
