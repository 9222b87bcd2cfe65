"""What to watch and where to keep it: the ``Strategy`` record.

Pure: frozen attrs records that validate themselves. Every invalid field is a
:class:`~ckptfn.ConfigError` naming the field and the bad value.
"""

from __future__ import annotations

import math
import numbers

import attrs

from ckptfn.core.errors import ConfigError

__all__ = ["MODES", "Strategy", "check_bool", "check_filename", "check_keep", "default_filename", "to_keep"]

MODES = ("min", "max")


def _fail(path: str, detail: str) -> ConfigError:
    return ConfigError(detail, path)


def _check_metric_name(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, str):
        raise _fail(attribute.name, f"expected a str, got {type(value).__name__} {value!r}")
    if not value:
        raise _fail(attribute.name, "must not be empty")
    if "" in value.split("."):
        raise _fail(attribute.name, f"{value!r} has an empty segment in its dotted path")


def _check_mode(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value not in MODES:
        raise _fail(attribute.name, f"{value!r} is not one of 'min', 'max'")


#: Longest file name (UTF-8 bytes) a strategy may use, so its temporary and archive names fit in 255.
MAX_FILENAME_BYTES = 160


def check_filename(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, str):
        raise _fail(attribute.name, f"expected a str, got {type(value).__name__} {value!r}")
    if not value:
        raise _fail(attribute.name, "must not be empty")
    for bad, what in (("/", "a '/'"), ("\\", "a '\\'"), ("\0", "a NUL character")):
        if bad in value:
            raise _fail(attribute.name, f"{value!r} contains {what}: it must be a plain file name")
    if not value.isprintable():
        bad = next(ch for ch in value if not ch.isprintable())
        raise _fail(attribute.name, f"{value!r} contains the control character {bad!r}: file names must be printable")
    if value.startswith("."):
        raise _fail(
            attribute.name,
            f"{value!r} starts with '.': hidden names are reserved for temporary files",
        )
    if len(value) >= 2 and value[0].isalpha() and value[1] == ":":
        raise _fail(attribute.name, f"{value!r} looks like a drive path: it must be a plain file name")
    try:
        size = len(value.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError as error:
        raise _fail(attribute.name, f"{value!r} cannot be a file name ({error.reason})") from None
    if size > MAX_FILENAME_BYTES:
        raise _fail(
            attribute.name,
            f"{value[:40]!r}... is {size} bytes long, more than {MAX_FILENAME_BYTES}: temporary and archive "
            "names add up to 95 bytes to it, and file systems allow 255",
        )


def to_keep(value: object) -> object:
    """``keep`` as an int when it is an integral number (numpy, OmegaConf), else unchanged for the validator."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def check_keep(inst: object, attribute: attrs.Attribute, value: object) -> None:
    """``keep`` is None (keep every version) or an int >= 1, and needs ``overwrite=False``."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(attribute.name, f"expected an int >= 1 or None, got {type(value).__name__} {value!r}")
    if getattr(inst, "overwrite", False) is True:
        raise _fail(
            attribute.name,
            f"keep={value} limits the archived versions, so it needs overwrite=False "
            "(overwrite=True always keeps exactly one version)",
        )


def check_bool(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(attribute.name, f"expected true or false, got {type(value).__name__} {value!r}")


def _to_min_delta(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail("min_delta", f"expected a number, got {type(value).__name__} {value!r}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond the float range
        result = math.inf
    if not math.isfinite(result) or result < 0:
        raise _fail("min_delta", f"must be a finite number >= 0, got {value!r}")
    return result


def default_filename(metric_name: str) -> str:
    """The file a strategy writes when no filename is given.

    >>> default_filename("loss_components.concordance")
    'best_loss_components_concordance.pt'
    """
    return "best_" + metric_name.replace(".", "_") + ".pt"


def _default_filename(self: Strategy) -> object:
    # Runs before validators; an invalid metric_name is reported by its own validator.
    return default_filename(self.metric_name) if isinstance(self.metric_name, str) else None


@attrs.frozen
class Strategy:
    """Keep the best checkpoint for one metric.

    Args:
        metric_name: the metric to watch; a dotted name (``"loss_components.concordance"``)
            addresses nested mappings.
        mode: ``"min"`` (lower is better) or ``"max"``.
        filename: plain file name of the best checkpoint; default ``best_<metric>.pt``.
        overwrite: replace the file on each improvement (``True``) or keep every
            earlier best under a timestamped name (``False``).
        min_delta: an improvement must beat the best by more than this.
        keep: with ``overwrite=False``, keep at most this many versions (the file
            plus ``keep - 1`` archived ones; the oldest archived are deleted after
            each new version is committed). None keeps every version.

    >>> Strategy("loss_components.concordance")
    Strategy(metric_name='loss_components.concordance', mode='min', filename='best_loss_components_concordance.pt', overwrite=True, min_delta=0.0, keep=None)
    >>> Strategy("val_loss", keep=3)
    Traceback (most recent call last):
    ...
    ckptfn.ConfigError: keep: keep=3 limits the archived versions, so it needs overwrite=False (overwrite=True always keeps exactly one version)
    """

    metric_name: str = attrs.field(validator=_check_metric_name)
    mode: str = attrs.field(default="min", validator=_check_mode)
    filename: str = attrs.field(
        default=attrs.Factory(_default_filename, takes_self=True), validator=check_filename
    )
    overwrite: bool = attrs.field(default=True, validator=check_bool)
    min_delta: float = attrs.field(default=0.0, converter=_to_min_delta)
    keep: int | None = attrs.field(default=None, converter=to_keep, validator=check_keep)

    @property
    def identity(self) -> tuple[str, str, str]:
        """What a saved best refers to: ``(metric_name, mode, filename)``."""
        return (self.metric_name, self.mode, self.filename)
