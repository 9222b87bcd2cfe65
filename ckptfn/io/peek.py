"""Vetting a checkpoint archive and reading its metadata, without importing torch.

Every checkpoint file is a zip archive written by ``torch.save``: ``<name>/data.pkl``
holds the pickled object, ``<name>/data/<key>`` the bytes of each tensor storage, and
a few small records (``version``, ``byteorder``, ...) say how to read them. Every
reader of the library vets a file here before anything else reads it:

``ckptfn.io.archive.check_archive`` first checks the zip structure from headers alone;
a file torch's reader would refuse is refused there.

``scan`` unpickles ``data.pkl`` alone (through the one allow-listed unpickler,
``ckptfn.io.unpickle``) with an allow-list:

- the globals ``torch.save`` writes for tensors, storages, dtypes, sizes and
  devices, all of them among the ones ``torch.load(weights_only=True)`` allows
  (``tests/io/test_peek.py`` checks the list against torch's), each replaced by an
  inert placeholder that never calls anything (``ckptfn.io.placeholders``). The placeholders check what torch
  would check later without reading a tensor byte: every storage names a record of
  the archive whose size is the storage's, and every tensor lies inside its storage;
- ``collections.OrderedDict``, ``builtins.set``/``complex``, and ``builtins.bytearray``
  and ``_codecs.encode`` only in the forms pickle writes for bytes (``bytearray(b)``,
  ``encode(text, "latin1")``), which build plain data no larger than the pickle;
- any other global (a class the user allowed with
  ``torch.serialization.add_safe_globals``, say) becomes an inert stand-in too, and
  the scan goes on to the end, so nothing later in the pickle escapes it; such a
  file is then torch's to judge (``Scanned.foreign``).

Bounds: the scan never calls what a pickle names and builds only what the pickle
spells out in its own bytes, so the memory it uses is a small multiple of
``data.pkl``'s size (which lies within the file; a length a pickle opcode declares
beyond its end is at most reserved, never touched, and refused) and its time is
linear in it. What torch's loader would allocate on a pickle's say-so is refused
outright, never handed to torch: a call such as ``bytearray(3 * 2**30)`` in a 1 KB
file, a storage larger than its record, a tensor reaching past its storage. So is
metadata that holds itself, nests deeper than ``ckptfn.core.metadata.MAX_DEPTH``
levels or holds more than ``MAX_VALUES`` values counted as a tree (lists that share
lists are judged without expanding them). Every refusal is a ``CheckpointError``
naming the file and the member; nothing is ever run.

``metadata_of`` gives the metadata when it is plain data and the pickle names
nothing foreign, else None, and the caller reads the (vetted) file with torch's own
``weights_only`` loader. That makes ``ckptfn inspect`` and ``read_metadata``
independent of torch's import time (seconds) and of the checkpoint's size.

``peek_file`` says what a file is from the same scan: a ckptfn checkpoint (and its
metadata), a plain Lightning checkpoint (``lightning_position``: its epoch, global
step and ``ModelCheckpoint`` record), or another ``torch.save`` file, so ``ckptfn
inspect`` can describe files that are not ckptfn's without torch.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Mapping

from ckptfn.core.errors import CheckpointError
from ckptfn.core.metadata import decompose, shape_problem
from ckptfn.io import unpickle
from ckptfn.io.archive import Damaged, check_archive, read_at
from ckptfn.io.fs import open_regular
from ckptfn.io.placeholders import ALLOWED_GLOBALS, PLAIN, TORCH, Foreign, Refused, Storage, StorageType, is_int

__all__ = [
    "ALLOWED_GLOBALS",
    "Peek",
    "Scanned",
    "checked_metadata",
    "lightning_position",
    "metadata_of",
    "peek_file",
    "peek_metadata",
    "scan",
]




@dataclasses.dataclass
class Scanned:
    """What ``scan`` found: the unpickled object (placeholders for torch's objects) and the
    globals it does not know (then torch's loader must judge the file)."""

    loaded: object
    foreign: list[str]


class _Scanner:
    def __init__(self, records: Mapping[str, int] | None) -> None:
        self.records = records  # storage key -> record size in bytes; None: not checked
        self.foreign: list[str] = []

    def resolve(self, module: str, name: str) -> object:
        found = TORCH.get((module, name)) or PLAIN.get((module, name))
        if found is not None:
            return found
        if len(self.foreign) < 20:
            self.foreign.append(f"{module}.{name}")
        return Foreign

    def storage(self, pid: object) -> Storage:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise Refused(f"persistent id {pid!r:.80} is not a storage record")
        _, kind, key, location, numel = pid
        if type(kind) is not StorageType or type(key) is not str or type(location) is not str:
            raise Refused(f"persistent id {pid!r:.80} is not a storage record")
        if not (is_int(numel) and numel >= 0):
            raise Refused(f"storage {key!r:.40} claims {numel!r:.40} elements")
        if self.records is not None:
            size = self.records.get(key)
            if size is None:
                raise Refused(f"storage {key!r:.40} has no record data/{key:.40} in the archive")
            if size != numel * kind.itemsize:
                raise Refused(
                    f"storage {key!r:.40} claims {numel} elements of {kind.itemsize} bytes; its record holds {size} bytes"
                )
        return Storage(numel, kind)


#: The opcodes torch's ``weights_only`` loader reads (torch 2.13), with the bytes of each one's
#: fixed-size argument; GLOBAL, BINUNICODE, SHORT_BINSTRING, LONG1, PROTO and STOP are read apart.
_FIXED = {
    **dict.fromkeys(
        pickle.NEWOBJ + pickle.REDUCE + pickle.BUILD + pickle.APPEND + pickle.APPENDS + pickle.SETITEM
        + pickle.SETITEMS + pickle.MARK + pickle.TUPLE + pickle.TUPLE1 + pickle.TUPLE2 + pickle.TUPLE3 + pickle.NONE
        + pickle.NEWFALSE + pickle.NEWTRUE + pickle.EMPTY_TUPLE + pickle.EMPTY_LIST + pickle.EMPTY_DICT
        + pickle.EMPTY_SET + pickle.BINPERSID,
        0,
    ),
    pickle.BININT[0]: 4, pickle.BININT1[0]: 1, pickle.BININT2[0]: 2, pickle.BINFLOAT[0]: 8,
    pickle.BINGET[0]: 1, pickle.LONG_BINGET[0]: 4, pickle.BINPUT[0]: 1, pickle.LONG_BINPUT[0]: 4,
}


def _check_opcodes(data: bytes) -> None:
    """Refuse a pickle with an opcode torch's loader does not read, or one that runs past the end.

    Walks the opcodes as torch's loader does before it unpickles, so a length an opcode
    declares is never allocated: torch would refuse such a pickle anyway.
    """
    at, end, fixed = 0, len(data), _FIXED
    while at < end:
        op = data[at]
        at += 1
        size = fixed.get(op)
        if size is not None:
            at += size
        elif op == 0x63:  # GLOBAL: two lines
            at = data.find(b"\n", data.find(b"\n", at) + 1) + 1
            if at == 0:
                raise Refused("a GLOBAL opcode runs past the end")
        elif op == 0x58:  # BINUNICODE
            at += 4 + int.from_bytes(data[at : at + 4], "little")
        elif op in (0x55, 0x8A):  # SHORT_BINSTRING, LONG1
            at += 1 + (data[at] if at < end else 0)
        elif op == 0x80:  # PROTO
            at += 1
        elif op == 0x2E:  # STOP
            return
        else:
            raise Refused(f"opcode {bytes([op])!r} at offset {at - 1} is not one torch's weights_only loader reads")
    raise Refused("the pickle has no STOP opcode inside its bytes (it is cut, or an opcode claims more bytes than there are)")


def scan(data: bytes, where: str, records: Mapping[str, int] | None = None) -> Scanned:
    """Unpickle ``data`` (a ``data.pkl``) with placeholders, refusing what torch would do on its say-so.

    ``records`` maps each storage key to the size of its ``data/<key>`` record (checked
    against the storages the pickle declares); ``where`` prefixes the error, e.g.
    ``"/runs/best.pt: data.pkl"``. Raises ``CheckpointError``; never runs anything.

    >>> import pickle
    >>> scan(pickle.dumps({"metadata": {"epoch": 3}}, protocol=2), "x").loaded
    {'metadata': {'epoch': 3}}
    >>> scan(b"c__builtin__\\nbytearray\\nJ\\x00\\x00\\x00\\x40\\x85R.", "best.pt: data.pkl")
    Traceback (most recent call last):
    ...
    ckptfn.CheckpointError: best.pt: data.pkl: refused: builtins.bytearray(int 1073741824) is not how pickle stores bytes (it could allocate any amount)
    """
    scanner = _Scanner(records)
    try:
        _check_opcodes(data)
        loaded = unpickle.load(data, scanner.resolve, persistent=scanner.storage, refuse=Refused)
    except Refused as error:
        raise CheckpointError(f"{where}: refused: {error}") from None
    except MemoryError:
        raise CheckpointError(f"{where}: refused: it declares more memory than there is") from None
    except RecursionError:  # pragma: no cover - the C unpickler does not recurse
        raise CheckpointError(f"{where}: refused: nested too deeply") from None
    except Exception as error:  # noqa: BLE001 - a damaged pickle raises many types
        raise CheckpointError(f"{where}: cannot be unpickled ({type(error).__name__}: {str(error)[:200]})") from None
    return Scanned(loaded, scanner.foreign)


def _is_plain(value: object, seen: set[int]) -> bool:
    """Plain data (str-keyed dicts, lists, scalars); ``value`` is already bounded (``shape_problem``)."""
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) not in (dict, list):
        return False
    if id(value) in seen:
        return True
    seen.add(id(value))
    if type(value) is dict:
        return all(type(k) is str and _is_plain(v, seen) for k, v in value.items())
    return all(_is_plain(v, seen) for v in value)


def checked_metadata(metadata: object, where: str) -> None:
    """Refuse metadata that is not bounded (``shape_problem``), with a ``CheckpointError`` naming the key."""
    problem = shape_problem(metadata)
    if problem is not None:
        raise CheckpointError(f"{where}: refused: {problem}")


def metadata_of(scanned: Scanned, where: str) -> dict | None:
    """The plain, bounded metadata of a scanned pickle; None when torch must judge the file."""
    parts = decompose(scanned.loaded)
    if parts is None:
        return None
    checked_metadata(parts[1], where)
    if scanned.foreign or not _is_plain(parts[1], set()):
        return None
    return parts[1]


def _scan_file(path: str | os.PathLike) -> tuple[Scanned, str]:
    """``check_archive`` and ``scan`` of the file at ``path``: the scan and where its ``data.pkl`` is."""
    try:
        with open_regular(path) as file:
            archive = check_archive(file, os.fstat(file.fileno()).st_size)
            member = archive.prefix + "data.pkl"
            data = read_at(file, *archive.members[member])
    except Damaged as error:
        raise CheckpointError(f"{path}: not a ckptfn checkpoint (damaged zip archive: {error})") from None
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None
    where = f"{path}: {member}"
    return scan(data, where, archive.records()), where


def peek_metadata(path: str | os.PathLike) -> dict | None:
    """The metadata of the checkpoint file at ``path``, or None when torch's loader must judge it.

    ``check_archive``, then ``scan`` and ``metadata_of``: a ``CheckpointError`` for a
    damaged archive or a refused pickle. ``ckptfn.read_metadata`` is the function to
    call; this one is the torch-free step inside it.
    """
    scanned, where = _scan_file(path)
    return metadata_of(scanned, where)


@dataclasses.dataclass(frozen=True)
class Peek:
    """What a checkpoint file's ``data.pkl`` says, read without torch (``peek_file``).

    ``ckptfn``: it holds a ckptfn metadata record (of any format version); ``metadata``:
    that record when it is plain, bounded and of this version (None: torch's loader must
    judge the file); ``lightning``: a plain Lightning checkpoint's ``lightning_position``
    (None otherwise); ``foreign``: the globals it names that this reader does not know.
    With any ``foreign``, torch's ``weights_only`` loader refuses the file unless they are
    allowed (``torch.serialization.add_safe_globals``), so ``read_metadata`` and
    ``load_checkpoint`` leave it to torch, even when ``metadata`` is plain.
    """

    ckptfn: bool
    metadata: dict | None
    lightning: dict | None
    foreign: tuple[str, ...]


def _count(value: object) -> int | None:
    return value if is_int(value) and 0 <= value < 2**63 else None


def _base_name(path: object) -> str | None:
    return path.replace("\\", "/").rsplit("/", 1)[-1] if type(path) is str else None


def lightning_position(loaded: object, name: str | None = None) -> dict | None:
    """What a plain Lightning checkpoint (a ``trainer.save_checkpoint`` file, as
    ``ModelCheckpoint`` writes) records of itself; None when ``loaded`` is not one.

    ``epoch`` and ``global_step`` (None where not a count), ``version`` (Lightning's),
    and for each ``ModelCheckpoint`` whose state it holds: the metric it monitors and
    whether the file was, when it was saved, that callback's ``best``, one of its
    ``top-k`` or its ``last`` (``name`` is the file's name, compared with the paths the
    callback recorded).

    >>> ckpt = {"epoch": 2, "global_step": 50, "pytorch-lightning_version": "2.6.6", "state_dict": {},
    ...         "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {
    ...             "monitor": "val_loss", "best_model_path": "/runs/ckpt/epoch=2-step=50.ckpt",
    ...             "best_k_models": {"/runs/ckpt/epoch=2-step=50.ckpt": None}, "last_model_path": ""}}}
    >>> lightning_position(ckpt, "epoch=2-step=50.ckpt")
    {'epoch': 2, 'global_step': 50, 'version': '2.6.6', 'checkpoints': [{'monitor': 'val_loss', 'role': 'best'}]}
    >>> lightning_position({"epoch": 2, "state_dict": {}}) is None
    True
    """
    if type(loaded) is not dict or type(loaded.get("pytorch-lightning_version")) is not str:
        return None
    if isinstance(loaded.get("metadata"), Mapping):  # ckptfn's own Lightning files say more
        return None
    found = {"epoch": _count(loaded.get("epoch")), "global_step": _count(loaded.get("global_step")),
             "version": loaded["pytorch-lightning_version"], "checkpoints": []}
    callbacks = loaded.get("callbacks")
    if type(callbacks) is dict:
        for key, state in callbacks.items():
            if type(key) is not str or not key.startswith("ModelCheckpoint") or type(state) is not dict:
                continue
            monitor = state.get("monitor") if type(state.get("monitor")) is str else None
            best_k = state.get("best_k_models")
            members = {_base_name(path) for path in best_k} if type(best_k) is dict else set()
            role = None
            if name is not None and _base_name(state.get("best_model_path")) == name:
                role = "best"
            elif name is not None and name in members:
                role = "top-k"
            elif name is not None and _base_name(state.get("last_model_path")) == name:
                role = "last"
            found["checkpoints"].append({"monitor": monitor, "role": role})
            if len(found["checkpoints"]) >= 8:
                break
    return found


def peek_file(path: str | os.PathLike) -> Peek:
    """What the checkpoint file at ``path`` is, from its vetted ``data.pkl`` alone: a ckptfn
    checkpoint, a plain Lightning checkpoint, or another ``torch.save`` file (``Peek``).

    The same checks and bounds as ``peek_metadata`` (a ``CheckpointError`` for a damaged
    archive or a refused pickle); nothing is run, torch is not imported.
    """
    scanned, where = _scan_file(path)
    loaded = scanned.loaded
    record = loaded.get("metadata") if type(loaded) is dict else None
    ckptfn = isinstance(record, Mapping) and isinstance(record.get("format"), str) and record["format"].startswith("ckptfn/")
    metadata = None
    if ckptfn:
        parts = decompose(loaded)
        if parts is not None:
            checked_metadata(parts[1], where)
            metadata = parts[1] if _is_plain(parts[1], set()) else None
    lightning = None if ckptfn else lightning_position(loaded, os.path.basename(os.fspath(path)))
    return Peek(ckptfn, metadata, lightning, tuple(scanned.foreign))
