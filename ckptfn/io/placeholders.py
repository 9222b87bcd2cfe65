"""Inert placeholders for the torch objects a checkpoint's ``data.pkl`` names.

``ckptfn.io.peek`` scans ``data.pkl`` without torch: every global ``torch.save`` writes
(storages, dtypes, sizes, devices, the tensor rebuild functions) is replaced by an
inert stand-in that never calls anything, yet checks what torch's ``weights_only``
loader would check later without reading a tensor byte: a storage names a record of
the archive with its size, a tensor lies inside its storage, arguments have the forms
and arities torch accepts. Plain constructors (``OrderedDict``, ``set``, ``complex``,
``bytearray``, ``_codecs.encode``) are allowed only in the forms pickle writes. Each
refusal is ``Refused``; ``ALLOWED_GLOBALS`` lists every global known here.
"""

from __future__ import annotations

import collections
import dataclasses

__all__ = ["ALLOWED_GLOBALS", "PLAIN", "TORCH", "Foreign", "Refused", "Storage", "StorageType", "is_int"]


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


class Foreign(_Inert):
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
class StorageType:
    itemsize: int
    floating: bool = False  # whose tensors may require gradients (floating point or complex)

    def __call__(self, *_args: object, **_kwargs: object) -> _Inert:
        return _Inert()


@dataclasses.dataclass(frozen=True)
class Storage:
    """A storage of ``numel`` elements of ``kind``; its bytes are never read."""

    numel: int
    kind: StorageType


def _bytearray(*args: object) -> bytearray:
    """``bytearray`` as pickle spells it (from bytes, or text and "latin-1"), never ``bytearray(n)``."""
    if not args:
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:
        return bytearray(args[0])
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin-1", "latin1"):
        return bytearray(args[0], "latin-1")
    raise Refused(f"builtins.bytearray{_shown(args)} is not how pickle stores bytes (it could allocate any amount)")


def _encode(*args: object) -> bytes:
    """``_codecs.encode`` as pickle protocol 2 spells bytes: ``encode(text, "latin1")``."""
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")
    raise Refused(f"_codecs.encode{_shown(args)} is not how pickle stores bytes")


def _complex(*args: object) -> complex:
    if len(args) <= 2 and all(type(a) in (int, float) for a in args):
        return complex(*args)
    raise Refused(f"builtins.complex{_shown(args)} is not how pickle stores a complex number")


def _set(*args: object) -> set:
    if not args or (len(args) == 1 and type(args[0]) in (list, tuple)):
        return set(*args)
    raise Refused(f"builtins.set{_shown(args)} is not how pickle stores a set")


def _ordered_dict(*args: object) -> collections.OrderedDict:
    if not args or (len(args) == 1 and type(args[0]) is list):
        return collections.OrderedDict(*args)
    raise Refused(f"collections.OrderedDict{_shown(args)} is not how pickle stores an OrderedDict")


_INT64 = (-(2**63), 2**63 - 1)


def _size(*args: object) -> _Inert:
    """``torch.Size`` as pickle spells it: ``Size()`` or ``Size(ints)``, each a 64-bit int, as torch accepts."""
    if not args or (
        len(args) == 1
        and type(args[0]) in (tuple, list)
        and all(is_int(n) and _INT64[0] <= n <= _INT64[1] for n in args[0])
    ):
        return _Inert()
    raise Refused(f"torch.Size{_shown(args)} is not a size torch reads (one sequence of 64-bit ints)")


def _shown(args: tuple) -> str:
    text = "(" + ", ".join(f"{type(a).__name__} {a!r:.40}" if type(a) in (int, str) else type(a).__name__ for a in args) + ")"
    return text if len(text) < 200 else text[:197] + "...)"


class Refused(Exception):
    """The pickle asks for something torch's loader would do on its say-so (allocate, reach out of bounds)."""


def is_int(value: object) -> bool:
    return type(value) is int


def _tensor_extent(storage: object, offset: object, size: object, stride: object, what: str) -> None:
    """Refuse a tensor that does not lie inside its storage (torch's ``set_`` would refuse it too)."""
    if type(storage) is not Storage:
        raise Refused(f"{what}: its storage is {type(storage).__name__}, not a storage record")
    if not (is_int(offset) and offset >= 0):
        raise Refused(f"{what}: storage offset {offset!r:.40} is not a non-negative int")
    if type(size) not in (tuple, list) or type(stride) not in (tuple, list) or len(size) != len(stride):
        raise Refused(f"{what}: size {size!r:.60} and stride {stride!r:.60} are not tuples of one length")
    if not all(is_int(n) and n >= 0 for n in size) or not all(is_int(s) for s in stride):
        raise Refused(f"{what}: size {size!r:.60} or stride {stride!r:.60} is not made of valid ints")
    if 0 in size:
        return
    needed = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride) if s > 0)
    if needed > storage.numel:
        raise Refused(
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
        raise Refused(f"{what}: requires_grad is {type(requires_grad).__name__}, not a bool")
    kind = getattr(storage, "kind", None)
    if requires_grad and kind is not None and not kind.floating:
        raise Refused(f"{what}: requires_grad on a storage whose elements are not floating point")
    if metadata and not (type(metadata) is dict and all(type(k) is str and type(v) is bool for k, v in metadata.items())):
        raise Refused(f"{what}: its metadata is {type(metadata).__name__}, not a dict of bools")


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
        raise Refused(f"a parameter of {type(data).__name__} with requires_grad {type(requires_grad).__name__}")
    return _Tensor()


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state) -> _Tensor:
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _rebuild_from_type_v2(function=None, _new_type=None, args=(), _state=None, *_rest) -> object:
    if callable(function) and type(args) is tuple:
        return function(*args)  # one of this module's placeholders: checks, allocates nothing
    return _Inert()


TORCH: dict[tuple[str, str], object] = {
    **{
        ("torch", name): StorageType(itemsize, name.startswith(("BFloat16", "Complex", "Double", "Float", "Half")))
        for name, itemsize in _STORAGES.items()
    },
    ("torch.storage", "UntypedStorage"): StorageType(1),
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
            raise Refused(f"{self.name}{_shown(args)}: a call torch.save never writes (it could allocate any amount)")
        return _Inert()


_TENSOR_TYPES = "BFloat16 Byte Char Double Float Half Int Long Short".split()
_TENSOR_CLASSES = (
    [f"{module}.{kind}Tensor" for module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse") for kind in _TENSOR_TYPES]
    + ["torch.BoolTensor", "torch.cuda.BoolTensor", "torch.Tensor", "torch.nn.parameter.Parameter"]
)
TORCH.update({tuple(name.rsplit(".", 1)): _TensorClass(name) for name in _TENSOR_CLASSES})

#: Plain constructors a pickle of plain data may name, each in the forms pickle writes.
PLAIN = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _set,
    ("builtins", "complex"): _complex,
    ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _encode,
}

#: Every global this reader knows, as "module.name" (a subset of weights_only's).
ALLOWED_GLOBALS = frozenset(f"{module}.{name}" for module, name in (*TORCH, *PLAIN))
