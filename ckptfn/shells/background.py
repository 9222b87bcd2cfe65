"""Asynchronous saving: snapshot the payload now, write it on one background thread.

The caller's thread does everything that decides or can fail fast: ``step``,
payload checks (``PayloadError``) and the *snapshot*. The snapshot copies every
tensor's storage into CPU staging buffers, reused from save to save while the
sizes match (pinned memory when the source is on CUDA), and deep-copies
everything else, so the training loop may change the payload the moment the
call returns (PyTorch #144657 is this bug in DCP's async save). One background
thread then runs the very same write function (``ckptfn.kit.write``) as synchronous mode, so the
files are exactly as crash-safe.

At most one save is in flight. The next save copies its snapshot as soon as the
previous one has handed its bytes to the OS (the staging buffers are free while
it fsyncs), then waits until the previous one is on disk before starting. A
failed background write is raised, as ``CheckpointWriteError``, by the next
``submit``, ``wait`` or ``close``. Saves still pending when the interpreter exits
normally are finished first (a failure then is logged on the ``ckptfn`` logger).

``os.fork()`` copies only the calling thread. In the child, every executor
forgets the parent's background thread and the save it may have in flight (the
parent finishes and reports that save; the child neither waits for it nor writes
it again), so the child exits normally and can save asynchronously itself, on a
thread of its own. The parent is unaffected.

``checksums=False`` is the opt-in fast path: ``torch.save`` then skips the CRC32
of every zip record, which ``torch.load`` never verifies. It is set in a copy of
the caller's ``contextvars`` context for the duration of one write, so no other
save in the process, on any thread, is affected.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import datetime as dt
import logging
import os
import pathlib
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence

from ckptfn.core.actions import Periodic, Save, Skip
from ckptfn.core.commit import Outcome
from ckptfn.core.summary import skip_line
from ckptfn.core.errors import CheckpointWriteError, MetricWarning
from ckptfn.core.snapshot import partition
from ckptfn.core.state import State
from ckptfn.io.payload import prepare_payload
from ckptfn.io.staging import StagingBuffers
from ckptfn.io.write import Written, interrupts_deferred, serialization_context, write
from ckptfn.shells.recipe import plan

__all__ = ["AsyncExecutor", "ClosesOnExit", "StagingBuffers", "serialization_context"]

logger = logging.getLogger("ckptfn")

#: A write to run later: called with the hook to call once the payload's bytes are in the kernel.
Write = Callable[[Callable[[], object]], Written]

_NOTHING = Written((), Outcome.success(()))


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


def _forget_the_parents_saves() -> None:
    """After ``os.fork()``, in the child: the writer threads are the parent's, not ours."""
    for executor in list(_LIVE):
        executor._forget_the_parents_save()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_the_parents_saves)


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

    def collect(self, *, block: bool) -> Written | None:
        """The ``Written`` of the save in flight once it is done (None while it runs and
        ``block=False``; an empty one when nothing was in flight). For shells that commit."""
        future = self._future
        if future is None:
            return _NOTHING
        if not block and not future.done():
            return None
        try:
            written = future.result()  # an interrupt here leaves the save in flight, to collect later
        except Exception as error:  # the write function never raises; anything here is a bug around it
            written = Written((), Outcome.failure(()), error)
        self._future = None
        return written

    def settle(self, *, block: bool) -> tuple[pathlib.Path, ...] | None:
        """Collect the save in flight: its paths once on disk, None while it runs (``block=False``).

        ``()`` when nothing was in flight. Its failure is raised here, once, as
        ``CheckpointWriteError``.
        """
        written = self.collect(block=block)
        if written is None:
            return None
        raise_as_write_error(written)
        return written.paths

    def join(self) -> None:
        """Block until the save in flight is finished, leaving its outcome to ``settle``."""
        if self._future is not None:
            concurrent.futures.wait([self._future])

    def start(self, job: Write, paths: Sequence[pathlib.Path]) -> tuple[pathlib.Path, ...]:
        """Hand ``job`` (a call of ``ckptfn.kit.write``) to the background thread (nothing may be
        in flight); returns ``paths``."""
        self._check_open()
        if self._future is not None:
            raise RuntimeError("a save is still in flight: settle it before starting the next")
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckptfn-writer")
        context = serialization_context(self.checksums)
        # Queued and recorded as one step: an interrupt between the two would leave a write
        # running that nobody waits for (and the staging buffers released while it reads them).
        with interrupts_deferred():
            self._released.clear()
            try:
                self._future = self._pool.submit(context.run, self._run, job)
            except BaseException:
                self._released.set()
                raise
            _LIVE.add(self)
        return tuple(paths)

    def _run(self, job: Write) -> Written:
        try:
            return job(self._released.set)
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
        snapshot = plan(saves, state=state, metrics=metrics, now=now)
        staged = self.stage(payload)
        self.settle(block=True)
        _warn_skips(skips)
        directory = pathlib.Path(directory)
        job = lambda hook: write(directory, snapshot, staged, on_serialized=hook)  # noqa: E731
        return self.start(job, [directory / name for name in snapshot.filenames])

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

    def _forget_the_parents_save(self) -> None:
        """In a child after ``os.fork()``: drop the parent's thread pool, its save in flight and
        the event its thread would set (their locks may have been held by a thread that is gone)."""
        self._pool = None  # its worker thread exists only in the parent; start() makes a new one
        self._future = None  # the parent's save: the parent completes it and raises its failure
        self._released = threading.Event()
        self._released.set()
        _LIVE.discard(self)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this AsyncExecutor is closed")


def _warn_skips(skips: Iterable[Skip]) -> None:
    for skip in skips:
        warnings.warn(skip_line(skip), MetricWarning, stacklevel=3)


def as_write_error(written: Written) -> CheckpointWriteError | None:
    """A background write's failure as ``CheckpointWriteError`` (its own, if it was one); None
    if it succeeded."""
    error = written.error
    if error is None or isinstance(error, CheckpointWriteError):
        return error
    wrapped = CheckpointWriteError(f"background checkpoint save failed: {type(error).__name__}: {error}", written.paths)
    wrapped.__cause__ = error
    return wrapped


def raise_as_write_error(written: Written) -> None:
    """Raise a background write's failure as ``CheckpointWriteError`` (its own, if it was one)."""
    error = as_write_error(written)
    if error is not None:
        raise error
