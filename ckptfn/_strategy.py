"""What to watch and where to keep it: the ``Strategy`` record.

Pure: frozen attrs records that validate themselves. Every invalid field is a
:class:`~ckptfn.ConfigError` naming the field and the bad value.
"""

from __future__ import annotations

import math
import numbers

import attrs

from ckptfn._errors import ConfigError

__all__ = ["MODES", "Strategy", "check_bool", "default_filename"]

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


def _check_filename(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, str):
        raise _fail(attribute.name, f"expected a str, got {type(value).__name__} {value!r}")
    if not value:
        raise _fail(attribute.name, "must not be empty")
    for bad, what in (("/", "a '/'"), ("\\", "a '\\'"), ("\0", "a NUL character")):
        if bad in value:
            raise _fail(attribute.name, f"{value!r} contains {what}: it must be a plain file name")
    if value.startswith("."):
        raise _fail(
            attribute.name,
            f"{value!r} starts with '.': hidden names are reserved for temporary files",
        )
    if len(value) >= 2 and value[0].isalpha() and value[1] == ":":
        raise _fail(attribute.name, f"{value!r} looks like a drive path: it must be a plain file name")


def check_bool(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(attribute.name, f"expected true or false, got {type(value).__name__} {value!r}")


def _to_min_delta(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail("min_delta", f"expected a number, got {type(value).__name__} {value!r}")
    result = float(value)
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

    >>> Strategy("loss_components.concordance")
    Strategy(metric_name='loss_components.concordance', mode='min', filename='best_loss_components_concordance.pt', overwrite=True, min_delta=0.0)
    """

    metric_name: str = attrs.field(validator=_check_metric_name)
    mode: str = attrs.field(default="min", validator=_check_mode)
    filename: str = attrs.field(
        default=attrs.Factory(_default_filename, takes_self=True), validator=_check_filename
    )
    overwrite: bool = attrs.field(default=True, validator=check_bool)
    min_delta: float = attrs.field(default=0.0, converter=_to_min_delta)

    @property
    def identity(self) -> tuple[str, str, str]:
        """What a saved best refers to: ``(metric_name, mode, filename)``."""
        return (self.metric_name, self.mode, self.filename)
