"""Reading a checkpoint's metadata without importing torch.

Every checkpoint file is a zip archive whose ``<name>/data.pkl`` member holds the
pickled object; the tensor bytes live in other members. ``peek_metadata``
unpickles ``data.pkl`` alone, with an allow-list:

- the globals ``torch.save`` writes for tensors, storages, dtypes, sizes and
  devices, all of them among the ones ``torch.load(weights_only=True)`` allows
  (``tests/test_peek.py`` checks the list against torch's), each replaced by an
  inert placeholder that never calls anything;
- ``collections.OrderedDict``, ``builtins.set``/``complex``/``bytearray`` and
  ``_codecs.encode`` (how pickle protocol 2 spells bytes), which build plain data;
- nothing else: any other global, a metadata value that is not plain data, or
  any doubt at all makes it give up (return None), and the caller reads the file
  with torch's own ``weights_only`` loader instead. It never falls back to unsafe
  unpickling, and it never runs anything a pickle names.

That makes ``ckptfn inspect`` and ``read_metadata`` independent of torch's import
time (seconds) and of the checkpoint's size.
"""

from __future__ import annotations

import codecs
import collections
import os
import re
import zipfile

from ckptfn.core.metadata import decompose
from ckptfn.io import unpickle

__all__ = ["ALLOWED_GLOBALS", "peek_metadata"]


class _Inert:
    """Stands for every torch object in the pickle. Creating or "calling" it does nothing."""

    __slots__ = ()

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def __setstate__(self, _state: object) -> None:
        pass

    def __reduce__(self):  # never re-pickled by accident
        raise TypeError("placeholder")


_STORAGES = (
    "BFloat16Storage BoolStorage ByteStorage CharStorage ComplexDoubleStorage ComplexFloatStorage "
    "DoubleStorage FloatStorage HalfStorage IntStorage LongStorage QInt32Storage QInt8Storage "
    "QUInt2x4Storage QUInt4x2Storage QUInt8Storage ShortStorage"
).split()
_DTYPES = (
    "bfloat16 bool complex128 complex32 complex64 float16 float32 float64 float8_e4m3fn float8_e4m3fnuz "
    "float8_e5m2 float8_e5m2fnuz int16 int32 int64 int8 qint32 qint8 quint2x4 quint4x2 quint8 uint16 "
    "uint32 uint64 uint8"
).split()
_REBUILDS = (
    "_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_parameter _rebuild_parameter_with_state "
    "_rebuild_qtensor _rebuild_sparse_tensor _rebuild_nested_tensor _rebuild_meta_tensor_no_storage "
    "_rebuild_device_tensor_from_cpu_tensor"
).split()
_QSCHEMES = "per_tensor_affine per_channel_affine per_tensor_symmetric per_channel_symmetric".split()

#: Plain constructors a pickle of plain data may name, and what they become.
_PLAIN = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): codecs.encode,
}

#: Every global this reader accepts, as "module.name" (a subset of weights_only's).
ALLOWED_GLOBALS = frozenset(
    [f"torch.{name}" for name in (*_STORAGES, *_DTYPES, *_QSCHEMES, "Size", "device")]
    + [f"torch._utils.{name}" for name in _REBUILDS]
    + ["torch.serialization._get_layout", "torch._tensor._rebuild_from_type_v2"]
    + [f"{module}.{name}" for module, name in _PLAIN]
)


class _GiveUp(Exception):
    """This reader cannot vouch for the file; use torch's loader."""


def _resolve(module: str, name: str) -> object:
    if f"{module}.{name}" not in ALLOWED_GLOBALS:
        return None
    return _PLAIN.get((module, name), _Inert)


def _storage(_pid: object) -> object:
    return _Inert()  # a storage: its bytes are never read


def _is_plain(value: object) -> bool:
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is dict:
        return all(type(k) is str and _is_plain(v) for k, v in value.items())
    if type(value) is list:
        return all(_is_plain(v) for v in value)
    return False


_DATA_PKL = re.compile(r"[^/]+/data\.pkl")


def peek_metadata(path: str | os.PathLike) -> dict | None:
    """The metadata of the checkpoint file at ``path``, or None when this reader cannot vouch for it.

    The caller has already checked that ``path`` is a regular zip file whose members
    are stored uncompressed and lie within it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if _DATA_PKL.fullmatch(name)]
            if len(names) != 1:
                return None
            loaded = unpickle.load(archive.read(names[0]), _resolve, persistent=_storage, refuse=_GiveUp)
    except Exception:  # noqa: BLE001 - any doubt: torch's loader decides, with its own errors
        return None
    parts = decompose(loaded)
    if parts is None or not _is_plain(parts[1]):
        return None
    return parts[1]
