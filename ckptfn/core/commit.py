"""The commit rule: which state a shell keeps after a write.

Pure. A shell decides with ``step`` (old state -> new state and actions), writes
the snapshot, and then keeps ``commit(old, new, outcome, on_disk)``:

- the write succeeded: the new state;
- it failed before any name held the new snapshot: the old state (the disk did not
  move, so the next epoch retries the same decision);
- it failed after some names were published (or the shell cannot tell): the new
  state with the bests of the strategies it was writing taken from the files
  (``on_disk``, what ``restore_from_directory`` reads), so state and disk agree.

``roll_back`` is the last rule on its own, for a background write that failed
after the state was already handed on.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ckptfn.core.naming import member_of
from ckptfn.core.state import State

__all__ = ["Outcome", "commit", "roll_back"]


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _check_published(inst: Outcome, _attribute: attrs.Attribute, published: tuple) -> None:
    unknown = [name for name in published if name not in inst.names]
    if unknown:
        raise ValueError(f"published {unknown} were not among the names written: {list(inst.names)}")
    if inst.succeeded and published != inst.names:
        raise ValueError("a write that succeeded published every name")


@attrs.frozen
class Outcome:
    """What one write did: the target filenames it was to publish, whether it succeeded,
    and which names hold the new snapshot (all of them on success).

    >>> Outcome.success(("best_loss.pt", "last.pt")).published
    ('best_loss.pt', 'last.pt')
    >>> Outcome.failure(("best_loss.pt", "last.pt"), published=("best_loss.pt",)).touched_disk
    True
    """

    names: tuple[str, ...] = attrs.field(converter=_names)
    succeeded: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    published: tuple[str, ...] = attrs.field(converter=_names, validator=_check_published)

    @classmethod
    def success(cls, names: Iterable[str]) -> Outcome:
        names = tuple(names)
        return cls(names, True, names)

    @classmethod
    def failure(cls, names: Iterable[str], published: Iterable[str] = ()) -> Outcome:
        return cls(tuple(names), False, tuple(published))

    @property
    def touched_disk(self) -> bool:
        """Whether the write failed after publishing something: the files must be read back."""
        return not self.succeeded and bool(self.published)


def _writes(strategy: object, names: frozenset[str]) -> bool:
    """Whether a write of ``names`` was (also) this strategy's: its file or a top-k member's."""
    if strategy.filename in names:
        return True
    return getattr(strategy, "top_k", 1) > 1 and any(member_of(name, strategy.filename) for name in names)


def roll_back(state: State, on_disk: State, filenames: Iterable[str]) -> State:
    """``state`` with the bests of the strategies writing ``filenames`` (their files, or top-k
    member names of them) taken from ``on_disk``.

    Those strategies believe again what their files hold (so the next epoch retries);
    the others and ``steps`` stay.

    >>> from ckptfn.core.config import Config
    >>> from ckptfn.core.state import Best
    >>> from ckptfn.core.strategy import Strategy
    >>> config = Config([Strategy("val_loss"), Strategy("val_corr", mode="max")])
    >>> believed = State(config, [Best(0.1, 5), Best(0.9, 5)], steps=6)
    >>> on_disk = State(config, [Best(0.3, 2), Best(0.9, 5)], steps=6)
    >>> roll_back(believed, on_disk, ["best_val_loss.pt"]).bests
    (Best(value=0.3, epoch=2), Best(value=0.9, epoch=5))
    """
    if state.config != on_disk.config:
        raise ValueError("roll_back: both states must have the same config")
    names = frozenset(filenames)
    bests = tuple(
        disk if _writes(strategy, names) else mine
        for strategy, mine, disk in zip(state.config.strategies, state.bests, on_disk.bests)
    )
    return State(state.config, bests, state.steps)


def commit(old: State, new: State, outcome: Outcome, on_disk: State | None = None) -> State:
    """The state to keep after writing the snapshot that the step ``old -> new`` asked for.

    ``on_disk`` (the state the files give) is needed only when ``outcome.touched_disk``.

    >>> from ckptfn.core.state import Best
    >>> from ckptfn.core.step import init, step
    >>> from ckptfn.core.strategy import Strategy
    >>> old = init([Strategy("val_loss"), Strategy("val_corr", mode="max")])
    >>> new, _ = step(old, {"val_loss": 0.5, "val_corr": 0.7}, epoch=0)
    >>> names = ("best_val_loss.pt", "best_val_corr.pt")
    >>> commit(old, new, Outcome.success(names)) == new, commit(old, new, Outcome.failure(names)) == old
    (True, True)
    >>> on_disk = State(old.config, [Best(0.5, 0), Best()], steps=1)  # the first name landed
    >>> commit(old, new, Outcome.failure(names, ["best_val_loss.pt"]), on_disk).bests
    (Best(value=0.5, epoch=0), Best(value=None, epoch=None))
    """
    if old.config != new.config:
        raise ValueError("commit: old and new states must have the same config")
    if outcome.succeeded:
        return new
    if not outcome.touched_disk:
        return old
    if on_disk is None:
        raise ValueError("commit: the write failed after publishing, so on_disk (the files' state) is needed")
    return roll_back(new, on_disk, outcome.names)
