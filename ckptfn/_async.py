"""Asynchronous saving: snapshot the payload now, write it on one background thread.

The caller's thread does everything that decides or can fail fast: ``step``,
payload checks (``PayloadError``) and the *snapshot*. The snapshot copies every
tensor's storage into CPU staging buffers, reused from save to save while the
sizes match (pinned memory when the source is on CUDA), and deep-copies
everything else, so the training loop may change the payload the moment the
call returns (PyTorch #144657 is this bug in DCP's async save). One background
thread then runs the very same ``write_snapshot`` as synchronous mode, so the
files are exactly as crash-safe.

At most one save is in flight. The next save copies its snapshot as soon as the
previous one has handed its bytes to the OS (the staging buffers are free while
it fsyncs), then waits until the previous one is on disk before starting. A
failed background write is raised, as ``CheckpointWriteError``, by the next
``submit``, ``wait`` or ``close``. Saves still pending when the interpreter exits
normally are finished first (a failure then is logged on the ``ckptfn`` logger).

``checksums=False`` is the opt-in fast path: ``torch.save`` then skips the CRC32
of every zip record, which ``torch.load`` never verifies. It is set in a copy of
the caller's ``contextvars`` context for the duration of one write, so no other
save in the process, on any thread, is affected.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextvars
import copy
import ctypes
import datetime as dt
import logging
import os
import pathlib
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from ckptfn._actions import Periodic, Save, Skip
from ckptfn._errors import CheckpointWriteError, MetricWarning
from ckptfn._executor import Target, log_saves, partition, snapshot_of, write_snapshot
from ckptfn._payload import prepare_payload
from ckptfn._state import State

__all__ = ["AsyncExecutor", "ClosesOnExit", "StagingBuffers", "serialization_context"]

logger = logging.getLogger("ckptfn")

#: A write to run later: called with the hook to call once the payload's bytes are in the kernel.
Write = Callable[[Callable[[], object]], tuple[pathlib.Path, ...]]


# --- the CRC32 fast path ---------------------------------------------------------------------


def _crc32_setting_is_per_context() -> bool:
    """Whether torch keeps ``save.compute_crc32`` overrides in a ``ContextVar`` (torch >= 2.13 does).

    Where it is a plain module attribute, changing it would change every other
    save in the process while ours runs, so the fast path is refused.
    """
    try:
        from torch.utils.serialization import config

        entry = config._config["save.compute_crc32"]
    except (ImportError, AttributeError, KeyError):
        return False
    return isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)


def _disable_crc32() -> None:
    from torch.utils.serialization import config

    config.save.compute_crc32 = False


def serialization_context(checksums: bool = True) -> contextvars.Context:
    """A copy of the caller's context to run one write in; without CRC32s if ``checksums`` is False.

    Writes always run in such a copy, also on the background thread, so torch's
    per-context serialization settings of the caller (``set_crc32_options``,
    storage alignment) apply to its saves as they would synchronously.

    >>> import torch
    >>> torch.serialization.get_crc32_options()
    True
    >>> serialization_context(checksums=False).run(torch.serialization.get_crc32_options)
    False
    >>> torch.serialization.get_crc32_options()  # the caller's setting is untouched
    True
    """
    context = contextvars.copy_context()
    if not checksums:
        if not _crc32_setting_is_per_context():
            raise NotImplementedError(
                f"checksums=False needs torch's serialization config to be per context (torch >= 2.13); "
                f"in torch {torch.__version__} it is process-global, so turning CRC32 off for one save "
                "would turn it off for every save running at the same time"
            )
        context.run(_disable_crc32)
    return context


# --- the snapshot ----------------------------------------------------------------------------


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
            if storage._cdata not in slot_of:
                slot_of[storage._cdata] = len(sources)
                sources.append(storage)
        self._fit([(s.nbytes(), s.device.type == "cuda") for s in sources])
        for (buffer, pinned), source in zip(self._slots, sources):
            _copy_bytes(buffer, source, pinned)
        for device in {s.device for s in sources if s.device.type == "cuda"}:
            torch.cuda.synchronize(device)  # the copies are done before the caller may change anything
        memo = {
            id(tensor): _on_staging(tensor, self._slots[slot_of[tensor.untyped_storage()._cdata]][0])
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


# --- rolling back after a failed background write --------------------------------------------


# --- the background writer -------------------------------------------------------------------

_LIVE: weakref.WeakSet[AsyncExecutor] = weakref.WeakSet()


@atexit.register
def _finish_pending_saves() -> None:
    """At a normal interpreter exit, finish every pending save; report failures on the log."""
    for executor in list(_LIVE):
        try:
            executor.close()
        except CheckpointWriteError as error:
            logger.error("a background checkpoint save failed before exit: %s", error)


def _write_and_log(
    directory: pathlib.Path,
    targets: Sequence[Target],
    payload: object,
    metadata: Mapping,
    saves: Sequence[Save | Periodic],
    on_serialized: Callable[[], object],
) -> tuple[pathlib.Path, ...]:
    paths = write_snapshot(directory, targets, payload, metadata, on_serialized=on_serialized)
    log_saves(saves)
    return paths


class ClosesOnExit:
    """``with`` support for writers with a ``close()`` that flushes pending saves.

    Leaving the block normally closes (and raises a failed save's
    ``CheckpointWriteError``); leaving it with an exception still closes, but a
    write error is only logged, so the exception already unwinding is never hidden.
    """

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointWriteError as write_error:
            logger.error("a background checkpoint save failed: %s", write_error)


class AsyncExecutor(ClosesOnExit):
    """Perform ``step``'s actions on one background thread; ``execute``'s asynchronous twin.

    Args:
        checksums: ``False`` skips torch's CRC32 of every zip record (faster;
            ``torch.load`` never checks them, but zip tools then report bad CRCs).

    >>> import tempfile, torch, ckptfn
    >>> state = ckptfn.init(ckptfn.Strategy("val_loss"))
    >>> payload = {"w": torch.zeros(3)}
    >>> with tempfile.TemporaryDirectory() as directory, AsyncExecutor() as writer:
    ...     state, actions = ckptfn.step(state, {"val_loss": 0.5}, epoch=0)
    ...     writer.submit(actions, payload, directory, state=state)  # returns once snapshotted
    ...     payload["w"] += 1  # does not reach the file
    ...     [path.name for path in writer.wait()]  # now it is on disk
    ...     ckptfn.load_checkpoint(f"{directory}/best_val_loss.pt")[0]["w"].tolist()
    (PosixPath('...best_val_loss.pt'),)
    ['best_val_loss.pt']
    [0.0, 0.0, 0.0]

    Shells that commit state (``CheckpointManager``) commit it when the save is
    handed over; if ``submit``/``wait``/``close`` then raise ``CheckpointWriteError``
    for it, rebuild the bests from the files (``restore_from_directory``, ``roll_back``).
    """

    def __init__(self, *, checksums: bool = True) -> None:
        if not checksums:
            serialization_context(checksums=False)  # refuse an unsafe torch now, not in the background
        self.checksums = checksums
        self.buffers = StagingBuffers()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._future: concurrent.futures.Future | None = None
        self._released = threading.Event()
        self._released.set()
        self._closed = False

    # --- the steps, for shells --------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Whether a save was handed over and its outcome not yet collected."""
        return self._future is not None

    def stage(self, payload: object) -> object:
        """Check ``payload`` (``PayloadError`` now) and snapshot it into the staging buffers.

        Waits only until the save in flight no longer reads the buffers.
        """
        self._check_open()
        prepared = prepare_payload(payload)
        self._released.wait()
        return self.buffers.snapshot(prepared)

    def settle(self, *, block: bool) -> tuple[pathlib.Path, ...] | None:
        """Collect the save in flight: its paths once on disk, None while it runs (``block=False``).

        ``()`` when nothing was in flight. Its failure is raised here, once, as
        ``CheckpointWriteError``.
        """
        future = self._future
        if future is None:
            return ()
        if not block and not future.done():
            return None
        self._future = None
        try:
            return future.result()
        except CheckpointWriteError:
            raise
        except Exception as error:
            raise CheckpointWriteError(
                f"background checkpoint save failed: {type(error).__name__}: {error}"
            ) from error

    def join(self) -> None:
        """Block until the save in flight is finished, leaving its outcome to ``settle``."""
        if self._future is not None:
            concurrent.futures.wait([self._future])

    def start(self, write: Write, paths: Sequence[pathlib.Path]) -> tuple[pathlib.Path, ...]:
        """Hand ``write`` to the background thread (nothing may be in flight); returns ``paths``."""
        self._check_open()
        if self._future is not None:
            raise RuntimeError("a save is still in flight: settle it before starting the next")
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckptfn-writer")
        context = serialization_context(self.checksums)
        self._released.clear()
        try:
            self._future = self._pool.submit(context.run, self._run, write)
        except BaseException:
            self._released.set()
            raise
        _LIVE.add(self)
        return tuple(paths)

    def _run(self, write: Write) -> tuple[pathlib.Path, ...]:
        try:
            return write(self._released.set)
        finally:
            self._released.set()

    # --- the execute-like interface ---------------------------------------------------------

    def submit(
        self,
        actions: Iterable[Save | Periodic | Skip],
        payload: object,
        directory: str | os.PathLike,
        *,
        state: State | None = None,
        metrics: Mapping | None = None,
        now: dt.datetime | None = None,
    ) -> tuple[pathlib.Path, ...]:
        """Like ``execute``, but returns once the payload is snapshotted: the paths that will be written.

        Raises the ``CheckpointWriteError`` of an earlier save that failed (and then
        submits nothing).
        """
        saves, skips = partition(actions)
        if not saves:
            self.settle(block=False)
            _warn_skips(skips)
            return ()
        targets, metadata = snapshot_of(saves, state=state, metrics=metrics, now=now)
        staged = self.stage(payload)
        self.settle(block=True)
        _warn_skips(skips)
        directory = pathlib.Path(directory)
        write = lambda hook: _write_and_log(directory, targets, staged, metadata, saves, hook)  # noqa: E731
        return self.start(write, [directory / target.filename for target in targets])

    def wait(self) -> tuple[pathlib.Path, ...]:
        """Block until the save in flight is on disk: its paths (``()`` if none); raises its failure."""
        return self.settle(block=True)

    def close(self) -> None:
        """``wait``, then stop the background thread and free the staging buffers. Idempotent."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self.buffers.clear()
            self._closed = True
            _LIVE.discard(self)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this AsyncExecutor is closed")


def _warn_skips(skips: Iterable[Skip]) -> None:
    for skip in skips:
        warnings.warn(str(skip), MetricWarning, stacklevel=3)
