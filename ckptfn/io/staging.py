"""Staging buffers: a snapshot of a payload that no later change of the original can reach.

``StagingBuffers.snapshot`` copies every tensor's storage into CPU buffers, reused
from save to save while the sizes match (pinned memory when the source is on
CUDA), and deep-copies everything else, so a training loop may change the payload
the moment the copy returns (PyTorch #144657 is this bug in DCP's async save).

A snapshot saves exactly what the original saves, whatever the tensor kind. A
plain dense tensor (or ``Parameter``) is rebuilt over its buffer directly. Every
other kind (sparse COO/CSR/CSC/BSR/BSC, nested, quantized, conjugate and
negative views, tensors with Python attributes, ``Parameter`` around any of
them) is taken apart the way ``torch.save`` takes it apart, with the tensor's own
pickling (``__reduce_ex__``): its storages are copied into buffers like any
other, and it is rebuilt from the copies with torch's own rebuild function, the
one ``torch.load`` calls for the file. Tensors that share a storage (tied
weights, views, a sparse tensor and its values) share one buffer, so the file
keeps the sharing. A tensor ``torch.save`` cannot store (an MKL-DNN tensor, say)
is a ``PayloadError`` naming its key, before anything is written.
"""

from __future__ import annotations

import collections
import copy
import ctypes
from collections.abc import Sequence

import torch

from ckptfn.core.errors import PayloadError
from ckptfn.io import torch_internals

__all__ = ["StagingBuffers"]


def _stageable(tensor: torch.Tensor) -> bool:
    """A plain dense tensor that is rebuilt over its buffer directly: ``torch.save`` stores its
    storage, offset, shape, strides and ``requires_grad``, nothing else."""
    return (
        type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and tensor.layout == torch.strided
        and not tensor.is_nested
        and not tensor.is_quantized
        and tensor.device.type != "meta"
        and not tensor.is_conj()
        and not tensor.is_neg()
        and not vars(tensor)
    )


def _tensors_in(payload: object) -> list[torch.Tensor]:
    """Every tensor of a prepared payload, each once, in the order ``torch.save`` meets them."""
    found: dict[int, torch.Tensor] = {}

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor):
            found.setdefault(id(value), value)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                visit(item)

    visit(payload)
    return list(found.values())


def _path_of(payload: object, tensor: torch.Tensor, path: str = "payload") -> str | None:
    """The key path of ``tensor`` in ``payload`` (for an error message; None if not found)."""
    if payload is tensor:
        return path
    if isinstance(payload, dict):
        items = ((f"{path}[{key!r}]", item) for key, item in payload.items())
    elif isinstance(payload, (list, tuple, set, frozenset)):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(payload))
    else:
        return None
    for where, item in items:
        found = _path_of(item, tensor, where)
        if found is not None:
            return found
    return None


def _allocate(nbytes: int, pinned: bool) -> torch.UntypedStorage:
    if pinned:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).untyped_storage()
    return torch.UntypedStorage(nbytes)


def _copy_bytes(buffer: torch.UntypedStorage, source: torch.UntypedStorage, pinned: bool) -> None:
    """Copy ``source``'s bytes into ``buffer`` (same size).

    From CPU memory: one plain ``memmove`` (it releases the GIL). torch's own copy
    splits large copies over its intra-op threads, and on a busy machine those
    stall for far longer than the copy takes while the writer thread serializes
    (measured on 2 busy cores: a 2 MiB payload of 16 tensors took about 200 ms
    instead of a few ms). From a device: torch (asynchronous into
    pinned memory; the caller synchronizes).
    """
    if source.nbytes() == 0:
        return
    if source.device.type == "cpu":
        ctypes.memmove(buffer.data_ptr(), source.data_ptr(), source.nbytes())
    else:
        buffer.copy_(source, non_blocking=pinned)


def _on_staging(tensor: torch.Tensor, storage: torch.UntypedStorage) -> torch.Tensor:
    """``tensor`` rebuilt over the staging ``storage``: same dtype, offset, shape, strides, type."""
    staged = torch.empty(0, dtype=tensor.dtype).set_(
        storage, tensor.storage_offset(), tensor.size(), tensor.stride()
    )
    if type(tensor) is torch.nn.Parameter:
        return torch.nn.Parameter(staged, requires_grad=tensor.requires_grad)
    return staged.requires_grad_(True) if tensor.requires_grad else staged


# --- the plan of a snapshot: what to copy, and how to rebuild each tensor from the copies -----


class _Buffer:
    """A storage of the payload, in a plan: rebuilt as its staging buffer, typed as ``torch.load``
    hands storages to the rebuild functions (a TypedStorage's own dtype; bytes for an UntypedStorage)."""

    __slots__ = ("slot", "dtype")

    def __init__(self, slot: int, dtype: torch.dtype) -> None:
        self.slot, self.dtype = slot, dtype


class _Plain:
    """A plain dense tensor, rebuilt over its buffer."""

    __slots__ = ("tensor", "slot")

    def __init__(self, tensor: torch.Tensor, slot: int) -> None:
        self.tensor, self.slot = tensor, slot


class _Reduced:
    """Any other tensor: the function and (planned) arguments of its ``__reduce_ex__``. It keeps the
    tensor, so that no object met while planning is freed and its id reused for another."""

    __slots__ = ("tensor", "function", "arguments")

    def __init__(self, tensor: torch.Tensor, function: object, arguments: object) -> None:
        self.tensor, self.function, self.arguments = tensor, function, arguments


class _Unstorable(Exception):
    """A tensor ``torch.save`` cannot store (raised as a ``PayloadError`` with its key path)."""

    def __init__(self, tensor: torch.Tensor, reason: str) -> None:
        super().__init__(reason)
        self.tensor, self.reason = tensor, reason


class _Planner:
    """Walks tensors the way ``torch.save`` pickles them, numbering their distinct storages."""

    def __init__(self) -> None:
        self.sources: list[torch.UntypedStorage] = []
        self.slot_of: dict[int, int] = {}
        self.plans: dict[int, _Plain | _Reduced] = {}  # by id of the tensor

    def slot(self, storage: torch.UntypedStorage) -> int:
        key = torch_internals.storage_key(storage)
        if key not in self.slot_of:
            self.slot_of[key] = len(self.sources)
            self.sources.append(storage)
        return self.slot_of[key]

    def tensor(self, tensor: torch.Tensor) -> _Plain | _Reduced:
        plan = self.plans.get(id(tensor))
        if plan is not None:
            return plan
        if _stageable(tensor):
            plan = _Plain(tensor, self.slot(tensor.untyped_storage()))
        else:
            try:
                reduced = tensor.__reduce_ex__(2)  # what torch.save pickles for it
            except Exception as error:
                reason = str(error).splitlines()[0] if str(error) else ""
                raise _Unstorable(
                    tensor, f"torch.save cannot store this {tensor.layout} tensor ({type(error).__name__}: {reason})"
                ) from None
            if not (isinstance(reduced, tuple) and len(reduced) == 2 and callable(reduced[0])):
                raise _Unstorable(tensor, f"{type(tensor).__name__} pickles in a form a snapshot cannot copy")
            function, arguments = reduced
            plan = _Reduced(tensor, function, self.value(arguments))
        self.plans[id(tensor)] = plan
        return plan

    def value(self, value: object) -> object:
        """A rebuild argument, planned: tensors and storages inside it are planned, the rest kept."""
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, torch.TypedStorage):
            return _Buffer(self.slot(value.untyped()), value.dtype)
        if isinstance(value, torch.UntypedStorage):
            return _Buffer(self.slot(value), torch.uint8)
        if type(value) in (tuple, list):
            return type(value)(self.value(item) for item in value)
        if type(value) in (dict, collections.OrderedDict):  # hooks, metadata, a tensor's attributes
            planned = type(value)()
            for key, item in value.items():
                planned[key] = self.value(item)
            return planned
        return _Kept(value)


class _Kept:
    """Anything else in a rebuild argument: deep-copied when the snapshot is built."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


class _Builder:
    """Builds planned tensors over the staging buffers (after the bytes are copied)."""

    def __init__(self, buffers: Sequence[torch.UntypedStorage], memo: dict) -> None:
        self.buffers = buffers
        self.memo = memo  # copy.deepcopy's memo: id of an original -> its copy
        self.built: dict[int, torch.Tensor] = {}  # id of a plan -> its tensor

    def tensor(self, plan: _Plain | _Reduced) -> torch.Tensor:
        done = self.built.get(id(plan))
        if done is None:
            if isinstance(plan, _Plain):
                done = _on_staging(plan.tensor, self.buffers[plan.slot])
            else:
                done = plan.function(*self.value(plan.arguments))
            self.built[id(plan)] = done
            self.memo[id(plan.tensor)] = done
        return done

    def value(self, value: object) -> object:
        if isinstance(value, (_Plain, _Reduced)):
            return self.tensor(value)
        if isinstance(value, _Buffer):
            return torch_internals.typed_storage(self.buffers[value.slot], value.dtype)
        if isinstance(value, _Kept):
            return copy.deepcopy(value.value, self.memo)
        if type(value) in (tuple, list):
            return type(value)(self.value(item) for item in value)
        if type(value) in (dict, collections.OrderedDict):
            built = type(value)()
            for key, item in value.items():
                built[key] = self.value(item)
            return built
        raise AssertionError(f"not a planned value: {value!r}")


class StagingBuffers:
    """CPU storages that hold the latest snapshot's tensor data.

    One buffer per distinct storage of the payload (tensors that share a storage,
    e.g. tied weights or views, share a buffer, so the file keeps the sharing).
    A buffer is reused when the storage at its position has the same size (and
    needs the same pinning); otherwise it is freed and a new one allocated.

    >>> import io
    >>> weights = torch.arange(6.0)
    >>> payload = {"w": weights, "head": weights[4:], "sparse": torch.eye(2).to_sparse(),
    ...            "nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}
    >>> snapshot = StagingBuffers().snapshot(payload)
    >>> weights += 1  # the training loop moves on
    >>> snapshot["head"].tolist(), snapshot["sparse"].to_dense().tolist(), snapshot["nested"].is_nested
    ([4.0, 5.0], [[1.0, 0.0], [0.0, 1.0]], True)
    >>> snapshot["head"].untyped_storage().data_ptr() == snapshot["w"].untyped_storage().data_ptr()
    True
    """

    def __init__(self) -> None:
        self._slots: list[tuple[torch.UntypedStorage, bool]] = []

    @property
    def storages(self) -> tuple[torch.UntypedStorage, ...]:
        """The current buffers, in payload order."""
        return tuple(storage for storage, _ in self._slots)

    def clear(self) -> None:
        """Free every buffer."""
        self._slots = []

    def snapshot(self, payload: object) -> object:
        """A copy of a prepared ``payload`` that no later change of the original can reach,
        which ``torch.save`` stores exactly as it stores the original.

        Tensors are copied into the buffers (whole storages, as ``torch.save``
        writes them); everything else is deep-copied. ``PayloadError`` (naming the
        key) for a tensor ``torch.save`` cannot store.
        """
        planner, plans = _Planner(), []
        for tensor in _tensors_in(payload):
            try:
                plans.append(planner.tensor(tensor))
            except _Unstorable as error:  # the tensor itself, or one inside it (its data, an attribute)
                inside = "" if error.tensor is tensor else " (a tensor inside it)"
                raise PayloadError(f"{_path_of(payload, tensor) or 'payload'}{inside}: {error.reason}") from None
        sources = planner.sources
        self._fit([(s.nbytes(), s.device.type == "cuda") for s in sources])
        for (buffer, pinned), source in zip(self._slots, sources):
            _copy_bytes(buffer, source, pinned)
        for device in {s.device for s in sources if s.device.type == "cuda"}:
            torch.cuda.synchronize(device)  # the copies are done before the caller may change anything
        memo: dict = {}
        builder = _Builder(self.storages, memo)
        for plan in plans:
            builder.tensor(plan)
        return copy.deepcopy(payload, memo)

    def _fit(self, wanted: Sequence[tuple[int, bool]]) -> None:
        old = self._slots
        kept = [
            old[index] if index < len(old) and (old[index][0].nbytes(), old[index][1]) == want else None
            for index, want in enumerate(wanted)
        ]
        self._slots = []
        del old  # free what is not reused before allocating anything new
        self._slots = [
            slot if slot is not None else (_allocate(nbytes, pinned), pinned)
            for slot, (nbytes, pinned) in zip(kept, wanted)
        ]
