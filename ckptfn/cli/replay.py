"""``ckptfn replay``: dry-run a checkpoint config over a logged metric history.

A history row is a *decision* when it holds a value of a metric the config watches
(every row is one when the config watches no metric): ``ckptfn.step`` judges it, as
the run did after that validation. The other rows are training positions (a Lightning
``CSVLogger`` writes training-only rows whose validation cells are empty): only the
``Every(n_steps=...)`` strategies are decided there, as the Lightning integration does
after a training batch, so such rows never count as a missing metric. A row's position
is its ``epoch`` (by default its index) and its ``global_step`` (or ``step``) when the
history logs one.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from collections.abc import Mapping, Sequence

import attrs

from ckptfn.cli.errors import UserError, printable
from ckptfn.cli.history import POSITION_KEYS, check_metric_values, load_config_file, read_history
from ckptfn.core.actions import Enter, Periodic, Save, Skip
from ckptfn.core.config import Config
from ckptfn.core.errors import ConfigError, MissingMetricError
from ckptfn.core.every import Every
from ckptfn.core.metadata import flatten_metrics
from ckptfn.core.metrics import MISSING, lookup, metric_value
from ckptfn.core.state import Best, State
from ckptfn.core.step import init, step, step_between_validations
from ckptfn.core.strategy import Strategy

__all__ = [
    "MAX_PANELS",
    "Position",
    "Replay",
    "Stopped",
    "between",
    "cmd_replay",
    "distinct",
    "kept_at_end",
    "plot_replay",
    "positions",
    "replay",
    "step_key",
]

#: The most metrics ``--plot`` draws (one panel each).
MAX_PANELS = 24
#: The keys that give a row's global step, in order of preference.
STEP_KEYS = ("global_step", "step")


@attrs.frozen
class Position:
    """Where a history row stands: its epoch, its global step (None: not logged), and whether
    it is a decision (it holds a watched metric)."""

    epoch: int
    global_step: int | None
    decision: bool


@attrs.frozen
class Replay:
    """What replaying a history gave: per row its metrics (position keys left out), its
    ``Position`` and its actions; the final state; the key that held the step (or None);
    whether the history logged epochs (else each row's epoch is its index)."""

    rows: tuple[Mapping, ...]
    positions: tuple[Position, ...]
    actions: tuple[tuple, ...]
    final: State
    step_key: str | None
    epochs_logged: bool = True

    @property
    def has_steps(self) -> bool:
        """Whether every decision has a global step (then steps are the x axis of the plot)."""
        decisions = [p for p in self.positions if p.decision]
        return bool(decisions) and all(p.global_step is not None for p in decisions)


class Stopped(Exception):
    """The run would have stopped at row ``index`` (a watched metric missing before its first
    save, with ``on_missing="error"``); ``error`` is the core's exception."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(str(error))
        self.index, self.error = index, error


def step_key(history: Sequence[Mapping]) -> str | None:
    """The key that holds the global step: ``global_step`` if any row has it, else ``step``, else None.

    >>> step_key([{"epoch": 0, "step": 9}]), step_key([{"step": 1, "global_step": 2}]), step_key([{}])
    ('step', 'global_step', None)
    """
    for key in STEP_KEYS:
        if any(key in row for row in history):
            return key
    return None


def _watched(config: Config) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s.metric_name for s in config.strategies if type(s) is Strategy))


def _row_epoch(row: Mapping, index: int) -> int:
    epoch = row.get("epoch", index)
    return int(epoch) if isinstance(epoch, float) and epoch.is_integer() else epoch


def positions(history: Sequence[Mapping], config: Config) -> tuple[Position, ...]:
    """Each row's ``Position``: ``epoch`` (the row's index without one), the global step, and
    whether it is a decision: it holds a metric the config watches (any row, if none is).

    >>> config = Config([Strategy("val_loss")])
    >>> [(p.epoch, p.global_step, p.decision) for p in positions(
    ...     [{"epoch": 0, "step": 4, "train_loss": 1.0}, {"epoch": 0, "step": 9, "val_loss": 0.5}], config)]
    [(0, 4, False), (0, 9, True)]
    """
    names, key = _watched(config), step_key(history)
    found = []
    for index, row in enumerate(history):
        decision = not names or any(lookup(row, name) is not MISSING for name in names)
        found.append(Position(_row_epoch(row, index), row.get(key) if key else None, decision))
    return tuple(found)


def between(state: State, epoch: int, global_step: int | None) -> tuple[State, tuple]:
    """The decision at a training-only row: the ``Every(n_steps=...)`` strategies alone (no
    metric is judged, the number of decisions stays). Pure: ``ckptfn.core.step.step_between_validations``,
    the rule of the Lightning integration too.

    >>> state = init([Strategy("val_loss"), Every(n_steps=20, filename="last.pt")])
    >>> state, actions = between(state, 0, 20)
    >>> [(a.filename, a.global_step) for a in actions], state.bests[0], state.steps
    ([('last.pt', 20)], Best(value=None, epoch=None), 0)
    """
    if global_step is None or not state.config.active:
        return state, ()
    return step_between_validations(state, epoch, global_step=global_step)  # replay refuses Every(seconds=...)


def replay(history: Sequence[Mapping], config: Config) -> Replay:
    """Fold ``step`` over the decisions of a history, and ``between`` over the other rows
    (except at a global step where a decision is logged too: that decision decides it, as
    the Lightning integration makes one write per step).

    Raises ``Stopped`` where the run would have stopped (``on_missing="error"``).

    >>> result = replay([{"val_loss": v} for v in (3, 1, 2, 0)], Config([Strategy("val_loss")]))
    >>> [[a.epoch for a in actions] for actions in result.actions], result.final.bests[0].value
    ([[0], [1], [], [3]], 0.0)
    """
    places = positions(history, config)
    rows = tuple({k: v for k, v in row.items() if k not in POSITION_KEYS} for row in history)
    decided = {place.global_step for place in places if place.decision and place.global_step is not None}
    state, per_row = init(config), []
    for index, (row, place) in enumerate(zip(rows, places)):
        try:
            if place.decision:
                state, actions = step(state, row, place.epoch, global_step=place.global_step)
            elif place.global_step in decided:  # a validation at this step decides it (one write per step)
                actions = ()
            else:
                state, actions = between(state, place.epoch, place.global_step)
        except MissingMetricError as error:
            raise Stopped(index, error) from None
        per_row.append(actions)
    logged = any("epoch" in row for row in history)
    return Replay(rows, places, tuple(per_row), state, step_key(history), logged)


def kept_at_end(strategy: Strategy | Every, saved: Sequence[Save | Enter | Periodic], best: object) -> tuple[bool, ...]:
    """For each of a strategy's saves, in order: whether its file is still there at the end.

    ``overwrite=True`` keeps the last save; ``overwrite=False`` keeps them all, or the last
    ``keep``; ``top_k`` keeps the saves of the final top k (``best`` is the final ``Best``).

    >>> s = Strategy("loss")
    >>> saves = [Save(s, 0, 3.0, None), Save(s, 1, 2.0, 3.0), Save(s, 2, 1.0, 2.0)]
    >>> kept_at_end(s, saves, None), kept_at_end(Strategy("loss", overwrite=False, keep=2), saves, None)
    ((False, False, True), (False, True, True))
    """
    if getattr(strategy, "top_k", 1) > 1 and type(best) is Best:
        final = {(best.epoch, best.global_step), *((m.epoch, m.global_step) for m in best.others)}
        return tuple((a.epoch, a.global_step) in final for a in saved)
    if strategy.overwrite:
        count = 1
    else:
        count = len(saved) if strategy.keep is None else strategy.keep
    return tuple(index >= len(saved) - count for index in range(len(saved)))


def distinct(value: float, other: float | None, digits: int = 6) -> str:
    """``value`` with the fewest significant digits (at least ``digits``) that tell it from ``other``.

    >>> distinct(0.42171, 0.42174, 4), distinct(0.5, None), distinct(0.25, 0.5, 4)
    ('0.42171', '0.5', '0.25')
    """
    for count in range(digits, 18):
        text = f"{value:.{count}g}"
        if other is None or text != f"{other:.{count}g}":
            return text
    return repr(value)


# --- checks before the replay -------------------------------------------------------------


_LISTED = 20  # metric names an error lists before "and N more"


def _metric_names(history: Sequence[Mapping]) -> set[str]:
    names: set[str] = set()
    for row in history:
        names.update(flatten_metrics(row))
        names.update(key for key in row if isinstance(key, str))
    return names


def _check_metrics_exist(config: Config, history: Sequence[Mapping], source: str) -> None:
    present = _metric_names(history)
    for index, strategy in enumerate(config.strategies):
        if isinstance(strategy, Strategy) and strategy.metric_name not in present:
            names = sorted(present)
            close = difflib.get_close_matches(strategy.metric_name, names, n=1) if len(names) <= 10_000 else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listed = ", ".join(printable(name, limit=80) for name in names[:_LISTED])
            if len(names) > _LISTED:
                listed += f", ... ({len(names) - _LISTED} more)"
            raise UserError(
                f"strategies[{index}].metric_name: {strategy.metric_name!r} never appears in {source}{hint}; "
                f"it has: {listed or 'no metrics'}"
            )


def _check_triggers(config: Config, history: Sequence[tuple[int, Mapping]], source: str) -> None:
    """A periodic strategy replay cannot decide is one clear line: a clock, or steps the history lacks."""
    rows = [row for _, row in history]
    key = step_key(rows)
    for index, strategy in enumerate(config.strategies):
        if type(strategy) is not Every or strategy.n_epochs is not None:
            continue
        what = f"strategies[{index}] ({strategy.describe()}, {printable(strategy.filename)})"
        if strategy.seconds is not None:
            raise UserError(f"{what}: a history has no clock, so replay cannot decide a period of wall time")
        if key is None:
            raise UserError(f"{what} counts steps, and {source} has no 'step' or 'global_step' column or key")
        for (line, row), place in zip(history, positions(rows, config)):
            if place.decision and row.get(key) is None:
                raise UserError(f"{source}: line {line}: no {key!r} value, and {what} counts steps")


def _load_config(path: str) -> Config:
    data = load_config_file(path)
    try:
        return Config.from_mapping(data)
    except (ConfigError, TypeError, ValueError, OverflowError, RecursionError) as error:  # odd data is the user's
        raise UserError(f"{path}: {error}") from None


# --- the records printed -------------------------------------------------------------------


def _save_record(place: Position, action: Save | Enter | Periodic) -> dict:
    s = action.strategy
    record = {"epoch": place.epoch, "global_step": place.global_step, "filename": action.filename}
    if type(action) is Periodic:
        record[s.key] = s.trigger[1]
        return record
    record.update(metric_name=s.metric_name, value=action.value)
    if type(action) is Save:
        record["previous"] = action.previous
        if action.aside is not None:
            record["aside"] = action.aside
    else:
        record.update(strategy=s.filename, top_k=s.top_k, kth=action.kth)
    if action.leaves:
        record["leaves"] = list(action.leaves)
    return record


def _best_record(strategy: Strategy | Every, best: object) -> dict:
    if type(strategy) is Every:
        return {strategy.key: strategy.trigger[1], "epoch": best.epoch, "global_step": best.global_step}
    record = {"metric_name": strategy.metric_name, "mode": strategy.mode, "value": best.value, "epoch": best.epoch,
              "global_step": best.global_step}
    if strategy.top_k > 1:
        record["top_k"] = strategy.top_k
        record["others"] = [{"value": m.value, "epoch": m.epoch, "global_step": m.global_step, "name": m.name}
                            for m in best.others]
    return record


def _skip_records(result: Replay) -> list[dict]:
    """One record per strategy and reason: how many decisions it skipped, and the first."""
    found: dict[tuple[str, str], dict] = {}
    for place, actions in zip(result.positions, result.actions):
        for action in actions:
            if type(action) is not Skip:
                continue
            key = (action.filename, action.reason)
            if key not in found:
                found[key] = {"filename": action.filename, "metric_name": action.strategy.metric_name,
                              "reason": action.reason, "count": 0, "epoch": place.epoch,
                              "global_step": place.global_step}
            found[key]["count"] += 1
    return list(found.values())


def _plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 row``, ``2 rows``; ``nouns`` where the plural is not ``noun + "s"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {nouns or noun + 's'}"


def _where(epoch: object, global_step: object, steps: bool, width: int = 0) -> str:
    text = f"epoch {epoch:>4}"
    return text + (f", step {'-' if global_step is None else global_step:>{width}}" if steps else "")


def _summary(result: Replay, source: str, config: Config) -> str:
    rows, places = len(result.rows), result.positions
    steps = [p.global_step for p in places if p.global_step is not None]
    parts = [_plural(rows, "row")]
    if result.epochs_logged or not steps:  # without an epoch column, a step log's rows are not epochs
        parts.append(_plural(len({p.epoch for p in places}), "epoch"))
    if steps:
        parts.append(f"steps {min(steps)}-{max(steps)}")
    text = f"replayed {', '.join(parts)} of {printable(source)} with {_plural(len(config.strategies), 'strategy', 'strategies')}"
    decisions = sum(p.decision for p in places)
    if decisions < rows:
        text += (f"; {_plural(decisions, 'row')} with a watched metric (the decisions), "
                 f"{rows - decisions} training-only")
    return text


def _describe(record: dict) -> str:
    for key, unit in (("every_n_epochs", "epoch"), ("every_n_steps", "step"), ("every_seconds", "second")):
        if key in record:
            return f"every {_plural(record[key], unit)}" if key != "every_seconds" else f"every {record[key]:g} seconds"
    name, value = printable(record["metric_name"]), record["value"]
    if "top_k" in record:
        kth = "" if record["kth"] is None else f", beating {distinct(record['kth'], value)}"
        return f"{name} {distinct(value, record['kth'])} enters the top {record['top_k']}{kth}"
    previous = record["previous"]
    was = "none" if previous is None else distinct(previous, value)
    return f"{name} {distinct(value, previous)} (was {was})"


def _print_text(result: Replay, config: Config, source: str, saves: list[dict], skips: list[dict]) -> None:
    steps = result.step_key is not None
    width = max((len(str(p.global_step)) for p in result.positions if p.global_step is not None), default=1)
    column = max([24, *(len(printable(save["filename"])) for save in saves)])
    top_k = {s.filename: s.top_k for s in config.strategies if type(s) is Strategy}
    print(_summary(result, source, config))
    for save in saves:
        where = _where(save["epoch"], save["global_step"], steps, width)
        print(f"{where}: {printable(save['filename']):<{column}} {_describe(save)}")
        indent = " " * (len(where) + 3 + column)
        if save.get("aside"):
            print(f"{indent}the previous best moves to {printable(save['aside'])}")
        k = top_k.get(save.get("strategy", save["filename"]))
        for name in save.get("leaves", ()):
            print(f"{indent}{printable(name)} leaves the top {k} (deleted)")
    if skips:
        print("skipped decisions:")
        for skip in skips:
            why = "missing" if skip["reason"] == "missing" else "not finite"
            first = f"epoch {skip['epoch']}" + ("" if skip["global_step"] is None else f", step {skip['global_step']}")
            print(f"  {printable(skip['filename']):<24} {printable(skip['metric_name'])} {why} at "
                  f"{_plural(skip['count'], 'decision')} (first at {first})")
    print("final bests:")
    for strategy, best in zip(config.strategies, result.final.bests):
        filename = printable(strategy.filename)
        if type(strategy) is Every:
            if best.epoch is None:
                last = "never saved"
            else:
                at = f"epoch {best.epoch}" + ("" if best.global_step is None else f", step {best.global_step}")
                last = f"last saved at {at}"
            print(f"  {filename:<24} {strategy.describe()}: {last}")
            continue
        kind = strategy.mode if strategy.top_k == 1 else f"{strategy.mode}, top {strategy.top_k}"
        if best.value is None:
            value = "never saved"
        else:
            value = f"{best.value:.6g} at epoch {best.epoch}" + ("" if best.global_step is None else f", step {best.global_step}")
            if best.others:
                value += "; then " + ", ".join(f"{m.value:.6g} ({printable(m.name)})" for m in best.others)
        print(f"  {filename:<24} {printable(strategy.metric_name)} ({kind}): {value}")


def cmd_replay(args: argparse.Namespace) -> int:
    lines = read_history(args.history)
    history = [row for _, row in lines]
    config = _load_config(args.config)
    if not config.active:
        raise UserError(f"{args.config}: checkpointing is disabled or has no strategies: nothing to replay")
    _check_metrics_exist(config, history, args.history)
    check_metric_values(lines, list(_watched(config)), args.history)
    _check_triggers(config, lines, args.history)
    try:
        result = replay(history, config)
    except Stopped as stopped:
        raise UserError(f"{args.history}: line {lines[stopped.index][0]}: the run would stop here: {stopped}") from None
    saves = [_save_record(place, action) for place, actions in zip(result.positions, result.actions)
             for action in actions if type(action) is not Skip]
    skips = _skip_records(result)
    if args.plot:
        _write_plot(result, config, args.plot, args.history)
    if args.json:
        places = result.positions
        steps = [p.global_step for p in places if p.global_step is not None]
        print(json.dumps({
            "rows": len(places), "decisions": sum(p.decision for p in places), "epochs": len({p.epoch for p in places}),
            "steps": [min(steps), max(steps)] if steps else None,
            "saves": saves, "skips": skips,
            "bests": {s.filename: _best_record(s, best) for s, best in zip(config.strategies, result.final.bests)},
        }, indent=2))
    else:
        _print_text(result, config, args.history, saves, skips)
    if args.plot:
        print(f"plot written to {printable(args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 0


# --- the plot ------------------------------------------------------------------------------

#: Okabe-Ito: distinguishable with every kind of colour blindness, and in greyscale by marker.
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def _label(text: str) -> str:
    """A plot label: printable, and never matplotlib mathtext (a ``$`` in a metric name is a dollar)."""
    return printable(text, limit=80).replace("$", r"\$")


def _x(place: Position, steps: bool) -> float:
    return place.global_step if steps else place.epoch


def _series(result: Replay, name: str, steps: bool) -> tuple[list, list]:
    """The finite values of metric ``name`` and their x, over the rows that have one."""
    xs, ys = [], []
    for row, place in zip(result.rows, result.positions):
        raw = lookup(row, name)
        if raw is MISSING or (steps and place.global_step is None):
            continue
        value = metric_value(name, raw)
        if math.isfinite(value):
            xs.append(_x(place, steps))
            ys.append(value)
    return xs, ys


def _saves_of(result: Replay, index: int) -> list[tuple[Position, object]]:
    strategy = result.final.config.strategies[index]
    return [(place, action) for place, actions in zip(result.positions, result.actions) for action in actions
            if type(action) in (Save, Enter, Periodic) and action.strategy == strategy]


def _best_so_far(result: Replay, index: int, steps: bool, end: float) -> tuple[list, list]:
    """The best value of strategy ``index`` after each of its saves, as a step line to ``end``."""
    xs, ys = [], []
    for place, action in _saves_of(result, index):
        if type(action) is Save:
            xs.append(_x(place, steps))
            ys.append(action.value)
    if xs:
        xs.append(max(end, xs[-1]))
        ys.append(ys[-1])
    return xs, ys


def _marks(axis, points: list, kept: Sequence[bool], colour: str, marker: str, size: float = 34) -> None:
    """Saves whose file is there at the end filled; the others hollow (replaced or deleted later)."""
    for keep, face in ((True, colour), (False, "white")):
        chosen = [point for point, k in zip(points, kept) if k is keep]
        if chosen:
            xs, ys = zip(*chosen)
            axis.scatter(xs, ys, s=size, marker=marker, facecolors=face, edgecolors=colour, linewidths=1.3,
                         zorder=4 if keep else 3)


def _strategy_handles(strategies: list[tuple[int, Strategy]], curve: str) -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.45", linewidth=1.1, marker=".", markersize=3, label=curve)]
    for index, strategy in strategies:
        kind = strategy.mode if strategy.top_k == 1 else f"{strategy.mode}, top {strategy.top_k}"
        handles.append(Line2D([], [], color=_COLOURS[index % len(_COLOURS)], linewidth=1.6,
                              marker=_MARKERS[index % len(_MARKERS)], markersize=5,
                              label=_label(f"{strategy.filename}: best so far ({kind})")))
    return handles


def _fate_handles() -> list:
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], linestyle="none", marker="o", markersize=5.5, markerfacecolor="0.35", markeredgecolor="0.35",
               label="save whose file is kept at the end"),
        Line2D([], [], linestyle="none", marker="o", markersize=5.5, markerfacecolor="white", markeredgecolor="0.35",
               label="save replaced or deleted later (overwrite, keep, top_k)"),
    ]


def _epoch_spans(result: Replay) -> list[tuple[int, float, float]]:
    """``(epoch, first, last)`` global step logged in each epoch, in order, for a step axis."""
    spans: dict[int, list[int]] = {}
    for place in result.positions:
        if place.global_step is not None and isinstance(place.epoch, int):
            span = spans.setdefault(place.epoch, [place.global_step, place.global_step])
            span[0], span[1] = min(span[0], place.global_step), max(span[1], place.global_step)
    return [(epoch, first, last) for epoch, (first, last) in sorted(spans.items())]


def _mark_epochs(axes: list, spans: list[tuple[int, float, float]]) -> None:
    """Dotted lines between epochs on every panel; the epoch numbers on top, each in the middle of its steps."""
    bounds = [(last + first) / 2 for (_, _, last), (_, first, _) in zip(spans, spans[1:])]
    for axis in axes:
        for x in bounds:
            axis.axvline(x, color="0.8", linewidth=0.7, linestyle=(0, (2, 2)), zorder=1)
    edges = [spans[0][1], *bounds, spans[-1][2]]
    top = axes[0].secondary_xaxis("top")
    top.set_xticks([(a + b) / 2 for a, b in zip(edges, edges[1:])], [str(epoch) for epoch, _, _ in spans])
    top.tick_params(labelsize=7, length=0, colors="0.4")
    top.set_xlabel("epoch", fontsize=8, color="0.4")


def plot_replay(result: Replay, config: Config, source: str | None = None):
    """A matplotlib Figure of a replay: a panel per watched metric (its values over the rows
    that have one, connected; each strategy's best so far; a marker at each save, hollow when
    a later save replaces or deletes its file), and a timeline of the periodic saves.

    The x axis is the global step when every decision has one, else the epoch.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'ckptfn[plot]'") from None

    metrics = _watched(config)
    periodic = [(i, s) for i, s in enumerate(config.strategies) if type(s) is Every]
    if len(metrics) > MAX_PANELS:
        raise UserError(f"--plot: the config watches {len(metrics)} metrics; a plot has at most {MAX_PANELS} panels")
    steps = result.has_steps
    xlabel = ("global step" if result.step_key == "global_step" else "step") if steps else "epoch"
    heights = [2.6] * len(metrics) + ([0.45 + 0.4 * len(periodic)] if periodic else [])
    with plt.rc_context({"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 7.5,
                         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
                         "axes.spines.right": False}):
        figure, axes = plt.subplots(len(heights), 1, figsize=(7.0, sum(heights) + 1.0), sharex=True, squeeze=False,
                                    gridspec_kw={"height_ratios": heights}, layout="constrained")
        axes = list(axes[:, 0])
        ends = [_x(p, steps) for p in result.positions if not steps or p.global_step is not None]
        end = max(ends, default=0)
        for axis, name in zip(axes, metrics):
            xs, ys = _series(result, name, steps)
            axis.plot(xs, ys, color="0.45", linewidth=1.1, marker=".", markersize=3, zorder=2)
            watching = [(i, s) for i, s in enumerate(config.strategies) if type(s) is Strategy and s.metric_name == name]
            for order, (index, strategy) in enumerate(watching):
                colour, marker = _COLOURS[index % len(_COLOURS)], _MARKERS[index % len(_MARKERS)]
                bx, by = _best_so_far(result, index, steps, end)
                axis.plot(bx, by, color=colour, linewidth=1.6, drawstyle="steps-post", alpha=0.9, zorder=2.5)
                saved = _saves_of(result, index)
                kept = kept_at_end(strategy, [a for _, a in saved], result.final.bests[index])
                size = 60 * 0.55**order  # strategies with the same saves stay visible, nested
                _marks(axis, [(_x(p, steps), a.value) for p, a in saved], kept, colour, marker, size)
            axis.set_ylabel(_label(name))
            axis.grid(True, color="0.92", linewidth=0.6)
            axis.legend(handles=_strategy_handles(watching, _label(name)), loc="best", framealpha=0.85,
                        edgecolor="0.85")
        if periodic:
            axis = axes[-1]
            for row, (index, every) in enumerate(periodic):
                saved = _saves_of(result, index)
                kept = kept_at_end(every, [a for _, a in saved], None)
                axis.axhline(row, color="0.88", linewidth=0.8, zorder=1)
                _marks(axis, [(_x(p, steps), row) for p, _ in saved], kept, _COLOURS[index % len(_COLOURS)], "o")
            axis.set_yticks(range(len(periodic)))
            axis.set_yticklabels([_label(f"{e.filename} ({e.describe()})") for _, e in periodic])
            axis.set_ylim(len(periodic) - 0.5, -0.5)
            axis.spines["left"].set_visible(False)
            axis.tick_params(axis="y", length=0)
            axis.set_title("periodic saves", loc="left", fontsize=8, color="0.35")
        spans = _epoch_spans(result) if steps else []
        if len(spans) > 1:
            _mark_epochs(axes, spans)
        axes[-1].set_xlabel(xlabel)
        axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        figure.legend(handles=_fate_handles(), loc="outside lower center", ncols=2, frameon=False)
        decisions = sum(p.decision for p in result.positions)
        if source is not None:
            figure.suptitle(_label(f"ckptfn replay of {source}: {_plural(decisions, 'decision')}, "
                                   f"{_plural(len(result.rows), 'row')}"), fontsize=9, x=0.02, ha="left")
    return figure


def _write_plot(result: Replay, config: Config, out: str, source: str) -> None:
    """Draw and write the plot (before anything is printed, so a bad --plot is a clean error)."""
    figure = plot_replay(result, config, source)
    try:
        figure.savefig(out, dpi=150)
    except ValueError as error:  # an unknown image format (raised before the file is opened)
        raise UserError(f"--plot {out}: {_first_line(error)}") from None
    except OSError as error:  # a missing directory, a directory at that name, no permission
        raise UserError(f"--plot {out}: cannot write the plot ({_first_line(error)})") from None
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


def _first_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
