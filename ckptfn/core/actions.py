"""Decisions as data: what ``step`` asks the executor to do.

Pure. Like h11's events, actions are plain frozen records that fully describe an
effect except what only the shell knows (the clock and the file system).
Dispatch on them with ``match``::

    match action:
        case Save(strategy=s, value=v): ...    # a new best, at s.filename
        case Enter(name=n): ...                # a top-k member that is not the best, at n
        case Periodic(strategy=every): ...
        case Skip(reason="missing"): ...

Every action records the decision's position: ``epoch`` and, when the shell knows
it, ``global_step``.
"""

from __future__ import annotations

import math
import numbers

import attrs

from ckptfn.core.errors import ConfigError
from ckptfn.core.every import Every
from ckptfn.core.naming import member_of
from ckptfn.core.strategy import Strategy

__all__ = ["SKIP_REASONS", "Enter", "Periodic", "Save", "Skip", "improved"]

SKIP_REASONS = ("missing", "not_finite")


def improved(mode: str, best: float | None, value: float, min_delta: float = 0.0) -> bool:
    """Whether ``value`` is a new best: strictly better than ``best`` by more than ``min_delta``.

    ``best is None`` (nothing saved yet) always improves; ties never do.

    >>> improved("min", None, 1.0), improved("min", 1.0, 0.5), improved("min", 1.0, 1.0)
    (True, True, False)
    >>> improved("max", 0.5, 0.55, min_delta=0.1)
    False
    """
    if mode == "min":
        return best is None or value < best - min_delta
    if mode == "max":
        return best is None or value > best + min_delta
    raise ConfigError(f"{mode!r} is not one of 'min', 'max'", "mode")


def _check_epoch(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value is None and attribute.name == "global_step":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be an int >= 0, got {value!r}")


def _names(value: object) -> tuple:
    return tuple(value)


def _check_members(inst: object, attribute: attrs.Attribute, value: object) -> None:
    """``aside``, ``name`` and ``leaves`` are top-k member names of the strategy's filename."""
    if value is None or value == ():  # the common case (no top-k move), without the work below
        return
    names = (value,) if isinstance(value, str) else value
    for name in names:
        if name is None:
            continue
        if not isinstance(name, str) or not member_of(name, inst.strategy.filename):
            raise ValueError(f"{attribute.name}: {name!r} is not a top-k member name of {inst.strategy.filename!r}")
    if attribute.name != "name" and names and inst.strategy.top_k == 1 and any(n is not None for n in names):
        raise ValueError(f"{attribute.name}: {inst.strategy.filename!r} keeps no top-k members (top_k=1)")


def _check_finite(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value is None and attribute.name == "previous":
        return
    if not isinstance(value, float) or not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite float, got {value!r}")


def _check_improves(inst: Save, _attribute: attrs.Attribute, previous: float | None) -> None:
    s = inst.strategy
    if not improved(s.mode, previous, inst.value, s.min_delta):
        raise ValueError(
            f"Save of {s.metric_name!r} ({s.mode}): {inst.value!r} does not improve "
            f"on {previous!r} by more than {s.min_delta!r}"
        )


def _optional_float(value: object) -> object:
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


@attrs.frozen
class Save:
    """Save this epoch's snapshot as ``strategy.filename``: ``value`` beat ``previous``.

    >>> Save(Strategy("val_loss"), epoch=3, value=0.25, previous=0.5).filename
    'best_val_loss.pt'
    >>> Save(Strategy("val_loss"), epoch=3, value=0.5, previous=0.25)
    Traceback (most recent call last):
    ...
    ValueError: Save of 'val_loss' (min): 0.5 does not improve on 0.25 by more than 0.0
    """

    strategy: Strategy = attrs.field(validator=attrs.validators.instance_of(Strategy))
    epoch: int = attrs.field(validator=_check_epoch)
    value: float = attrs.field(converter=_optional_float, validator=_check_finite)
    previous: float | None = attrs.field(
        converter=_optional_float, validator=[_check_finite, _check_improves]
    )
    global_step: int | None = attrs.field(default=None, kw_only=True, validator=_check_epoch)
    #: top-k: the member name the previous best moves to before this one takes ``filename``
    aside: str | None = attrs.field(default=None, kw_only=True, validator=_check_members)
    #: top-k: the member names that leave the top k (deleted once this save is committed)
    leaves: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=_names, validator=_check_members)

    @property
    def filename(self) -> str:
        """The name this snapshot is published under: the strategy's file."""
        return self.strategy.filename


@attrs.frozen
class Enter:
    """Top-k: this snapshot enters the ``strategy.top_k`` best without being the new best;
    it is published as ``name`` (a member name, see ``ckptfn.core.naming.member_name``)
    and the members in ``leaves`` are deleted once it is committed. ``kth`` is the value
    it beat (None while the top k was not full).

    >>> s = Strategy("val_acc", mode="max", top_k=3)
    >>> Enter(s, 4, 0.55, "best_val_acc-epoch=4.pt", kth=0.5, leaves=["best_val_acc-epoch=0.pt"]).filename
    'best_val_acc-epoch=4.pt'
    """

    strategy: Strategy = attrs.field(validator=attrs.validators.instance_of(Strategy))
    epoch: int = attrs.field(validator=_check_epoch)
    value: float = attrs.field(converter=_optional_float, validator=_check_finite)
    name: str = attrs.field(validator=_check_members)
    kth: float | None = attrs.field(default=None, kw_only=True, converter=_optional_float)
    global_step: int | None = attrs.field(default=None, kw_only=True, validator=_check_epoch)
    leaves: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=_names, validator=_check_members)

    def __attrs_post_init__(self) -> None:
        if self.strategy.top_k < 2:
            raise ValueError(f"Enter: {self.strategy.filename!r} keeps no top-k members (top_k=1)")
        if self.kth is not None and not improved(self.strategy.mode, self.kth, self.value, self.strategy.min_delta):
            raise ValueError(f"Enter of {self.strategy.metric_name!r}: {self.value!r} does not beat the k-th best {self.kth!r}")

    @property
    def filename(self) -> str:
        """The name this snapshot is published under: its member name."""
        return self.name


@attrs.frozen
class Skip:
    """The strategy could not judge this epoch: its metric was ``"missing"`` or ``"not_finite"``.

    ``value`` holds the non-finite value (NaN, inf) for messages; None when missing.
    It is not part of equality (NaN is not equal to itself), so equal inputs give
    equal actions.

    >>> str(Skip(Strategy("val_loss"), epoch=2, reason="not_finite", value=float("nan")))
    'val_loss is not finite (nan) at epoch 2; best_val_loss.pt not saved'
    """

    strategy: Strategy = attrs.field(validator=attrs.validators.instance_of(Strategy))
    epoch: int = attrs.field(validator=_check_epoch)
    reason: str = attrs.field(validator=attrs.validators.in_(SKIP_REASONS))
    value: float | None = attrs.field(default=None, converter=_optional_float, eq=False)
    global_step: int | None = attrs.field(default=None, kw_only=True, validator=_check_epoch)
    #: for a missing metric: the metric names there were (for the message), at most ``MAX_LISTED``
    available: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=_names, eq=False)

    @property
    def filename(self) -> str:
        return self.strategy.filename

    def __str__(self) -> str:
        what = "is missing" if self.reason == "missing" else f"is not finite ({self.value!r})"
        step = "" if self.global_step is None else f", step {self.global_step}"
        return f"{self.strategy.metric_name} {what} at epoch {self.epoch}{step}; {self.filename} not saved"


@attrs.frozen
class Periodic:
    """Save this epoch's snapshot as ``strategy.filename`` because the ``Every`` strategy is due.

    >>> Periodic(Every(2, filename="last.pt"), epoch=5).filename
    'last.pt'
    """

    strategy: Every = attrs.field(validator=attrs.validators.instance_of(Every))
    epoch: int = attrs.field(validator=_check_epoch)
    global_step: int | None = attrs.field(default=None, kw_only=True, validator=_check_epoch)

    @property
    def filename(self) -> str:
        return self.strategy.filename
