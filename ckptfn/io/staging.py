"""Staging buffers: a snapshot of a payload that no later change of the original can reach.

``StagingBuffers.snapshot`` copies every tensor's storage into CPU buffers, reused
from save to save while the sizes match (pinned memory when the source is on
CUDA), and deep-copies everything else, so a training loop may change the payload
the moment the copy returns (PyTorch #144657 is this bug in DCP's async save).
"""

from __future__ import annotations

import copy
import ctypes
from collections.abc import Sequence

import torch

from ckptfn.io import torch_internals

__all__ = ["StagingBuffers"]


def _stageable(tensor: torch.Tensor) -> bool:
    """A plain dense tensor whose bytes are all ``torch.save`` stores (anything else is deep-copied)."""
    return (
        type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and tensor.device.type != "meta"
        and not tensor.is_conj()
        and not tensor.is_neg()
        and not vars(tensor)
    )


def _tensors_in(payload: object) -> list[torch.Tensor]:
    """The stageable tensors of a prepared payload, each once, in the order ``torch.save`` meets them."""
    found: dict[int, torch.Tensor] = {}

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor):
            if _stageable(value):
                found.setdefault(id(value), value)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                visit(item)

    visit(payload)
    return list(found.values())


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


class StagingBuffers:
    """CPU storages that hold the latest snapshot's tensor data.

    One buffer per distinct storage of the payload (tensors that share a storage,
    e.g. tied weights or views, share a buffer, so the file keeps the sharing).
    A buffer is reused when the storage at its position has the same size (and
    needs the same pinning); otherwise it is freed and a new one allocated.
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
        """A copy of a prepared ``payload`` that no later change of the original can reach.

        Tensors are copied into the buffers (whole storages, as ``torch.save``
        writes them); everything else is deep-copied.
        """
        tensors = _tensors_in(payload)
        slot_of: dict[int, int] = {}
        sources: list[torch.UntypedStorage] = []
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if torch_internals.storage_key(storage) not in slot_of:
                slot_of[torch_internals.storage_key(storage)] = len(sources)
                sources.append(storage)
        self._fit([(s.nbytes(), s.device.type == "cuda") for s in sources])
        for (buffer, pinned), source in zip(self._slots, sources):
            _copy_bytes(buffer, source, pinned)
        for device in {s.device for s in sources if s.device.type == "cuda"}:
            torch.cuda.synchronize(device)  # the copies are done before the caller may change anything
        memo = {
            id(tensor): _on_staging(tensor, self._slots[slot_of[torch_internals.storage_key(tensor.untyped_storage())]][0])
            for tensor in tensors
        }
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
