"""``CheckpointManager``: the imperative shell a training loop calls once per validation epoch.

Thin and boring by design: ``step`` decides, the executor writes, and only then
is the new state committed. If a write fails the manager keeps its old state (so
the next epoch retries); if the failure hit after some names were already
published, it rebuilds its bests from the files, exactly as ``resume=True`` does,
so that state and disk always agree.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import pathlib
import warnings
from collections.abc import Mapping

from ckptfn._async import AsyncExecutor, ClosesOnExit, serialization_context
from ckptfn._config import Config, as_config
from ckptfn._core import best_values, init, new_skips, step
from ckptfn._distributed import SOLO, find_group, restore_together, save_one_together, update_together
from ckptfn._errors import CheckpointError, CheckpointWriteError, MetricWarning
from ckptfn._every import Every
from ckptfn._executor import Target, log_saves, partition, snapshot_of, versions, write_snapshot
from ckptfn._metadata import build_metadata, entry_for
from ckptfn._naming import timestamp_iso
from ckptfn._reading import load_checkpoint, read_metadata, restore_from_directory
from ckptfn._state import State, restore, roll_back

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
        self._seen_skips: frozenset[tuple[str, str]] = frozenset()
        serialization_context(checksums)  # an unsafe torch for checksums=False fails here, not later
        self.checksums = checksums
        self._writer = AsyncExecutor(checksums=checksums) if async_save else None
        self._in_flight: tuple[str, ...] = ()  # the names the background save is writing
        self._closed = False
        self.sharded = sharded
        self._process_group = process_group
        self._ranks = find_group(process_group)  # None in a single process: nothing below changes
        if resume:
            if self._ranks is not None:
                self.state = restore_together(self.config, self.output_dir, self._ranks)
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
        if self._coordinated():
            return update_together(self, self._ranks or SOLO, metrics_dict, model_state_dict, epoch, barrier=barrier)
        new_state, actions = step(self.state, metrics_dict, epoch)
        saves, _ = partition(actions)
        if saves:
            targets, metadata = snapshot_of(saves, state=new_state, metrics=metrics_dict)
        if self._writer is not None:
            staged = self._writer.stage(model_state_dict) if saves else None  # PayloadError now
            self._settle(block=bool(saves))  # one save in flight: wait for the previous one
        self._report_skips(actions)
        if not saves:
            self.state = new_state
            return []
        if self._writer is not None:
            write = functools.partial(self._write, targets, staged, metadata, saves)
            paths = self._writer.start(write, [self.output_dir / target.filename for target in targets])
            self._in_flight = tuple(target.filename for target in targets)
            self.state = new_state
            return list(paths)
        try:
            paths = serialization_context(self.checksums).run(
                self._write, targets, model_state_dict, metadata, saves
            )
        except CheckpointWriteError as error:
            if error.published:  # the disk moved on for some names: believe the files
                self.state = restore_from_directory(self.config, self.output_dir)
            raise
        self.state = new_state
        return list(paths)

    def _write(self, targets, payload, metadata, saves, on_serialized=None) -> tuple[pathlib.Path, ...]:
        """Write one snapshot and log its saves (on the background thread with ``async_save``)."""
        paths = write_snapshot(self.output_dir, targets, payload, metadata, on_serialized=on_serialized)
        log_saves(saves)
        return paths

    def _settle(self, *, block: bool) -> None:
        """Collect the background save; on its failure roll its strategies back to the files and raise."""
        try:
            done = self._writer.settle(block=block)
        except CheckpointWriteError:
            on_disk = restore_from_directory(self.config, self.output_dir)
            self.state = roll_back(self.state, on_disk, self._in_flight)
            self._in_flight = ()
            raise
        if done is not None:
            self._in_flight = ()

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

    def _coordinated(self) -> bool:
        """Whether saving involves other ranks or DCP. Until a process group exists this
        looks for one at each call (two cheap checks, no collective)."""
        if self._ranks is None and self._process_group is None:
            self._ranks = find_group()
        if self._ranks is None and self.sharded is not True:
            return False
        if self._writer is not None:
            raise ValueError("async_save is not supported with a process group or sharded=True")
        return True

    def _report_skips(self, actions) -> None:
        self._seen_skips, loud, quiet = new_skips(self._seen_skips, actions)
        for skip in loud:
            warnings.warn(f"{skip} (further such epochs are logged at DEBUG)", MetricWarning, stacklevel=3)
        for skip in quiet:
            logger.debug("%s", skip)

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
            timestamp=timestamp_iso(dt.datetime.now(dt.timezone.utc)),
            metrics=None,
            manager_state=self.state.to_dict(),
            versions=versions(),
            extra=extra,
        )
        if self._coordinated():
            target = Target(path.name, overwrite)
            return save_one_together(self, self._ranks or SOLO, state_dict, directory, target, file_metadata)
        if self._writer is not None:
            self._writer.join()  # never two writes at once; its outcome is left for update/wait/close
        (written,) = serialization_context(self.checksums).run(
            write_snapshot, directory, [Target(path.name, overwrite)], state_dict, file_metadata
        )
        return written

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
        if not self.config.strategies:
            return "checkpointing is off (no strategies)"
        lines = [] if self.config.enabled else ["checkpointing is disabled"]
        for strategy, best in zip(self.config.strategies, self.state.bests):
            if isinstance(strategy, Every):
                saved = "never saved" if best.epoch is None else f"last saved at epoch {best.epoch} -> {self.output_dir / strategy.filename}"
                lines.append(f"every {strategy.n_epochs} epoch(s) ({strategy.filename}): {saved}")
                continue
            head = f"{strategy.metric_name} ({strategy.mode})"
            if best.value is None:
                lines.append(f"{head}: never saved")
            else:
                path = self.output_dir / strategy.filename
                lines.append(f"{head}: best {best.value:.6g} at epoch {best.epoch} -> {path}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.output_dir)!r}, {len(self.config.strategies)} strategies, best={self.best_values})"

    def _warn_about_existing_files(self) -> None:
        """With ``resume=False``, say what configured names already hold and what will happen to them."""
        if not self.config.active or (self._ranks is not None and not self._ranks.is_coordinator):
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
