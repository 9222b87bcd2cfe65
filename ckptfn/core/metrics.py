"""Finding a metric's value in a (nested) metrics mapping and reading it as a float.

Pure. numpy scalars and torch tensors are recognised by duck typing (``.item()``
plus a ``size``/``numel()`` of one), so this module imports neither library.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping

from ckptfn.core.errors import MetricTypeError

__all__ = ["MAX_LISTED", "MISSING", "element_count", "lookup", "metric_names", "metric_value", "missing_hint"]

#: The most metric names a message lists.
MAX_LISTED = 50


class _Missing:
    """Sentinel for a metric that is not in the mapping (the one instance is ``MISSING``).

    >>> lookup({"val_loss": 0.5}, "val_acc") is MISSING
    True
    >>> MISSING
    MISSING
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


def lookup(metrics: Mapping, name: str) -> object:
    """The value of ``name`` in ``metrics``, or ``MISSING``.

    At every level the exact remaining key wins (flat logs such as
    ``{"loss_components.concordance": 0.3}``); otherwise the first dotted segment
    is followed into a nested mapping. Nothing is copied.

    >>> lookup({"loss_components": {"concordance": 0.3}}, "loss_components.concordance")
    0.3
    >>> lookup({"loss_components.concordance": 0.2}, "loss_components.concordance")
    0.2
    >>> lookup({"loss_components": 0.5}, "loss_components.concordance")
    MISSING
    """
    if name in metrics:
        return metrics[name]
    head, dot, rest = name.partition(".")
    if not dot or head not in metrics:
        return MISSING
    inner = metrics[head]
    return lookup(inner, rest) if isinstance(inner, dict) or isinstance(inner, Mapping) else MISSING


def _type_name(value: object) -> str:
    kind = type(value)
    module = kind.__module__
    name = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
    dtype = getattr(value, "dtype", None)
    return f"{name} (dtype {dtype})" if dtype is not None and not isinstance(dtype, type) else name


def element_count(value: object) -> int | None:
    """How many elements an array-like holds (torch ``numel()``, numpy/jax ``size``), else None."""
    numel = getattr(value, "numel", None)
    if callable(numel):
        count = numel()
    else:
        count = getattr(value, "size", None)
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _as_real(value: object) -> float | None:
    """``value`` as a Python float if it is a real, non-bool number (Python or numpy scalar)."""
    if type(value) is float:  # the common case, without the slow abstract-base-class check below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None  # numpy.bool_ is not a numbers.Real either
    try:
        return float(value)
    except OverflowError:  # an int too large for a float
        return math.inf if value > 0 else -math.inf


def metric_value(name: str, value: object) -> float:
    """``value`` as a Python float; ``MetricTypeError`` naming the metric and type otherwise.

    Accepts Python and numpy real scalars and one-element arrays/tensors (any
    device: ``.item()`` copies the one number to the host). NaN and inf are
    returned as they are; deciding what they mean is the caller's business.

    >>> metric_value("val_loss", 3)
    3.0
    >>> metric_value("val_loss", True)
    Traceback (most recent call last):
    ...
    ckptfn.MetricTypeError: metric 'val_loss': expected a real number or a one-element tensor, got bool True
    """
    result = _as_real(value)
    if result is not None:
        return result
    count = element_count(value)
    item = getattr(value, "item", None)
    if count == 1 and callable(item) and not isinstance(value, (str, bytes, Mapping)):
        try:
            result = _as_real(item())
        except Exception:  # noqa: BLE001 - e.g. a meta or nested tensor has no value to read
            result = None
        if result is not None:
            return result
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise MetricTypeError(
        f"metric {name!r}: expected a real number or a one-element tensor, "
        f"got {_type_name(value)} {shown}"
    )


def metric_names(metrics: Mapping, limit: int = MAX_LISTED) -> tuple[str, ...]:
    """The dotted names of the values in ``metrics`` (nested mappings followed), sorted, at most ``limit``.

    >>> metric_names({"val_loss": 0.5, "loss_components": {"mse": 1, "kl": 2}})
    ('loss_components.kl', 'loss_components.mse', 'val_loss')
    """
    names: list[str] = []
    pending = [("", metrics, 0)]
    while pending and len(names) < 10 * limit:  # bounded whatever the mapping holds
        prefix, mapping, depth = pending.pop()
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            name = name if name.isprintable() else ascii(name)  # never a control character in a message
            if isinstance(value, Mapping) and depth < 10:
                pending.append((name + ".", value, depth + 1))
            else:
                names.append(name)
    return tuple(sorted(names)[:limit])


def missing_hint(name: str, available: tuple[str, ...]) -> str:
    """What to say about a missing metric: the metrics there are and the closest name.

    >>> missing_hint("val_los", ("train_loss", "val_loss"))
    "the metrics are: train_loss, val_loss (did you mean 'val_loss'?)"
    >>> missing_hint("val_loss", ())
    'the metrics mapping is empty'
    """
    if not available:
        return "the metrics mapping is empty"
    close = difflib.get_close_matches(name, available, n=1, cutoff=0.75)
    more = ", ..." if len(available) >= MAX_LISTED else ""
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"the metrics are: {', '.join(available)}{more}{hint}"
