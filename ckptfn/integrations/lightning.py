"""PyTorch Lightning integration: ``Checkpointing``, one callback for any number of strategies.

``pip install 'ckptfn[lightning]'``. The core never imports this module, and
``import ckptfn`` does not import Lightning.

Every file it writes holds the complete Lightning checkpoint (what
``trainer.save_checkpoint`` writes: weights, optimizer and scheduler states, loops,
callback states, hyper-parameters) at the top level, plus ckptfn's metadata under
the key ``"metadata"`` (ckptfn's *flat* layout). So the same file is read by

- ``Trainer.fit(ckpt_path=...)`` and ``LightningModule.load_from_checkpoint``,
- ``ckptfn.load_checkpoint`` (the payload is the Lightning checkpoint dict),
  ``ckptfn.read_metadata`` and ``ckptfn.restore_from_directory``,
- plain ``torch.load(path, weights_only=True)``.

It is written once per epoch whatever the number of names (hard links), atomically,
by global rank 0, after every rank took the same decision from rank 0's metrics.
"""

from __future__ import annotations

import logging
import os
import time
import pathlib
import warnings
from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.strategies import Strategy as LightningStrategy
from lightning.pytorch.trainer.states import TrainerFn

from ckptfn.core.config import Config, as_config
from ckptfn.core.errors import CheckpointError, CheckpointWriteError, MetricTypeError, PayloadError
from ckptfn.core.every import Every
from ckptfn.core.metrics import metric_value
from ckptfn.core.snapshot import partition
from ckptfn.core.state import State, restore, resume_state
from ckptfn.core.summary import count_of
from ckptfn.core.step import best_values, init, step
from ckptfn.integrations import lightning_internals
from ckptfn.io.read import restore_from_directory
from ckptfn.io.write import write
from ckptfn.shells.recipe import plan, report_skips, state_to_keep, user_stacklevel

__all__ = ["Checkpointing"]

logger = logging.getLogger("ckptfn")

_HPARAMS_OWNERS = (pl.LightningModule, pl.LightningDataModule)


class Checkpointing(Checkpoint):
    """Save the best checkpoint of every configured metric, and periodic ones, from Lightning.

    Args:
        strategies: a ``Config``, a ``Strategy``/``Every``, a list of them, or anything
            ``Config.from_mapping`` accepts (lists of dicts, Hydra configs). Metric names
            are the keys of ``trainer.callback_metrics`` (what ``self.log`` logged).
        dirpath: a local directory for the files. ``None``: like ``ModelCheckpoint``,
            ``<logger save_dir>/<name>/<version>/checkpoints``, or
            ``<default_root_dir>/checkpoints`` without a logger.
        save_on_train_epoch_end: decide at the end of the training epoch (``True``) or
            after each validation (``False``); ``None`` chooses like ``ModelCheckpoint``
            (at the training epoch's end when validation runs once per epoch or never).
        resume: what a fit that does not resume from a checkpoint does with checkpoints of
            an earlier run in ``dirpath``: ``None`` (default) or ``True`` judges against them
            (only better epochs replace them; ``None`` warns that it does); ``False`` starts
            from scratch, the explicit opt-in to replace them. A file at a watched name
            that cannot be judged is refused with a ``CheckpointError``.

    The decision is ``ckptfn.step`` on ``trainer.callback_metrics`` (as broadcast from
    global rank 0) at ``trainer.current_epoch``; nothing is decided during the sanity
    check, outside ``fit`` or twice at one global step. The callback's state is the pure
    ``State``: it goes into every Lightning checkpoint, so ``fit(ckpt_path=...)``
    restores the bests (reconciled with the files in ``dirpath``, which win for metric
    strategies, as with ``CheckpointManager(resume=True)``).

    Pass it to ``lightning.pytorch.Trainer(callbacks=[...])``; constructing it writes nothing:

    >>> import ckptfn
    >>> callback = Checkpointing([ckptfn.Strategy("val_loss")], dirpath="checkpoints")
    >>> callback.best_values, callback.best_model_path
    ({'best_val_loss.pt': None}, '')
    >>> saved = ckptfn.State(callback.config, [ckptfn.Best(0.25, 3)], steps=4).to_dict()
    >>> callback.load_state_dict(saved)  # what fit(ckpt_path=...) does
    >>> callback.best_values, callback.best_model_path
    ({'best_val_loss.pt': 0.25}, 'checkpoints/best_val_loss.pt')
    """

    def __init__(
        self,
        strategies: object,
        dirpath: str | os.PathLike | None = None,
        *,
        save_on_train_epoch_end: bool | None = None,
        resume: bool | None = None,
    ) -> None:
        super().__init__()
        if resume not in (None, True, False):
            raise TypeError(f"resume: expected None, True or False, got {resume!r}")
        self._resume = resume
        self.config: Config = as_config(strategies)
        if dirpath is not None and "://" in os.fspath(dirpath):
            raise ValueError(f"dirpath: ckptfn writes local files, got the URL {os.fspath(dirpath)!r}")
        if save_on_train_epoch_end not in (None, True, False):
            raise TypeError(f"save_on_train_epoch_end: expected None, True or False, got {save_on_train_epoch_end!r}")
        self._dirpath_given = None if dirpath is None else pathlib.Path(dirpath)
        self.dirpath: pathlib.Path | None = self._dirpath_given
        self.state: State = init(self.config)
        self._save_on_train_epoch_end = save_on_train_epoch_end
        self._last_global_step_decided = 0  # like ModelCheckpoint: nothing to save before a step
        self._seen_skips: frozenset[tuple[str, str]] = frozenset()
        self._resumed = False
        #: Set while rank 0 writes and the outcome is shared: if anything escapes in between
        #: (an interrupt ends ``fit``), the next ``fit`` takes the state from the files.
        self._in_doubt = False

    # --- Lightning hooks ------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return "ckptfn.integrations.lightning.Checkpointing"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _check_supported(trainer.strategy)
        dirpath = self._dirpath_given if self._dirpath_given is not None else _default_dirpath(trainer)
        self.dirpath = pathlib.Path(trainer.strategy.broadcast(os.fspath(dirpath), src=0))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reconcile the state with the files (read on global rank 0, then broadcast).

        A resumed fit takes its bests from the files (``resume_state``). A fit that does not
        resume (no ``ckpt_path``, or ``ckpt_path="last"`` finding nothing) in a directory
        holding checkpoints of an earlier run judges against them by default, so a worse
        epoch never replaces a better file; ``resume=False`` starts from scratch instead.
        After an interrupted fit, the state is the files'.
        """
        on_disk = self._files_state(trainer)
        starts_fresh = all(best.epoch is None for best in self.state.bests)
        found = [s.filename for s, b in zip(self.config.strategies, on_disk.bests) if b.epoch is not None]
        if self._resumed:
            self.state = resume_state(self.state, on_disk)
            self._resumed = False
        elif self._in_doubt:
            self.state = on_disk
        elif starts_fresh and found and self._resume is not False:
            self.state = on_disk
            if trainer.is_global_zero and self._resume is None:
                warnings.warn(
                    f"{self.dirpath} holds checkpoints of an earlier run ({', '.join(found)}): judging against "
                    "them, so only better epochs replace them. Pass Checkpointing(..., resume=False) to start "
                    "from scratch (they are then replaced or archived).",
                    stacklevel=1,  # ckptfn's warning, not one of Lightning's (whose caller this is)
                )
        elif starts_fresh and found and trainer.is_global_zero:
            warnings.warn(
                f"{self.dirpath} already holds checkpoints ({', '.join(found)}) and resume=False, so bests "
                "start from scratch and these files will be replaced or archived.",
                stacklevel=1,
            )
        self._in_doubt = False

    def _files_state(self, trainer: pl.Trainer) -> State:
        """What the files in ``dirpath`` say, read on global rank 0; its refusal (a file it cannot
        judge) is raised on every rank alike."""
        found = None
        if trainer.is_global_zero:
            try:
                found = ("ok", restore_from_directory(self.config, self.dirpath).to_dict())
            except CheckpointError as error:
                found = ("error", str(error))
        kind, value = trainer.strategy.broadcast(found, src=0)
        if kind == "error":
            raise CheckpointError(value)
        return restore(self.config, value)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._decides_on_train_epoch_end(trainer):
            self._checkpoint(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._decides_on_train_epoch_end(trainer):
            self._checkpoint(trainer)

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Resume: strategies whose ``(metric_name, mode, filename)`` is unchanged keep their best.

        When training starts, each metric strategy's best is then taken from the file
        at its name (``ckptfn.core.state.resume_state``): a better file written after the
        checkpoint resumed from is never replaced by a worse one.
        """
        self.state = restore(self.config, state_dict)
        self._resumed = True

    # --- what ModelCheckpoint users look for ------------------------------------------------

    @property
    def best_values(self) -> dict[str, float | None]:
        """filename -> best value saved so far (None before the first save)."""
        return best_values(self.state)

    @property
    def best_model_path(self) -> str:
        """The file of the first metric strategy, once it saved ("" before): what
        ``trainer.test(ckpt_path="best")`` loads."""
        for strategy, best in zip(self.config.strategies, self.state.bests):
            if not isinstance(strategy, Every):
                return self._path_of(strategy.filename) if best.epoch is not None else ""
        return ""

    @best_model_path.setter
    def best_model_path(self, path: str) -> None:
        """Lightning's spawn and fork launchers hand rank 0's best path back to the main
        process, whose callback did not train: it then rebuilds its state from the files."""
        if path:
            self.dirpath = pathlib.Path(path).parent
        if self.dirpath is not None:
            self.state = restore_from_directory(self.config, self.dirpath)

    @property
    def last_model_path(self) -> str:
        """The file of the first ``Every`` strategy, once it saved ("" before)."""
        for strategy, last in zip(self.config.strategies, self.state.bests):
            if isinstance(strategy, Every):
                return self._path_of(strategy.filename) if last.epoch is not None else ""
        return ""

    def _path_of(self, filename: str) -> str:
        return os.fspath(self.dirpath / filename) if self.dirpath is not None else filename

    def __repr__(self) -> str:
        return f"Checkpointing({count_of(len(self.config.strategies), 'strategy', 'strategies')}, dirpath={self.dirpath!r})"

    # --- the decision and the write ---------------------------------------------------------

    def _decides_on_train_epoch_end(self, trainer: pl.Trainer) -> bool:
        if self._save_on_train_epoch_end is not None:
            return self._save_on_train_epoch_end
        if lightning_internals.val_check_time_interval(trainer) is not None:
            return False  # time-based validation: decide after each validation
        if trainer.check_val_every_n_epoch != 1:
            return False
        batches = trainer.num_val_batches
        if (sum(batches) if isinstance(batches, list) else batches) == 0:
            return True  # no validation at all
        return trainer.val_check_interval == 1.0

    def _skips(self, trainer: pl.Trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._last_global_step_decided == trainer.global_step
        )

    def _checkpoint(self, trainer: pl.Trainer) -> None:
        if self._skips(trainer):
            return
        self._last_global_step_decided = trainer.global_step
        # rank 0's metrics and clock, so that every rank takes the same decision
        metrics, now = trainer.strategy.broadcast((plain_metrics(trainer.callback_metrics), time.monotonic()), src=0)
        old = self.state
        new, actions = step(old, metrics, trainer.current_epoch, global_step=trainer.global_step, now=now)
        saves, _ = partition(actions)
        self._seen_skips = report_skips(
            self._seen_skips, actions, stacklevel=user_stacklevel(skip=("lightning", "torch")), loud=trainer.is_global_zero
        )
        if not saves:
            self.state = new
            return
        checkpoint = lightning_internals.dump_checkpoint(trainer)  # on every rank
        if isinstance(checkpoint.get("callbacks"), dict):
            checkpoint["callbacks"][self.state_key] = new.to_dict()  # the state after this save
        snapshot = plan(saves, state=new, metrics=metrics, extra={"layout": "flat"})
        error, kept = None, new
        self._in_doubt = True
        if trainer.is_global_zero:
            written = write(self.dirpath, snapshot, weights_only_checkpoint(checkpoint))
            kept = state_to_keep(self.config, self.dirpath, old, new, written)
            error = _explained(written.error)
        report = None if error is None else (str(error), kept.to_dict())
        report = trainer.strategy.broadcast(report, src=0)
        if report is None:
            self.state, self._in_doubt = new, False
            return
        self.state, self._in_doubt = restore(self.config, report[1]), False  # the same on every rank
        if error is not None:
            raise error
        raise CheckpointWriteError(f"global rank 0 could not write the checkpoint: {report[0]}")


def _explained(error: BaseException | None) -> BaseException | None:
    """A ``PayloadError`` with the Lightning-specific way out added; other errors as they are."""
    if not isinstance(error, PayloadError):
        return error
    explained = PayloadError(
        f"{error}. A Lightning checkpoint written by ckptfn must load with "
        "torch.load(weights_only=True); leave such a hyper-parameter out with "
        "self.save_hyperparameters(ignore=[...]) or store plain data"
    )
    explained.__cause__ = error
    return explained


def plain_metrics(callback_metrics: Mapping) -> dict[str, float]:
    """The scalar entries of ``trainer.callback_metrics`` as Python floats (NaN/inf kept).

    >>> import torch
    >>> plain_metrics({"val_loss": torch.tensor(0.5), "hist": torch.ones(3), "note": "x"})
    {'val_loss': 0.5}
    """
    plain = {}
    for name, value in callback_metrics.items():
        try:
            plain[str(name)] = metric_value(str(name), value)
        except MetricTypeError:
            continue
    return plain


def weights_only_checkpoint(checkpoint: dict) -> dict:
    """The Lightning checkpoint, with OmegaConf hyper-parameters as plain containers.

    Lightning stores a ``DictConfig`` given to ``save_hyperparameters`` together with
    its class, both of which ``torch.load(weights_only=True)`` refuses. Here the values
    become plain dicts and lists and the class its name, a string, for which
    ``load_from_checkpoint`` builds an ``AttributeDict`` (attribute access at the top
    level, ``cfg.lr``). Anything else that does not load with ``weights_only=True`` is
    a ``PayloadError`` naming its key when the file is written.

    >>> from lightning.fabric.utilities.data import AttributeDict
    >>> checkpoint = {"state_dict": {}, "hyper_parameters": AttributeDict(lr=0.1), "hparams_type": AttributeDict}
    >>> weights_only_checkpoint(checkpoint)["hparams_type"]  # a class becomes its name
    'lightning.fabric.utilities.data.AttributeDict'
    >>> checkpoint["hparams_type"] is AttributeDict  # the given dict is not changed
    True
    """
    converted = dict(checkpoint)
    for owner in _HPARAMS_OWNERS:
        kind = converted.get(owner.CHECKPOINT_HYPER_PARAMS_TYPE)
        if not isinstance(kind, type):
            continue
        key = owner.CHECKPOINT_HYPER_PARAMS_KEY
        if kind.__module__.split(".")[0] == "omegaconf":
            from omegaconf import OmegaConf  # present, since the hparams are OmegaConf objects

            converted[key] = OmegaConf.to_container(converted[key], resolve=True)
        converted[owner.CHECKPOINT_HYPER_PARAMS_TYPE] = f"{kind.__module__}.{kind.__qualname__}"
    return converted


def _default_dirpath(trainer: pl.Trainer) -> pathlib.Path:
    """Where ``ModelCheckpoint`` would write without a ``dirpath``."""
    if trainer.loggers:
        first = trainer.loggers[0]
        save_dir = first.save_dir if first.save_dir is not None else trainer.default_root_dir
        version = first.version if isinstance(first.version, str) else f"version_{first.version}"
        return pathlib.Path(save_dir, str(first.name), version, "checkpoints")
    return pathlib.Path(trainer.default_root_dir, "checkpoints")


def _check_supported(strategy: LightningStrategy) -> None:
    if type(strategy).save_checkpoint is not LightningStrategy.save_checkpoint:
        raise RuntimeError(
            f"ckptfn.integrations.lightning.Checkpointing writes one complete checkpoint file from global rank 0; "
            f"{type(strategy).__name__} saves its checkpoints its own way (sharded or from other "
            "devices), which it does not support: use Lightning's ModelCheckpoint with this strategy"
        )
