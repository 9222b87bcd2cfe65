"""The decision state: the best value each strategy has saved, and how it round-trips.

A metric ``Strategy`` has a ``Best`` (value and epoch); an ``Every`` has a ``Last``
(the epoch of its last periodic save).

Pure. ``State.to_dict()`` is plain data (it survives JSON and
``torch.load(weights_only=True)``); ``restore`` rebuilds a ``State`` from it for
a possibly changed configuration and rejects malformed data with a ``ConfigError``
that names the key path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import attrs

from ckptfn.core.config import Config, as_config
from ckptfn.core.errors import ConfigError
from ckptfn.core.every import TRIGGER_KEYS, Every
from ckptfn.core.metadata import entry_for
from ckptfn.core.naming import member_of

__all__ = [
    "STATE_FORMAT",
    "Best",
    "Last",
    "Member",
    "State",
    "fit",
    "ranked",
    "restore",
    "restore_from_saves",
    "resume_state",
]

STATE_FORMAT = "ckptfn.state/1"


def _check_best_value(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value is not None and (not isinstance(value, float) or not math.isfinite(value)):
        raise ConfigError(f"expected a finite float or None, got {value!r}", attribute.name)


def _check_count(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value is None and attribute.name in ("epoch", "global_step"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"expected an int >= 0, got {value!r}", attribute.name)


def _check_epoch_matches_value(inst: Best, _attribute: attrs.Attribute, epoch: object) -> None:
    if (inst.value is None) != (epoch is None):
        raise ConfigError(f"value {inst.value!r} and epoch {epoch!r} must both be None or both set")


def _check_step_has_epoch(inst: object, _attribute: attrs.Attribute, global_step: object) -> None:
    if global_step is not None and inst.epoch is None:
        raise ConfigError(f"global_step {global_step!r} needs an epoch (nothing saved has no position)")


def _check_time(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value is not None and (not isinstance(value, float) or not math.isfinite(value)):
        raise ConfigError(f"expected a finite float or None, got {value!r}", attribute.name)


def _optional_real(value: object) -> object:
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


def _int_or_real(value: object) -> object:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return _optional_real(value)


def _check_seen(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ConfigError(f"expected a finite number or None, got {value!r}", attribute.name)


def _position(epoch: int | None, global_step: int | None) -> str:
    return "" if global_step is None else f", global_step={global_step!r}"


@attrs.frozen
class Member:
    """A top-k member other than the best: its value, position and the name it is kept under.

    >>> Member(0.55, 3, 120, "best_val_loss-epoch=3-step=120.pt").name
    'best_val_loss-epoch=3-step=120.pt'
    """

    value: float = attrs.field(converter=_optional_real, validator=_check_best_value)
    epoch: int = attrs.field(validator=_check_count)
    global_step: int | None = attrs.field(default=None, validator=_check_count)
    name: str = attrs.field(default="", validator=attrs.validators.instance_of(str))

    def __attrs_post_init__(self) -> None:
        if self.value is None or self.epoch is None or not self.name:
            raise ConfigError(f"a top-k member needs a value, an epoch and a name, got {self!r}")


def _check_others(inst: Best, _attribute: attrs.Attribute, others: tuple) -> None:
    if not others:
        return
    for index, member in enumerate(others):
        if type(member) is not Member:
            raise ConfigError(f"expected a Member, got {type(member).__name__}", f"others[{index}]")
    names = [member.name for member in others]
    if len(set(names)) != len(names):
        raise ConfigError(f"top-k members must have distinct names, got {names}", "others")


@attrs.frozen
class Best:
    """A strategy's best so far: the value saved, its epoch and global step (None before);
    with ``top_k`` > 1 also the ``others`` members of the top k, best first.

    The value is a finite float; value and epoch are set together or not at all.

    >>> Best(), Best(0.25, 3), Best(0.25, 3, 1200)
    (Best(value=None, epoch=None), Best(value=0.25, epoch=3), Best(value=0.25, epoch=3, global_step=1200))
    >>> Best(0.25)
    Traceback (most recent call last):
    ...
    ckptfn.ConfigError: value 0.25 and epoch None must both be None or both set
    """

    value: float | None = attrs.field(default=None, validator=_check_best_value)
    epoch: int | None = attrs.field(
        default=None, validator=[_check_count, _check_epoch_matches_value]
    )
    global_step: int | None = attrs.field(default=None, validator=[_check_count, _check_step_has_epoch])
    others: tuple[Member, ...] = attrs.field(default=(), converter=tuple, validator=_check_others)
    #: top-k, when the file at the strategy's name is gone (moved away by hand): the member name
    #: that holds the best; None: the best is the file at the strategy's name
    at: str | None = attrs.field(default=None, kw_only=True, validator=attrs.validators.optional(attrs.validators.instance_of(str)))

    def __repr__(self) -> str:
        others = f", others={self.others!r}" if self.others else ""
        at = f", at={self.at!r}" if self.at is not None else ""
        return f"Best(value={self.value!r}, epoch={self.epoch!r}{_position(self.epoch, self.global_step)}{others}{at})"


@attrs.frozen
class Last:
    """An ``Every`` strategy's state: the epoch and global step of its last periodic save
    (None before), and for ``Every(seconds=...)`` the clock reading ``time`` it is measured from.

    ``time`` is this process's clock: it is not stored in files (a new run's clock
    starts afresh) and not part of equality (a resumed state equals the one it was saved from).

    >>> import ckptfn
    >>> state = ckptfn.init(ckptfn.Every(2, filename="last.pt"))
    >>> state.bests
    (Last(epoch=None),)
    >>> state, _ = ckptfn.step(state, {}, epoch=0)
    >>> state, _ = ckptfn.step(state, {}, epoch=1)  # every 2nd epoch: epochs 1, 3, 5, ...
    >>> state.bests
    (Last(epoch=1),)
    """

    epoch: int | None = attrs.field(default=None, validator=_check_count)
    global_step: int | None = attrs.field(default=None, validator=[_check_count, _check_step_has_epoch])
    time: float | None = attrs.field(default=None, kw_only=True, converter=_optional_real, validator=_check_time, eq=False)
    #: the trigger's counter (epoch, global step or clock reading) at the last decision, saved or
    #: not: a counter below it is a new phase even when it is still above the last save's
    seen: float | None = attrs.field(default=None, kw_only=True, converter=_int_or_real, validator=_check_seen, eq=False)

    def __repr__(self) -> str:
        time = "" if self.time is None else f", time={self.time!r}"
        return f"Last(epoch={self.epoch!r}{_position(self.epoch, self.global_step)}{time})"


_NOTHING_SAVED = Best()
_NEVER_SAVED = Last()


def fresh(strategy: object) -> Best | Last:
    """The state of a strategy that has saved nothing yet."""
    return _NEVER_SAVED if type(strategy) is Every else _NOTHING_SAVED


def _fresh_bests(state: State) -> tuple[Best | Last, ...]:
    return tuple(fresh(strategy) for strategy in state.config.strategies)


def _check_bests(inst: State, _attribute: attrs.Attribute, bests: tuple) -> None:
    if len(bests) != len(inst.config.strategies):
        raise ConfigError(
            f"{len(bests)} bests for {len(inst.config.strategies)} strategies", "bests"
        )
    for index, (strategy, best) in enumerate(zip(inst.config.strategies, bests)):
        expected = Last if type(strategy) is Every else Best
        if type(best) is not expected:
            raise ConfigError(
                f"expected a {expected.__name__}, got {type(best).__name__}", f"bests[{index}]"
            )


@attrs.frozen
class State:
    """The configuration, one ``Best`` (or ``Last`` for an ``Every``) per strategy, in the
    same order, and the number of steps taken.

    Immutable: ``step`` returns a new one. ``to_dict`` and ``restore`` round-trip it
    through plain data.

    >>> import ckptfn
    >>> state = ckptfn.init([ckptfn.Strategy("val_loss"), ckptfn.Every(2)])
    >>> state.bests, state.steps
    ((Best(value=None, epoch=None), Last(epoch=None)), 0)
    >>> state, _ = ckptfn.step(state, {"val_loss": 0.5}, epoch=0)
    >>> state.bests, state.steps
    ((Best(value=0.5, epoch=0), Last(epoch=None)), 1)
    >>> restore(state.config, state.to_dict()) == state
    True
    """

    config: Config = attrs.field(validator=attrs.validators.instance_of(Config))
    bests: tuple[Best | Last, ...] = attrs.field(
        default=attrs.Factory(_fresh_bests, takes_self=True), converter=tuple, validator=_check_bests
    )
    steps: int = attrs.field(default=0, validator=_check_count)

    def to_dict(self) -> dict:
        """Plain data (dict/list/str/int/float/bool/None) that ``restore`` reads back.

        >>> from ckptfn.core.strategy import Strategy
        >>> State(Config([Strategy("val_loss")])).to_dict()["strategies"][0]["best"] is None
        True
        """
        return {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "enabled": self.config.enabled,
            "strategies": [
                _entry(strategy, best) for strategy, best in zip(self.config.strategies, self.bests)
            ],
        }


def _member_entry(member: Member) -> dict:
    return {"value": member.value, "epoch": member.epoch, "global_step": member.global_step, "name": member.name}


def _entry(strategy: object, best: Best | Last) -> dict:
    if type(strategy) is Every:
        return {
            strategy.key: strategy.trigger[1],
            "filename": strategy.filename,
            "overwrite": strategy.overwrite,
            "keep": strategy.keep,
            "last_epoch": best.epoch,
            "last_global_step": best.global_step,
            # the clock of Every(seconds=...) is this process's: never stored
            "last_seen": None if strategy.trigger[0] == "seconds" else best.seen,
        }
    entry = {**attrs.asdict(strategy), "best": best.value, "best_epoch": best.epoch, "best_global_step": best.global_step}
    if best.others:
        entry["top_k_others"] = [_member_entry(member) for member in best.others]
    if best.at is not None:
        entry["best_at"] = best.at
    return entry


def _require(data: Mapping, key: str, path: str, check, expected: str) -> object:
    where = f"{path}.{key}" if path else key
    if key not in data:
        raise ConfigError("required key is missing", where)
    value = data[key]
    if not check(value):
        raise ConfigError(f"expected {expected}, got {value!r}", where)
    return value


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_optional_count(value: object) -> bool:
    return value is None or _is_count(value)


def _is_optional_finite(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range (e.g. from a hostile file)
        return False


def _is_every_entry(entry: object) -> bool:
    return isinstance(entry, Mapping) and any(key in entry for key in TRIGGER_KEYS)


def _saved_member(entry: object, path: str) -> Member:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"expected a mapping, got {type(entry).__name__}", path)
    value = _require(entry, "value", path, lambda v: _is_optional_finite(v) and v is not None, "a finite number")
    epoch = _require(entry, "epoch", path, _is_count, "an int >= 0")
    step = entry.get("global_step")
    if not _is_optional_count(step):
        raise ConfigError(f"expected an int >= 0 or None, got {step!r}", f"{path}.global_step")
    name = _require(entry, "name", path, lambda v: isinstance(v, str) and bool(v), "a file name")
    return Member(float(value), epoch, step, name)


def _saved_best(entry: object, path: str) -> tuple[tuple[str, str, str], Best]:
    """Parse one saved strategy entry into its identity and its ``Best``."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"expected a mapping, got {type(entry).__name__}", path)
    identity = tuple(
        _require(entry, key, path, _is_str, "a str") for key in ("metric_name", "mode", "filename")
    )
    value = _require(entry, "best", path, _is_optional_finite, "a finite number or None")
    epoch = _require(entry, "best_epoch", path, _is_optional_count, "an int >= 0 or None")
    step = entry.get("best_global_step")  # absent in files of earlier versions
    if not _is_optional_count(step):
        raise ConfigError(f"expected an int >= 0 or None, got {step!r}", f"{path}.best_global_step")
    others = entry.get("top_k_others", [])
    if not isinstance(others, Sequence) or isinstance(others, (str, bytes)):
        raise ConfigError(f"expected a list, got {type(others).__name__}", f"{path}.top_k_others")
    at = entry.get("best_at")
    if at is not None and not (isinstance(at, str) and at):
        raise ConfigError(f"expected a file name or None, got {at!r}", f"{path}.best_at")
    try:
        members = tuple(_saved_member(item, f"{path}.top_k_others[{i}]") for i, item in enumerate(others))
        best = Best(None if value is None else float(value), epoch, step, members, at=at)
    except ConfigError as error:
        raise error.within(path) if not error.path.startswith(path) else error from None
    return identity, best


def _saved_entry(entry: object, path: str) -> tuple[tuple, Best | Last]:
    """Parse one saved entry (a metric strategy's or an ``Every``'s) into its identity and state."""
    if not _is_every_entry(entry):
        return _saved_best(entry, path)
    filename = _require(entry, "filename", path, _is_str, "a str")
    epoch = _require(entry, "last_epoch", path, _is_optional_count, "an int >= 0 or None")
    step = entry.get("last_global_step")
    if not _is_optional_count(step):
        raise ConfigError(f"expected an int >= 0 or None, got {step!r}", f"{path}.last_global_step")
    seen = entry.get("last_seen")
    if not _is_optional_finite(seen):
        raise ConfigError(f"expected a number or None, got {seen!r}", f"{path}.last_seen")
    try:
        return ("every", filename), Last(epoch, step if epoch is not None else None, seen=seen)
    except ConfigError as error:
        raise error.within(path) from None


def restore(config: object, data: object) -> State:
    """Rebuild a ``State`` for ``config`` from ``State.to_dict()`` output.

    A strategy whose ``(metric_name, mode, filename)`` is unchanged keeps its best
    (an ``Every`` keeps its last save epoch if its filename is unchanged);
    a new or changed strategy starts fresh; strategies no longer configured are
    dropped. ``data=None`` means nothing was saved: a fresh state.

    >>> from ckptfn.core.strategy import Strategy
    >>> saved = State(Config([Strategy("val_loss")]), bests=[Best(0.25, 3)], steps=4).to_dict()
    >>> restore([Strategy("val_loss"), Strategy("val_corr", mode="max")], saved).bests
    (Best(value=0.25, epoch=3), Best(value=None, epoch=None))
    """
    config = as_config(config)
    if data is None:
        return State(config)
    if not isinstance(data, Mapping):
        raise ConfigError(f"saved state must be a mapping, got {type(data).__name__}")
    if data.get("format") != STATE_FORMAT:
        raise ConfigError(f"expected {STATE_FORMAT!r}, got {data.get('format')!r}", "format")
    steps = _require(data, "steps", "", _is_count, "an int >= 0")
    entries = _require(
        data,
        "strategies",
        "",
        lambda v: isinstance(v, Sequence) and not isinstance(v, (str, bytes)),
        "a list",
    )
    saved = {}
    for index, entry in enumerate(entries):
        identity, best = _saved_entry(entry, f"strategies[{index}]")
        filename = identity[-1]
        if filename in saved:
            raise ConfigError(f"{filename!r} appears twice", f"strategies[{index}].filename")
        saved[filename] = (identity, best)
    bests = []
    for strategy in config.strategies:
        identity, best = saved.get(strategy.filename, (None, None))
        bests.append(fit(strategy, best) if identity == strategy.identity else fresh(strategy))
    return State(config, bests, steps)


def ranked(mode: str, members: Iterable[Member]) -> tuple[Member, ...]:
    """``members`` best first by value; equal values keep their order (the earlier stays ahead).

    >>> [m.value for m in ranked("max", [Member(0.5, 0, None, "a"), Member(0.6, 1, None, "b"), Member(0.5, 2, None, "c")])]
    [0.6, 0.5, 0.5]
    """
    return tuple(sorted(members, key=(lambda m: m.value) if mode == "min" else (lambda m: -m.value)))


def fit(strategy: object, best: Best | Last) -> Best | Last:
    """``best`` with no more top-k members than ``strategy`` keeps (``top_k - 1`` besides the best).

    >>> from ckptfn.core.strategy import Strategy
    >>> best = Best(0.1, 4, None, [Member(0.2, 1, None, "a"), Member(0.3, 2, None, "b")])
    >>> [m.name for m in fit(Strategy("loss", top_k=2), best).others], fit(Strategy("loss"), best).others
    (['a'], ())
    """
    if type(best) is not Best or len(best.others) <= strategy.top_k - 1:
        return best
    return Best(best.value, best.epoch, best.global_step, best.others[: strategy.top_k - 1], at=best.at)


def _last_from_file(every: Every, metadata: Mapping | None) -> Last:
    """The last periodic save an ``Every`` can trust from the file at its name."""
    entry = entry_for(metadata, every.filename) if isinstance(metadata, Mapping) else None
    if not _is_every_entry(entry):
        return _NEVER_SAVED
    epoch = entry.get("epoch", metadata.get("epoch"))
    step = entry.get("global_step", metadata.get("global_step"))
    if not _is_count(epoch):
        return _NEVER_SAVED
    step = step if _is_count(step) else None
    seen = {"n_epochs": epoch, "n_steps": step}.get(every.trigger[0])  # the last decision was at least there
    return Last(epoch, step, seen=seen)


def _saved_choice(strategy, metadata: Mapping | None) -> tuple[float, int, int | None, str] | None:
    """``(value, epoch, global_step, timestamp)`` of the strategy's own entry in a file's
    metadata, if it records a save of the same metric and mode; else None."""
    if not isinstance(metadata, Mapping):
        return None
    entry = entry_for(metadata, strategy.filename)
    if entry is None or (entry.get("metric_name"), entry.get("mode")) != (strategy.metric_name, strategy.mode):
        return None
    value, epoch = entry.get("value"), entry.get("epoch", metadata.get("epoch"))
    if not (_is_optional_finite(value) and value is not None and _is_count(epoch)):
        return None
    step = entry.get("global_step", metadata.get("global_step"))
    return float(value), epoch, step if _is_count(step) else None, str(metadata.get("timestamp") or "")


def _best_from_files(strategy, found: Mapping[str, Mapping | None]) -> Best | Last:
    """The best (and, for top-k, the other members) a strategy can trust from the files
    (fresh if it cannot). A member file that records the very save the best file holds
    is the trace of an interrupted move, not a member: it is left out (and pruned)."""
    if type(strategy) is Every:
        return _last_from_file(strategy, found.get(strategy.filename))
    best = _saved_choice(strategy, found.get(strategy.filename))
    others = []
    if strategy.top_k > 1:
        chosen = sorted(
            (choice[3], name, choice)
            for name, metadata in found.items()
            if member_of(name, strategy.filename) and (choice := _saved_choice(strategy, metadata)) is not None
        )
        others = [Member(c[0], c[1], c[2], name) for _, name, c in chosen if c != best]
    others = ranked(strategy.mode, others)
    if best is None:  # the best file is gone (moved away by hand): the best member is the best, where it is
        if not others:
            return _NOTHING_SAVED
        top, *rest = others
        return fit(strategy, Best(top.value, top.epoch, top.global_step, rest, at=top.name))
    return fit(strategy, Best(best[0], best[1], best[2], others))


def restore_from_saves(config: object, found: Mapping[str, Mapping | None], steps: int = 0) -> State:
    """A ``State`` whose bests are exactly what the files on disk record.

    ``found`` maps a filename to the metadata of the file at that name (None when
    missing or unreadable); for a strategy with ``top_k`` > 1 it also holds the files
    named as its members (``ckptfn.core.naming.member_of``). A strategy keeps the value
    its own ``saves`` entry records if that entry has the same metric and mode;
    otherwise it starts fresh. ``steps`` is at least one past the newest save's epoch.

    >>> from ckptfn.core.strategy import Strategy
    >>> meta = {"epoch": 4, "saves": [{"filename": "best_val_loss.pt", "metric_name": "val_loss",
    ...                                "mode": "min", "value": 0.2, "epoch": 4}]}
    >>> state = restore_from_saves([Strategy("val_loss"), Strategy("val_loss", mode="max", filename="x.pt")],
    ...                            {"best_val_loss.pt": meta, "x.pt": meta})
    >>> state.bests, state.steps
    ((Best(value=0.2, epoch=4), Best(value=None, epoch=None)), 5)
    """
    config = as_config(config)
    bests = tuple(_best_from_files(s, found) for s in config.strategies)
    epochs = [best.epoch for best in bests if best.epoch is not None]
    epochs += [m.epoch for best in bests if type(best) is Best for m in best.others]
    newest = max((epoch + 1 for epoch in epochs), default=0)
    return State(config, bests, max(steps, newest))


def resume_state(saved: State, on_disk: State) -> State:
    """The state to continue with after restoring ``saved`` (from the checkpoint resumed
    from) in a directory whose files give ``on_disk`` (``restore_from_saves``).

    A metric strategy takes its best from the files, so a better file written after
    that checkpoint (say, just before a crash) is never replaced by a worse one, and a
    strategy whose file is missing saves again. An ``Every`` keeps ``saved``'s last
    save: periodic saves follow the resumed run, not files from a run abandoned later.

    >>> from ckptfn.core.strategy import Strategy
    >>> config = Config([Strategy("val_loss"), Every(2)])
    >>> saved = State(config, [Best(0.5, 3), Last(3)], steps=4)
    >>> on_disk = State(config, [Best(0.25, 6), Last(7)], steps=8)
    >>> resume_state(saved, on_disk).bests, resume_state(saved, on_disk).steps
    ((Best(value=0.25, epoch=6), Last(epoch=3)), 4)
    """
    if saved.config != on_disk.config:
        raise ValueError("resume_state: both states must have the same config")
    bests = tuple(
        own if type(strategy) is Every else disk
        for strategy, own, disk in zip(saved.config.strategies, saved.bests, on_disk.bests)
    )
    return State(saved.config, bests, saved.steps)
