"""Sharded checkpoints: ``torch.distributed.checkpoint`` (DCP) directories, committed atomically.

A sharded snapshot of ``best_loss.pt`` is the directory ``best_loss.dcp/``: DCP's
files (``.metadata``, ``__<rank>_<n>.distcp``) plus ``ckptfn.json``, the same
metadata record a checkpoint file holds (format, epoch, timestamp, saves,
metrics, manager_state, versions).

The write protocol (one call, all ranks):

1. Every rank writes its shards with ``torch.distributed.checkpoint.save`` into
   one hidden temporary directory (``.ckptfn-dcp.<pid>.<host>.<token>.best_loss.dcp.tmp``,
   named by rank 0). DCP ends with a collective, so when it returns every shard
   and DCP's ``.metadata`` are on disk.
2. Rank 0 writes ``ckptfn.json`` into it and fsyncs it, then publishes it under
   each target name: a new name by ``rename``; an existing one by an atomic
   exchange (``renameat2(RENAME_EXCHANGE)``) after which the old tree, now under
   the temporary name, is removed. With ``overwrite=False`` the old tree first
   gets its archive name (``best_corr_<UTC stamp>.dcp``) as a tree of hard links.
   Further names of the same snapshot are trees of hard links to the first one
   (copies where links are refused): one sharded write per epoch.
3. Rank 0 tells every rank how it went; all ranks return the same paths or
   raise the same ``CheckpointWriteError``.

A crash (of any rank, at any instant) leaves every final name holding its
complete old or complete new tree. Where the file system has no atomic
exchange (e.g. NFS), the old tree is first moved aside to a hidden
``....old`` name; a crash in that short window is repaired by the next sharded
write or ``resume=True`` in that directory (the aside is moved back).

Reading never unpickles arbitrary objects: DCP's ``.metadata`` goes through an
allow-list of DCP's own record classes, and non-tensor values load with
``torch.load(weights_only=True)``.

``torch.distributed.checkpoint`` is imported only when a sharded checkpoint is
written or read, so single-process users never pay for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import errno
import functools
import io
import json
import logging
import os
import pathlib
import pickle
import re
import secrets
import socket
import types
import warnings
from collections.abc import Mapping, Sequence


from ckptfn._errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError, PayloadError
from ckptfn._fs import LINKS_UNSUPPORTED, FileSystem
from ckptfn._metadata import FORMAT
from ckptfn._naming import archive_name, host_tag, split_suffix
from ckptfn._retention import plan_prune

__all__ = [
    "DCP_SUFFIX",
    "METADATA_NAME",
    "TREES",
    "TreeFileSystem",
    "commit_tree",
    "dcp_name",
    "dcp_temp_name",
    "is_sharded_checkpoint",
    "load_consolidated",
    "load_sharded",
    "new_temp_name",
    "parse_dcp_temp_name",
    "prune_trees",
    "read_sharded_metadata",
    "recover",
    "write_shards",
]

logger = logging.getLogger("ckptfn")

DCP_SUFFIX = ".dcp"
METADATA_NAME = "ckptfn.json"
_DCP_METADATA = ".metadata"
_TEMP = re.compile(
    r"^\.ckptfn-dcp\.(?P<pid>\d+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<token>[0-9a-f]+)\.(?P<name>.+)\.(?P<kind>tmp|old)$"
)

# --- names ---------------------------------------------------------------------------------


def dcp_name(filename: str) -> str:
    """The directory holding the sharded checkpoint of a strategy's ``filename``.

    >>> dcp_name("best_loss.pt"), dcp_name("last"), dcp_name("best_loss.dcp")
    ('best_loss.dcp', 'last.dcp', 'best_loss.dcp')
    """
    return split_suffix(filename)[0] + DCP_SUFFIX


def dcp_temp_name(name: str, pid: int, host: str, token: str, kind: str = "tmp") -> str:
    """A hidden name for a tree being written (``tmp``) or moved aside (``old``) by a writer.

    Deliberately not of the form of the executor's temporary files (``.ckptfn.<pid>...``):
    their cleanup removes files, these are directories.

    >>> dcp_temp_name("best_loss.dcp", 4242, "node-1.example", "9f3a")
    '.ckptfn-dcp.4242.node-1_example.9f3a.best_loss.dcp.tmp'
    """
    if kind not in ("tmp", "old"):
        raise ValueError(f"kind must be 'tmp' or 'old', got {kind!r}")
    return f".ckptfn-dcp.{pid}.{host_tag(host)}.{token}.{name}.{kind}"


def parse_dcp_temp_name(name: str) -> tuple[int, str, str, str] | None:
    """``(pid, host tag, final name, kind)`` of a ``dcp_temp_name``, else None.

    >>> parse_dcp_temp_name(dcp_temp_name("best_loss.dcp", 7, "h", "ab", "old"))
    (7, 'h', 'best_loss.dcp', 'old')
    >>> parse_dcp_temp_name("best_loss.dcp") is None
    True
    """
    match = _TEMP.match(name)
    return (int(match["pid"]), match["host"], match["name"], match["kind"]) if match else None


def new_temp_name(name: str, kind: str = "tmp") -> str:
    """A fresh temporary (or aside) tree name for ``name`` owned by this process."""
    return dcp_temp_name(name, os.getpid(), socket.gethostname(), secrets.token_hex(6), kind)


# --- the file-system seam, extended to directories -------------------------------------------

#: errno values meaning "this file system cannot exchange two names atomically".
EXCHANGE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", 95)})
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2():
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError, ImportError, TypeError):  # not Linux/glibc: no such call
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


class TreeFileSystem(FileSystem):
    """``FileSystem`` plus the directory operations of the sharded commit (tests subclass it)."""

    def rename(self, source: pathlib.Path, target: pathlib.Path) -> None:
        """Rename; for directories this fails if ``target`` is a non-empty directory."""
        os.rename(source, target)

    def exchange(self, a: pathlib.Path, b: pathlib.Path) -> None:
        """Atomically swap the names ``a`` and ``b`` (both must exist); ``OSError`` with an
        errno in ``EXCHANGE_UNSUPPORTED`` where the platform or file system cannot."""
        function = _renameat2()
        if function is None:
            raise OSError(errno.ENOSYS, "renameat2 is not available")
        import ctypes

        if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")

    def rmdir(self, path: pathlib.Path) -> None:
        os.rmdir(path)

    def rmtree(self, path: pathlib.Path) -> None:
        """Remove a directory tree, one operation at a time through this seam."""
        for entry in self.listdir(path):
            child = path / entry
            if os.path.isdir(child) and not os.path.islink(child):
                self.rmtree(child)
            else:
                self.unlink(child)
        self.rmdir(path)

    def link_tree(self, source: pathlib.Path, target: pathlib.Path) -> None:
        """Create ``target`` as a tree of hard links to ``source``'s files (copies where refused)."""
        self.mkdir(target)
        for entry in sorted(self.listdir(source)):
            child = source / entry
            if os.path.isdir(child) and not os.path.islink(child):
                self.link_tree(child, target / entry)
                continue
            try:
                self.link(child, target / entry)
            except OSError as error:
                if error.errno not in LINKS_UNSUPPORTED:
                    raise
                self.copy(child, target / entry)
        self.fsync_dir(target)


TREES = TreeFileSystem()


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


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: DCP's own record classes, torch sizes/dtypes, paths; nothing else."""

    def find_class(self, module: str, name: str) -> object:
        import torch  # lazily: reading ckptfn.json needs no torch
        found = None
        if module in _METADATA_MODULES and not name.startswith("__"):
            candidate = super().find_class(module, name)
            if isinstance(candidate, type) and (dataclasses.is_dataclass(candidate) or issubclass(candidate, enum.Enum)):
                found = candidate
        elif module == "torch" and name == "Size":
            found = torch.Size
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            found = getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            found = super().find_class(module, name)
        elif module == "pathlib" and name in _PATH_CLASSES:
            found = super().find_class(module, name)
        elif (module, name) in {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}:
            found = super().find_class(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return found


def _safe_load_bytes(value: io.BytesIO, fqn: str) -> object:
    import torch  # lazily: reading ckptfn.json needs no torch
    try:
        return torch.load(value, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"value {fqn!r} does not load with torch.load(weights_only=True): {error}") from error


@functools.cache
def _dcp():
    """DCP and ckptfn's safe reader/planners over it, built on first use (imports DCP)."""
    import torch  # lazily: reading ckptfn.json needs no torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = pathlib.Path(self.path) / _DCP_METADATA
            with open(path, "rb") as file:
                try:
                    metadata = _MetadataUnpickler(file).load()
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
    try:  # what torch's own dcp_to_torch_save uses to load without a template
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

        class SafeEmptyPlanner(_EmptyStateDictLoadPlanner):
            def load_bytes(self, read_item, value):
                load_bytes_safely(self, super().load_bytes, read_item, value)

        empty_planner = SafeEmptyPlanner
    except ImportError:  # pragma: no cover - depends on the torch version
        pass

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
    from ckptfn._payload import prepare_payload  # imports torch: only when writing

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
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state_dict: dict = {}
    try:
        _load_state_dict(state_dict, storage_reader=api.reader(path), planner=api.empty_planner(), no_dist=True)
    except api.failures as error:
        cause = _dcp_failure(error)
        raise CheckpointError(f"{path}: cannot be loaded ({type(cause).__name__}: {cause})") from error
    return state_dict, metadata


# --- writing -------------------------------------------------------------------------------


def _saved_at(path: pathlib.Path) -> dt.datetime:
    """When the tree at ``path`` was saved: its metadata timestamp, else its mtime."""
    try:
        moment = dt.datetime.fromisoformat(read_sharded_metadata(path)["timestamp"])
        if moment.tzinfo is not None:
            return moment
    except (CheckpointError, KeyError, TypeError, ValueError):
        pass
    return dt.datetime.fromtimestamp(os.lstat(path).st_mtime, dt.timezone.utc)


def _same_tree(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        return os.path.samefile(a / _DCP_METADATA, b / _DCP_METADATA)
    except OSError:
        return False


def recover(directory: str | os.PathLike, fs: TreeFileSystem = TREES) -> None:
    """Tidy ``directory`` after killed sharded writers on this host: remove their
    temporary trees, and move a tree they had moved aside back to its name if that
    name is empty (a crash in the non-atomic fallback's window)."""
    directory = pathlib.Path(directory)
    try:
        names = fs.listdir(directory)
    except FileNotFoundError:
        return
    mine = host_tag(socket.gethostname())
    for name in sorted(names, key=lambda n: n.endswith(".tmp")):  # asides first
        parsed = parse_dcp_temp_name(name)
        if parsed is None or parsed[1] != mine or fs.pid_alive(parsed[0]):
            continue
        path, final = directory / name, directory / parsed[2]
        try:
            if parsed[3] == "old" and not _exists(final):
                fs.rename(path, final)
            else:
                fs.rmtree(path)
        except FileNotFoundError:
            pass  # another process tidied it first


def _write_metadata(fs: FileSystem, tree: pathlib.Path, metadata: Mapping) -> None:
    data = json.dumps(dict(metadata), indent=1).encode("utf-8")
    with fs.create(tree / METADATA_NAME) as file:
        file.write(data)
        file.sync()
    fs.fsync_dir(tree)


class _Committer:
    """Rank 0's half of the protocol: publish a complete temporary tree under its names."""

    def __init__(self, directory: pathlib.Path, fs: TreeFileSystem) -> None:
        self.directory = directory
        self.fs = fs
        self.temps: list[pathlib.Path] = []
        self.published: list[pathlib.Path] = []

    def archive(self, final: pathlib.Path) -> None:
        """Keep the tree at ``final`` under its archive name (a tree of hard links)."""
        if not _exists(final):
            return
        saved_at = _saved_at(final)
        for clash in range(10_000):
            candidate = self.directory / archive_name(final.name, saved_at, clash)
            if _exists(candidate):
                if _same_tree(candidate, final):
                    return  # archived by an earlier, interrupted attempt
                continue
            staging = self.directory / new_temp_name(candidate.name)
            self.temps.append(staging)
            self.fs.link_tree(final, staging)
            try:
                self.fs.rename(staging, candidate)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                self.fs.rmtree(staging)  # someone took the name meanwhile: try the next one
                self.temps.remove(staging)
                continue
            self.temps.remove(staging)
            return
        raise CheckpointWriteError(f"{final}: no free archive name after 10000 attempts")

    def install(self, source: pathlib.Path, final: pathlib.Path) -> pathlib.Path | None:
        """Make ``source`` the tree at ``final`` in one atomic step; the old tree's new
        (temporary) name, to be removed, or None."""
        if not _exists(final):
            try:
                self.fs.rename(source, final)
                return None
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise  # otherwise the name appeared meanwhile: exchange with it
        try:
            self.fs.exchange(source, final)
            return source  # it now holds the old tree
        except OSError as error:
            if error.errno not in EXCHANGE_UNSUPPORTED:
                raise
        aside = self.directory / new_temp_name(final.name, "old")  # names the tree it holds
        self.fs.rename(final, aside)  # the window: final is briefly absent (see recover)
        try:
            self.fs.rename(source, final)
        except BaseException:
            self.fs.rename(aside, final)
            raise
        return aside

    def drop(self, old: pathlib.Path | None) -> None:
        """Remove a superseded tree; a failure only leaves a hidden tree for a later ``recover``."""
        if old is None:
            return
        try:
            self.fs.rmtree(old)
        except OSError as error:
            logger.warning("could not remove the superseded checkpoint tree %s: %s", old, error)

    def publish(self, temp: pathlib.Path, targets: Sequence, metadata: Mapping) -> tuple[pathlib.Path, ...]:
        self.temps.append(temp)
        _write_metadata(self.fs, temp, metadata)
        names = [dcp_name(target.filename) for target in targets]
        for index, (target, name) in enumerate(zip(targets, names)):
            final = self.directory / name
            if index == len(targets) - 1:
                source = temp
            else:
                source = self.directory / new_temp_name(name)
                self.temps.append(source)
                self.fs.link_tree(temp, source)
            if not target.overwrite:
                self.archive(final)
            old = self.install(source, final)
            self.temps.remove(source)
            self.published.append(final)
            self.drop(old)
        self.fs.fsync_dir(self.directory)
        return tuple(self.published)

    def undo(self) -> None:
        for path in self.temps:
            try:
                self.fs.rmtree(path)
            except BaseException:  # noqa: BLE001 - already failing; never mask the first error
                pass
        self.temps.clear()


def commit_tree(
    directory: str | os.PathLike,
    temp: str | os.PathLike,
    targets: Sequence,
    metadata: Mapping,
    *,
    fs: TreeFileSystem = TREES,
) -> tuple[pathlib.Path, ...]:
    """Publish the complete DCP tree ``temp`` under every target's ``.dcp`` name (rank 0 only).

    ``targets`` have ``filename`` and ``overwrite`` (``ckptfn._executor.Target``).
    Raises ``CheckpointWriteError`` whose ``published`` lists the names already switched.
    """
    directory, temp = pathlib.Path(directory), pathlib.Path(temp)
    names = [dcp_name(target.filename) for target in targets]
    if len(set(names)) != len(names):
        raise CheckpointWriteError(f"sharded checkpoint names clash: {names} (strategy filenames must differ before the suffix)")
    committer = _Committer(directory, fs)
    try:
        paths = committer.publish(temp, targets, metadata)
    except Exception as error:
        committer.undo()
        described = ", ".join(str(directory / name) for name in names)
        raise CheckpointWriteError(
            f"could not write {described}: {type(error).__name__}: {error}", committer.published
        ) from error
    except BaseException:
        committer.undo()
        raise
    prune_trees(directory, targets, fs=fs)  # only now that the new versions are committed
    return paths


def prune_trees(directory: pathlib.Path, targets: Sequence, *, fs: TreeFileSystem = TREES) -> tuple[pathlib.Path, ...]:
    """Remove the archived trees beyond each target's ``keep`` (as the executor does for files).

    Only archived names are ever removed, never a current one; a failure is a WARNING.
    """
    keeps = [(dcp_name(target.filename), getattr(target, "keep", None)) for target in targets]
    if all(keep is None for _, keep in keeps):
        return ()
    names = fs.listdir(directory)
    removed = []
    for name, keep in keeps:
        for doomed in plan_prune(name, keep, names):
            try:
                fs.rmtree(directory / doomed)
            except OSError as error:
                logger.warning("could not remove old checkpoint version %s: %s", directory / doomed, error)
                continue
            removed.append(directory / doomed)
            logger.info("removed %s: %s keeps %d versions", doomed, name, keep)
    return tuple(removed)


def write_shards(
    directory: str | os.PathLike,
    temp_name: str,
    payload: Mapping,
    *,
    group: object = None,
    coordinator: bool = True,
    fs: TreeFileSystem = TREES,
) -> pathlib.Path:
    """Collective: every rank of ``group`` writes its shards of ``payload`` into
    ``directory/temp_name`` (the same name on every rank, chosen by rank 0) with DCP.
    ``group=None`` with no process group initialized is a single process.

    Returns the temporary tree, complete on disk (DCP's last step is collective).
    A failure on any rank (a ``PayloadError``, a full disk) is raised on every
    rank as a ``CheckpointWriteError`` and the temporary tree is removed. Then
    the coordinator alone calls ``commit_tree``.
    """
    directory = pathlib.Path(directory)
    temp = directory / temp_name
    api = _dcp()
    if coordinator:
        try:
            fs.mkdir(directory)
            recover(directory, fs)
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
                pass  # left for the next write's recover
        if isinstance(cause, PayloadError):
            raise PayloadError(str(cause)) from error
        raise CheckpointWriteError(f"could not write {temp}: {type(cause).__name__}: {cause}") from error
    return temp
