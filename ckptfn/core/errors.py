"""Exception and warning types of ckptfn.

Pure: no imports beyond the standard exception hierarchy. The public classes
report themselves as ``ckptfn.X`` in tracebacks.

Errors about configuration carry the *key path* of the offending entry relative
to the object the user passed, so a message reads like
``strategies[1].mode: 'maximum' is not one of 'min', 'max'``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "ConfigError",
    "MetricTypeError",
    "MetricWarning",
    "MissingMetricError",
    "PayloadError",
]


def _join_path(prefix: str, path: str) -> str:
    """Join two key-path fragments: ``a`` + ``b`` -> ``a.b``, ``a`` + ``[0]`` -> ``a[0]``.

    >>> _join_path("strategies[1]", "mode"), _join_path("strategies", "[0]"), _join_path("", "mode")
    ('strategies[1].mode', 'strategies[0]', 'mode')
    """
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


class ConfigError(ValueError):
    """A checkpoint configuration (or saved state) is invalid.

    ``path`` is the key path of the bad entry (``""`` for the object itself),
    ``detail`` says what is wrong with it.

    >>> str(ConfigError("'maximum' is not one of 'min', 'max'", "mode").within("strategies[1]"))
    "strategies[1].mode: 'maximum' is not one of 'min', 'max'"
    """

    __module__ = "ckptfn"

    def __init__(self, detail: str, path: str = "") -> None:
        self.detail = detail
        self.path = path
        super().__init__(f"{path}: {detail}" if path else detail)

    def within(self, prefix: str) -> ConfigError:
        """The same error, located inside ``prefix`` (a key path or ``[i]``)."""
        return ConfigError(self.detail, _join_path(prefix, self.path))


class MetricTypeError(TypeError):
    """A monitored metric has a value that is not a real number.

    Raised by ``step`` (and so by every shell) before anything is decided or written;
    a number, a numpy scalar or a one-element tensor is accepted.

    >>> import ckptfn
    >>> state = ckptfn.init(ckptfn.Strategy("val_loss"))
    >>> ckptfn.step(state, {"val_loss": "low"}, epoch=0)
    Traceback (most recent call last):
    ...
    ckptfn.MetricTypeError: metric 'val_loss': expected a real number or a one-element tensor, got str 'low'
    """

    __module__ = "ckptfn"


class MissingMetricError(LookupError):
    """A watched metric is missing before its strategy's first save: almost always a typo
    or a logging mistake, so ``step`` refuses the decision (``on_missing="error"``, the
    default). The message lists the metrics there are and the closest name.

    >>> import ckptfn
    >>> state = ckptfn.init(ckptfn.Strategy("val_los"))
    >>> ckptfn.step(state, {"val_loss": 0.5, "train_loss": 0.7}, epoch=0)
    Traceback (most recent call last):
    ...
    ckptfn.MissingMetricError: metric 'val_los' (best_val_los.pt) is missing; the metrics are: train_loss, val_loss (did you mean 'val_loss'?). Fix the name, or set on_missing='warn' (on the strategy or the config) if it appears only later
    """

    __module__ = "ckptfn"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MetricWarning(UserWarning):
    """A monitored metric was missing or not finite, so its strategy skipped.

    Warned once per strategy and reason (repeats are logged at DEBUG); filter it with
    ``warnings.filterwarnings("ignore", category=ckptfn.MetricWarning)``.

    >>> import tempfile, warnings, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     manager = ckptfn.CheckpointManager(directory, ckptfn.Strategy("val_loss", on_missing="warn"))
    ...     manager.update({"train_loss": 0.3}, {}, epoch=0)  # no val_loss: nothing saved
    []
    >>> [(w.category.__name__, str(w.message)) for w in caught]
    [('MetricWarning', 'val_loss is missing at epoch 0; best_val_loss.pt not saved; the metrics are: train_loss (further such epochs are logged at DEBUG)')]
    """

    __module__ = "ckptfn"


class CheckpointError(Exception):
    """A checkpoint file could not be read, or is not a (safe) ckptfn checkpoint.

    The base of ``CheckpointNotFoundError`` and ``CheckpointWriteError``; raised by
    ``load_checkpoint``, ``read_metadata`` and ``load_sharded`` for corrupt, foreign
    or unsafe files (never by falling back to unsafe unpickling).

    >>> import pathlib, tempfile, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     path = pathlib.Path(directory, "notes.pt")
    ...     _ = path.write_text("not a checkpoint")
    ...     ckptfn.load_checkpoint(path)
    Traceback (most recent call last):
    ...
    ckptfn.CheckpointError: ...notes.pt: not a ckptfn checkpoint (not a torch zip archive)
    """

    __module__ = "ckptfn"


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed; no final name holds a partial file.

    ``published`` lists the final paths that already hold the new snapshot when
    the failure hit (empty when nothing changed on disk).

    >>> import pathlib, tempfile, torch, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     blocker = pathlib.Path(directory, "not_a_directory")
    ...     _ = blocker.write_text("")
    ...     manager = ckptfn.CheckpointManager(blocker / "checkpoints", ckptfn.Strategy("val_loss"))
    ...     try:
    ...         manager.update({"val_loss": 0.5}, {"w": torch.zeros(2)}, epoch=0)
    ...     except ckptfn.CheckpointWriteError as error:
    ...         print(error.published, manager.best_values)  # nothing moved: the next epoch retries
    () {'best_val_loss.pt': None}
    """

    __module__ = "ckptfn"

    def __init__(self, message: str, published: tuple = ()) -> None:
        super().__init__(message)
        self.published = tuple(published)


class PayloadError(CheckpointWriteError, TypeError):
    """Something in the payload or metadata cannot be stored so that it loads with
    ``torch.load(weights_only=True)``; raised before anything is written.

    The message names the key path of the offending value.

    >>> import os, tempfile, torch, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     manager = ckptfn.CheckpointManager(directory, ckptfn.Strategy("val_loss"))
    ...     try:
    ...         manager.update({"val_loss": 0.5}, {"w": torch.zeros(2), "hook": object()}, epoch=0)
    ...     except ckptfn.PayloadError as error:
    ...         print(error)
    ...     os.listdir(directory), manager.best_values
    payload['hook']: builtins.object does not load with torch.load(weights_only=True); ...
    ([], {'best_val_loss.pt': None})
    """

    __module__ = "ckptfn"


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist; the message lists what the directory holds.

    It is also a ``FileNotFoundError`` (with ``filename`` set), so code that already
    catches that keeps working.

    >>> import tempfile, ckptfn
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     try:
    ...         ckptfn.load_checkpoint(f"{directory}/best_val_loss.pt")
    ...     except FileNotFoundError as error:
    ...         print(type(error).__name__, error.filename.endswith("best_val_loss.pt"))
    ...         print(error)
    CheckpointNotFoundError True
    /...best_val_loss.pt: no such checkpoint; /... holds: no checkpoint files
    """

    __module__ = "ckptfn"

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.errno, self.strerror, self.filename = 2, "No such checkpoint", path  # ENOENT, like OSError

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
