"""What a save tells the world: the ``Saved`` event that trackers and user hooks receive.

Pure. A shell builds the events of one committed snapshot with ``saved_events``
(passing in what only it knows: where each name is, and the snapshot's size on
disk), then hands each to every ``on_saved`` hook. Plain data only, so an
adapter (W&B, MLflow, a log line) never needs ckptfn's records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from ckptfn.core.actions import Enter, Periodic, Save

__all__ = ["KINDS", "Saved", "saved_events"]

#: ``best``: a new best at the strategy's file; ``top_k``: a top-k member that is not the
#: best; ``periodic``: an ``Every``'s save.
KINDS = ("best", "top_k", "periodic")


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(str(item) for item in value)


@attrs.frozen
class Saved:
    """One name of one committed snapshot, and why it was saved.

    ``name`` is the file this save published (``path`` its location, ``paths`` every
    name of the snapshot, ``bytes`` its size on disk, counted once); ``strategy`` the
    file name that identifies the strategy; ``metric_name``, ``mode``, ``value`` and
    ``previous`` are None for a periodic save; ``removed`` are the top-k members this
    save pushed out (deleted once it was committed), ``aside`` the member name the
    previous best moved to.

    >>> event = Saved("best_loss.pt", "best_loss.pt", "best", "val_loss", "min", 0.25, 0.5, 3, 1200,
    ...               "run/best_loss.pt", ["run/best_loss.pt"], 4096)
    >>> event.kind, event.value, event.global_step
    ('best', 0.25, 1200)
    """

    name: str
    strategy: str
    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    metric_name: str | None
    mode: str | None
    value: float | None
    previous: float | None
    epoch: int
    global_step: int | None
    path: str
    paths: tuple[str, ...] = attrs.field(converter=_strings)
    bytes: int
    removed: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    aside: str | None = None

    def to_dict(self) -> dict:
        """The event as a plain dict (for JSON, a tracker's table)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in attrs.asdict(self).items()}


def saved_events(saves: Iterable[Save | Enter | Periodic], paths: Mapping[str, str], size: int) -> tuple[Saved, ...]:
    """The events of one committed snapshot: one per save, in order.

    ``paths`` maps each published name to its location, ``size`` is the snapshot's
    bytes on disk.

    >>> from ckptfn.core.every import Every
    >>> from ckptfn.core.strategy import Strategy
    >>> saves = [Save(Strategy("val_loss"), 3, 0.25, 0.5), Periodic(Every(), 3)]
    >>> [(e.name, e.kind, e.paths) for e in saved_events(saves, {"best_val_loss.pt": "r/b", "last.pt": "r/l"}, 10)]
    [('best_val_loss.pt', 'best', ('r/b', 'r/l')), ('last.pt', 'periodic', ('r/b', 'r/l'))]
    """
    saves = tuple(saves)
    everywhere = tuple(paths[save.filename] for save in saves)
    events = []
    for save in saves:
        common = dict(
            name=save.filename, strategy=save.strategy.filename, epoch=save.epoch, global_step=save.global_step,
            path=paths[save.filename], paths=everywhere, bytes=size,
        )
        if type(save) is Periodic:
            events.append(Saved(kind="periodic", metric_name=None, mode=None, value=None, previous=None, **common))
            continue
        s = save.strategy
        best = type(save) is Save
        events.append(Saved(
            kind="best" if best else "top_k", metric_name=s.metric_name, mode=s.mode, value=save.value,
            previous=save.previous if best else save.kth, removed=save.leaves,
            aside=save.aside if best else None, **common,
        ))
    return tuple(events)
