"""One rank's decision as plain data, so that every rank of a distributed run acts on it.

Pure. In a distributed run only rank 0 calls ``step``; it sends the outcome to
the other ranks, which rebuild the very same ``State`` and actions from it. What
travels is plain data (tuples, dicts, str/int/float/bool/None), never attrs
records: the state as ``State.to_dict()`` (rebuilt with ``restore``), each
action as its class name, its strategy's index and its other fields. A receiver
whose configuration differs from the sender's finds out with a clear error
instead of acting on the wrong strategy.

Wire forms:

- a configuration (every rank sends its own once, when its manager is built):
  ``("config", enabled, strategies, settings)``, each strategy ``(class name,
  ((field, value), ...))`` in field order, ``settings`` the manager options that
  change which collectives a rank makes, as ``((name, value), ...)``;
- a decision: ``("decision", filenames, state.to_dict(), actions)``, each action
  ``(class name, strategy index, ((field, value), ...))``;
- a failure: ``("error", type name, message, published)``, rebuilt on the
  receiving side as the same ckptfn or builtin exception type.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

import ckptfn.core.actions
from ckptfn.core.config import Config
from ckptfn.core.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ConfigError,
    MetricTypeError,
    MissingMetricError,
    PayloadError,
)
from ckptfn.core.state import State, restore

__all__ = [
    "config_difference",
    "config_to_wire",
    "decision_from_wire",
    "decision_to_wire",
    "failure_from_wire",
    "failure_to_wire",
    "is_failure",
]

#: Every action record (an attrs class with a ``strategy`` field), by class name.
_ACTIONS = {
    kind.__name__: kind
    for kind in vars(ckptfn.core.actions).values()
    if isinstance(kind, type) and attrs.has(kind) and "strategy" in attrs.fields_dict(kind)
}

#: Exception types a receiving rank re-raises as themselves; anything else becomes a RuntimeError.
_KNOWN_FAILURES = {
    kind.__name__: kind
    for kind in (
        CheckpointError,
        CheckpointNotFoundError,
        CheckpointWriteError,
        ConfigError,
        MetricTypeError,
        MissingMetricError,
        PayloadError,
        TypeError,
        ValueError,
        KeyError,
        OSError,
    )
}


def _action_to_wire(action: object, index_of: dict[str, int]) -> tuple:
    kind = type(action)
    if _ACTIONS.get(kind.__name__) is not kind:
        raise TypeError(f"cannot share an action of type {kind.__name__}")
    fields = tuple(
        (field.name, getattr(action, field.name))
        for field in attrs.fields(kind)
        if field.name != "strategy" and (field.default is attrs.NOTHING or getattr(action, field.name) != field.default)
    )  # a field at its default stays at home: the receiver's constructor fills it in
    return (kind.__name__, index_of[action.strategy.filename], fields)


def decision_to_wire(state: State, actions: Iterable[object]) -> tuple:
    """``step``'s outcome (the new state and its actions) as plain data.

    >>> from ckptfn.core.step import init, step
    >>> from ckptfn.core.strategy import Strategy
    >>> state, actions = step(init(Strategy("val_loss")), {"val_loss": 0.5}, 3)
    >>> wire = decision_to_wire(state, actions)
    >>> wire[1], wire[3]
    (('best_val_loss.pt',), (('Save', 0, (('epoch', 3), ('value', 0.5), ('previous', None))),))
    """
    filenames = tuple(strategy.filename for strategy in state.config.strategies)
    index_of = {filename: index for index, filename in enumerate(filenames)}
    return ("decision", filenames, state.to_dict(), tuple(_action_to_wire(a, index_of) for a in actions))


def _action_from_wire(config: Config, wire: tuple) -> object:
    name, index, fields = wire
    kind = _ACTIONS.get(name)
    if kind is None:
        raise ValueError(f"unknown action {name!r} in a shared decision")
    return kind(strategy=config.strategies[index], **dict(fields))


def decision_from_wire(config: Config, wire: tuple) -> tuple[State, tuple]:
    """Rebuild ``(state, actions)`` for ``config`` from ``decision_to_wire`` output.

    The sender's strategies (by filename, in order) must be this ``config``'s,
    else a ``ConfigError`` names both lists: ranks must be configured alike.

    >>> from ckptfn.core.step import init, step
    >>> from ckptfn.core.strategy import Strategy
    >>> state, actions = step(init(Strategy("val_loss")), {"val_loss": 0.5}, 3)
    >>> decision_from_wire(state.config, decision_to_wire(state, actions)) == (state, actions)
    True
    >>> decision_from_wire(init(Strategy("val_corr")).config, decision_to_wire(state, actions))
    Traceback (most recent call last):
    ...
    ckptfn.ConfigError: rank 0 decides for strategies ['best_val_loss.pt'] but this rank is configured with ['best_val_corr.pt']; every rank must pass the same checkpoint configuration
    """
    tag, filenames, state_data, actions = wire
    if tag != "decision":
        raise ValueError(f"expected a shared decision, got {tag!r}")
    mine = tuple(strategy.filename for strategy in config.strategies)
    if tuple(filenames) != mine:
        raise ConfigError(
            f"rank 0 decides for strategies {list(filenames)} but this rank is configured with {list(mine)}; "
            "every rank must pass the same checkpoint configuration"
        )
    return restore(config, state_data), tuple(_action_from_wire(config, action) for action in actions)


def failure_to_wire(error: BaseException) -> tuple:
    """An exception as plain data: its type name, message and (for write errors) published paths.

    >>> failure_to_wire(MetricTypeError("val_loss: expected a real number, got 'abc'"))
    ('error', 'MetricTypeError', "val_loss: expected a real number, got 'abc'", ())
    """
    published = tuple(str(path) for path in getattr(error, "published", ()) or ())
    return ("error", type(error).__name__, str(error), published)


def is_failure(wire: object) -> bool:
    """Whether a shared message reports a failure.

    >>> is_failure(("error", "ValueError", "bad", ())), is_failure(("decision", (), {}, ()))
    (True, False)
    """
    return isinstance(wire, tuple) and len(wire) == 4 and wire[0] == "error"


def failure_from_wire(wire: tuple, rank: int = 0) -> Exception:
    """The exception a receiving rank raises for a failure reported by ``rank``.

    The type is the sender's when it is a ckptfn error or a common builtin one
    (so ``except ckptfn.CheckpointWriteError`` works the same on every rank),
    otherwise ``RuntimeError``; the message says which rank failed.

    >>> error = failure_from_wire(("error", "CheckpointWriteError", "disk full", ("run/best.pt",)))
    >>> type(error).__name__, str(error), error.published
    ('CheckpointWriteError', 'on rank 0: disk full', ('run/best.pt',))
    >>> failure_from_wire(("error", "ZeroDivisionError", "division by zero", ()))
    RuntimeError('on rank 0: ZeroDivisionError: division by zero')
    """
    _tag, name, message, published = wire
    kind = _KNOWN_FAILURES.get(name)
    if kind is None:
        return RuntimeError(f"on rank {rank}: {name}: {message}")
    if issubclass(kind, CheckpointWriteError):
        return kind(f"on rank {rank}: {message}", published)
    return kind(f"on rank {rank}: {message}")


# --- the configuration, compared across ranks ---------------------------------------------------


def config_to_wire(config: Config, **settings: object) -> tuple:
    """``config`` (and the manager ``settings`` that decide which collectives a rank makes) as
    plain data: what each rank sends so that every rank can compare all of them.

    >>> from ckptfn.core.every import Every
    >>> from ckptfn.core.strategy import Strategy
    >>> config_to_wire(Config([Every(2)]), resume=True)
    ('config', True, (('Every', (('n_epochs', 2), ('n_steps', None), ('seconds', None), ('filename', 'last.pt'), ('overwrite', True), ('keep', None))),), (('resume', True),))
    >>> dict(config_to_wire(Config([Strategy("val_loss", top_k=3)]))[2][0][1])["top_k"]
    3
    """
    strategies = tuple(
        (type(s).__name__, tuple((field.name, getattr(s, field.name)) for field in attrs.fields(type(s))))
        for s in config.strategies
    )
    return ("config", config.enabled, strategies, tuple(sorted(settings.items())))


def _strategy_name(wire: tuple) -> str:
    return dict(wire[1]).get("filename", "?")


def _differences(mine: tuple, theirs: tuple) -> list[str]:
    """Each way another rank's configuration (``theirs``) differs from rank 0's (``mine``)."""
    _, enabled, strategies, settings = mine
    _, other_enabled, other_strategies, other_settings = theirs
    found = []
    if enabled != other_enabled:
        found.append(f"enabled={other_enabled!r} where rank 0 has {enabled!r}")
    if len(strategies) != len(other_strategies):
        found.append(
            f"{len(other_strategies)} strategies {[_strategy_name(s) for s in other_strategies]} where rank 0 has "
            f"{len(strategies)} {[_strategy_name(s) for s in strategies]}"
        )
    for index, (strategy, other) in enumerate(zip(strategies, other_strategies)):
        where = f"strategies[{index}]"
        if strategy[0] != other[0]:
            theirs_, mine_ = f"{other[0]} {_strategy_name(other)!r}", f"{strategy[0]} {_strategy_name(strategy)!r}"
            found.append(f"{where} = {theirs_} where rank 0 has {mine_}")
            continue
        fields, other_fields = dict(strategy[1]), dict(other[1])
        for name, value in fields.items():
            if other_fields.get(name) != value:
                found.append(
                    f"{where}.{name}={other_fields.get(name)!r} where rank 0 has {value!r} ({_strategy_name(strategy)})"
                )
    values, other_values = dict(settings), dict(other_settings)
    for name in sorted(set(values) | set(other_values)):
        value, other = values.get(name, "<not given>"), other_values.get(name, "<not given>")
        if value != other:
            found.append(f"{name}={other!r} where rank 0 has {value!r}")
    return found


def config_difference(configs: Sequence[tuple]) -> str | None:
    """How the ranks' configurations (``config_to_wire`` of rank 0, 1, ...) differ, as one message
    naming the ranks, the strategies, the fields and both values; None when they are alike. Every
    rank computes the same message from the same list, so every rank raises the same error.

    >>> from ckptfn.core.strategy import Strategy
    >>> same = config_to_wire(Config([Strategy("val_loss", filename="best.pt")]))
    >>> other = config_to_wire(Config([Strategy("val_loss", mode="max", filename="best.pt")]))
    >>> config_difference([same, same]) is None
    True
    >>> print(config_difference([same, other, same]))
    the ranks are configured differently: rank 1 has strategies[0].mode='max' where rank 0 has 'min' (best.pt); every rank must build its CheckpointManager with the same checkpoint configuration
    """
    reports = [(rank, _differences(configs[0], config)) for rank, config in enumerate(configs) if rank]
    reports = [(rank, found) for rank, found in reports if found]
    if not reports:
        return None
    rank, found = reports[0]
    others = [other for other, _ in reports[1:]]
    if len(others) == 1:
        also = f" (rank {others[0]} differs from rank 0 too)"
    else:
        also = f" (ranks {', '.join(map(str, others))} differ from rank 0 too)" if others else ""
    return (
        f"the ranks are configured differently: rank {rank} has {'; '.join(found)}{also}; "
        "every rank must build its CheckpointManager with the same checkpoint configuration"
    )
