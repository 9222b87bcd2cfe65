"""``CheckpointManager``: the imperative shell a training loop calls once per validation epoch.

Thin and boring by design: ``step`` decides, the executor writes, and only then
is the new state committed. If a write fails the manager keeps its old state (so
the next epoch retries); if the failure hit after some names were already
published, it rebuilds its bests from the files, exactly as ``resume=True`` does,
so that state and disk always agree.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import pathlib
import warnings
from collections.abc import Mapping

from ckptfn._config import Config, as_config
from ckptfn._core import best_values, init, new_skips, step
from ckptfn._errors import CheckpointError, CheckpointWriteError, MetricWarning
from ckptfn._executor import Target, log_saves, partition, snapshot_of, versions, write_snapshot
from ckptfn._metadata import build_metadata, entry_for
from ckptfn._naming import timestamp_iso
from ckptfn._reading import load_checkpoint, read_metadata, restore_from_directory
from ckptfn._state import State, restore

__all__ = ["CheckpointManager"]

logger = logging.getLogger("ckptfn")


class CheckpointManager:
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
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        checkpoint_configs: object = None,
        *,
        resume: bool = False,
    ) -> None:
        self.output_dir = pathlib.Path(output_dir)
        self.config: Config = as_config(checkpoint_configs)
        self._seen_skips: frozenset[tuple[str, str]] = frozenset()
        if resume:
            self.state = restore_from_directory(self.config, self.output_dir)
            if self.config.active:
                logger.info("resumed checkpointing in %s:\n%s", self.output_dir, self.summary())
        else:
            self.state = init(self.config)
            self._warn_about_existing_files()

    # --- the training-loop call ------------------------------------------------------------

    def update(self, metrics_dict: Mapping, model_state_dict: object, epoch: int) -> list[pathlib.Path]:
        """Judge this epoch's metrics and save whatever improved: the files written, in strategy order.

        ``model_state_dict`` may be any payload, e.g. ``{"model": ..., "optimizer": ...}``.
        """
        new_state, actions = step(self.state, metrics_dict, epoch)
        saves, _ = partition(actions)
        self._report_skips(actions)
        if not saves:
            self.state = new_state
            return []
        targets, metadata = snapshot_of(saves, state=new_state, metrics=metrics_dict)
        try:
            paths = write_snapshot(self.output_dir, targets, model_state_dict, metadata)
        except CheckpointWriteError as error:
            if error.published:  # the disk moved on for some names: believe the files
                self.state = restore_from_directory(self.config, self.output_dir)
            raise
        log_saves(saves)
        self.state = new_state
        return list(paths)

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
        (written,) = write_snapshot(directory, [Target(path.name, overwrite)], state_dict, file_metadata)
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
        if not self.config.active:
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
