"""``CheckpointManager``: the imperative shell a training loop calls once per validation epoch.

Thin and boring by design: ``step`` decides, the one write function writes, and
the pure commit rule (``ckptfn.core.commit``) says which state to keep: the new
one after a successful write, the old one if nothing was published (so the next
epoch retries), the bests read back from the files if the failure hit after some
names were published, so that state and disk always agree, whatever the
exception (an interrupt included). In a distributed run the manager's
``Coordinator`` does the same across ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import time
from collections.abc import Mapping

from ckptfn.core.commit import roll_back
from ckptfn.core.config import Config, as_config
from ckptfn.core.errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError
from ckptfn.core.every import Every
from ckptfn.core.metadata import build_metadata, entry_for
from ckptfn.core.naming import timestamp_iso
from ckptfn.core.snapshot import Snapshot, Target, partition
from ckptfn.core.state import State, restore
from ckptfn.core.step import best_values, init, preempt, step
from ckptfn.core.summary import count_of, summary_lines
from ckptfn.io.objectstore import is_remote, location
from ckptfn.io.read import load_checkpoint, member_files, read_metadata, restore_from_directory
from ckptfn.io.write import interrupts_deferred, serialization_context, versions, write
from ckptfn.shells.async_ranks import AsyncCoordinator
from ckptfn.shells.background import AsyncExecutor, ClosesOnExit, raise_as_write_error
from ckptfn.shells.distributed import SOLO, Coordinator, find_group
from ckptfn.shells.preemption import Preemption, SignalWatch, check_main_thread, honour_preemption, with_save_on
from ckptfn.shells.recipe import hooks_of, notify, plan, report_skips, state_to_keep, trackers_of, utc_now

__all__ = ["CheckpointManager"]

logger = logging.getLogger("ckptfn")


class CheckpointManager(ClosesOnExit):
    """Keep the best checkpoint of every configured metric in ``output_dir``.

    Args:
        output_dir: where checkpoint files go (created on first save): a local directory, or
            an fsspec URL (``s3://bucket/run1``) for an object store (``ckptfn.io.remote``).
        checkpoint_configs: a ``Config``, a ``Strategy``, a list of ``Strategy``,
            or anything ``Config.from_mapping`` accepts (lists of dicts, Hydra
            ``DictConfig``/``ListConfig``, ``{"enabled": ..., "strategies": [...]}``).
            ``None``, ``[]`` or ``enabled: false`` turn checkpointing off.
        resume: ``None`` (default) or ``True``: each strategy's best is what the file
            at its name in ``output_dir`` holds (the files are the truth), so no
            epoch ever replaces a better checkpoint with a worse one, whether this
            is a restart or a new run in a used directory (the default says so in a
            WARNING when it finds checkpoints). ``False``: start from scratch, the
            explicit opt-in to replace an earlier run's checkpoints (it lists them).
            A file at a watched name that cannot be judged (unreadable, damaged,
            another format) is refused with a ``CheckpointError`` unless ``False``.
        verify: how much of each best to check before trusting it when resuming:
            ``"structure"`` (default: the zip structure and the metadata, cheap) or
            ``"full"`` (also every record's CRC32 and a ``weights_only`` load, reading
            every byte; a damaged best is refused, naming it and what failed).
        async_save: ``update`` returns once the payload is snapshotted (tensors
            copied into reused CPU staging buffers, the rest deep-copied) and one
            background thread writes it, one save at a time. ``wait()``,
            ``close()`` and leaving a ``with`` block block until it is on disk. Under a
            process group and for sharded state too (``ckptfn.shells.async_ranks``): the
            decision stays shared, the writing ranks write in the background, and ``wait``
            and ``close`` become collective (every rank calls them).
        checksums: ``False`` skips torch's CRC32 of every zip record (faster
            saves; ``torch.load`` never checks them, zip tools report bad CRCs).
        process_group: the ``torch.distributed`` group whose ranks share this
            manager's decisions; default: the default group once one is initialized.
            Rank 0 decides on its metrics and every rank acts on that decision.
        on_saved: a callable (or a list of them) called with a ``ckptfn.core.events.Saved``
            for every name of every committed snapshot (on rank 0; with ``async_save``
            once the background write is collected): names, metric, value, previous,
            epoch, global step, paths, bytes. A hook that raises is a WARNING. The
            config's ``trackers`` (``["wandb", "mlflow"]``) add the adapters of
            ``ckptfn.integrations.trackers``.
        sharded: ``None`` (default): save with ``torch.distributed.checkpoint``
            into ``<stem>.dcp/`` directories when the payload holds DTensors
            (FSDP2, tensor parallel), else a file written by rank 0; ``True``:
            always sharded directories; ``False``: never.
        save_on: signals that announce a preemption (``("SIGTERM", "SIGUSR1")``: names or
            numbers), added to the config's ``save_on``. Their handlers (installed from the main
            thread, chained to the previous ones, put back by ``close``) only record the
            signal; the next ``update`` or ``check_preemption`` writes every ``Every``
            strategy's file at once, whatever its period and the metrics, and sets
            ``preempted``: the loop should stop. The config must have an ``Every`` (``last.pt``).
            Under a process group the ranks agree on the flag (one ``all_reduce`` per call),
            so a signal to one rank stops all of them at the same step.

    >>> import tempfile, torch, ckptfn
    >>> strategies = [ckptfn.Strategy("val_loss"), ckptfn.Strategy("val_acc", mode="max")]
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     with CheckpointManager(directory, strategies) as manager:
    ...         for epoch, (loss, acc) in enumerate([(0.5, 0.7), (0.4, 0.6)]):
    ...             paths = manager.update({"val_loss": loss, "val_acc": acc}, {"w": torch.full((2,), epoch)}, epoch)
    ...             print(epoch, [path.name for path in paths])
    ...     print(manager.best_values)
    ...     print(ckptfn.load_checkpoint(f"{directory}/best_val_acc.pt")[0])
    ...     print(CheckpointManager(directory, strategies, resume=True).best_values)  # after a restart
    0 ['best_val_loss.pt', 'best_val_acc.pt']
    1 ['best_val_loss.pt']
    {'best_val_loss.pt': 0.4, 'best_val_acc.pt': 0.7}
    {'w': tensor([0, 0])}
    {'best_val_loss.pt': 0.4, 'best_val_acc.pt': 0.7}
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        checkpoint_configs: object = None,
        *,
        resume: bool | None = None,
        verify: str = "structure",
        async_save: bool = False,
        checksums: bool = True,
        process_group: object = None,
        sharded: bool | None = None,
        on_saved: object = None,
        save_on: object = None,
    ) -> None:
        self.output_dir = location(output_dir)  # a pathlib.Path, or a RemotePath for an fsspec URL
        self.config: Config = with_save_on(as_config(checkpoint_configs), save_on)
        watching = self.config.active and bool(self.config.save_on)
        if watching:
            check_main_thread("save_on")  # before any collective: every rank fails alike or none
        self._watch: SignalWatch | None = None
        self._preempted: Preemption | None = None
        if sharded is True:
            self.config.check_sharded()  # a clash of sharded directory names is known now
        self._seen_skips: frozenset[tuple[str, str]] = frozenset()
        self._hooks = hooks_of(on_saved) + trackers_of(self.config)
        self._in_flight_saves: tuple = ()  # the saves of the background write, for the hooks
        serialization_context(checksums)  # an unsafe torch for checksums=False fails here, not later
        self.checksums = checksums
        self._writer = AsyncExecutor(checksums=checksums) if async_save else None
        self._in_flight: State | None = None  # the state before the step the background save writes
        #: Set while a write and its commit run: if anything escapes in between (an interrupt
        #: included), the state is rebuilt from the files before it is used again.
        self._in_doubt = False
        self._closed = False
        self.sharded = sharded
        self._process_group = process_group
        ranks = find_group(process_group)  # None in a single process: nothing below changes
        self._coordinator = None if ranks is None else self._coordinator_for(ranks)
        if self._coordinator is not None:  # the same ConfigError on every rank if the ranks differ
            save_on = self.config.save_on if watching else ()  # decides the agreement collective
            self._coordinator.check_config(resume=resume is not False, async_save=async_save, save_on=save_on)
        if resume is not False:
            if self._coordinator is not None:
                self.state = self._coordinator.restore(verify=verify)
            else:
                self.state = restore_from_directory(self.config, self.output_dir, verify=verify)
            found = any(best.epoch is not None for best in self._state.bests)
            if self.config.active and (resume or found):
                loud = logger.warning if resume is None else logger.info
                how = "" if resume else " (found checkpoints of an earlier run; pass resume=False to start from scratch)"
                loud("judging against the checkpoints in %s%s:\n%s", self.output_dir, how, self.summary())
        else:
            self.state = init(self.config)
            self._warn_about_existing_files()
        if watching:
            self._watch = SignalWatch(self.config.save_on)  # last: nothing above can fail with it installed

    # --- the training-loop call ------------------------------------------------------------

    def update(
        self,
        metrics_dict: Mapping,
        model_state_dict: object,
        epoch: int | None = None,
        *,
        global_step: int | None = None,
        barrier: bool = False,
    ) -> list[pathlib.Path]:
        """Judge this validation's metrics and save whatever improved: the files written, in strategy order.

        ``model_state_dict`` may be any payload, e.g. ``{"model": ..., "optimizer": ...}``.
        ``epoch`` (default: the number of decisions so far) and ``global_step`` (optimizer
        steps completed; needed by ``Every(n_steps=...)``) are recorded in every file.
        ``Every(seconds=...)`` measures this process's monotonic clock.

        With ``async_save=True`` it returns the files being written in the
        background; a failure of that write is raised by the next ``update``,
        ``wait`` or ``close`` (which then commits nothing of its own epoch), and
        the bests of its strategies roll back to what their files hold.

        In a distributed run every rank calls it: rank 0 decides on its metrics
        and every rank acts on that decision and returns the same paths. A
        replicated payload is written by rank 0 alone; ``barrier=True`` makes the
        other ranks wait for that write (and raise if it failed). A sharded
        payload is written by all ranks together, always awaited.

        With ``save_on``, once a signal came (to any rank) this update also writes every
        ``Every`` strategy's file, whatever its period (one write with whatever improved),
        waits for it on every rank (as ``barrier=True``), and sets ``preempted``: stop the loop.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        position = {"epoch": epoch, "global_step": global_step, "now": time.monotonic()}
        coordinator = self._coordination()
        preempted = self._preemption_requested(coordinator)
        if preempted:
            position["preempted"] = True
        return self._decide_and_save(coordinator, step, metrics_dict, model_state_dict, position, barrier, preempted)

    def check_preemption(
        self, model_state_dict: object, epoch: int | None = None, *, global_step: int | None = None
    ) -> bool:
        """Between decisions: if a ``save_on`` signal came (on any rank), write every ``Every``
        strategy's file now and return True (the loop should stop; ``preempted`` says more).

        A cheap check to call every few optimizer steps, where ``update`` runs only at
        validation: one flag read in a single process; under a process group one collective,
        so every rank must call it at the same points. No metric is judged and the number of
        decisions (the default ``epoch``) stays; ``global_step`` is recorded in the file.
        Without ``save_on`` it returns False and does nothing.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._watch is None:
            return False
        coordinator = self._coordination()
        if not self._preemption_requested(coordinator):
            return False
        position = {"epoch": epoch, "global_step": global_step, "now": time.monotonic()}
        self._decide_and_save(coordinator, _between_decisions, None, model_state_dict, position, True, True)
        return True

    @property
    def preempted(self) -> Preemption | None:
        """None until a preemption save (``save_on``) is committed; then its ``Preemption``
        record (signals, epoch, global step, paths), which is truthy: stop the loop."""
        return self._preempted

    def _preemption_requested(self, coordinator: Coordinator | None) -> bool:
        """Whether to make the preemption save now: this process's flag alone (no collective),
        or, under a process group, the flag of any rank (one collective)."""
        if self._watch is None:
            return False
        return self._watch.requested_on(coordinator)

    def _deferral(self):
        """While a write and its commit run: chained signal handlers wait until they are done."""
        return self._watch.deferred() if self._watch is not None else contextlib.nullcontext()

    def _honour(self, actions, paths, *, loud: bool = True) -> None:
        """A committed preemption save: record it, so the loop can stop (and say so, on rank 0)."""
        self._preempted = honour_preemption(self._watch, actions, paths, loud=loud)

    def _decide_and_save(
        self, coordinator, decide, metrics_dict, model_state_dict, position, barrier: bool, preempted: bool
    ) -> list[pathlib.Path]:
        """``update``'s recipe, for ``decide`` (``step``, or the preemption between decisions)."""
        if coordinator is not None:
            old = self.state
            self._in_doubt = True
            with self._deferral():
                result = coordinator.update(
                    old, metrics_dict, model_state_dict, position, barrier=barrier or preempted, decide=decide
                )
                self._state, self._in_doubt = result.state, False
            self._seen_skips = report_skips(
                self._seen_skips, result.actions, stacklevel=3, loud=coordinator.is_coordinator
            )
            for saves, paths in result.confirmed:  # rank 0 only
                notify(self._hooks, saves, paths)
            result.raise_error()
            if preempted:
                self._honour(result.actions, result.paths, loud=coordinator.is_coordinator)
            return list(result.paths)
        old = self.state
        new, actions = decide(old, metrics_dict, **position)
        saves, _ = partition(actions)
        snapshot = plan(saves, state=new, metrics=metrics_dict) if saves else None
        if self._writer is not None:
            staged = self._writer.stage(model_state_dict) if saves else None  # PayloadError now
            self._settle(block=bool(saves))  # one save in flight: wait for the previous one
        self._seen_skips = report_skips(self._seen_skips, actions, stacklevel=3)
        if not saves:
            self.state = new
            return []
        self._in_doubt = True
        if self._writer is not None:
            job = lambda hook: write(self.output_dir, snapshot, staged, on_serialized=hook)  # noqa: E731
            with interrupts_deferred():  # handed over and committed together
                paths = self._writer.start(job, [self.output_dir / name for name in snapshot.filenames])
                self._in_flight, self._state, self._in_doubt = old, new, False
                self._in_flight_saves = snapshot.saves
            if preempted:  # the process is about to stop: on disk before update returns
                with self._deferral():
                    self._settle(block=True)
                self._honour(actions, paths)
            return list(paths)
        with self._deferral():
            written = serialization_context(self.checksums).run(write, self.output_dir, snapshot, model_state_dict)
            self._state = state_to_keep(self.config, self.output_dir, old, new, written)
            self._in_doubt = False
        written.raise_error()
        notify(self._hooks, snapshot.saves, written.paths)
        if preempted:
            self._honour(actions, written.paths)
        return list(written.paths)

    def _settle(self, *, block: bool) -> None:
        """Collect the background save; on its failure roll its strategies back (to what they
        believed before it if nothing was published, else to the files) and raise. Under a
        process group (``block=True`` only): the same, agreed by every rank (``AsyncCoordinator``)."""
        if isinstance(self._coordinator, AsyncCoordinator):
            self._settle_together()
            return
        written = self._writer.collect(block=block)
        if written is None:
            return
        prior, self._in_flight = self._in_flight, None
        saves, self._in_flight_saves = self._in_flight_saves, ()
        if written.error is None:
            notify(self._hooks, saves, written.paths)
        if written.error is not None and prior is not None:
            self._in_doubt = True
            believed = self._state
            before = roll_back(believed, prior, written.outcome.names)
            self._state = state_to_keep(self.config, self.output_dir, before, believed, written)
            self._in_doubt = False
        raise_as_write_error(written)

    # --- the state ----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The decision state: each strategy's best, as its file holds it.

        If an exception (an interrupt included) left ``update`` while a write or its
        commit ran, the state is first rebuilt from the files (after the background
        write, if one is in flight, has finished), so it never disagrees with the disk.
        """
        if self._in_doubt:
            self._rebuild_from_files()
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        self._state, self._in_doubt = value, False

    def _rebuild_from_files(self) -> None:
        if self._writer is not None:
            self._writer.join()  # the files settle first; its outcome stays for update/wait/close
        if self._coordinator is None or self._coordinator.is_coordinator:  # rank 0's state is the one that decides
            self._state = restore_from_directory(self.config, self.output_dir)
        self._in_doubt = False

    # --- asynchronous saving ----------------------------------------------------------------

    def wait(self) -> None:
        """Block until every save handed to the background is on disk (nothing to do when synchronous).

        Raises the ``CheckpointWriteError`` of a background save that failed.
        """
        if self._writer is not None:
            self._settle(block=True)

    def _settle_together(self) -> None:
        """``_settle(block=True)`` across ranks (every rank calls it): rank 0 reports the background
        save's outcome, every rank keeps the same state and raises the same failure."""
        old = self.state
        self._in_doubt = True
        result = self._coordinator.settle(old)
        self._state, self._in_doubt = result.state, False
        for saves, paths in result.confirmed:
            notify(self._hooks, saves, paths)
        result.raise_error()

    def close(self) -> None:
        """``wait``, then stop the background writer and free its staging buffers, and put back the
        signal handlers ``save_on`` replaced. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                try:
                    self._settle(block=True)
                finally:
                    self._writer.close()
        finally:
            if self._watch is not None:
                self._watch.close()  # the previous signal handlers are back

    def __exit__(self, kind, error, traceback) -> None:
        """Leaving a ``with`` block: ``close()``; with an exception, under a process group with
        ``async_save``, this rank closes alone (no collective: the other ranks may be anywhere),
        finishing its own background write and logging its failure, never hiding the exception."""
        if kind is None or not isinstance(self._coordinator, AsyncCoordinator) or self._closed:
            return super().__exit__(kind, error, traceback)
        self._closed = True
        self._in_doubt = True  # not judged with the others: the state is read back from the files if asked
        try:
            self._writer.close()
        except CheckpointWriteError as write_error:
            logger.error("a background checkpoint save failed: %s", write_error)
        finally:
            if self._watch is not None:
                self._watch.close()
        return None

    def _coordination(self) -> Coordinator | None:
        """The coordinator when saving involves other ranks or DCP, else None. Until a process
        group exists this looks for one at each call (two cheap checks, no collective)."""
        if self._coordinator is None and self._process_group is None:
            ranks = find_group()
            if ranks is not None:
                self._coordinator = self._coordinator_for(ranks)
        if self._coordinator is None and self.sharded is True:
            self._coordinator = self._coordinator_for(SOLO)
        return self._coordinator

    def _coordinator_for(self, ranks: object) -> Coordinator:
        """The distributed half for ``ranks``: writing in the background with ``async_save``."""
        if self._writer is not None:
            return AsyncCoordinator(ranks, self.config, self.output_dir, self.sharded, self._writer)
        return Coordinator(ranks, self.config, self.output_dir, self.sharded)

    # --- one-off saves and loads -----------------------------------------------------------

    def save_checkpoint(
        self,
        state_dict: object,
        filepath: str | os.PathLike,
        overwrite: bool = True,
        metadata: Mapping | None = None,
    ) -> pathlib.Path:
        """Save ``state_dict`` once, atomically, with the same overwrite policy as strategies.

        A bare file name goes into ``output_dir``; a path with a directory part is
        used as given. With ``overwrite=False`` an existing file is first kept under
        its timestamped archive name. ``metadata`` (plain data) is merged into the
        top level of the file's metadata; its ``epoch`` and ``global_step`` become the
        file's, any other reserved key is a ``ValueError``.
        """
        path = location(filepath)
        bare = not is_remote(path) and path.parent == pathlib.Path() and not path.is_absolute()
        directory = self.output_dir if bare else path.parent
        extra = dict(metadata or {})
        epoch = extra.pop("epoch", None)
        global_step = extra.pop("global_step", None)
        file_metadata = build_metadata(
            [],
            epoch=epoch,
            global_step=global_step,
            timestamp=timestamp_iso(utc_now()),
            metrics=None,
            manager_state=self.state.to_dict(),
            versions=versions(),
            extra=extra,
        )
        snapshot = Snapshot([Target(path.name, overwrite)], file_metadata)
        coordinator = self._coordination()
        if self._writer is not None:
            self._writer.join()  # never two writes at once; its outcome is left for update/wait/close
        if coordinator is not None:
            return coordinator.save_one(state_dict, directory, snapshot)
        written = serialization_context(self.checksums).run(write, directory, snapshot, state_dict)
        written.raise_error()
        (path,) = written.paths
        return path

    @staticmethod
    def load_checkpoint(filepath: str | os.PathLike) -> tuple[object, dict]:
        """``(state_dict, metadata)``, loaded with ``weights_only=True`` (see ``ckptfn.load_checkpoint``)."""
        return load_checkpoint(filepath)

    # --- state ----------------------------------------------------------------------------

    @property
    def best_values(self) -> dict[str, float | None]:
        """filename -> best value saved so far (None before the first save)."""
        return best_values(self.state)

    def state_dict(self) -> dict:
        """The manager's state as plain data, to store inside a training checkpoint."""
        return self.state.to_dict()

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore from ``state_dict()`` output (strategies whose identity changed start fresh)."""
        self.state = restore(self.config, state_dict)

    def summary(self) -> str:
        """One line per strategy: metric, mode, best value, epoch, path (or "never saved")."""
        return "\n".join(summary_lines(self.state, lambda name: str(self.output_dir / name)))

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.output_dir)!r}, {count_of(len(self.config.strategies), 'strategy', 'strategies')}, best={self.best_values})"

    def _warn_about_existing_files(self) -> None:
        """With ``resume=False``, say what configured names already hold and what will happen to them
        (an unreadable file too: it is replaced like any other, but never silently)."""
        if not self.config.active or (self._coordinator is not None and not self._coordinator.is_coordinator):
            return
        found = []
        for strategy in self.config.strategies:
            path = self.output_dir / strategy.filename
            try:
                metadata = read_metadata(path)
            except CheckpointNotFoundError:
                continue
            except CheckpointError as error:
                found.append(f"{strategy.filename} (which cannot be read: {error}) will be replaced or archived")
                continue
            entry = entry_for(metadata, strategy.filename) or {}
            fate = "archived (overwrite=False)" if not strategy.overwrite else "replaced (overwrite=True)"
            if isinstance(strategy, Every):
                found.append(f"{strategy.filename} (epoch {metadata.get('epoch')}) will be {fate} at the next periodic save")
                continue
            found.append(
                f"{strategy.filename} (epoch {metadata.get('epoch')}, {strategy.metric_name}={entry.get('value')}) "
                f"will be {fate} at the first new best"
            )
        members = member_files(self.config, self.output_dir)
        if members:
            found.append(f"the top-k members {', '.join(members)} will be deleted at their strategy's first save")
        if found:
            logger.warning(
                "%s already holds checkpoints and resume=False, so bests start from scratch: %s. "
                "Leave resume out (or pass resume=True) to judge against them instead.",
                self.output_dir,
                "; ".join(found),
            )


def _between_decisions(state: State, _metrics: None, **position: object):
    """The decision of ``check_preemption``: ``preempt`` (no metrics to judge), shaped like ``step``."""
    return preempt(state, **position)
