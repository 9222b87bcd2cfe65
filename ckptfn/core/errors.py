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
    """A monitored metric has a value that is not a real number."""

    __module__ = "ckptfn"


class MetricWarning(UserWarning):
    """A monitored metric was missing or not finite, so its strategy skipped."""

    __module__ = "ckptfn"


class CheckpointError(Exception):
    """A checkpoint file could not be read, or is not a (safe) ckptfn checkpoint."""

    __module__ = "ckptfn"


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed; no final name holds a partial file.

    ``published`` lists the final paths that already hold the new snapshot when
    the failure hit (empty when nothing changed on disk).
    """

    __module__ = "ckptfn"

    def __init__(self, message: str, published: tuple = ()) -> None:
        super().__init__(message)
        self.published = tuple(published)


class PayloadError(CheckpointWriteError, TypeError):
    """Something in the payload or metadata cannot be stored so that it loads with
    ``torch.load(weights_only=True)``; raised before anything is written."""

    __module__ = "ckptfn"


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist; the message lists what the directory holds."""

    __module__ = "ckptfn"

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.errno, self.strerror, self.filename = 2, "No such checkpoint", path  # ENOENT, like OSError

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
