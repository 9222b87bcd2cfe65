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

import collections
import contextlib
import functools
import io
import json
import os
import pathlib
import pickle
import sys
import types
import warnings
from collections.abc import Callable, Mapping

from ckptfn.core.errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError, PayloadError
from ckptfn.core.metadata import FORMAT, shape_problem
from ckptfn.core.naming import DCP_SUFFIX
from ckptfn.io import torch_internals, unpickle
from ckptfn.io.fs import REAL, FileSystem
from ckptfn.io.trees import DCP_METADATA, Unsafe, check_blob, check_dcp_metadata, check_entries, open_in_tree, read_in_tree

__all__ = [
    "DCP_SUFFIX",
    "METADATA_NAME",
    "is_sharded_checkpoint",
    "load_consolidated",
    "load_sharded",
    "read_sharded_metadata",
    "prepare_shards",
    "start_shards",
    "write_shards",
]

METADATA_NAME = "ckptfn.json"


def _exists(path: pathlib.Path) -> bool:
    return os.path.lexists(path)


# --- reading -------------------------------------------------------------------------------


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a DCP checkpoint (has DCP's ``.metadata``)."""
    path = pathlib.Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file()


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
    if not (path / DCP_METADATA).is_file():
        raise CheckpointError(f"{path}: not a complete torch.distributed.checkpoint directory (no {DCP_METADATA})")


#: The most bytes ``ckptfn.json`` may hold (metadata is small: at most MAX_VALUES values).
MAX_METADATA_BYTES = 16 * 1024**2


def read_sharded_metadata(path: str | os.PathLike) -> dict:
    """The ckptfn metadata of a sharded checkpoint directory (its ``ckptfn.json``); no tensor is read.

    ``ckptfn.json`` must be a regular file inside the tree (never a link, FIFO or
    device) of at most ``MAX_METADATA_BYTES``, holding bounded metadata
    (``ckptfn.core.metadata.shape_problem``); else ``CheckpointError``.
    """
    path = pathlib.Path(path)
    _require_tree(path)
    if not _exists(path / METADATA_NAME):
        raise CheckpointError(
            f"{path}: not a ckptfn checkpoint (no {METADATA_NAME}); a plain DCP checkpoint loads with "
            "torch.distributed.checkpoint.load"
        )
    try:
        metadata = json.loads(read_in_tree(path, METADATA_NAME, MAX_METADATA_BYTES).decode("utf-8"))
    except Unsafe as error:
        raise CheckpointError(str(error)) from None
    except RecursionError:
        raise CheckpointError(f"{path / METADATA_NAME}: cannot be read (nested too deeply)") from None
    except ValueError as error:  # not UTF-8, not JSON, a number with too many digits
        raise CheckpointError(
            f"{path / METADATA_NAME}: cannot be read ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ckptfn checkpoint (no {FORMAT!r} metadata in {METADATA_NAME})")
    problem = shape_problem(metadata)
    if problem is not None:
        raise CheckpointError(f"{path / METADATA_NAME}: refused: {problem}")
    check_entries(path)
    return metadata


_DCP_CLASSES = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    )]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo")]
)
_PATH_CLASSES = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")


@functools.cache
def _metadata_globals() -> dict[tuple[str, str], object]:
    """The allow-list of ``_resolve_metadata_global``, built once, from modules DCP has imported."""
    import torch  # lazily: reading ckptfn.json needs no torch
    import torch.distributed.checkpoint.filesystem  # noqa: F401 - DCP imports both itself
    import torch.distributed.checkpoint.metadata  # noqa: F401

    allowed: dict[tuple[str, str], object] = {}
    for module, name in _DCP_CLASSES:
        found = vars(sys.modules[module]).get(name)
        if isinstance(found, type):
            allowed[(module, name)] = found
    allowed[("torch", "Size")] = torch.Size
    for name, value in vars(torch).items():  # vars, not getattr: torch imports submodules on attribute access
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    allowed[("torch.serialization", "_get_layout")] = torch_internals.layout_from_name
    allowed.update({("pathlib", name): getattr(pathlib, name) for name in _PATH_CLASSES})
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


def _resolve_metadata_global(module: str, name: str) -> object:
    """What DCP's ``.metadata`` may name, by exact (module, name) (see ``_DCP_CLASSES``); None
    (refused) for anything else. Nothing is imported on a pickle's say-so."""
    return _metadata_globals().get((module, name))


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
    from torch.distributed.checkpoint import filesystem, metadata as records

    allowed = _metadata_globals()  # the record classes, by the names DCP's pickle uses
    classes = types.SimpleNamespace(
        StorageInfo=allowed.get(("torch.distributed.checkpoint.filesystem", "_StorageInfo")),
        **{name: allowed.get(("torch.distributed.checkpoint.metadata", name))
           for name in ("Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata")},
    )

    class TreeOnly(filesystem.FileSystem):
        """DCP's file access, limited to reading regular files directly inside one tree."""

        def __init__(self, tree: pathlib.Path) -> None:
            super().__init__()
            self.tree = tree

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            path = pathlib.Path(path)
            if mode != "rb" or path.parent != self.tree:
                raise CheckpointError(f"{path}: DCP asked to open it with {mode!r}; a reader only reads files of {self.tree}")
            try:
                file, _ = open_in_tree(self.tree, path.name)
            except Unsafe as error:
                raise CheckpointError(str(error)) from None
            with file:
                yield file

    class SafeReader(FileSystemReader):
        def __init__(self, path) -> None:
            super().__init__(path)
            self.tree = pathlib.Path(self.path)
            self.fs = TreeOnly(self.tree)

        def read_metadata(self, *args, **kwargs):
            path = self.tree / DCP_METADATA
            try:
                file, _ = open_in_tree(self.tree, DCP_METADATA)
                with file:
                    metadata = unpickle.load(file, _resolve_metadata_global)
            except Unsafe as error:
                raise CheckpointError(str(error)) from None
            except pickle.UnpicklingError as error:
                raise CheckpointError(f"{path}: refused to unpickle ({error})") from None
            except CheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 - a damaged pickle raises many types
                raise CheckpointError(f"{path}: cannot be unpickled ({type(error).__name__}: {str(error)[:200]})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = records.StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

        def _slice_file(self, file, sinfo):
            check_blob(file, f"{self.tree / sinfo.relative_path} at {sinfo.offset}", sinfo.offset, sinfo.length)
            return super()._slice_file(file, sinfo)

    def load_bytes_safely(planner, super_load_bytes, read_item, value):
        # Load with weights_only=True, then hand DCP a re-serialized copy of the (now known
        # to be safe) value: DCP's own load_bytes unpickles without weights_only.
        import torch  # lazily: reading ckptfn.json needs no torch
        obj = _safe_load_bytes(value, read_item.dest_index.fqn)
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        super_load_bytes(read_item, buffer)

    class Vetting:
        """A load planner for one tree that vets DCP's metadata against the tree before planning
        (``check_dcp_metadata``): before it allocates a tensor or DCP opens a file."""

        def __init__(self, tree: str | os.PathLike, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.tree = pathlib.Path(tree)

        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            try:
                check_dcp_metadata(self.tree, metadata, classes)
            except Unsafe as error:
                where = self.tree / DCP_METADATA
                raise CheckpointError(str(error) if str(error).startswith(str(self.tree)) else f"{where}: refused: {error}") from None
            super().set_up_planner(state_dict, metadata, is_coordinator)

        def load_bytes(self, read_item, value):
            load_bytes_safely(self, super().load_bytes, read_item, value)

    class SafeLoadPlanner(Vetting, DefaultLoadPlanner):
        pass

    empty_planner = None
    base = torch_internals.empty_state_dict_load_planner()  # what torch's own dcp_to_torch_save uses
    if base is not None:

        class SafeEmptyPlanner(Vetting, base):
            pass

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


#: DCP's warning that a save without a process group is a single process's: what we asked for.
_SINGLE_PROCESS_SAVE = "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to save"


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
                planner=api.planner(path),
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
        torch_internals.load_without_template(state_dict, reader=api.reader(path), planner=api.empty_planner(path))
    except api.failures as error:
        cause = _dcp_failure(error)
        raise CheckpointError(f"{path}: cannot be loaded ({type(cause).__name__}: {cause})") from error
    return state_dict, metadata


# --- writing -------------------------------------------------------------------------------


def _made_temp(directory: pathlib.Path, temp_name: str, coordinator: bool, fs: FileSystem) -> pathlib.Path:
    """The temporary tree ``directory/temp_name``, made (and locked) by its owner, rank 0, before
    DCP writes into it."""
    temp = directory / temp_name
    if coordinator:
        try:
            fs.mkdir(directory)
            fs.make_directory(temp)
        except OSError:  # DCP creates the directory itself and shares its error with every rank
            pass
    return temp


def _shard_failure(error: BaseException, temp: pathlib.Path, coordinator: bool, fs: FileSystem) -> Exception:
    """DCP's failure (the same on every rank: DCP gathers them) as ckptfn's error; the owner
    removes the temporary tree (else it is left for the next write's sweep)."""
    cause = _dcp_failure(error)
    if coordinator and _exists(temp):
        try:
            fs.rmtree(temp)
        except OSError:
            pass
    if isinstance(cause, PayloadError):
        return PayloadError(str(cause))
    return CheckpointWriteError(f"could not write {temp}: {type(cause).__name__}: {cause}")


def _dcp_save(asynchronous: bool, directory, temp_name: str, payload: Mapping, group, coordinator: bool, fs):
    """The temporary tree and what DCP's ``save`` (or ``async_save``) of ``payload`` into it
    returned; DCP's failure raised as ``_shard_failure`` makes it."""
    temp = _made_temp(pathlib.Path(directory), temp_name, coordinator, fs)
    api = _dcp()
    no_dist = group is None and not _initialized()
    try:
        if not isinstance(payload, Mapping):
            raise PayloadError(f"payload: a sharded checkpoint needs a mapping, got {type(payload).__name__}")
        arguments = {
            "storage_writer": api.dcp.FileSystemWriter(temp, sync_files=True),
            "planner": api.saver(),
            "process_group": group,
            "no_dist": no_dist,
        }
        if asynchronous:
            if no_dist:  # DCP warns from its own thread, where a catch_warnings here cannot reach
                warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_SAVE, category=UserWarning)
            return temp, api.dcp.async_save(dict(payload), **arguments)
        with _single_process_quietly(no_dist):
            return temp, api.dcp.save(dict(payload), **arguments)
    except api.failures as error:
        raise _shard_failure(error, temp, coordinator, fs) from error


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
    temp, _ = _dcp_save(False, directory, temp_name, payload, group, coordinator, fs)
    return temp


def prepare_shards(payload: object) -> dict:
    """``payload`` as DCP saves it: tensors (plain or sharded) as they are, other values as
    ``prepare_payload`` makes them; ``PayloadError`` now for what cannot be stored."""
    if not isinstance(payload, Mapping):
        raise PayloadError(f"payload: a sharded checkpoint needs a mapping, got {type(payload).__name__}")
    return _prepare(payload, "payload")


def start_shards(
    directory: str | os.PathLike,
    temp_name: str,
    payload: Mapping,
    *,
    group: object = None,
    coordinator: bool = True,
    fs: FileSystem = REAL,
) -> Callable[[], pathlib.Path]:
    """``write_shards``, asynchronously, through DCP's ``async_save``: every rank of ``group``
    copies its shards of ``payload`` to CPU memory now (the caller may change the payload once
    this returns) and DCP writes them on a thread of its own, whose collectives run on
    ``group`` (give it a process group of its own, with a CPU backend: it runs beside the
    training loop's collectives).

    Returns ``finish``: blocks until the tree is complete on disk and returns it, or raises
    the failure of any rank as ``write_shards`` does. Call it (on every rank) before the
    coordinator publishes the tree.
    """
    temp, future = _dcp_save(True, directory, temp_name, payload, group, coordinator, fs)
    api = _dcp()

    def finish() -> pathlib.Path:
        try:
            future.result()
        except api.failures as error:
            raise _shard_failure(error, temp, coordinator, fs) from error
        return temp

    return finish
