"""Sharded checkpoints: ``torch.distributed.checkpoint`` (DCP) directories.

A sharded snapshot of ``best_loss.pt`` is the directory ``best_loss.dcp/``: DCP's
files (``.metadata``, ``__<rank>_<n>.distcp``) plus ``ckptfn.json``, the same
metadata record a checkpoint file holds (format, epoch, timestamp, saves,
metrics, manager_state, versions).

Writing (one call, all ranks): ``write_shards`` has every rank write its shards
into one hidden temporary tree named by rank 0 (DCP ends with a collective, so
when it returns every shard and DCP's ``.metadata`` are on disk); then rank 0
alone publishes that tree with the one publish protocol
(``ckptfn.io.write.commit_tree``, ``ckptfn.io.publish``), exactly as files are.

Reading never unpickles arbitrary objects: DCP's ``.metadata`` goes through the
one allow-listed unpickler (``ckptfn.io.unpickle``) with DCP's own record classes,
and non-tensor values load with ``torch.load(weights_only=True)``.

``torch.distributed.checkpoint`` is imported only when a sharded checkpoint is
written or read, so single-process users never pay for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import importlib
import io
import json
import os
import pathlib
import pickle
import types
import warnings
from collections.abc import Mapping

from ckptfn.core.errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError, PayloadError
from ckptfn.core.metadata import FORMAT
from ckptfn.core.naming import DCP_SUFFIX
from ckptfn.io import torch_internals, unpickle
from ckptfn.io.fs import REAL, FileSystem

__all__ = [
    "DCP_SUFFIX",
    "METADATA_NAME",
    "is_sharded_checkpoint",
    "load_consolidated",
    "load_sharded",
    "read_sharded_metadata",
    "write_shards",
]

METADATA_NAME = "ckptfn.json"
_DCP_METADATA = ".metadata"


def _exists(path: pathlib.Path) -> bool:
    return os.path.lexists(path)


# --- reading -------------------------------------------------------------------------------


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a DCP checkpoint (has DCP's ``.metadata``)."""
    path = pathlib.Path(path)
    return path.is_dir() and (path / _DCP_METADATA).is_file()


def _listing(directory: pathlib.Path) -> str:
    try:
        names = sorted(name for name in os.listdir(directory) if not name.startswith("."))
    except OSError:
        return "nothing readable"
    return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") or "no checkpoints"


def _require_tree(path: pathlib.Path) -> None:
    if not _exists(path):
        if not path.parent.is_dir():
            raise CheckpointNotFoundError(
                f"{path}: no such sharded checkpoint (directory {path.parent} does not exist)", str(path)
            )
        raise CheckpointNotFoundError(
            f"{path}: no such sharded checkpoint; {path.parent} holds: {_listing(path.parent)}", str(path)
        )
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: a file, not a sharded checkpoint directory (load it with ckptfn.load_checkpoint)"
        )
    if not (path / _DCP_METADATA).is_file():
        raise CheckpointError(f"{path}: not a complete torch.distributed.checkpoint directory (no {_DCP_METADATA})")


def read_sharded_metadata(path: str | os.PathLike) -> dict:
    """The ckptfn metadata of a sharded checkpoint directory (its ``ckptfn.json``); no tensor is read."""
    path = pathlib.Path(path)
    _require_tree(path)
    try:
        with open(path / METADATA_NAME, "rb") as file:
            metadata = json.loads(file.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: not a ckptfn checkpoint (no {METADATA_NAME}); a plain DCP checkpoint loads with "
            "torch.distributed.checkpoint.load"
        ) from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / METADATA_NAME}: cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ckptfn checkpoint (no {FORMAT!r} metadata in {METADATA_NAME})")
    return metadata


_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_PATH_CLASSES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}


def _resolve_metadata_global(module: str, name: str) -> object:
    """What DCP's ``.metadata`` may name: DCP's own record classes, torch sizes/dtypes,
    paths and a few containers; None (refused) for anything else."""
    import torch  # lazily: reading ckptfn.json needs no torch

    if module in _METADATA_MODULES and not name.startswith("__"):
        candidate = getattr(importlib.import_module(module), name, None)
        if isinstance(candidate, type) and (dataclasses.is_dataclass(candidate) or issubclass(candidate, enum.Enum)):
            return candidate
        return None
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
        return getattr(torch, name)
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch_internals.layout_from_name
    if module == "pathlib" and name in _PATH_CLASSES:
        return getattr(pathlib, name)
    return _CONTAINERS.get((module, name))


_CONTAINERS = {("collections", "OrderedDict"): __import__("collections").OrderedDict, ("builtins", "set"): set,
               ("builtins", "frozenset"): frozenset}


def _safe_load_bytes(value: io.BytesIO, fqn: str) -> object:
    import torch  # lazily: reading ckptfn.json needs no torch
    try:
        return torch.load(value, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"value {fqn!r} does not load with torch.load(weights_only=True): {error}") from error


@functools.cache
def _dcp():
    """DCP and ckptfn's safe reader/planners over it, built on first use (imports DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = pathlib.Path(self.path) / _DCP_METADATA
            with open(path, "rb") as file:
                try:
                    metadata = unpickle.load(file, _resolve_metadata_global)
                except pickle.UnpicklingError as error:
                    raise CheckpointError(f"{path}: refused to unpickle ({error})") from error
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    def load_bytes_safely(planner, super_load_bytes, read_item, value):
        # Load with weights_only=True, then hand DCP a re-serialized copy of the (now known
        # to be safe) value: DCP's own load_bytes unpickles without weights_only.
        import torch  # lazily: reading ckptfn.json needs no torch
        obj = _safe_load_bytes(value, read_item.dest_index.fqn)
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        super_load_bytes(read_item, buffer)

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            load_bytes_safely(self, super().load_bytes, read_item, value)

    empty_planner = None
    base = torch_internals.empty_state_dict_load_planner()  # what torch's own dcp_to_torch_save uses
    if base is not None:

        class SafeEmptyPlanner(base):
            def load_bytes(self, read_item, value):
                load_bytes_safely(self, super().load_bytes, read_item, value)

        empty_planner = SafeEmptyPlanner

    class CheckingSavePlanner(DefaultSavePlanner):
        """Converts/rejects non-tensor values inside DCP's planning step, so an error on
        one rank reaches every rank (DCP gathers planning errors) instead of a hang."""

        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
            super().set_up_planner(_prepare(state_dict, "payload"), storage_meta, is_coordinator)

    return types.SimpleNamespace(
        dcp=dcp,
        reader=SafeReader,
        planner=SafeLoadPlanner,
        empty_planner=empty_planner,
        saver=CheckingSavePlanner,
        failures=(Exception, dcp.api.CheckpointException),  # DCP's is a BaseException
    )


def _initialized() -> bool:
    import torch  # lazily: reading ckptfn.json needs no torch
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _single_process_quietly(no_dist: bool):
    """Yield ``no_dist``; when True, silence DCP's warning that it assumes a single process (we asked for it)."""
    if not no_dist:
        yield False
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield True


def _prepare(value: object, path: str) -> object:
    """Tensors (plain or sharded) stay as they are; other values as ``prepare_payload`` makes them."""
    import torch  # lazily: reading ckptfn.json needs no torch
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {key: _prepare(item, f"{path}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_prepare(item, f"{path}[{index}]") for index, item in enumerate(value))
    from ckptfn.io.payload import prepare_payload  # imports torch: only when writing

    return prepare_payload(value, path)


def _dcp_failure(error: BaseException) -> BaseException:
    """The first real cause inside DCP's ``CheckpointException`` (which wraps each rank's error)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, Mapping):
        for rank in sorted(failures):
            wrapped = failures[rank]
            cause = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            if isinstance(cause, BaseException):
                return cause
    return error


def load_sharded(path: str | os.PathLike, state_dict: dict, *, process_group: object = None) -> tuple[dict, dict]:
    """Load a sharded checkpoint into ``state_dict`` in place: ``(state_dict, metadata)``.

    Call it on every rank with a state dict shaped like the one saved (e.g. from
    ``torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer)``);
    each rank reads the pieces its shards need, so the saved and the loading
    sharding may differ (DCP reshards). Then apply it, e.g. with ``set_state_dict``.

    In a single process (no process group), plain tensors work too:

    >>> import tempfile, torch, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     manager = ckptfn.CheckpointManager(directory, ckptfn.Strategy("val_loss"), sharded=True)
    ...     [path.name for path in manager.update({"val_loss": 0.5}, {"w": torch.arange(4.0)}, epoch=0)]
    ...     template = {"w": torch.zeros(4)}
    ...     state_dict, metadata = load_sharded(f"{directory}/best_val_loss.dcp", template)
    ['best_val_loss.dcp']
    >>> state_dict is template, template["w"].tolist(), metadata["saves"][0]["value"]
    (True, [0.0, 1.0, 2.0, 3.0], 0.5)
    """
    path = pathlib.Path(path)
    metadata = read_sharded_metadata(path)
    api = _dcp()
    try:
        with _single_process_quietly(process_group is None and not _initialized()) as no_dist:
            api.dcp.load(
                state_dict,
                storage_reader=api.reader(path),
                planner=api.planner(),
                process_group=process_group,
                no_dist=no_dist,
            )
    except api.failures as error:
        cause = _dcp_failure(error)
        if isinstance(cause, CheckpointError):
            raise type(cause)(f"{path}: {cause}") from error
        raise CheckpointError(f"{path}: cannot be loaded ({type(cause).__name__}: {cause})") from error
    return state_dict, metadata


def load_consolidated(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, metadata)`` of a sharded checkpoint, gathered into plain tensors in this process.

    Needs no process group and no model: every tensor is rebuilt whole (a sharded
    parameter becomes its full tensor). Memory: the whole checkpoint.
    """
    path = pathlib.Path(path)
    metadata = read_sharded_metadata(path)
    api = _dcp()
    if api.empty_planner is None:  # pragma: no cover - depends on the torch version
        raise CheckpointError(f"{path}: this torch version cannot load a DCP checkpoint without a template; use load_sharded")
    state_dict: dict = {}
    try:
        torch_internals.load_without_template(state_dict, reader=api.reader(path), planner=api.empty_planner())
    except api.failures as error:
        cause = _dcp_failure(error)
        raise CheckpointError(f"{path}: cannot be loaded ({type(cause).__name__}: {cause})") from error
    return state_dict, metadata


# --- writing -------------------------------------------------------------------------------


def write_shards(
    directory: str | os.PathLike,
    temp_name: str,
    payload: Mapping,
    *,
    group: object = None,
    coordinator: bool = True,
    fs: FileSystem = REAL,
) -> pathlib.Path:
    """Collective: every rank of ``group`` writes its shards of ``payload`` into
    ``directory/temp_name`` (the same name on every rank, chosen by rank 0) with DCP.
    ``group=None`` with no process group initialized is a single process.

    Returns the temporary tree, complete on disk (DCP's last step is collective).
    A failure on any rank (a ``PayloadError``, a full disk) is raised on every
    rank as a ``CheckpointWriteError`` and the temporary tree is removed. Then
    the coordinator alone publishes it (``ckptfn.io.write.commit_tree``).
    """
    directory = pathlib.Path(directory)
    temp = directory / temp_name
    api = _dcp()
    if coordinator:
        try:
            fs.mkdir(directory)
        except OSError:  # DCP creates the directory itself below and shares its error with every rank
            pass
    try:
        if not isinstance(payload, Mapping):
            raise PayloadError(f"payload: a sharded checkpoint needs a mapping, got {type(payload).__name__}")
        with _single_process_quietly(group is None and not _initialized()) as no_dist:
            api.dcp.save(
                dict(payload),
                storage_writer=api.dcp.FileSystemWriter(temp, sync_files=True),
                planner=api.saver(),
                process_group=group,
                no_dist=no_dist,
            )
    except api.failures as error:
        cause = _dcp_failure(error)
        if coordinator and _exists(temp):
            try:
                fs.rmtree(temp)
            except OSError:
                pass  # left for the next write's sweep
        if isinstance(cause, PayloadError):
            raise PayloadError(str(cause)) from error
        raise CheckpointWriteError(f"could not write {temp}: {type(cause).__name__}: {cause}") from error
    return temp
