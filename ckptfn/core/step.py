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

from ckptfn.core.actions import Enter, Periodic, Save, Skip, improved
from ckptfn.core.config import Config, as_config
from ckptfn.core.errors import MetricTypeError, MissingMetricError
from ckptfn.core.every import Every, counter, due, restarted
from ckptfn.core.metrics import MISSING, lookup, metric_names, metric_value, missing_hint
from ckptfn.core.state import Best, Last, State
from ckptfn.core.strategy import Strategy
from ckptfn.core.topk import judge_top_k

__all__ = [
    "Action", "best_values", "between_validations", "init", "new_skips", "preempt", "scan", "step", "step_between_validations",
]

Action = Save | Enter | Periodic | Skip


def init(config: object) -> State:
    """The state before any epoch: nothing saved yet.

    ``config`` is a ``Config``, a ``Strategy``, a sequence of ``Strategy``, or
    anything ``Config.from_mapping`` accepts.

    >>> init([Strategy("val_loss"), Strategy("val_corr", mode="max")]).bests
    (Best(value=None, epoch=None), Best(value=None, epoch=None))
    """
    return State(as_config(config))


def _periodic(every: Every, last: Last, epoch: int, global_step: int | None, now: float | None, force: bool = False):
    seen = counter(every, epoch=epoch, global_step=global_step, now=now)
    if force:  # a preemption: saved now, whatever the period; the period counts from here
        return Last(epoch, global_step, time=now, seen=seen), Periodic(every, epoch, global_step=global_step)
    if restarted(every, last, epoch=epoch, global_step=global_step, now=now):
        last = Last()  # a new phase: it saves as a fresh run would, and its state says so
    if not due(every, last, epoch=epoch, global_step=global_step, now=now):
        return Last(last.epoch, last.global_step, time=last.time, seen=seen), None
    return Last(epoch, global_step, time=now, seen=seen), Periodic(every, epoch, global_step=global_step)


def _judge(
    config: Config, strategy: Strategy, best: Best, metrics: Mapping, epoch: int, global_step: int | None,
) -> tuple[Best, Action | None]:
    """One metric strategy's verdict on one decision: its new best and its action (None: no change)."""
    raw = lookup(metrics, strategy.metric_name)
    if raw is MISSING:
        if best.value is None and not best.others and config.on_missing_of(strategy) == "error":
            raise MissingMetricError(
                f"metric {strategy.metric_name!r} ({strategy.filename}) is missing; "
                f"{missing_hint(strategy.metric_name, metric_names(metrics))}. "
                "Fix the name, or set on_missing='warn' (on the strategy or the config) if it appears only later"
            )
        return best, Skip(strategy, epoch, "missing", global_step=global_step, available=metric_names(metrics))
    value = raw if type(raw) is float else metric_value(strategy.metric_name, raw)  # fast path
    if not math.isfinite(value):
        return best, Skip(strategy, epoch, "not_finite", value, global_step=global_step)
    if strategy.top_k > 1:
        return judge_top_k(strategy, best, value, epoch, global_step)
    if not improved(strategy.mode, best.value, value, strategy.min_delta):
        return best, None
    return Best(value, epoch, global_step), Save(strategy, epoch, value, best.value, global_step=global_step)


def _count(name: str, value: object) -> int:
    if type(value) is int and value >= 0:  # the common case, without the slow ABC check below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(value)


def _clock(now: object) -> float | None:
    if now is None or type(now) is float and math.isfinite(now):
        return now
    if isinstance(now, bool) or not isinstance(now, numbers.Real) or not math.isfinite(float(now)):
        raise TypeError(f"now must be a finite number of seconds, got {type(now).__name__} {now!r}")
    return float(now)


def step(
    state: State,
    metrics: Mapping,
    epoch: int | None = None,
    *,
    global_step: int | None = None,
    now: float | None = None,
    preempted: bool = False,
) -> tuple[State, tuple[Action, ...]]:
    """Judge one decision's metrics: the new state and the actions to perform, in strategy order.

    A strategy contributes a ``Save`` when its value is a strict new best (with
    ``top_k`` > 1 an ``Enter`` when it enters the top k without being the best), a
    ``Skip`` when its metric is missing or not finite, and nothing otherwise; an
    ``Every`` contributes a ``Periodic`` when it is due (``ckptfn.core.every.due``).

    The position: ``epoch`` defaults to the number of decisions taken so far;
    ``global_step`` (optimizer steps completed) is recorded when given and needed by
    ``Every(n_steps=...)``; ``now`` (seconds on a clock of the shell's choosing) is
    needed by ``Every(seconds=...)``. A metric missing before its strategy's first save
    raises ``MissingMetricError`` unless that strategy's ``on_missing`` is ``"warn"``.
    ``preempted=True`` (the run is about to stop): every ``Every`` saves at this decision
    whatever its period, as ``preempt`` says; the metric strategies are judged as always.

    >>> state = init([Strategy("val_loss"), Strategy("loss_components.concordance")])
    >>> state, actions = step(state, {"val_loss": 0.5, "loss_components": {"concordance": 0.2}})
    >>> [(type(a).__name__, a.filename, a.value) for a in actions]
    [('Save', 'best_val_loss.pt', 0.5), ('Save', 'best_loss_components_concordance.pt', 0.2)]
    >>> state, actions = step(state, {"val_loss": 0.7})
    >>> [(type(a).__name__, a.filename) for a in actions]
    [('Skip', 'best_loss_components_concordance.pt')]
    >>> state, actions = step(init(Every(n_steps=20, filename="last.ckpt")), {}, epoch=0, global_step=20)
    >>> actions
    (Periodic(strategy=Every(n_steps=20, filename='last.ckpt', overwrite=True, keep=None), epoch=0, global_step=20),)
    >>> _, actions = step(state, {}, epoch=0, global_step=27, preempted=True)  # not due until step 40
    >>> [(a.filename, a.global_step) for a in actions]
    [('last.ckpt', 27)]
    """
    if not isinstance(metrics, dict) and not isinstance(metrics, Mapping):  # dict first: fast
        raise MetricTypeError(
            f"metrics must be a mapping of metric names to values, got {type(metrics).__name__}"
        )
    at = state.steps if epoch is None else _count("epoch", epoch)
    position = None if global_step is None else _count("global_step", global_step)
    now = _clock(now)
    # New states come from the constructor (validated), not attrs.evolve: same checks, a
    # quarter of the cost, which matters in a function called once per epoch by ``scan``.
    config = state.config
    if not config.active:
        return State(config, state.bests, state.steps + 1), ()
    bests, actions = [], []
    for strategy, best in zip(config.strategies, state.bests):
        if type(strategy) is Every:
            best, action = _periodic(strategy, best, at, position, now, preempted)
        else:
            best, action = _judge(config, strategy, best, metrics, at, position)
        bests.append(best)
        if action is not None:
            actions.append(action)
    return State(config, tuple(bests), state.steps + 1), tuple(actions)


def preempt(
    state: State, epoch: int | None = None, *, global_step: int | None = None, now: float | None = None
) -> tuple[State, tuple[Periodic, ...]]:
    """The save a preempted run makes between decisions: every ``Every`` strategy's ``Periodic``
    at this position, whatever its period, and the state that records them.

    No metric is judged (there are none between validations): the metric strategies keep
    their bests, and the number of decisions (``state.steps``, the default ``epoch``) stays.
    Each ``Every`` counts its period from here, as after any save of its own. A config
    with no ``Every`` (or an inactive one) gives no action: ``Config.save_on`` refuses an
    active config without one, so a preemption never silently saves nothing.
    ``step(..., preempted=True)`` is the same at a decision, with the metrics judged too.

    >>> from ckptfn.core.every import Every
    >>> state = init([Strategy("val_loss"), Every(n_steps=500, filename="last.pt"), Every(seconds=1800, filename="hourly.pt")])
    >>> state, actions = step(state, {"val_loss": 0.4}, epoch=0, global_step=500, now=10.0)
    >>> [a.filename for a in actions]
    ['best_val_loss.pt', 'last.pt', 'hourly.pt']
    >>> after, actions = preempt(state, 1, global_step=731, now=20.0)  # neither period is due
    >>> [(a.filename, a.epoch, a.global_step) for a in actions]
    [('last.pt', 1, 731), ('hourly.pt', 1, 731)]
    >>> after.bests[0] == state.bests[0], after.bests[1], after.steps == state.steps
    (True, Last(epoch=1, global_step=731, time=20.0), True)
    >>> [a.global_step for a in step(after, {"val_loss": 0.5}, 1, global_step=1000, now=30.0)[1]]  # next save at 1000
    [1000]
    """
    at = state.steps if epoch is None else _count("epoch", epoch)
    position = None if global_step is None else _count("global_step", global_step)
    now = _clock(now)
    config = state.config
    if not config.active:
        return state, ()
    bests, actions = [], []
    for strategy, best in zip(config.strategies, state.bests):
        if type(strategy) is Every:
            best, action = _periodic(strategy, best, at, position, now, force=True)
            actions.append(action)
        bests.append(best)
    return State(config, tuple(bests), state.steps), tuple(actions)


def between_validations(strategy: object) -> bool:
    """Whether ``strategy`` may fall due between two validations: an ``Every`` counting
    steps or seconds (an epoch period falls due only at an epoch's end)."""
    return type(strategy) is Every and strategy.n_epochs is None


def step_between_validations(
    state: State, epoch: int, *, global_step: int, now: float | None = None
) -> tuple[State, tuple]:
    """``ckptfn.step`` for the ``Every(n_steps=...)`` and ``Every(seconds=...)`` strategies
    alone (the decision after a training batch, with no metrics to judge); every other
    strategy keeps its state. Pure.

    >>> state = init([Strategy("val_loss"), Every(n_steps=20, filename="last.ckpt")])
    >>> state, actions = step_between_validations(state, 0, global_step=20)
    >>> [(type(a).__name__, a.filename, a.global_step) for a in actions], state.bests[0]
    ([('Periodic', 'last.ckpt', 20)], Best(value=None, epoch=None))
    """
    config = state.config
    picked = [index for index, strategy in enumerate(config.strategies) if between_validations(strategy)]
    if not picked:
        return state, ()
    part = State(
        Config([config.strategies[i] for i in picked], enabled=config.enabled),
        [state.bests[i] for i in picked],
        state.steps,
    )
    part, actions = step(part, {}, epoch, global_step=global_step, now=now)
    bests = list(state.bests)
    for index, best in zip(picked, part.bests):
        bests[index] = best
    return State(config, bests, state.steps), actions  # not a validation: the number of decisions stays


def scan(
    state: State,
    history: Iterable[Mapping],
    epochs: Iterable[int | None] | None = None,
    *,
    global_steps: Iterable[int | None] | None = None,
    times: Iterable[float | None] | None = None,
) -> tuple[State, tuple[tuple[Action, ...], ...]]:
    """Fold ``step`` over a metric history: the final state and each step's actions.

    ``epochs``, ``global_steps`` and ``times`` (one per row each, when given) are each
    row's ``epoch``, ``global_step`` and ``now``; by default rows count 0, 1, 2, ...

    >>> final, actions = scan(init(Strategy("val_loss")), [{"val_loss": v} for v in (3, 1, 2, 0)])
    >>> [[a.epoch for a in step_actions] for step_actions in actions]
    [[0], [1], [], [3]]
    >>> best_values(final)
    {'best_val_loss.pt': 0.0}
    >>> [[a.epoch for a in s] for s in scan(init(Strategy("val_loss")), [{"val_loss": 2}, {"val_loss": 1}], [4, 9])[1]]
    [[4], [9]]
    >>> _, actions = scan(init(Every(n_steps=50)), [{}] * 4, global_steps=[20, 40, 60, 80])
    >>> [[a.global_step for a in s] for s in actions]
    [[], [], [60], []]
    """
    rows = list(history) if not isinstance(history, list) else history
    columns = {"epoch": epochs, "global_step": global_steps, "now": times}
    given = {name: list(values) for name, values in columns.items() if values is not None}
    for name, values in given.items():
        if len(values) != len(rows):
            raise ValueError(f"scan: {len(rows)} rows but {len(values)} values of {name}")
    if not given:
        advance = lambda carry, row: step(carry[0], row)  # noqa: E731
        items = rows
    else:
        names = tuple(given)
        advance = lambda carry, row: step(carry[0], row[0], **dict(zip(names, row[1:])))  # noqa: E731
        items = list(zip(rows, *given.values()))
    carries = toolz.accumulate(advance, items, (state, ()))
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
