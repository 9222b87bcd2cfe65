"""Hugging Face ``transformers`` integration: ``Checkpointing``, one ``TrainerCallback`` for any number of metrics.

``pip install 'ckptfn[huggingface]'``. The core never imports this module, and
``import ckptfn`` does not import transformers.

On every evaluation during ``Trainer.train`` the callback runs ``ckptfn.step`` on the
evaluation metrics, under the names the Trainer gives them in ``on_evaluate``
(``eval_loss``, ``eval_<key of compute_metrics>``; ``eval/<key>``, the spelling of W&B
and TensorBoard charts, is accepted for a watched name), at ``epoch=int(state.epoch)``
and ``global_step=state.global_step``, and writes every best of that evaluation with
one write (one serialization, the other names hard links), on world process zero.

A file holds, under ckptfn's nested layout (``ckptfn.load_checkpoint(path)`` returns
``(payload, metadata)``; plain ``torch.load(path, weights_only=True)`` returns
``{"state_dict": payload, "metadata": metadata}``) the payload

- ``model``: the model's state dict (unwrapped from DDP and ``torch.compile``), so
  ``model.load_state_dict(ckptfn.load_checkpoint(path)[0]["model"])`` gives it back;
- ``optimizer``, ``lr_scheduler``: their state dicts, ``rng``: the Python, numpy, torch
  (and CUDA) generator states (all three left out with ``save_only_model=True``);
- ``trainer_state``: the ``TrainerState`` as the plain data of its JSON form
  (``TrainerState(**payload["trainer_state"])`` rebuilds it).

The files go to ``<args.output_dir>/ckptfn`` unless a directory is given (a local one, or
an fsspec URL such as ``s3://bucket/run``: ckptfn's object-store protocol, one upload per
write); the Trainer's own ``checkpoint-*`` directories are never written, renamed or deleted.
``save_on=("SIGTERM", "SIGUSR1")`` turns a preemption signal into one complete ``last`` file
at the next safe point, then ``control.should_training_stop`` (``ckptfn.shells.preemption``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import random
import time
import warnings
from collections.abc import Mapping

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import TrainerCallback

from ckptfn import kit
from ckptfn.core.config import Config, as_config
from ckptfn.core.errors import MetricTypeError, PayloadError
from ckptfn.core.every import Every
from ckptfn.core.metrics import metric_value
from ckptfn.core.state import State
from ckptfn.core.step import best_values, init, step
from ckptfn.io.objectstore import location
from ckptfn.shells.distributed import find_group
from ckptfn.shells.preemption import Preemption, SignalWatch, check_main_thread, honour_preemption, with_save_on
from ckptfn.shells.recipe import trackers_of

__all__ = ["Checkpointing", "trainer_metrics", "trainer_payload"]

logger = logging.getLogger("ckptfn")

#: Frames of these packages are skipped when a warning points at the user's line.
_FRAMEWORKS = ("transformers", "accelerate", "torch")


class Checkpointing(TrainerCallback):
    """Keep the best checkpoint of every configured metric (and periodic ones) of a ``transformers.Trainer``.

    Args:
        config: a ``Config``, a ``Strategy``/``Every``, a list of them, or anything
            ``Config.from_mapping`` accepts. Metric names are the keys of the
            evaluation metrics (``eval_loss``, ``eval_accuracy``; ``eval/accuracy`` too).
        output_dir: a local directory for the files, or an fsspec URL (``s3://bucket/run``,
            ``memory://run``): the files are then objects of that store (``ckptfn.io.remote``);
            ``None``: ``<args.output_dir>/ckptfn``.
        resume: what a ``train()`` that does not resume from a checkpoint does with
            files of an earlier run in ``output_dir``: ``None`` (default) or ``True``
            judges against them (only better evaluations replace them; ``None`` warns
            that it does), ``False`` starts from scratch. ``train(resume_from_checkpoint=...)``
            always continues with the bests of the files. A file at a watched name that
            cannot be judged stops ``train()`` with a ``CheckpointError`` naming it.
        on_saved: a callable or a list of them; each gets one ``ckptfn.kit.Saved`` event
            per name after every committed write (trackers, user code).
        evaluations: the ``on_evaluate`` calls that make one evaluation: ``len(eval_dataset)``
            when the Trainer's ``eval_dataset`` is a dict (the Trainer evaluates each
            dataset separately, as ``eval_<name>_loss``, ...), so that one decision sees
            all their metrics.
        save_on: signals that announce a preemption (``("SIGTERM", "SIGUSR1")``, names or
            numbers), added to the config's ``save_on``; the config needs an ``Every``. From
            ``on_train_begin`` to ``on_train_end`` their handlers (installed from the main
            thread, chained to the previous ones, put back at the end) only record the signal.
            At the next safe point (``on_step_end``, after an optimizer step, or an
            ``on_evaluate``) every ``Every`` strategy's file is written at once, whatever its
            period (at a decision with whatever improved, one write), ``preempted`` is set and
            ``control.should_training_stop`` too: ``train()`` returns; nothing more is decided
            at that global step. Under several processes they agree on the flag (one
            ``all_reduce`` per safe point), so a signal to any of them stops all at the same step.

    Only world process zero decides (on its metrics) and writes; the other processes do
    nothing. Nothing is decided outside ``train()``, before the first optimizer step
    (``eval_on_start``) or twice at one global step. A write that fails raises
    ``CheckpointWriteError`` once the state agrees with the files again.

    Pass it to ``Trainer(callbacks=[...])``; constructing it writes nothing:

    >>> import ckptfn
    >>> callback = Checkpointing([ckptfn.Strategy("eval_loss"), ckptfn.Strategy("eval_accuracy", mode="max")])
    >>> callback.best_values, callback.output_dir
    ({'best_eval_loss.pt': None, 'best_eval_accuracy.pt': None}, None)
    >>> callback
    Checkpointing(2 strategies, output_dir=None)
    """

    def __init__(
        self,
        config: object,
        output_dir: str | os.PathLike | None = None,
        *,
        resume: bool | None = None,
        on_saved: object = None,
        evaluations: int = 1,
        save_on: object = None,
    ) -> None:
        if resume not in (None, True, False):
            raise TypeError(f"resume: expected None, True or False, got {resume!r}")
        if type(evaluations) is not int or evaluations < 1:
            raise ValueError(f"evaluations: expected a positive int, got {evaluations!r}")
        self.config: Config = with_save_on(as_config(config), save_on)
        self._given = None if output_dir is None else location(output_dir)
        #: where the files go (known once training begins when not given): a ``pathlib.Path``,
        #: or a ``RemotePath`` (a URL) for an object store
        self.output_dir: pathlib.Path | None = self._given
        #: the pure decision state; it always describes the files in ``output_dir``
        self.state: State = init(self.config)
        self._resume = resume
        self._hooks = kit.hooks_of(on_saved) + trackers_of(self.config)
        self._evaluations = evaluations
        self._training = False
        self._last_step_decided = 0
        self._pending: tuple[int, dict, int] | None = None  # (global step, metrics so far, calls so far)
        self._seen_skips: frozenset[tuple[str, str]] = frozenset()
        #: set while a write runs: if anything escapes before the commit, the files decide
        self._in_doubt = False
        self._watching = self.config.active and bool(self.config.save_on)
        self._watch: SignalWatch | None = None  # installed while train() runs (save_on)
        self._ranks = None  # the processes that agree on a preemption (None: this one alone)
        self._preempted: Preemption | None = None

    # --- what users look for ------------------------------------------------------------------

    @property
    def best_values(self) -> dict[str, float | None]:
        """filename -> best value saved so far (None before the first save)."""
        return best_values(self.state)

    @property
    def best_model_path(self) -> str:
        """The file of the first metric strategy, once it saved ("" before)."""
        for strategy, best in zip(self.config.strategies, self.state.bests):
            if not isinstance(strategy, Every):
                if best.epoch is None:
                    return ""
                return os.fspath(self.output_dir / strategy.filename) if self.output_dir else strategy.filename
        return ""

    @property
    def preempted(self) -> Preemption | None:
        """None until a preemption save (``save_on``) of the latest ``train()`` is committed; then
        its ``Preemption`` record (signals, epoch, global step, paths), which is truthy."""
        return self._preempted

    def __repr__(self) -> str:
        count = len(self.config.strategies)
        return f"Checkpointing({count} {'strategy' if count == 1 else 'strategies'}, output_dir={self.output_dir!r})"

    # --- TrainerCallback events -----------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        """Take the bests from the files in ``output_dir`` (world process zero).

        A resumed run (``train(resume_from_checkpoint=...)``, so ``state.global_step > 0``)
        and a run after an interrupted write continue with the files' bests. A run that
        does not resume judges against files of an earlier run unless ``resume=False``.
        """
        _check_supported(args)
        if self._watching:
            check_main_thread("save_on")
        self._close_watch()  # one left by a train() that raised
        self._training = False
        self._pending = None
        self._preempted = None
        self._last_step_decided = state.global_step
        self.output_dir = self._given if self._given is not None else location(os.fspath(args.output_dir)) / "ckptfn"
        if state.is_world_process_zero:
            self._take_bests_from_files(state)
        if self._watching:  # last: nothing above can fail with it installed
            self._ranks = find_group()
            self._watch = SignalWatch(self.config.save_on)

    def _take_bests_from_files(self, state) -> None:
        on_disk = kit.restore_from_directory(self.config, self.output_dir)
        found = [s.filename for s, b in zip(self.config.strategies, on_disk.bests) if b.epoch is not None]
        starts_fresh = all(best.epoch is None for best in self.state.bests)
        if state.global_step > 0 or self._in_doubt:
            self.state = on_disk
        elif starts_fresh and found and self._resume is not False:
            self.state = on_disk
            if self._resume is None:
                warnings.warn(
                    f"{self.output_dir} holds checkpoints of an earlier run ({', '.join(found)}): judging against "
                    "them, so only better evaluations replace them. Pass Checkpointing(..., resume=False) to start "
                    "from scratch (they are then replaced or archived).",
                    stacklevel=kit.user_stacklevel(skip=_FRAMEWORKS),
                )
        elif starts_fresh and found:
            warnings.warn(
                f"{self.output_dir} already holds checkpoints ({', '.join(found)}) and resume=False, so bests "
                "start from scratch and these files will be replaced or archived.",
                stacklevel=kit.user_stacklevel(skip=_FRAMEWORKS),
            )
        self._in_doubt = False
        self._training = True

    def on_train_end(self, args, state, control, **kwargs) -> None:
        """Put back the signal handlers ``save_on`` replaced (a signal no safe point saw is a WARNING)."""
        self._training = False
        self._close_watch()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        """A safe point for ``save_on`` (every process, after each optimizer step): after a signal,
        every ``Every``'s file now, then stop."""
        if self._preemption_requested():
            with self._closing_on_error():
                self._preempt(args, state, control, kwargs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
        """Decide on the evaluation's metrics and write what improved (world process zero); a
        safe point for ``save_on`` too (every process)."""
        preempted = self._preemption_requested()
        with self._closing_on_error():
            decision = self._collect(state, metrics) if self._training and state.is_world_process_zero else None
            if preempted and decision is not None:
                self._checkpoint(decision, args, state, kwargs, control=control)
            elif preempted:
                self._preempt(args, state, control, kwargs)
            elif decision is not None:
                self._checkpoint(decision, args, state, kwargs)

    def _collect(self, state, metrics) -> dict | None:
        """The metrics of one decision at this global step, once its ``evaluations`` came (None
        before, or when this step is decided already)."""
        at = state.global_step
        if at <= self._last_step_decided:
            logger.debug("ckptfn: evaluation at global step %d not decided (decided already, or no step yet)", at)
            return None
        seen, calls = {}, 0
        if self._pending is not None and self._pending[0] == at:
            _, seen, calls = self._pending
        elif self._pending is not None:
            warnings.warn(
                f"only {self._pending[2]} of evaluations={self._evaluations} evaluations came at global step "
                f"{self._pending[0]}; nothing was decided there",
                stacklevel=kit.user_stacklevel(skip=_FRAMEWORKS),
            )
        seen, calls = {**seen, **trainer_metrics(metrics or {})}, calls + 1
        if calls < self._evaluations:
            self._pending = (at, seen, calls)
            return None
        self._pending = None
        self._last_step_decided = at
        return seen

    # --- the decision and the write -------------------------------------------------------------

    def _checkpoint(self, metrics: dict, args, state, objects: Mapping, *, control=None) -> None:
        """The decision (``step``; with ``control``, a preempted one: the preemption save too)."""
        if self._in_doubt:  # an interrupt escaped a write: the files say what holds
            self.state, self._in_doubt = kit.restore_from_directory(self.config, self.output_dir), False
        old = self.state
        new, actions = step(
            old, _with_chart_names(metrics, self.config), int(state.epoch or 0),
            global_step=state.global_step, now=time.monotonic(), preempted=control is not None,
        )
        self._seen_skips = kit.report_skips(self._seen_skips, actions, stacklevel=kit.user_stacklevel(skip=_FRAMEWORKS))
        if control is not None:
            self._save_preempted(old, new, actions, metrics, args, state, objects, control)
            return
        self._save(old, new, actions, metrics, args, state, objects)

    # --- preemption (save_on) -----------------------------------------------------------------

    def _preemption_requested(self) -> bool:
        """Whether a ``save_on`` signal came, to any process: the flag alone in one process, else
        one collective (every process reaches the same safe points). False, with no collective,
        while no watch is installed (the same everywhere: outside ``train()``, or without ``save_on``)."""
        return self._watch is not None and self._watch.requested_on(self._ranks)

    def _preempt(self, args, state, control, objects: Mapping) -> None:
        """Between decisions: every ``Every``'s file now (``preempt``; written by world process
        zero), then stop, on every process."""
        if self._in_doubt and state.is_world_process_zero:
            self.state, self._in_doubt = kit.restore_from_directory(self.config, self.output_dir), False
        old = self.state
        new, actions = kit.preempt(old, int(state.epoch or 0), global_step=state.global_step, now=time.monotonic())
        self._save_preempted(old, new, actions, None, args, state, objects, control)

    def _save_preempted(self, old, new, actions, metrics, args, state, objects: Mapping, control) -> None:
        """The preemption save (the write inside ``deferred``, on world process zero), its record,
        and the stop; nothing more is decided at this global step."""
        self._last_step_decided = max(self._last_step_decided, state.global_step)
        self._pending = None
        if state.is_world_process_zero:
            with self._watch.deferred():
                paths = self._save(old, new, actions, metrics, args, state, objects)
        else:  # the names world process zero writes
            paths = tuple(self.output_dir / action.filename for action in kit.partition(actions)[0])
        self._preempted = honour_preemption(self._watch, actions, paths, loud=state.is_world_process_zero)
        control.should_training_stop = True

    def _close_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    @contextlib.contextmanager
    def _closing_on_error(self):
        """An exception leaving a hook ends ``train()`` without ``on_train_end``: the handlers go back first."""
        try:
            yield
        except BaseException:
            self._close_watch()
            raise

    def _save(self, old: State, new: State, actions: tuple, metrics: dict | None, args, state, objects: Mapping) -> tuple:
        """Plan, the one write, the commit rule, then the hooks (world process zero); the paths written."""
        saves, _ = kit.partition(actions)
        if not saves:
            self.state = new
            return ()
        payload = trainer_payload(
            objects.get("model"), state, optimizer=objects.get("optimizer"),
            lr_scheduler=objects.get("lr_scheduler"), model_only=bool(getattr(args, "save_only_model", False)),
        )
        snapshot = kit.plan(saves, state=new, metrics=metrics)
        self._in_doubt = True
        written = kit.write(self.output_dir, snapshot, payload)
        self.state = kit.state_to_keep(self.config, self.output_dir, old, new, written)
        self._in_doubt = False
        if written.error is not None:
            raise _explained(written.error)
        kit.notify(self._hooks, saves, written.paths)
        return tuple(written.paths)


def trainer_metrics(metrics: Mapping) -> dict[str, float]:
    """The scalar entries of the metrics ``on_evaluate`` receives, as Python floats (NaN/inf kept).

    >>> import numpy as np
    >>> trainer_metrics({"eval_loss": 0.5, "eval_accuracy": np.float32(0.75), "eval_hist": [1, 2], "epoch": 1.5})
    {'eval_loss': 0.5, 'eval_accuracy': 0.75, 'epoch': 1.5}
    """
    plain = {}
    for name, value in metrics.items():
        try:
            plain[str(name)] = metric_value(str(name), value)
        except MetricTypeError:
            continue
    return plain


def _with_chart_names(metrics: dict, config: Config) -> dict:
    """``metrics`` plus ``eval/<x>`` for a watched ``eval/<x>`` whose Trainer name ``eval_<x>`` is there."""
    added = {}
    for strategy in config.strategies:
        name = getattr(strategy, "metric_name", None)
        if name and name.startswith("eval/") and name not in metrics and f"eval_{name[5:]}" in metrics:
            added[name] = metrics[f"eval_{name[5:]}"]
    return {**metrics, **added} if added else metrics


def trainer_payload(
    model: torch.nn.Module | None,
    state: object,
    *,
    optimizer: object = None,
    lr_scheduler: object = None,
    model_only: bool = False,
) -> dict:
    """What a file holds: plain data that loads with ``torch.load(weights_only=True)``.

    ``model`` (unwrapped as the Trainer does, then its state dict), ``trainer_state``
    (the JSON form of the ``TrainerState``), and unless ``model_only``, ``optimizer``,
    ``lr_scheduler`` and ``rng`` (``random``, numpy, torch and CUDA generator states;
    numpy's as ``{"bit_generator", "key" (an int64 tensor), "pos", "has_gauss", "gauss"}``).

    >>> import torch
    >>> from transformers import TrainerState
    >>> model = torch.nn.Linear(2, 1)
    >>> payload = trainer_payload(model, TrainerState(global_step=4), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    >>> sorted(payload), sorted(payload["model"]), payload["trainer_state"]["global_step"]
    (['lr_scheduler', 'model', 'optimizer', 'rng', 'trainer_state'], ['bias', 'weight'], 4)
    >>> sorted(trainer_payload(model, TrainerState(), model_only=True))
    ['model', 'trainer_state']
    """
    if model is None:
        raise ValueError("the Trainer gave the callback no model")
    payload = {
        "model": extract_model_from_parallel(model, keep_torch_compile=False).state_dict(),
        "trainer_state": json.loads(json.dumps(dataclasses.asdict(state))),
    }
    if not model_only:
        payload["optimizer"] = None if optimizer is None else optimizer.state_dict()
        payload["lr_scheduler"] = None if lr_scheduler is None else lr_scheduler.state_dict()
        payload["rng"] = rng_states()
    return payload


def rng_states() -> dict:
    """The generator states the Trainer saves for resuming, as plain data.

    >>> sorted(rng_states())[:3]
    ['cpu', 'numpy', 'python']
    """
    import numpy as np  # a dependency of transformers

    numpy_state = np.random.get_state(legacy=False)
    states = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(numpy_state["bit_generator"]),
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.random.get_rng_state_all()
    return states


def _explained(error: BaseException) -> BaseException:
    """A ``PayloadError`` with the way out added; other errors as they are."""
    if not isinstance(error, PayloadError):
        return error
    explained = PayloadError(
        f"{error}. A file written by ckptfn must load with torch.load(weights_only=True): the model's, "
        "optimizer's and scheduler's state dicts must be tensors and plain data (save_only_model=True "
        "leaves the optimizer and scheduler out)"
    )
    explained.__cause__ = error
    return explained


def _check_supported(args: object) -> None:
    for option in ("deepspeed", "fsdp"):
        if getattr(args, option, None):
            raise RuntimeError(
                f"ckptfn.integrations.huggingface.Checkpointing writes one complete file from world process zero; "
                f"with {option}={getattr(args, option)!r} the model and optimizer states are sharded across "
                "processes, which it does not support: use the Trainer's own checkpoints with this setup"
            )
