"""Every use of Lightning's private names, in one place (checked with lightning 2.6.6).

``tests/test_purity.py`` keeps private Lightning names out of every other module.

What is used, and why:

- ``trainer._checkpoint_connector.dump_checkpoint(weights_only=...)``: the checkpoint dict
  that ``trainer.save_checkpoint`` would write (``ModelCheckpoint`` goes through it too).
- ``trainer._val_check_time_interval``: whether validation is timed.
- ``trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)``:
  whether a validation runs right after the current training batch.
- ``_CheckpointConnector._parse_ckpt_path``: where ``fit(ckpt_path="last" | "best")``
  is resolved. Lightning 2.6.6 looks for "last" only among ``ModelCheckpoint`` callbacks
  (``ModelCheckpoint._find_last_checkpoints``), warns and starts over when it finds none,
  and resolves "best" from ``trainer.checkpoint_callback.best_model_path``.
  ``resolve_special_ckpt_paths`` wraps it so that a checkpoint callback with a
  ``resolve_ckpt_path(trainer, name, fn)`` method resolves these names itself.
- ``trainer._signal_connector._original_handlers``: the signal handlers from before ``fit``
  (Lightning's connector replaced them with its own, and puts them back when ``fit`` ends):
  ``save_on`` chains to those, not to Lightning's (``handlers_before_fit``).
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings

__all__ = [
    "dump_checkpoint", "handlers_before_fit", "resolve_special_ckpt_paths", "val_check_time_interval", "validation_follows",
]

#: The ``ckpt_path`` names a callback with ``resolve_ckpt_path`` resolves.
SPECIAL_CKPT_PATHS = ("last", "best")
_PARSE_PARAMETERS = ["self", "state_fn", "ckpt_path", "model_provided", "model_connected"]


def dump_checkpoint(trainer: object, weights_only: bool = False) -> dict:
    """The Lightning checkpoint dict of ``trainer`` (what ``ModelCheckpoint`` saves), built on
    every rank: ``trainer._checkpoint_connector.dump_checkpoint``. ``weights_only=True`` leaves
    out optimizer, scheduler, precision and callback states (``save_weights_only``)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=weights_only)


def val_check_time_interval(trainer: object) -> object:
    """The time-based validation interval of ``trainer`` (None when validation is not timed)."""
    return getattr(trainer, "_val_check_time_interval", None)


def validation_follows(trainer: object) -> bool:
    """Whether the fit loop runs a validation right after the current training batch (called
    from ``on_train_batch_end``): Lightning's own test, ``_should_check_val_fx``."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if getattr(epoch_loop, "_skip_next_val", False):
        return False
    return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def handlers_before_fit(trainer: object, numbers: list[int]) -> dict[int, object] | None:
    """The handler each signal of ``numbers`` had before Lightning's signal connector installed its
    own for this ``fit`` (``trainer._signal_connector._original_handlers``); None when this
    Lightning does not record them."""
    originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
    if not isinstance(originals, dict) or not all(number in originals for number in numbers):
        return None
    return {number: originals[number] for number in numbers}


def resolve_special_ckpt_paths() -> bool:
    """Let checkpoint callbacks resolve ``ckpt_path="last"`` and ``"best"`` (idempotent).

    Wraps ``_CheckpointConnector._parse_ckpt_path``: when the name is ``"last"`` or
    ``"best"`` and a checkpoint callback of the trainer has a ``resolve_ckpt_path``
    method, that method answers (for ``"best"``: the first checkpoint callback, as
    Lightning does). Other callbacks and names go to Lightning unchanged. With other
    checkpoint callbacks beside (``ModelCheckpoint``), "last" is the newest of their last
    checkpoints and the callbacks' ones, as Lightning picks the newest among its own.

    Returns False, and changes nothing, when this Lightning has no such method with the
    signature of 2.6.6.
    """
    try:
        from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
    except ImportError:
        return False
    original = getattr(_CheckpointConnector, "_parse_ckpt_path", None)
    if original is None:
        return False
    if getattr(original, "_ckptfn_resolves", False):
        return True
    if list(inspect.signature(original).parameters) != _PARSE_PARAMETERS:
        return False

    @functools.wraps(original)
    def _parse_ckpt_path(self, state_fn, ckpt_path, model_provided, model_connected):
        if not (isinstance(ckpt_path, str) and ckpt_path in SPECIAL_CKPT_PATHS):
            return original(self, state_fn, ckpt_path, model_provided, model_connected)
        trainer = self.trainer
        callbacks = list(trainer.checkpoint_callbacks)
        resolving = [callback for callback in callbacks if callable(getattr(callback, "resolve_ckpt_path", None))]
        fn = getattr(state_fn, "value", str(state_fn))
        if ckpt_path == "best":
            if not callbacks or callbacks[0] not in resolving:
                return original(self, state_fn, ckpt_path, model_provided, model_connected)
            return callbacks[0].resolve_ckpt_path(trainer, "best", fn)
        if not resolving:
            return original(self, state_fn, ckpt_path, model_provided, model_connected)
        found, refusals = [], []
        for callback in resolving:
            try:
                path = callback.resolve_ckpt_path(trainer, "last", fn)
            except ValueError as refusal:  # it can have no last checkpoint; another one may
                refusals.append(refusal)
                continue
            if path:
                found.append(path)
        if len(resolving) < len(callbacks) or _has_exception_checkpoint(trainer):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*there is no last checkpoint available")
                theirs = original(self, state_fn, ckpt_path, model_provided, model_connected)
            if theirs:
                found.append(theirs)
        if found:
            return found[0] if len(found) == 1 else max(found, key=_modified)
        if refusals:
            raise refusals[0]
        return None  # each callback said why (a warning), as Lightning does for ModelCheckpoint

    _parse_ckpt_path._ckptfn_resolves = True
    _CheckpointConnector._parse_ckpt_path = _parse_ckpt_path
    return True


def _modified(path: str) -> float:
    """When the checkpoint at ``path`` (a local file, or an object for a URL) was last written."""
    from ckptfn.io.objectstore import is_remote, store_for

    if is_remote(path):
        store, key = store_for(path)
        return store.modified(key).timestamp()
    return os.stat(path).st_mtime


def _has_exception_checkpoint(trainer: object) -> bool:
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    return any(isinstance(callback, OnExceptionCheckpoint) for callback in trainer.callbacks)
