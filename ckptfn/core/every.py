"""Periodic saves: the ``Every`` record and the rule that says when it is due.

Pure. ``Every(n_epochs=1, filename="last.pt")`` saves a snapshot every n epochs,
whatever the metrics, so training can always resume from its latest state;
``Every(n_steps=500)`` counts optimizer steps (the global step the shell passes to
``step``) and ``Every(seconds=1800)`` wall time since its last save (the clock
reading the shell passes as ``now``; the core never reads a clock). One ``Every``
has exactly one trigger. It sits in ``Config.strategies`` beside the metric
strategies; when a best and a periodic save fall on the same decision they share
one write (hard links).

In plain data (YAML, ``Config.from_mapping``) it is a strategy mapping with one of
the keys ``every_n_epochs``, ``every_n_steps`` or ``every_seconds`` instead of
``metric_name``.
"""

from __future__ import annotations

import math
import numbers

import attrs

from ckptfn.core.errors import ConfigError
from ckptfn.core.strategy import check_bool, check_filename, check_keep, to_keep

__all__ = ["EVERY_KEYS", "LAST_FILENAME", "TRIGGER_KEYS", "Every", "counter", "due", "restarted"]

LAST_FILENAME = "last.pt"
#: The plain-data key of each trigger, and the ``Every`` field it sets.
TRIGGER_KEYS = {"every_n_epochs": "n_epochs", "every_n_steps": "n_steps", "every_seconds": "seconds"}
#: The keys of an ``Every`` in plain data.
EVERY_KEYS = (*TRIGGER_KEYS, "filename", "overwrite", "keep")


def _to_count(value: object) -> object:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _check_count(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"expected an int >= 1, got {type(value).__name__} {value!r}", attribute.name)


def _to_seconds(value: object) -> object:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    return value


def _check_seconds(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"expected a finite number of seconds > 0, got {type(value).__name__} {value!r}", attribute.name)


def _plural(count: float, unit: str) -> str:
    shown = f"{count:g}" if isinstance(count, float) else str(count)
    return f"{shown} {unit}" if count == 1 else f"{shown} {unit}s"


@attrs.frozen
class Every:
    """Save every ``n_epochs`` epochs, every ``n_steps`` global steps, or every ``seconds``
    of wall time, regardless of the metrics. Exactly one trigger; ``Every()`` is every epoch.

    Args:
        n_epochs: with 0-based epochs validated every epoch, the saves fall on the
            epochs where ``epoch % n_epochs == n_epochs - 1`` (like Lightning's
            ``every_n_epochs``).
        n_steps: the saves fall on the first decision at or after each multiple of
            ``n_steps`` optimizer steps (``global_step`` counts completed steps, as
            Lightning's ``trainer.global_step`` and the Hugging Face ``state.global_step`` do).
        seconds: the first decision saves, then each decision at least ``seconds``
            after the previous periodic save (on the clock the shell passes as ``now``).
        filename: plain file name; default ``last.pt``.
        overwrite: replace the file each time (``True``) or keep earlier ones under
            timestamped names (``False``).
        keep: with ``overwrite=False``, keep at most this many versions.

    >>> Every()
    Every(n_epochs=1, filename='last.pt', overwrite=True, keep=None)
    >>> Every(n_steps=20, filename="last.ckpt").describe()
    'every 20 steps'
    >>> Every(0)
    Traceback (most recent call last):
    ...
    ckptfn.ConfigError: n_epochs: expected an int >= 1, got int 0
    >>> Every(n_epochs=2, n_steps=100)
    Traceback (most recent call last):
    ...
    ckptfn.ConfigError: an Every has exactly one trigger, got n_epochs=2, n_steps=100
    """

    n_epochs: int | None = attrs.field(default=None, converter=_to_count, validator=_check_count)
    n_steps: int | None = attrs.field(default=None, kw_only=True, converter=_to_count, validator=_check_count)
    seconds: float | None = attrs.field(default=None, kw_only=True, converter=_to_seconds, validator=_check_seconds)
    filename: str = attrs.field(default=LAST_FILENAME, kw_only=True, validator=check_filename)
    overwrite: bool = attrs.field(default=True, kw_only=True, validator=check_bool)
    keep: int | None = attrs.field(default=None, kw_only=True, converter=to_keep, validator=check_keep)

    def __repr__(self) -> str:
        name, value = self.trigger
        return f"Every({name}={value!r}, filename={self.filename!r}, overwrite={self.overwrite!r}, keep={self.keep!r})"

    def __attrs_post_init__(self) -> None:
        given = [(name, value) for name, value in self._triggers() if value is not None]
        if not given:  # Every(): every epoch; set once here, so the record always says its trigger
            object.__setattr__(self, "n_epochs", 1)
        elif len(given) > 1:
            raise ConfigError("an Every has exactly one trigger, got " + ", ".join(f"{n}={v!r}" for n, v in given))

    def _triggers(self) -> tuple[tuple[str, object], ...]:
        return (("n_epochs", self.n_epochs), ("n_steps", self.n_steps), ("seconds", self.seconds))

    @property
    def trigger(self) -> tuple[str, int | float]:
        """``(field name, period)`` of the one trigger, e.g. ``("n_steps", 20)``."""
        return next((name, value) for name, value in self._triggers() if value is not None)

    @property
    def key(self) -> str:
        """The plain-data key of the trigger (``every_n_epochs``, ``every_n_steps`` or ``every_seconds``)."""
        return "every_" + self.trigger[0]

    def describe(self) -> str:
        """The period in words: ``every 1 epoch``, ``every 20 steps``, ``every 30 seconds``."""
        name, value = self.trigger
        return "every " + _plural(value, {"n_epochs": "epoch", "n_steps": "step", "seconds": "second"}[name])

    @property
    def identity(self) -> tuple[str, str]:
        """What a saved periodic state refers to: ``("every", filename)``."""
        return ("every", self.filename)


def _count_due(period: int, done: int, done_at_last: int | None) -> bool:
    """Whether a counter that has reached ``done`` (completed epochs or steps) passed a
    multiple of ``period`` since ``done_at_last`` (None: never saved; a larger value: the
    counter went backwards, a new phase that saves as a fresh run would)."""
    since = 0 if done_at_last is None or done < done_at_last else done_at_last
    return done // period > since // period


def counter(every: Every, *, epoch: int, global_step: int | None = None, now: float | None = None) -> float | None:
    """The value of ``every``'s trigger counter at a decision: the epoch, the global step or the clock.

    >>> counter(Every(n_steps=5), epoch=2, global_step=120), counter(Every(seconds=9), epoch=2, now=7.5)
    (120, 7.5)
    """
    name = every.trigger[0]
    return epoch if name == "n_epochs" else global_step if name == "n_steps" else now


def restarted(every: Every, last, *, epoch: int, global_step: int | None = None, now: float | None = None) -> bool:
    """Whether the counter of ``every``'s trigger went back since the last decision (a new phase):
    below the counter the previous decision saw (``Last.seen``), or, when that is not known,
    below its last save's.

    >>> from ckptfn.core.state import Last
    >>> restarted(Every(1), Last(9), epoch=0), restarted(Every(n_steps=5), Last(9, 100), epoch=0, global_step=120)
    (True, False)
    >>> restarted(Every(n_steps=20), Last(0, 20, seen=35), epoch=0, global_step=25)  # above the save, below the last decision
    True
    """
    now_at = counter(every, epoch=epoch, global_step=global_step, now=now)
    if now_at is None:
        return False
    name = every.trigger[0]
    before = last.seen
    if before is None:
        before = last.epoch if name == "n_epochs" else last.global_step if name == "n_steps" else last.time
    return before is not None and now_at < before


def due(every: Every, last, *, epoch: int, global_step: int | None = None, now: float | None = None) -> bool:
    """Whether ``every`` saves at this decision, given its ``Last`` (its previous save).

    Epochs: it saves at the first epoch at or after each epoch ``g`` with
    ``(g + 1) % n_epochs == 0`` that is later than its last save. For epochs
    0, 1, 2, ... that is exactly ``epoch % n_epochs == n_epochs - 1``; when
    validation skips epochs, the save happens at the next validated epoch
    instead of being lost. Steps: the same with the number of completed steps
    (``global_step``) in place of ``epoch + 1``. Seconds: at the first decision,
    then once ``now`` is ``seconds`` past the previous save.

    >>> from ckptfn.core.state import Last
    >>> last, saved = Last(), []
    >>> for epoch in range(9):
    ...     if due(Every(3), last, epoch=epoch):
    ...         last = Last(epoch)
    ...         saved.append(epoch)
    >>> saved
    [2, 5, 8]
    >>> [due(Every(n_steps=20), Last(0, 20), epoch=0, global_step=s) for s in (30, 40, 65)]
    [False, True, True]
    >>> [due(Every(seconds=60), Last(0, time=100.0), epoch=1, now=t) for t in (150.0, 160.0)]
    [False, True]

    When a counter goes backwards (a resumed run counting from 0 again, a second
    training phase, a clock of another process), the last save belongs to an earlier
    phase: the new phase saves as a fresh run would, so ``last.pt`` never stays at
    the old phase's position.

    >>> due(Every(1), Last(9), epoch=0), due(Every(3), Last(9), epoch=1), due(Every(3), Last(9), epoch=2)
    (True, False, True)
    >>> due(Every(seconds=60), Last(3, time=500.0), epoch=4, now=20.0)
    True
    """
    name, period = every.trigger
    if name == "n_epochs":
        return _count_due(period, epoch + 1, None if last.epoch is None else last.epoch + 1)
    if name == "n_steps":
        if global_step is None:
            raise ValueError(f"{every.describe()} ({every.filename}) needs the global step: pass global_step=")
        return _count_due(period, global_step, last.global_step)
    if now is None:
        raise ValueError(f"{every.describe()} ({every.filename}) needs the clock: pass now= (seconds)")
    return last.time is None or now < last.time or now - last.time >= period
