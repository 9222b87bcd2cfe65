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

With ``save_weights_only=True`` the file holds what ``trainer.save_checkpoint(path,
weights_only=True)`` writes instead (no optimizer, scheduler or callback states), plus
the same metadata.

It is written once per decision whatever the number of names (hard links), atomically,
by global rank 0, after every rank took the same decision from rank 0's metrics. After
each committed write, rank 0 tells the ``on_saved`` hooks and the loggers
(``logger.after_save_checkpoint``, as ``ModelCheckpoint`` does).

``dirpath`` may be an fsspec URL (``s3://bucket/run``): the files are then objects of the
store, written by ckptfn's object-store protocol (one upload per decision, the other names
server-side copies), and ``fit(ckpt_path=...)`` reads them through Lightning's own fsspec
loading. ``save_on=("SIGTERM", "SIGUSR1")`` turns a preemption signal into one complete
``last`` file at the next safe point, then a clean stop (``ckptfn.shells.preemption``).
"""

from __future__ import annotations

import logging
import math
import os
import time
import pathlib
import signal
import types
import warnings
import weakref
from collections.abc import Mapping

import attrs
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.strategies import Strategy as LightningStrategy
from lightning.pytorch.trainer.states import TrainerFn

from ckptfn.core.actions import Enter, Save
from ckptfn.core.config import Config, as_config
from ckptfn.core.errors import CheckpointError, CheckpointWriteError, MetricTypeError, PayloadError
from ckptfn.core.every import Every
from ckptfn.core.metrics import metric_value
from ckptfn.core.snapshot import partition
from ckptfn.core.state import Best, State, restore, resume_state
from ckptfn.core.strategy import Strategy
from ckptfn.core.summary import count_of
from ckptfn.core.step import best_values, init, preempt, step, step_between_validations
from ckptfn.core.step import between_validations as _between
from ckptfn.integrations import lightning_internals
from ckptfn.io.objectstore import is_remote, location, store_for
from ckptfn.io.read import restore_from_directory
from ckptfn.io.write import write
from ckptfn.shells.preemption import Preemption, SignalWatch, check_main_thread, honour_preemption, with_save_on
from ckptfn.shells.recipe import hooks_of, notify, plan, report_skips, state_to_keep, trackers_of, user_stacklevel

__all__ = ["BestFiles", "Checkpointing", "step_between_validations"]

logger = logging.getLogger("ckptfn")

_HPARAMS_OWNERS = (pl.LightningModule, pl.LightningDataModule)


def _read_only(mapping: Mapping) -> Mapping:
    return types.MappingProxyType(dict(mapping))


@attrs.frozen
class BestFiles:
    """One metric strategy's files and values under ``ModelCheckpoint``'s attribute names.

    ``best_model_path`` is the strategy's file ("" before its first save) and
    ``best_model_score`` its value (a tensor, or None); ``best_k_models`` maps the path
    of every file it keeps by value (the best, and with ``top_k`` > 1 the other
    members) to its value; ``kth_best_model_path`` and ``kth_value`` are the worst of
    those once the top k is full ("" and +/-inf before, as in ``ModelCheckpoint``);
    ``save_top_k`` is its ``top_k``, or -1 when it keeps every best (``overwrite=False``,
    ``keep=None``). ``Checkpointing.bests_by_filename`` holds one per metric strategy.

    >>> import ckptfn
    >>> callback = Checkpointing([ckptfn.Strategy("val_loss", top_k=2)], dirpath="run")
    >>> callback.load_state_dict(ckptfn.State(callback.config, [ckptfn.Best(0.25, 3, 40, [
    ...     ckptfn.Member(0.5, 1, 20, "best_val_loss-epoch=1-step=20.pt")])]).to_dict())
    >>> files = callback.bests_by_filename["best_val_loss.pt"]
    >>> files.best_model_path, files.best_model_score, files.kth_best_model_path, files.kth_value
    ('run/best_val_loss.pt', tensor(0.2500), 'run/best_val_loss-epoch=1-step=20.pt', tensor(0.5000))
    """

    monitor: str
    mode: str
    save_top_k: int
    best_model_path: str
    best_model_score: torch.Tensor | None = attrs.field(eq=False)
    best_k_models: Mapping[str, torch.Tensor] = attrs.field(eq=False, converter=_read_only)
    kth_best_model_path: str
    kth_value: torch.Tensor = attrs.field(eq=False)

    @classmethod
    def of(cls, strategy: Strategy, best: Best, path_of) -> BestFiles:
        """The files of ``strategy`` given its ``best``; ``path_of(name)`` is a name's path."""
        kept = [] if best.value is None else [(path_of(strategy.filename), best.value)]
        kept += [(path_of(member.name), member.value) for member in best.others]
        full = bool(kept) and len(kept) >= strategy.top_k
        worst = kept[-1] if full else ("", math.inf if strategy.mode == "min" else -math.inf)
        return cls(
            monitor=strategy.metric_name,
            mode=strategy.mode,
            save_top_k=_save_top_k(strategy),
            best_model_path=kept[0][0] if kept else "",
            best_model_score=torch.tensor(kept[0][1]) if kept else None,
            best_k_models={path: torch.tensor(value) for path, value in kept},
            kth_best_model_path=worst[0],
            kth_value=torch.tensor(worst[1]),
        )


def _save_top_k(strategy: Strategy) -> int:
    if strategy.top_k > 1:
        return strategy.top_k
    return -1 if not strategy.overwrite and strategy.keep is None else 1


class Checkpointing(Checkpoint):
    """Save the best checkpoint of every configured metric, and periodic ones, from Lightning.

    Args:
        strategies: a ``Config``, a ``Strategy``/``Every``, a list of them, or anything
            ``Config.from_mapping`` accepts (lists of dicts, Hydra configs). Metric names
            are the keys of ``trainer.callback_metrics`` (what ``self.log`` logged).
        dirpath: a local directory for the files, or an fsspec URL (``s3://bucket/run``,
            ``memory://run``: the files are then objects of that store, ``ckptfn.io.remote``).
            ``None``: like ``ModelCheckpoint``, ``<logger save_dir>/<name>/<version>/checkpoints``,
            or ``<default_root_dir>/checkpoints`` without a logger (a URL too, when that is one).
        save_on_train_epoch_end: decide at the end of the training epoch (``True``) or
            after each validation (``False``); ``None`` chooses like ``ModelCheckpoint``
            (at the training epoch's end when validation runs once per epoch or never).
        resume: what a fit that does not resume from a checkpoint does with checkpoints of
            an earlier run in ``dirpath``: ``None`` (default) or ``True`` judges against them
            (only better epochs replace them; ``None`` warns that it does); ``False`` starts
            from scratch, the explicit opt-in to replace them. A file at a watched name
            that cannot be judged is refused with a ``CheckpointError``.
        save_weights_only: write only what ``trainer.save_checkpoint(path, weights_only=True)``
            writes (the model's state dict, loops, epoch, global step, hyper-parameters),
            plus ckptfn's metadata. Such files load with ``load_from_checkpoint`` and
            ``ckptfn.load_checkpoint``; ``fit(ckpt_path=...)`` refuses them (no optimizer state).
        on_saved: a callable (or a list of them) called on global rank 0 with a
            ``ckptfn.kit.Saved`` event for every name of every committed write, as with
            ``CheckpointManager(on_saved=...)``; the config's ``trackers`` are added.
        save_on: signals that announce a preemption (``("SIGTERM", "SIGUSR1")``, names or
            numbers), added to the config's ``save_on``; the config needs an ``Every``. From the
            start of training to its end (``on_train_start`` .. ``on_train_end``) their handlers
            only record the signal, in place of Lightning's own (which for SIGTERM ends ``fit``
            with ``SIGTERMException``, and under SLURM auto-requeue saves inside the signal
            handler: neither is called for it), then call the Python handlers installed before
            ``fit``, as ``CheckpointManager`` does; those are back once training ends (also
            when ``fit`` fails). At the next safe point (the end of a training batch
            that completed an optimizer step, or a decision: validation or epoch end) every
            ``Every`` strategy's file is written at once, whatever its period (at a decision with
            whatever improved, one write), ``preempted`` is set and ``trainer.should_stop`` too:
            ``fit`` returns. Nothing more is decided at that global step (a validation Lightning
            runs before it stops saves nothing). Under several processes the ranks agree on the
            flag (one ``reduce_boolean_decision`` per safe point), so a signal to any rank stops
            all of them at the same step. As with ``EarlyStopping``, Lightning does not stop
            before ``min_epochs``/``min_steps``.

    The decision is ``ckptfn.step`` on ``trainer.callback_metrics`` (as broadcast from
    global rank 0) at ``trainer.current_epoch``; nothing is decided during the sanity
    check, outside ``fit`` or twice at one global step. ``Every(n_steps=...)`` and
    ``Every(seconds=...)`` are also decided after each training batch with no decision
    right after it (``step_between_validations``), as ``ModelCheckpoint(every_n_train_steps=...)``
    saves; ``Every(seconds=...)`` counts from the start of ``fit``. The callback's state is
    the pure ``State``: it goes into every Lightning checkpoint, so ``fit(ckpt_path=...)``
    restores the bests (reconciled with the files in ``dirpath``, which win for metric
    strategies, as with ``CheckpointManager(resume=True)``). ``fit(ckpt_path="last")``
    resumes from the first ``Every``'s file, ``ckpt_path="best"`` loads the first metric
    strategy's (``resolve_ckpt_path``).

    After each committed write, global rank 0 calls ``logger.after_save_checkpoint`` of
    every ``trainer.loggers``, as ``ModelCheckpoint`` does, so ``WandbLogger(log_model=...)``
    and ``MLFlowLogger(log_model=...)`` upload the files of every strategy.

    What ``ModelCheckpoint`` users read is here with the same meaning, for the first
    metric strategy: ``monitor``, ``mode``, ``best_model_path``, ``best_model_score``,
    ``best_k_models``, ``kth_best_model_path``, ``kth_value``, ``current_score``,
    ``save_top_k``; ``last_model_path`` is the first ``Every``'s file. The same for every
    metric strategy: ``bests_by_filename``.

    Pass it to ``lightning.pytorch.Trainer(callbacks=[...])``; constructing it writes nothing:

    >>> import ckptfn
    >>> callback = Checkpointing([ckptfn.Strategy("val_loss")], dirpath="checkpoints")
    >>> callback.best_values, callback.best_model_path, callback.best_model_score
    ({'best_val_loss.pt': None}, '', None)
    >>> saved = ckptfn.State(callback.config, [ckptfn.Best(0.25, 3)], steps=4).to_dict()
    >>> callback.load_state_dict(saved)  # what fit(ckpt_path=...) does
    >>> callback.best_values, callback.best_model_path, callback.best_model_score, callback.monitor
    ({'best_val_loss.pt': 0.25}, 'checkpoints/best_val_loss.pt', tensor(0.2500), 'val_loss')
    """

    def __init__(
        self,
        strategies: object,
        dirpath: str | os.PathLike | None = None,
        *,
        save_on_train_epoch_end: bool | None = None,
        resume: bool | None = None,
        save_weights_only: bool = False,
        on_saved: object = None,
        save_on: object = None,
    ) -> None:
        super().__init__()
        if resume not in (None, True, False):
            raise TypeError(f"resume: expected None, True or False, got {resume!r}")
        if not isinstance(save_weights_only, bool):
            raise TypeError(f"save_weights_only: expected True or False, got {save_weights_only!r}")
        self._resume = resume
        self.config: Config = with_save_on(as_config(strategies), save_on)
        if save_on_train_epoch_end not in (None, True, False):
            raise TypeError(f"save_on_train_epoch_end: expected None, True or False, got {save_on_train_epoch_end!r}")
        self._dirpath_given = None if dirpath is None else location(dirpath)
        #: where the files go: a ``pathlib.Path``, or a ``RemotePath`` (a URL) for an object store
        self.dirpath: pathlib.Path | None = self._dirpath_given
        self.state: State = init(self.config)
        #: Like ``ModelCheckpoint.save_weights_only``: files without optimizer and callback states.
        self.save_weights_only = save_weights_only
        self._hooks = hooks_of(on_saved) + trackers_of(self.config)
        self._save_on_train_epoch_end = save_on_train_epoch_end
        self._last_global_step_decided = 0  # like ModelCheckpoint: nothing to save before a step
        self._last_global_step_between = 0  # the last decision after a training batch
        self._between = any(_between(strategy) for strategy in self.config.strategies)
        self._timed = any(type(s) is Every and s.seconds is not None for s in self.config.strategies)
        self._seen_skips: frozenset[tuple[str, str]] = frozenset()
        self._resumed = False
        self._current_score: torch.Tensor | None = None
        self._for_loggers = CheckpointingForLoggers(self)
        #: Set while rank 0 writes and the outcome is shared: if anything escapes in between
        #: (an interrupt ends ``fit``), the next ``fit`` takes the state from the files.
        self._in_doubt = False
        self._watching = self.config.active and bool(self.config.save_on)
        self._watch: SignalWatch | None = None  # installed while training runs (save_on)
        self._preempted: Preemption | None = None
        self._last_safe_step = 0  # the global step of the last preemption check after a batch
        _resolve_special_ckpt_paths()

    # --- Lightning hooks ------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return "ckptfn.integrations.lightning.Checkpointing"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _check_supported(trainer.strategy)
        if self._watching and stage == TrainerFn.FITTING:
            check_main_thread("save_on")  # before any collective: every rank fails alike
        dirpath = self._dirpath_given if self._dirpath_given is not None else _default_dirpath(trainer)
        self.dirpath = location(trainer.strategy.broadcast(os.fspath(dirpath), src=0))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reconcile the state with the files (read on global rank 0, then broadcast).

        A resumed fit takes its bests from the files (``resume_state``). A fit that does not
        resume (no ``ckpt_path``, or ``ckpt_path="last"`` finding nothing) in a directory
        holding checkpoints of an earlier run judges against them by default, so a worse
        epoch never replaces a better file; ``resume=False`` starts from scratch instead.
        After an interrupted fit, the state is the files'. ``Every(seconds=...)`` counts
        from here (rank 0's clock).
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
        if self._timed:
            self.state = _clock_started(self.state, trainer.strategy.broadcast(time.monotonic(), src=0))
        self._last_safe_step = trainer.global_step
        self._preempted = None
        if self._watching and not trainer.fast_dev_run:
            self._close_watch()
            self._watch = _watch_in_place_of_lightnings(trainer, self.config.save_on)  # last: nothing above can fail

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put back the signal handlers ``save_on`` replaced (a signal no safe point saw is a WARNING)."""
        self._close_watch()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_watch()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_watch()

    def _close_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

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

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        """A safe point for ``save_on`` (after an optimizer step); then decide the step and time
        periods (``step_between_validations``) when no decision follows at this global step; a
        validation or epoch end that follows decides them."""
        if self._watch is not None and trainer.global_step > self._last_safe_step:  # not mid-accumulation
            self._last_safe_step = trainer.global_step
            if self._preemption_requested(trainer):
                self._preempt(trainer)
                return
        if not self._between or self._skips_between(trainer):
            return
        now = time.monotonic()
        if self._timed:
            now = trainer.strategy.broadcast(now, src=0)
        old = self.state
        new, actions = step_between_validations(old, trainer.current_epoch, global_step=trainer.global_step, now=now)
        if not actions or self._decision_follows(trainer):
            return
        self._last_global_step_between = trainer.global_step
        self._carry_out(trainer, old, new, actions, plain_metrics(trainer.callback_metrics))

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

    def resolve_ckpt_path(self, trainer: pl.Trainer, name: str, fn: str = "fit") -> str | None:
        """The file that ``trainer.<fn>(ckpt_path=name)`` loads, for ``name`` ``"last"`` or ``"best"``.

        ``"last"``: the first ``Every``'s file in ``dirpath`` (None, with a warning, when it
        does not exist yet, so a first run starts from the beginning, as Lightning does for
        ``ModelCheckpoint``); a ``ValueError`` when there is no ``Every`` strategy, since
        nothing is ever saved as "last" then. ``"best"``: the first metric strategy's file;
        a ``ValueError`` when it does not exist or there is no metric strategy.

        Lightning calls this for ``ckpt_path="last"``/``"best"`` (the adapter wraps its
        resolution); call it yourself to see what will be loaded:

        >>> import ckptfn
        >>> callback = Checkpointing([ckptfn.Strategy("val_loss")], dirpath="run")
        >>> callback.resolve_ckpt_path(None, "last")
        Traceback (most recent call last):
        ...
        ValueError: .fit(ckpt_path="last"): this Checkpointing has no ckptfn.Every strategy, so it never saves a last checkpoint to resume from. Add one (e.g. ckptfn.Every(1, filename="last.ckpt")), or pass the file to resume from: ckpt_path="run/best_val_loss.pt"
        """
        directory = self.dirpath if self.dirpath is not None else _default_dirpath(trainer)
        if name == "last":
            every = next((s for s in self.config.strategies if type(s) is Every), None)
            if every is None:
                some = next(iter(self.config.strategies), None)
                example = os.fspath(directory / some.filename) if some is not None else "PATH"
                raise ValueError(
                    f'.{fn}(ckpt_path="last"): this Checkpointing has no ckptfn.Every strategy, so it never saves '
                    'a last checkpoint to resume from. Add one (e.g. ckptfn.Every(1, filename="last.ckpt")), '
                    f'or pass the file to resume from: ckpt_path="{example}"'
                )
            path = directory / every.filename
            if _is_file(path):
                return os.fspath(path)
            warnings.warn(
                f'.{fn}(ckpt_path="last"): there is no last checkpoint at {path} yet, so {fn} starts from the '
                f"beginning (expected on a first run; otherwise check dirpath, or pass ckpt_path=PATH)",
                UserWarning,
                stacklevel=user_stacklevel(skip=("lightning", "torch")),
            )
            return None
        if name == "best":
            strategy = next((s for s in self.config.strategies if type(s) is not Every), None)
            if strategy is None:
                raise ValueError(
                    f'.{fn}(ckpt_path="best"): this Checkpointing has no metric strategy, so it has no best '
                    f"checkpoint; pass the file to load: ckpt_path=PATH"
                )
            path = directory / strategy.filename
            if _is_file(path):
                return os.fspath(path)
            raise ValueError(
                f'.{fn}(ckpt_path="best"): there is no best checkpoint at {path} yet; pass the file to load: '
                "ckpt_path=PATH"
            )
        raise ValueError(f'ckpt_path={name!r}: Checkpointing resolves "last" and "best"')

    # --- what ModelCheckpoint users look for ------------------------------------------------

    @property
    def best_values(self) -> dict[str, float | None]:
        """filename -> best value saved so far (None before the first save)."""
        return best_values(self.state)

    @property
    def preempted(self) -> Preemption | None:
        """None until a preemption save (``save_on``) of the latest ``fit`` is committed; then
        its ``Preemption`` record (signals, epoch, global step, paths), which is truthy."""
        return self._preempted

    @property
    def bests_by_filename(self) -> dict[str, BestFiles]:
        """filename -> ``BestFiles`` of every metric strategy, in order: ``ModelCheckpoint``'s
        attributes (``best_model_path``, ``best_model_score``, ``best_k_models``, ...) per strategy."""
        return {
            strategy.filename: BestFiles.of(strategy, best, self._path_of)
            for strategy, best in zip(self.config.strategies, self.state.bests)
            if type(strategy) is not Every
        }

    def _first_files(self) -> BestFiles | None:
        for strategy, best in zip(self.config.strategies, self.state.bests):
            if type(strategy) is not Every:
                return BestFiles.of(strategy, best, self._path_of)
        return None

    @property
    def monitor(self) -> str | None:
        """The first metric strategy's metric name (None without one)."""
        first = self._first_files()
        return None if first is None else first.monitor

    @property
    def mode(self) -> str:
        """The first metric strategy's mode ("min" without one, as ``ModelCheckpoint``)."""
        first = self._first_files()
        return "min" if first is None else first.mode

    @property
    def save_top_k(self) -> int:
        """The first metric strategy's ``top_k``; -1 when it keeps every best (``overwrite=False``,
        ``keep=None``); 1 without a metric strategy."""
        first = self._first_files()
        return 1 if first is None else first.save_top_k

    @property
    def save_last(self) -> bool | None:
        """True when an ``Every`` strategy saves a last checkpoint, else None."""
        return True if any(type(s) is Every for s in self.config.strategies) else None

    @property
    def best_model_path(self) -> str:
        """The file of the first metric strategy, once it saved ("" before): what
        ``trainer.test(ckpt_path="best")`` loads."""
        first = self._first_files()
        return "" if first is None else first.best_model_path

    @best_model_path.setter
    def best_model_path(self, path: str) -> None:
        """Lightning's spawn and fork launchers hand rank 0's best path back to the main
        process, whose callback did not train: it then rebuilds its state from the files."""
        if path:
            self.dirpath = location(path).parent
        if self.dirpath is not None:
            self.state = restore_from_directory(self.config, self.dirpath)

    @property
    def best_model_score(self) -> torch.Tensor | None:
        """The first metric strategy's best value, a tensor (None before its first save)."""
        first = self._first_files()
        return None if first is None else first.best_model_score

    @property
    def best_k_models(self) -> dict[str, torch.Tensor]:
        """The first metric strategy's files kept by value (path -> value): its best, and with
        ``top_k`` > 1 the other members of its top k."""
        first = self._first_files()
        return {} if first is None else dict(first.best_k_models)

    @property
    def kth_best_model_path(self) -> str:
        """The worst file of the first metric strategy's top k once it is full ("" before)."""
        first = self._first_files()
        return "" if first is None else first.kth_best_model_path

    @property
    def kth_value(self) -> torch.Tensor:
        """The value of ``kth_best_model_path`` (+inf for "min", -inf for "max" before)."""
        first = self._first_files()
        return torch.tensor(math.inf) if first is None else first.kth_value

    @property
    def current_score(self) -> torch.Tensor | None:
        """The first metric strategy's value at its latest save in this process (None before),
        like ``ModelCheckpoint.current_score``."""
        return self._current_score

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

    def _skips_between(self, trainer: pl.Trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.global_step in (self._last_global_step_decided, self._last_global_step_between)
        )

    def _decision_follows(self, trainer: pl.Trainer) -> bool:
        """Whether a full decision follows at this global step (so the one after this batch is
        left to it: one write per global step): the epoch's end, or a validation."""
        if self._decides_on_train_epoch_end(trainer):
            ends = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or trainer.should_stop
            return bool(ends) or 0 <= trainer.max_steps <= trainer.global_step
        follows = lightning_internals.validation_follows(trainer)
        if lightning_internals.val_check_time_interval(trainer) is not None:
            follows = trainer.strategy.broadcast(follows, src=0)  # each rank's clock says otherwise
        return follows

    def _checkpoint(self, trainer: pl.Trainer) -> None:
        if self._skips(trainer):
            if not self._sanity_or_not_fitting(trainer) and self._preemption_requested(trainer):
                self._preempt(trainer)  # decided at this step already: the preemption save alone
            return
        preempted = self._preemption_requested(trainer)  # a safe point: every rank, the same step
        self._last_global_step_decided = trainer.global_step
        # rank 0's metrics and clock, so that every rank takes the same decision
        metrics, now = trainer.strategy.broadcast((plain_metrics(trainer.callback_metrics), time.monotonic()), src=0)
        old = self.state
        new, actions = step(
            old, metrics, trainer.current_epoch, global_step=trainer.global_step, now=now, preempted=preempted
        )
        self._seen_skips = report_skips(
            self._seen_skips, actions, stacklevel=user_stacklevel(skip=("lightning", "torch")), loud=trainer.is_global_zero
        )
        if preempted:
            self._save_preempted(trainer, old, new, actions, metrics)
            return
        self._carry_out(trainer, old, new, actions, metrics)

    # --- preemption (save_on) -----------------------------------------------------------------

    def _sanity_or_not_fitting(self, trainer: pl.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def _preemption_requested(self, trainer: pl.Trainer) -> bool:
        """Whether a ``save_on`` signal came, to any rank: the flag alone in one process, else one
        collective (every rank reaches the same safe points). False, with no collective, while
        no watch is installed (the same on every rank: outside training, or without ``save_on``)."""
        if self._watch is None:
            return False
        return self._watch.requested_on(None if trainer.world_size == 1 else _StrategyRanks(trainer.strategy))

    def _preempt(self, trainer: pl.Trainer) -> None:
        """Between decisions: every ``Every``'s file now (``preempt``), then stop."""
        now = time.monotonic()
        if self._timed:
            now = trainer.strategy.broadcast(now, src=0)
        old = self.state
        new, actions = preempt(old, trainer.current_epoch, global_step=trainer.global_step, now=now)
        self._save_preempted(trainer, old, new, actions, plain_metrics(trainer.callback_metrics))

    def _save_preempted(self, trainer: pl.Trainer, old: State, new: State, actions: tuple, metrics: Mapping) -> None:
        """The preemption save (the write inside ``deferred``), its record, and the stop; nothing
        more is decided at this global step."""
        self._last_global_step_decided = self._last_global_step_between = trainer.global_step
        with self._watch.deferred():
            paths = self._carry_out(trainer, old, new, actions, metrics)
        self._preempted = honour_preemption(self._watch, actions, paths, loud=trainer.is_global_zero)
        trainer.should_stop = True

    def _carry_out(self, trainer: pl.Trainer, old: State, new: State, actions: tuple, metrics: Mapping) -> tuple:
        """Plan, the one write (on global rank 0), the commit rule; then the hooks and loggers.
        The paths of the names written (on every rank)."""
        saves, _ = partition(actions)
        if not saves:
            self.state = new
            return ()
        checkpoint = lightning_internals.dump_checkpoint(trainer, weights_only=self.save_weights_only)  # every rank
        if isinstance(checkpoint.get("callbacks"), dict):
            checkpoint["callbacks"][self.state_key] = new.to_dict()  # the state after this save
        snapshot = plan(saves, state=new, metrics=metrics, extra={"layout": "flat"})
        error, kept, written = None, new, None
        self._in_doubt = True
        if trainer.is_global_zero:
            written = write(self.dirpath, snapshot, weights_only_checkpoint(checkpoint))
            kept = state_to_keep(self.config, self.dirpath, old, new, written)
            error = _explained(written.error)
        report = None if error is None else (str(error), kept.to_dict())
        report = trainer.strategy.broadcast(report, src=0)
        if report is None:
            self.state, self._in_doubt = new, False
            self._current_score = _current_score(self.config, saves, self._current_score)
            if written is None:  # another rank: the names rank 0 wrote
                return tuple(self.dirpath / name for name in snapshot.filenames)
            notify(self._hooks, saves, written.paths)
            for logger in trainer.loggers:  # as ModelCheckpoint._save_checkpoint does
                logger.after_save_checkpoint(weakref.proxy(self._for_loggers))
            return tuple(written.paths)
        self.state, self._in_doubt = restore(self.config, report[1]), False  # the same on every rank
        if error is not None:
            raise error
        raise CheckpointWriteError(f"global rank 0 could not write the checkpoint: {report[0]}")


class CheckpointingForLoggers:
    """What ``logger.after_save_checkpoint`` is given: the callback's attributes, except that
    ``best_k_models`` holds every file of every strategy (path -> value, None for an
    ``Every``'s), so that loggers with ``log_model`` upload them all. Holds the callback weakly,
    as ``ModelCheckpoint`` hands loggers a ``weakref.proxy`` of itself."""

    def __init__(self, callback: Checkpointing) -> None:
        self._callback = weakref.proxy(callback)

    @property
    def best_k_models(self) -> dict[str, torch.Tensor | None]:
        callback, files = self._callback, {}
        for strategy, best in zip(callback.config.strategies, callback.state.bests):
            if type(strategy) is Every:
                if best.epoch is not None:
                    files[callback._path_of(strategy.filename)] = None
            else:
                files.update(BestFiles.of(strategy, best, callback._path_of).best_k_models)
        return files

    def __getattr__(self, name: str) -> object:
        return getattr(self._callback, name)


def _current_score(config: Config, saves: tuple, previous: torch.Tensor | None) -> torch.Tensor | None:
    """The first metric strategy's value if this snapshot saved it (``Save`` or ``Enter``)."""
    first = next((s for s in config.strategies if type(s) is not Every), None)
    for action in saves:
        if isinstance(action, Save | Enter) and first is not None and action.strategy == first:
            return torch.tensor(action.value)
    return previous


def _clock_started(state: State, now: float) -> State:
    """``state`` with each ``Every(seconds=...)`` that has no clock reading measured from ``now``."""
    bests = [
        attrs.evolve(best, time=now)
        if type(strategy) is Every and strategy.seconds is not None and best.time is None
        else best
        for strategy, best in zip(state.config.strategies, state.bests)
    ]
    return State(state.config, bests, state.steps)


_RESOLVES: list[bool] = []


def _resolve_special_ckpt_paths() -> None:
    """Have Lightning ask ``Checkpointing.resolve_ckpt_path`` for ``ckpt_path="last"``/``"best"``;
    warn once when this Lightning version cannot be adapted."""
    if _RESOLVES:
        return
    _RESOLVES.append(lightning_internals.resolve_special_ckpt_paths())
    if not _RESOLVES[0]:
        warnings.warn(
            f"ckptfn cannot resolve fit(ckpt_path='last') for lightning {pl.__version__} (checked with 2.6.6): "
            "pass ckpt_path=callback.resolve_ckpt_path(trainer, 'last') instead",
            UserWarning,
            stacklevel=3,
        )


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
    """Where ``ModelCheckpoint`` would write without a ``dirpath`` (a ``RemotePath`` when the
    logger's ``save_dir`` or the trainer's ``default_root_dir`` is a URL)."""
    if trainer.loggers:
        first = trainer.loggers[0]
        save_dir = first.save_dir if first.save_dir is not None else trainer.default_root_dir
        version = first.version if isinstance(first.version, str) else f"version_{first.version}"
        return location(os.fspath(save_dir)) / str(first.name) / version / "checkpoints"
    return location(os.fspath(trainer.default_root_dir)) / "checkpoints"


def _is_file(path: str | os.PathLike) -> bool:
    """Whether a checkpoint file (or, for a URL, an object) is at ``path``."""
    if is_remote(path):
        store, key = store_for(path)
        return store.size(key) is not None
    return pathlib.Path(path).is_file()


def _watch_in_place_of_lightnings(trainer: pl.Trainer, save_on: tuple[str, ...]) -> SignalWatch:
    """The ``SignalWatch`` of ``save_on``, installed in place of the handlers Lightning's signal
    connector installed for this ``fit`` (its SIGTERM one ends ``fit`` with ``SIGTERMException``,
    its SLURM requeue one saves inside the handler): chained to the handlers from before ``fit``,
    as every shell chains to the previous ones. Where this Lightning does not say which those
    were, it chains to none (``chain=False``); ``close`` then puts Lightning's back."""
    numbers = [signal.Signals[name] for name in save_on]
    before = lightning_internals.handlers_before_fit(trainer, numbers)
    if before is None or not all(callable(h) or h in (signal.SIG_DFL, signal.SIG_IGN) for h in before.values()):
        return SignalWatch(save_on, chain=False)
    for number, handler in before.items():
        signal.signal(number, handler)  # Lightning puts back these same ones when fit ends
    return SignalWatch(save_on)


class _StrategyRanks:
    """What ``SignalWatch.requested_on`` needs, over Lightning's own collective: whether a flag
    is true on any rank, on every rank (one ``reduce_boolean_decision``, a sum all-reduce)."""

    def __init__(self, strategy: LightningStrategy) -> None:
        self.strategy = strategy

    def agree(self, flag: bool) -> bool:
        return bool(self.strategy.reduce_boolean_decision(bool(flag), all=False))


def _check_supported(strategy: LightningStrategy) -> None:
    if type(strategy).save_checkpoint is not LightningStrategy.save_checkpoint:
        raise RuntimeError(
            f"ckptfn.integrations.lightning.Checkpointing writes one complete checkpoint file from global rank 0; "
            f"{type(strategy).__name__} saves its checkpoints its own way (sharded or from other "
            "devices), which it does not support: use Lightning's ModelCheckpoint with this strategy"
        )
