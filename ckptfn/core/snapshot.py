"""Planning one snapshot: which names it is published under, and what its metadata says.

Pure. A shell turns one step's actions into a ``Snapshot`` with ``plan_snapshot``
(passing in what only it knows: the clock reading ``now`` and the library
versions), hands the snapshot to the one write function (``ckptfn.kit.write``),
then keeps the state that ``ckptfn.core.commit.commit`` says.
"""

from __future__ import annotations

import datetime as dt
import types
from collections.abc import Iterable, Mapping, Sequence

import attrs

from ckptfn.core.actions import Enter, Periodic, Save, Skip
from ckptfn.core.metadata import build_metadata
from ckptfn.core.naming import dcp_name, member_of, timestamp_iso
from ckptfn.core.state import State
from ckptfn.core.strategy import check_filename

__all__ = ["Snapshot", "Target", "partition", "plan_snapshot"]


def _check_keep(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{attribute.name} must be an int >= 1 or None, got {value!r}")


def _check_aside(inst: Target, attribute: attrs.Attribute, value: object) -> None:
    if value is None:
        return
    check_filename(inst, attribute, value)
    if not inst.overwrite:
        raise ValueError(f"aside={value!r}: a target that archives (overwrite=False) names its own versions")
    if value == inst.filename:
        raise ValueError(f"aside={value!r} is the target's own name")


@attrs.frozen
class Target:
    """One name under which a snapshot is published, with its overwrite policy and, for
    ``overwrite=False``, how many versions to keep (None: all). ``aside`` (top-k): the
    exact name the entry now at ``filename`` moves to before the snapshot replaces it.

    >>> Target("best_loss.pt", overwrite=False, keep=3).tree_name
    'best_loss.dcp'
    >>> Target("best_loss.pt", aside="best_loss-epoch=3.pt").aside
    'best_loss-epoch=3.pt'
    """

    filename: str = attrs.field(validator=check_filename)  # the same rules as a strategy's filename
    overwrite: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    keep: int | None = attrs.field(default=None, kw_only=True, validator=_check_keep)
    aside: str | None = attrs.field(default=None, kw_only=True, validator=_check_aside)

    @property
    def tree_name(self) -> str:
        """The directory name of this target's sharded checkpoint."""
        return dcp_name(self.filename)


def _unique_targets(_inst: object, _attribute: attrs.Attribute, targets: tuple) -> None:
    names = [target.filename for target in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"a snapshot cannot be published twice under one name: {names}")


def _read_only(metadata: Mapping) -> Mapping:
    return types.MappingProxyType(dict(metadata))


def _families(value: object) -> tuple:
    return tuple((filename, tuple(kept)) for filename, kept in value)


def _check_families(_inst: object, _attribute: attrs.Attribute, families: tuple) -> None:
    for filename, kept in families:
        strays = [name for name in kept if not member_of(name, filename)]
        if strays:
            raise ValueError(f"top-k members of {filename!r} must have member names, got {strays}")


@attrs.frozen
class Snapshot:
    """What one write publishes: its targets, in order, the metadata stored with it, the
    saves that asked for it (for the log lines), and what to delete once it is committed:
    ``removes`` (top-k members that left) and, per top-k ``families`` entry
    ``(filename, kept member names)``, any other member of that file (a move or a
    deletion a crash interrupted).

    >>> snapshot = Snapshot([Target("best_loss.pt"), Target("last.pt")], {"format": "ckptfn/1"})
    >>> snapshot.filenames
    ('best_loss.pt', 'last.pt')
    """

    targets: tuple[Target, ...] = attrs.field(converter=tuple, validator=_unique_targets)
    metadata: Mapping = attrs.field(converter=_read_only)
    saves: tuple[Save | Enter | Periodic, ...] = attrs.field(default=(), converter=tuple)
    removes: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=tuple)
    families: tuple[tuple[str, tuple[str, ...]], ...] = attrs.field(
        default=(), kw_only=True, converter=_families, validator=_check_families
    )

    def __attrs_post_init__(self) -> None:
        clash = set(self.removes) & set(self.filenames)
        if clash:
            raise ValueError(f"a snapshot cannot both publish and remove {sorted(clash)}")

    @property
    def filenames(self) -> tuple[str, ...]:
        return tuple(target.filename for target in self.targets)


def partition(actions: Iterable[object]) -> tuple[tuple[Save | Periodic, ...], tuple[Skip, ...]]:
    """Split one step's actions into those that write (``Save``, ``Enter``, ``Periodic``) and the ``Skip``\\ s.

    >>> from ckptfn.core.strategy import Strategy
    >>> saves, skips = partition([Save(Strategy("a"), 0, 1.0, None), Skip(Strategy("b"), 0, "missing")])
    >>> [s.filename for s in saves], [s.filename for s in skips]
    (['best_a.pt'], ['best_b.pt'])
    """
    saves, skips = [], []
    for action in actions:
        match action:
            case Save() | Enter() | Periodic():
                saves.append(action)
            case Skip():
                skips.append(action)
            case _:
                raise TypeError(f"expected Save or Skip (or Periodic) actions, got {type(action).__name__}")
    return tuple(saves), tuple(skips)


def _target(save: Save | Enter | Periodic) -> Target:
    if type(save) is Enter:
        return Target(save.name)
    return Target(save.filename, save.strategy.overwrite, keep=save.strategy.keep, aside=getattr(save, "aside", None))


def _member_names(best) -> tuple[str, ...]:
    at = (best.at,) if getattr(best, "at", None) else ()
    return at + tuple(member.name for member in best.others)


def _families_of(saves: Sequence[Save | Enter | Periodic], state: State | None) -> tuple:
    if state is None:
        return ()
    kept = {s.filename: best for s, best in zip(state.config.strategies, state.bests)}
    return tuple(
        (save.strategy.filename, _member_names(kept[save.strategy.filename]))
        for save in saves
        if type(save) is not Periodic and save.strategy.top_k > 1 and save.strategy.filename in kept
    )


def plan_snapshot(
    saves: Sequence[Save | Enter | Periodic],
    *,
    now: dt.datetime,
    versions: Mapping[str, str],
    state: State | None = None,
    metrics: Mapping | None = None,
    extra: Mapping | None = None,
) -> Snapshot:
    """The snapshot that one epoch's ``saves`` ask for.

    ``now`` (timezone-aware) is the save time recorded in the metadata; ``state``
    (the state after the step) is stored so training can resume; ``metrics`` are
    stored as floats; ``extra`` holds further metadata keys (e.g. ``layout``).

    >>> import datetime as dt
    >>> from ckptfn.core.step import init, step
    >>> from ckptfn.core.strategy import Strategy
    >>> state, actions = step(init(Strategy("val_loss")), {"val_loss": 0.5}, epoch=3)
    >>> when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    >>> snapshot = plan_snapshot(partition(actions)[0], now=when, versions={"ckptfn": "1"}, state=state)
    >>> snapshot.filenames, snapshot.metadata["epoch"], snapshot.metadata["saves"][0]["value"]
    (('best_val_loss.pt',), 3, 0.5)
    """
    if state is not None and not isinstance(state, State):
        raise TypeError(f"state: expected a ckptfn.State, got {type(state).__name__}")
    positions = {(save.epoch, save.global_step) for save in saves}
    if len(positions) > 1:
        raise ValueError(f"the saves of one snapshot must share one position (epoch, global_step), got {sorted(positions, key=str)}")
    metadata = build_metadata(
        saves,
        epoch=saves[0].epoch if saves else None,
        global_step=saves[0].global_step if saves else None,
        timestamp=timestamp_iso(now),
        metrics=metrics,
        manager_state=state.to_dict() if state is not None else None,
        versions=versions,
    )
    if extra:
        metadata.update(extra)
    removes = tuple(name for save in saves for name in getattr(save, "leaves", ()))
    return Snapshot([_target(s) for s in saves], metadata, saves, removes=removes, families=_families_of(saves, state))
