"""What to watch and where to keep it: the ``Strategy`` record.

Pure: frozen attrs records that validate themselves. Every invalid field is a
:class:`~ckptfn.ConfigError` naming the field and the bad value.
"""

from __future__ import annotations

import math
import numbers
import re
import zlib

import attrs

from ckptfn.core.errors import ConfigError

__all__ = [
    "MODES",
    "ON_MISSING",
    "Strategy",
    "check_bool",
    "check_filename",
    "check_keep",
    "check_on_missing",
    "default_filename",
    "to_keep",
]

MODES = ("min", "max")
#: What a strategy that has not saved yet does when its metric is missing.
ON_MISSING = ("error", "warn")


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


#: Characters a default file name never holds: separators, NUL and other controls, and what
#: Windows refuses (a dotted metric path becomes ``_`` too, as it always has).
_NOT_IN_NAMES = re.compile(r'[./\\<>:"|?*\x00-\x1f\x7f]')
#: The longest stem (UTF-8 bytes) of a default name, so that top-k member names still fit.
_MAX_DEFAULT_STEM = 100


def default_filename(metric_name: str) -> str:
    """The file a strategy writes when no filename is given: ``best_<metric>.pt``, with every
    character that cannot be in a portable file name (``.``, ``/``, ``\\``, controls, ...)
    as ``_``; a very long name is shortened, keeping a checksum of the whole name.

    >>> default_filename("loss_components.concordance"), default_filename("val/loss")
    ('best_loss_components_concordance.pt', 'best_val_loss.pt')
    >>> len(default_filename("x" * 300).encode())
    108
    """
    stem = _NOT_IN_NAMES.sub("_", metric_name)
    stem = "".join(ch if ch.isprintable() else "_" for ch in stem)
    stem = stem.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate is no file name: "?"
    stem = stem.replace("?", "_")
    encoded = stem.encode("utf-8")
    if len(encoded) > _MAX_DEFAULT_STEM:
        check = f"{zlib.crc32(metric_name.encode('utf-8', 'surrogatepass')):08x}"
        head = encoded[: _MAX_DEFAULT_STEM - 9].decode("utf-8", "ignore")  # never half a character
        stem = f"{head}_{check}"
    return f"best_{stem}.pt"


def check_on_missing(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value is not None and value not in ON_MISSING:
        raise _fail(attribute.name, f"{value!r} is not one of 'error', 'warn' (or None: the config's)")


def _check_top_k(inst: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(attribute.name, f"expected an int >= 1, got {type(value).__name__} {value!r}")
    if value == 1:
        return
    if inst.overwrite is not True or inst.keep is not None:
        raise _fail(
            attribute.name,
            f"top_k={value} keeps the {value} best values under their own names; it cannot be combined "
            "with overwrite=False or keep (which keep earlier bests by time)",
        )
    size = len(inst.filename.encode("utf-8", "surrogateescape")) if isinstance(inst.filename, str) else 0
    if size > MAX_FILENAME_BYTES - _MEMBER_ROOM:
        raise _fail(
            attribute.name,
            f"top_k={value} names its members <stem>-epoch=<n>-step=<n><suffix>: the filename "
            f"{inst.filename[:40]!r} ({size} bytes) leaves no room; use at most {MAX_FILENAME_BYTES - _MEMBER_ROOM} bytes",
        )


#: Bytes a top-k member name may add to its strategy's filename (``-epoch=<n>-step=<n>-<k>``).
_MEMBER_ROOM = 40


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
            each new version is committed). None keeps every version. These are the
            last ``keep`` *improvements*, not the best values: see ``top_k``.
        top_k: keep the ``top_k`` best values seen (Lightning's ``save_top_k``): the
            best at ``filename``, the others under names that say their position
            (``best_val_loss-epoch=3-step=120.pt``); a snapshot that beats the k-th
            best (by more than ``min_delta``) enters, the worst member's file is deleted
            after the new one is committed. ``1`` (default) is one file, replaced.
        on_missing: when the metric is missing from the metrics and this strategy has
            not saved yet: ``"error"`` (a ``MissingMetricError`` listing the metrics
            there are, usually a typo) or ``"warn"`` (skip, warn once); None (default)
            follows ``Config.on_missing``. Once saved, a missing metric always skips.

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
    top_k: int = attrs.field(default=1, converter=to_keep, validator=_check_top_k)
    on_missing: str | None = attrs.field(default=None, validator=check_on_missing)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{field.name}={getattr(self, field.name)!r}"
            for field in attrs.fields(Strategy)
            if field.name not in ("top_k", "on_missing") or getattr(self, field.name) != field.default
        )
        return f"Strategy({fields})"

    @property
    def identity(self) -> tuple[str, str, str]:
        """What a saved best refers to: ``(metric_name, mode, filename)``."""
        return (self.metric_name, self.mode, self.filename)
