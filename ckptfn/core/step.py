"""The decision core: ``init``, ``step``, ``scan`` and ``best_values``.

Pure (see toolz's definition of purity): the output depends only on the input,
inputs are never mutated, no I/O, no clock. ``step`` does O(number of strategies)
work and never copies the metrics mapping.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import toolz

from ckptfn.core.actions import Periodic, Save, Skip, improved
from ckptfn.core.config import as_config
from ckptfn.core.errors import MetricTypeError
from ckptfn.core.every import Every, due
from ckptfn.core.metrics import MISSING, lookup, metric_value
from ckptfn.core.state import Best, Last, State
from ckptfn.core.strategy import Strategy

__all__ = ["Action", "best_values", "init", "new_skips", "scan", "step"]

Action = Save | Periodic | Skip


def init(config: object) -> State:
    """The state before any epoch: nothing saved yet.

    ``config`` is a ``Config``, a ``Strategy``, a sequence of ``Strategy``, or
    anything ``Config.from_mapping`` accepts.

    >>> init([Strategy("val_loss"), Strategy("val_corr", mode="max")]).bests
    (Best(value=None, epoch=None), Best(value=None, epoch=None))
    """
    return State(as_config(config))


def _judge(
    strategy: Strategy, best: Best, metrics: Mapping, epoch: int
) -> tuple[Best, Action | None]:
    """One strategy's verdict on one epoch: its new best and its action (None: no change)."""
    if type(strategy) is Every:  # periodic: the metrics do not matter
        if best.epoch is not None and epoch < best.epoch:
            best = Last()  # the epoch went backwards: a new phase, saving as a fresh run would
        if not due(strategy, best.epoch, epoch):
            return best, None
        return Last(epoch), Periodic(strategy, epoch)
    raw = lookup(metrics, strategy.metric_name)
    if raw is MISSING:
        return best, Skip(strategy, epoch, "missing")
    value = raw if type(raw) is float else metric_value(strategy.metric_name, raw)  # fast path
    if not math.isfinite(value):
        return best, Skip(strategy, epoch, "not_finite", value)
    if not improved(strategy.mode, best.value, value, strategy.min_delta):
        return best, None
    return Best(value, epoch), Save(strategy, epoch, value, best.value)


def _epoch(state: State, epoch: object) -> int:
    if epoch is None:
        return state.steps
    if type(epoch) is int and epoch >= 0:  # the common case, without the slow ABC check below
        return epoch
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
        raise TypeError(f"epoch must be an int, got {type(epoch).__name__} {epoch!r}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch!r}")
    return int(epoch)


def step(state: State, metrics: Mapping, epoch: int | None = None) -> tuple[State, tuple[Action, ...]]:
    """Judge one epoch's metrics: the new state and the actions to perform, in strategy order.

    A strategy contributes a ``Save`` when its value is a strict new best, a
    ``Skip`` when its metric is missing or not finite, and nothing otherwise; an
    ``Every`` contributes a ``Periodic`` when it is due (see ``ckptfn.core.every.due``).
    ``epoch`` defaults to the number of steps taken so far.

    >>> state = init([Strategy("val_loss"), Strategy("loss_components.concordance")])
    >>> state, actions = step(state, {"val_loss": 0.5, "loss_components": {"concordance": 0.2}})
    >>> [(type(a).__name__, a.filename, a.value) for a in actions]
    [('Save', 'best_val_loss.pt', 0.5), ('Save', 'best_loss_components_concordance.pt', 0.2)]
    >>> state, actions = step(state, {"val_loss": 0.7})
    >>> [(type(a).__name__, a.filename) for a in actions]
    [('Skip', 'best_loss_components_concordance.pt')]
    """
    if not isinstance(metrics, dict) and not isinstance(metrics, Mapping):  # dict first: fast
        raise MetricTypeError(
            f"metrics must be a mapping of metric names to values, got {type(metrics).__name__}"
        )
    at = _epoch(state, epoch)
    # New states come from the constructor (validated), not attrs.evolve: same checks, a
    # quarter of the cost, which matters in a function called once per epoch by ``scan``.
    if not state.config.active:
        return State(state.config, state.bests, state.steps + 1), ()
    bests, actions = [], []
    for strategy, best in zip(state.config.strategies, state.bests):
        best, action = _judge(strategy, best, metrics, at)
        bests.append(best)
        if action is not None:
            actions.append(action)
    return State(state.config, tuple(bests), state.steps + 1), tuple(actions)


def scan(
    state: State, history: Iterable[Mapping], epochs: Iterable[int | None] | None = None
) -> tuple[State, tuple[tuple[Action, ...], ...]]:
    """Fold ``step`` over a metric history: the final state and each step's actions.

    ``epochs`` (one per row) gives each row's epoch; by default rows count 0, 1, 2, ...

    >>> final, actions = scan(init(Strategy("val_loss")), [{"val_loss": v} for v in (3, 1, 2, 0)])
    >>> [[a.epoch for a in step_actions] for step_actions in actions]
    [[0], [1], [], [3]]
    >>> best_values(final)
    {'best_val_loss.pt': 0.0}
    >>> [[a.epoch for a in s] for s in scan(init(Strategy("val_loss")), [{"val_loss": 2}, {"val_loss": 1}], [4, 9])[1]]
    [[4], [9]]
    """
    rows = history if epochs is None else zip(history, epochs, strict=True)
    advance = (lambda carry, row: step(carry[0], row)) if epochs is None else (lambda carry, row: step(carry[0], *row))
    carries = toolz.accumulate(advance, rows, (state, ()))
    final, per_step = next(carries)[0], []
    for final, actions in carries:
        per_step.append(actions)
    return final, tuple(per_step)


def best_values(state: State) -> dict[str, float | None]:
    """The best value each metric strategy has saved so far, keyed by filename (None before
    its first save). ``Every`` strategies have no best value and are left out.

    >>> best_values(init([Strategy("val_corr", mode="max"), Every(1, filename="last.pt")]))
    {'best_val_corr.pt': None}
    """
    return {
        s.filename: best.value
        for s, best in zip(state.config.strategies, state.bests)
        if type(best) is Best
    }


def new_skips(
    seen: frozenset[tuple[str, str]], actions: Iterable[Action]
) -> tuple[frozenset[tuple[str, str]], tuple[Skip, ...], tuple[Skip, ...]]:
    """Split ``actions``' skips into first-time and repeated ones, per (filename, reason).

    Returns the grown ``seen`` set, the skips to report loudly, and the repeats.
    Shells use it to warn once per strategy and reason, not once per epoch.

    >>> s = Strategy("val_loss")
    >>> seen, loud, quiet = new_skips(frozenset(), [Skip(s, 0, "missing"), Skip(s, 0, "missing")])
    >>> len(loud), len(quiet), sorted(seen)
    (1, 1, [('best_val_loss.pt', 'missing')])
    """
    loud, quiet = [], []
    for action in actions:
        if not isinstance(action, Skip):
            continue
        key = (action.filename, action.reason)
        (quiet if key in seen else loud).append(action)
        seen = seen | {key}
    return frozenset(seen), tuple(loud), tuple(quiet)
