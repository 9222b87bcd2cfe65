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
  inert placeholder that never calls anything. The placeholders check what torch
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
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
from collections.abc import Mapping

from ckptfn.core.errors import CheckpointError
from ckptfn.core.metadata import decompose, shape_problem
from ckptfn.io import unpickle
from ckptfn.io.archive import Damaged, check_archive, read_at
from ckptfn.io.fs import open_regular

__all__ = ["ALLOWED_GLOBALS", "Scanned", "checked_metadata", "metadata_of", "peek_metadata", "scan"]


class _Inert:
    """Stands for a torch object (or any object the reader does not know). Creating, calling,
    filling or setting its state does nothing."""

    __slots__ = ()

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def __call__(self, *_args: object, **_kwargs: object) -> _Inert:
        return _Inert()

    def __setstate__(self, _state: object) -> None:
        pass

    def __setitem__(self, _key: object, _value: object) -> None:
        pass

    def append(self, _item: object) -> None:
        pass

    def extend(self, _items: object) -> None:
        pass

    def add(self, _item: object) -> None:
        pass

    def __reduce__(self):  # never re-pickled by accident
        raise TypeError("placeholder")


class _Foreign(_Inert):
    """A global this reader does not know; it marks the file as torch's to judge."""

    __slots__ = ()


#: Storage classes torch.save names, with the bytes of one element.
_STORAGES = {
    "BFloat16Storage": 2, "BoolStorage": 1, "ByteStorage": 1, "CharStorage": 1, "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8, "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "IntStorage": 4,
    "LongStorage": 8, "QInt32Storage": 4, "QInt8Storage": 1, "QUInt2x4Storage": 1, "QUInt4x2Storage": 1,
    "QUInt8Storage": 1, "ShortStorage": 2,
}
_DTYPES = (
    "bfloat16 bits16 bits1x8 bits2x4 bits4x2 bits8 bool complex128 complex32 complex64 float16 float32 float64 "
    "float4_e2m1fn_x2 float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu int1 int16 int2 "
    "int3 int32 int4 int5 int6 int64 int7 int8 qint32 qint8 quint2x4 quint4x2 quint8 uint1 uint16 uint2 uint3 "
    "uint32 uint4 uint5 uint6 uint64 uint7 uint8"
).split()
_QSCHEMES = "per_tensor_affine per_channel_affine per_channel_affine_float_qparams per_tensor_symmetric per_channel_symmetric".split()


@dataclasses.dataclass(frozen=True)
class _StorageType:
    itemsize: int
    floating: bool = False  # whose tensors may require gradients (floating point or complex)

    def __call__(self, *_args: object, **_kwargs: object) -> _Inert:
        return _Inert()


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A storage of ``numel`` elements of ``kind``; its bytes are never read."""

    numel: int
    kind: _StorageType


def _bytearray(*args: object) -> bytearray:
    """``bytearray`` as pickle spells it (from bytes, or text and "latin-1"), never ``bytearray(n)``."""
    if not args:
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:
        return bytearray(args[0])
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin-1", "latin1"):
        return bytearray(args[0], "latin-1")
    raise _Refused(f"builtins.bytearray{_shown(args)} is not how pickle stores bytes (it could allocate any amount)")


def _encode(*args: object) -> bytes:
    """``_codecs.encode`` as pickle protocol 2 spells bytes: ``encode(text, "latin1")``."""
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")
    raise _Refused(f"_codecs.encode{_shown(args)} is not how pickle stores bytes")


def _complex(*args: object) -> complex:
    if len(args) <= 2 and all(type(a) in (int, float) for a in args):
        return complex(*args)
    raise _Refused(f"builtins.complex{_shown(args)} is not how pickle stores a complex number")


def _set(*args: object) -> set:
    if not args or (len(args) == 1 and type(args[0]) in (list, tuple)):
        return set(*args)
    raise _Refused(f"builtins.set{_shown(args)} is not how pickle stores a set")


def _ordered_dict(*args: object) -> collections.OrderedDict:
    if not args or (len(args) == 1 and type(args[0]) is list):
        return collections.OrderedDict(*args)
    raise _Refused(f"collections.OrderedDict{_shown(args)} is not how pickle stores an OrderedDict")


_INT64 = (-(2**63), 2**63 - 1)


def _size(*args: object) -> _Inert:
    """``torch.Size`` as pickle spells it: ``Size()`` or ``Size(ints)``, each a 64-bit int, as torch accepts."""
    if not args or (
        len(args) == 1
        and type(args[0]) in (tuple, list)
        and all(_is_int(n) and _INT64[0] <= n <= _INT64[1] for n in args[0])
    ):
        return _Inert()
    raise _Refused(f"torch.Size{_shown(args)} is not a size torch reads (one sequence of 64-bit ints)")


def _shown(args: tuple) -> str:
    text = "(" + ", ".join(f"{type(a).__name__} {a!r:.40}" if type(a) in (int, str) else type(a).__name__ for a in args) + ")"
    return text if len(text) < 200 else text[:197] + "...)"


class _Refused(Exception):
    """The pickle asks for something torch's loader would do on its say-so (allocate, reach out of bounds)."""


def _is_int(value: object) -> bool:
    return type(value) is int


def _tensor_extent(storage: object, offset: object, size: object, stride: object, what: str) -> None:
    """Refuse a tensor that does not lie inside its storage (torch's ``set_`` would refuse it too)."""
    if type(storage) is not _Storage:
        raise _Refused(f"{what}: its storage is {type(storage).__name__}, not a storage record")
    if not (_is_int(offset) and offset >= 0):
        raise _Refused(f"{what}: storage offset {offset!r:.40} is not a non-negative int")
    if type(size) not in (tuple, list) or type(stride) not in (tuple, list) or len(size) != len(stride):
        raise _Refused(f"{what}: size {size!r:.60} and stride {stride!r:.60} are not tuples of one length")
    if not all(_is_int(n) and n >= 0 for n in size) or not all(_is_int(s) for s in stride):
        raise _Refused(f"{what}: size {size!r:.60} or stride {stride!r:.60} is not made of valid ints")
    if 0 in size:
        return
    needed = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride) if s > 0)
    if needed > storage.numel:
        raise _Refused(
            f"{what}: size {tuple(size)!r:.60} at offset {offset} needs {needed} elements; its storage has {storage.numel}"
        )


# The rebuild functions torch.save names, with torch's own signatures (a pickle that calls one
# with other arguments fails in torch too): they check the tensor against its storage.


class _Tensor(_Inert):
    """Stands for a rebuilt tensor."""

    __slots__ = ()


def _tensor_state(storage: object, requires_grad: object, metadata: object, what: str) -> None:
    """What torch checks of a rebuilt tensor's state: ``requires_grad`` a bool (and only for a
    floating point or complex storage), ``metadata`` absent or a dict of bools."""
    if type(requires_grad) is not bool:
        raise _Refused(f"{what}: requires_grad is {type(requires_grad).__name__}, not a bool")
    kind = getattr(storage, "kind", None)
    if requires_grad and kind is not None and not kind.floating:
        raise _Refused(f"{what}: requires_grad on a storage whose elements are not floating point")
    if metadata and not (type(metadata) is dict and all(type(k) is str and type(v) is bool for k, v in metadata.items())):
        raise _Refused(f"{what}: its metadata is {type(metadata).__name__}, not a dict of bools")


def _rebuild_tensor(storage, storage_offset, size, stride) -> _Tensor:
    _tensor_extent(storage, storage_offset, size, stride, "a tensor")
    return _Tensor()


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None) -> _Tensor:
    _tensor_state(storage, requires_grad, metadata, "a tensor")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
) -> _Tensor:
    _tensor_state(None, requires_grad, metadata, "a tensor")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_qtensor(storage, storage_offset, size, stride, quantizer_params, requires_grad, backward_hooks) -> _Tensor:
    # torch allocates ``size`` elements before it checks them against the storage: check first
    _tensor_extent(storage, storage_offset, size, stride, "a quantized tensor")
    return _Tensor()


def _rebuild_parameter(data, requires_grad, backward_hooks) -> _Tensor:
    if type(data) is not _Tensor or type(requires_grad) is not bool:
        raise _Refused(f"a parameter of {type(data).__name__} with requires_grad {type(requires_grad).__name__}")
    return _Tensor()


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state) -> _Tensor:
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _rebuild_from_type_v2(function=None, _new_type=None, args=(), _state=None, *_rest) -> object:
    if callable(function) and type(args) is tuple:
        return function(*args)  # one of this module's placeholders: checks, allocates nothing
    return _Inert()


_TORCH: dict[tuple[str, str], object] = {
    **{
        ("torch", name): _StorageType(itemsize, name.startswith(("BFloat16", "Complex", "Double", "Float", "Half")))
        for name, itemsize in _STORAGES.items()
    },
    ("torch.storage", "UntypedStorage"): _StorageType(1),
    **{("torch", name): _Inert() for name in (*_DTYPES, *_QSCHEMES)},
    ("torch", "Size"): _size,
    ("torch", "device"): _Inert,
    ("torch.serialization", "_get_layout"): _Inert,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    **{
        ("torch._utils", name): _Tensor
        for name in (
            "_rebuild_sparse_tensor", "_rebuild_nested_tensor",
            "_rebuild_meta_tensor_no_storage", "_rebuild_device_tensor_from_cpu_tensor",
        )
    },
}


class _TensorClass(_Inert):
    """A tensor class torch's loader allows (``torch.FloatTensor``, ``torch.Tensor``, ...): fine to name
    (as the type a tensor is rebuilt as), refused when called with arguments, which torch.save never
    writes: ``torch.FloatTensor(2**31)`` would allocate on the pickle's say-so."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: object, **kwargs: object) -> _Inert:
        if args or kwargs:
            raise _Refused(f"{self.name}{_shown(args)}: a call torch.save never writes (it could allocate any amount)")
        return _Inert()


_TENSOR_TYPES = "BFloat16 Byte Char Double Float Half Int Long Short".split()
_TENSOR_CLASSES = (
    [f"{module}.{kind}Tensor" for module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse") for kind in _TENSOR_TYPES]
    + ["torch.BoolTensor", "torch.cuda.BoolTensor", "torch.Tensor", "torch.nn.parameter.Parameter"]
)
_TORCH.update({tuple(name.rsplit(".", 1)): _TensorClass(name) for name in _TENSOR_CLASSES})

#: Plain constructors a pickle of plain data may name, each in the forms pickle writes.
_PLAIN = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _set,
    ("builtins", "complex"): _complex,
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _encode,
}

#: Every global this reader knows, as "module.name" (a subset of weights_only's).
ALLOWED_GLOBALS = frozenset(f"{module}.{name}" for module, name in (*_TORCH, *_PLAIN))


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
        found = _TORCH.get((module, name)) or _PLAIN.get((module, name))
        if found is not None:
            return found
        if len(self.foreign) < 20:
            self.foreign.append(f"{module}.{name}")
        return _Foreign

    def storage(self, pid: object) -> _Storage:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise _Refused(f"persistent id {pid!r:.80} is not a storage record")
        _, kind, key, location, numel = pid
        if type(kind) is not _StorageType or type(key) is not str or type(location) is not str:
            raise _Refused(f"persistent id {pid!r:.80} is not a storage record")
        if not (_is_int(numel) and numel >= 0):
            raise _Refused(f"storage {key!r:.40} claims {numel!r:.40} elements")
        if self.records is not None:
            size = self.records.get(key)
            if size is None:
                raise _Refused(f"storage {key!r:.40} has no record data/{key:.40} in the archive")
            if size != numel * kind.itemsize:
                raise _Refused(
                    f"storage {key!r:.40} claims {numel} elements of {kind.itemsize} bytes; its record holds {size} bytes"
                )
        return _Storage(numel, kind)


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
                raise _Refused("a GLOBAL opcode runs past the end")
        elif op == 0x58:  # BINUNICODE
            at += 4 + int.from_bytes(data[at : at + 4], "little")
        elif op in (0x55, 0x8A):  # SHORT_BINSTRING, LONG1
            at += 1 + (data[at] if at < end else 0)
        elif op == 0x80:  # PROTO
            at += 1
        elif op == 0x2E:  # STOP
            return
        else:
            raise _Refused(f"opcode {bytes([op])!r} at offset {at - 1} is not one torch's weights_only loader reads")
    raise _Refused("the pickle has no STOP opcode inside its bytes (it is cut, or an opcode claims more bytes than there are)")


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
        loaded = unpickle.load(data, scanner.resolve, persistent=scanner.storage, refuse=_Refused)
    except _Refused as error:
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


def peek_metadata(path: str | os.PathLike) -> dict | None:
    """The metadata of the checkpoint file at ``path``, or None when torch's loader must judge it.

    ``check_archive``, then ``scan`` and ``metadata_of``: a ``CheckpointError`` for a
    damaged archive or a refused pickle. ``ckptfn.read_metadata`` is the function to
    call; this one is the torch-free step inside it.
    """
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
    return metadata_of(scan(data, where, archive.records()), where)
