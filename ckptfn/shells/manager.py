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

import logging
import os
import pathlib
from collections.abc import Mapping

from ckptfn.core.commit import roll_back
from ckptfn.core.config import Config, as_config
from ckptfn.core.errors import CheckpointError
from ckptfn.core.every import Every
from ckptfn.core.metadata import build_metadata, entry_for
from ckptfn.core.naming import timestamp_iso
from ckptfn.core.snapshot import Snapshot, Target, partition
from ckptfn.core.state import State, restore
from ckptfn.core.step import best_values, init, step
from ckptfn.core.summary import summary_lines
from ckptfn.io.read import load_checkpoint, read_metadata, restore_from_directory
from ckptfn.io.write import serialization_context, versions, write
from ckptfn.shells.background import AsyncExecutor, ClosesOnExit, raise_as_write_error
from ckptfn.shells.distributed import SOLO, Coordinator, find_group
from ckptfn.shells.recipe import plan, report_skips, state_to_keep, utc_now

__all__ = ["CheckpointManager"]

logger = logging.getLogger("ckptfn")


class CheckpointManager(ClosesOnExit):
    """Keep the best checkpoint of every configured metric in ``output_dir``.

    Args:
        output_dir: where checkpoint files go (created on first save).
        checkpoint_configs: a ``Config``, a ``Strategy``, a list of ``Strategy``,
            or anything ``Config.from_mapping`` accepts (lists of dicts, Hydra
            ``DictConfig``/``ListConfig``, ``{"enabled": ..., "strategies": [...]}``).
            ``None``, ``[]`` or ``enabled: false`` turn checkpointing off.
        resume: rebuild each strategy's best from the file at its name in
            ``output_dir`` (the files are the truth), so the first epoch after a
            restart never replaces a better checkpoint with a worse one.
        async_save: ``update`` returns once the payload is snapshotted (tensors
            copied into reused CPU staging buffers, the rest deep-copied) and one
            background thread writes it, one save at a time. ``wait()``,
            ``close()`` and leaving a ``with`` block block until it is on disk.
        checksums: ``False`` skips torch's CRC32 of every zip record (faster
            saves; ``torch.load`` never checks them, zip tools report bad CRCs).
        process_group: the ``torch.distributed`` group whose ranks share this
            manager's decisions; default: the default group once one is initialized.
            Rank 0 decides on its metrics and every rank acts on that decision.
        sharded: ``None`` (default): save with ``torch.distributed.checkpoint``
            into ``<stem>.dcp/`` directories when the payload holds DTensors
            (FSDP2, tensor parallel), else a file written by rank 0; ``True``:
            always sharded directories; ``False``: never.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        checkpoint_configs: object = None,
        *,
        resume: bool = False,
        async_save: bool = False,
        checksums: bool = True,
        process_group: object = None,
        sharded: bool | None = None,
    ) -> None:
        self.output_dir = pathlib.Path(output_dir)
        self.config: Config = as_config(checkpoint_configs)
        if sharded is True:
            self.config.check_sharded()  # a clash of sharded directory names is known now
        self._seen_skips: frozenset[tuple[str, str]] = frozenset()
        serialization_context(checksums)  # an unsafe torch for checksums=False fails here, not later
        self.checksums = checksums
        self._writer = AsyncExecutor(checksums=checksums) if async_save else None
        self._in_flight: State | None = None  # the state before the step the background save writes
        self._closed = False
        self.sharded = sharded
        self._process_group = process_group
        ranks = find_group(process_group)  # None in a single process: nothing below changes
        self._coordinator = None if ranks is None else Coordinator(ranks, self.config, self.output_dir, sharded)
        if resume:
            if self._coordinator is not None:
                self.state = self._coordinator.restore()
            else:
                self.state = restore_from_directory(self.config, self.output_dir)
            if self.config.active:
                logger.info("resumed checkpointing in %s:\n%s", self.output_dir, self.summary())
        else:
            self.state = init(self.config)
            self._warn_about_existing_files()

    # --- the training-loop call ------------------------------------------------------------

    def update(
        self, metrics_dict: Mapping, model_state_dict: object, epoch: int, *, barrier: bool = False
    ) -> list[pathlib.Path]:
        """Judge this epoch's metrics and save whatever improved: the files written, in strategy order.

        ``model_state_dict`` may be any payload, e.g. ``{"model": ..., "optimizer": ...}``.

        With ``async_save=True`` it returns the files being written in the
        background; a failure of that write is raised by the next ``update``,
        ``wait`` or ``close`` (which then commits nothing of its own epoch), and
        the bests of its strategies roll back to what their files hold.

        In a distributed run every rank calls it: rank 0 decides on its metrics
        and every rank acts on that decision and returns the same paths. A
        replicated payload is written by rank 0 alone; ``barrier=True`` makes the
        other ranks wait for that write (and raise if it failed). A sharded
        payload is written by all ranks together, always awaited.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        coordinator = self._coordination()
        if coordinator is not None:
            result = coordinator.update(self.state, metrics_dict, model_state_dict, epoch, barrier=barrier)
            self._seen_skips = report_skips(self._seen_skips, result.actions, loud=coordinator.is_coordinator)
            self.state = result.state
            result.raise_error()
            return list(result.paths)
        old = self.state
        new, actions = step(old, metrics_dict, epoch)
        saves, _ = partition(actions)
        snapshot = plan(saves, state=new, metrics=metrics_dict) if saves else None
        if self._writer is not None:
            staged = self._writer.stage(model_state_dict) if saves else None  # PayloadError now
            self._settle(block=bool(saves))  # one save in flight: wait for the previous one
        self._seen_skips = report_skips(self._seen_skips, actions)
        if not saves:
            self.state = new
            return []
        if self._writer is not None:
            job = lambda hook: write(self.output_dir, snapshot, staged, on_serialized=hook)  # noqa: E731
            paths = self._writer.start(job, [self.output_dir / name for name in snapshot.filenames])
            self._in_flight = old
            self.state = new
            return list(paths)
        written = serialization_context(self.checksums).run(write, self.output_dir, snapshot, model_state_dict)
        self.state = state_to_keep(self.config, self.output_dir, old, new, written)
        written.raise_error()
        return list(written.paths)

    def _settle(self, *, block: bool) -> None:
        """Collect the background save; on its failure roll its strategies back (to what they
        believed before it if nothing was published, else to the files) and raise."""
        written = self._writer.collect(block=block)
        if written is None:
            return
        prior, self._in_flight = self._in_flight, None
        if written.error is not None and prior is not None:
            before = roll_back(self.state, prior, written.outcome.names)
            self.state = state_to_keep(self.config, self.output_dir, before, self.state, written)
        raise_as_write_error(written)

    # --- asynchronous saving ----------------------------------------------------------------

    def wait(self) -> None:
        """Block until every save handed to the background is on disk (nothing to do when synchronous).

        Raises the ``CheckpointWriteError`` of a background save that failed.
        """
        if self._writer is not None:
            self._settle(block=True)

    def close(self) -> None:
        """``wait``, then stop the background writer and free its staging buffers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            try:
                self._settle(block=True)
            finally:
                self._writer.close()

    def _coordination(self) -> Coordinator | None:
        """The coordinator when saving involves other ranks or DCP, else None. Until a process
        group exists this looks for one at each call (two cheap checks, no collective)."""
        if self._coordinator is None and self._process_group is None:
            ranks = find_group()
            if ranks is not None:
                self._coordinator = Coordinator(ranks, self.config, self.output_dir, self.sharded)
        if self._coordinator is None and self.sharded is True:
            self._coordinator = Coordinator(SOLO, self.config, self.output_dir, self.sharded)
        if self._coordinator is None:
            return None
        if self._writer is not None:
            raise ValueError("async_save is not supported with a process group or sharded=True")
        return self._coordinator

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
        top level of the file's metadata; its ``epoch`` becomes the file's epoch,
        any other reserved key is a ``ValueError``.
        """
        path = pathlib.Path(filepath)
        directory = self.output_dir if path.parent == pathlib.Path() and not path.is_absolute() else path.parent
        extra = dict(metadata or {})
        epoch = extra.pop("epoch", None)
        file_metadata = build_metadata(
            [],
            epoch=epoch,
            timestamp=timestamp_iso(utc_now()),
            metrics=None,
            manager_state=self.state.to_dict(),
            versions=versions(),
            extra=extra,
        )
        snapshot = Snapshot([Target(path.name, overwrite)], file_metadata)
        coordinator = self._coordination()
        if coordinator is not None:
            return coordinator.save_one(state_dict, directory, snapshot)
        if self._writer is not None:
            self._writer.join()  # never two writes at once; its outcome is left for update/wait/close
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
        return f"CheckpointManager({str(self.output_dir)!r}, {len(self.config.strategies)} strategies, best={self.best_values})"

    def _warn_about_existing_files(self) -> None:
        """With ``resume=False``, say what configured names already hold and what will happen to them."""
        if not self.config.active or (self._coordinator is not None and not self._coordinator.is_coordinator):
            return
        found = []
        for strategy in self.config.strategies:
            path = self.output_dir / strategy.filename
            try:
                metadata = read_metadata(path)
            except CheckpointError:
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
        if found:
            logger.warning(
                "%s already holds ckptfn checkpoints and resume=False, so bests start from scratch: %s. "
                "Pass resume=True to continue from them.",
                self.output_dir,
                "; ".join(found),
            )
