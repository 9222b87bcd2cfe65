"""One rank's decision as plain data, so that every rank of a distributed run acts on it.

Pure. In a distributed run only rank 0 calls ``step``; it sends the outcome to
the other ranks, which rebuild the very same ``State`` and actions from it. What
travels is plain data (tuples, dicts, str/int/float/bool/None), never attrs
records: the state as ``State.to_dict()`` (rebuilt with ``restore``), each
action as its class name, its strategy's index and its other fields. A receiver
whose configuration differs from the sender's finds out with a clear error
instead of acting on the wrong strategy.

Wire forms:

- a decision: ``("decision", filenames, state.to_dict(), actions)``, each action
  ``(class name, strategy index, ((field, value), ...))``;
- a failure: ``("error", type name, message, published)``, rebuilt on the
  receiving side as the same ckptfn or builtin exception type.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

import ckptfn.core.actions
from ckptfn.core.config import Config
from ckptfn.core.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ConfigError,
    MetricTypeError,
    PayloadError,
)
from ckptfn.core.state import State, restore

__all__ = ["decision_from_wire", "decision_to_wire", "failure_from_wire", "failure_to_wire", "is_failure"]

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
        (field.name, getattr(action, field.name)) for field in attrs.fields(kind) if field.name != "strategy"
    )
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
