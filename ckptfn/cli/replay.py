"""``ckptfn replay``: dry-run a checkpoint config over a logged metric history (``ckptfn.scan``)."""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from collections.abc import Mapping, Sequence

from ckptfn.cli.errors import UserError, printable
from ckptfn.cli.history import check_metric_values, load_config_file, read_history
from ckptfn.core.actions import Periodic, Save
from ckptfn.core.config import Config
from ckptfn.core.errors import ConfigError
from ckptfn.core.metadata import flatten_metrics
from ckptfn.core.step import init, scan
from ckptfn.core.strategy import Strategy

__all__ = ["MAX_PANELS", "cmd_replay", "plot_replay", "replay"]

#: The most metrics ``--plot`` draws (one panel each).
MAX_PANELS = 24


def _metric_names(history: Sequence[Mapping]) -> set[str]:
    names: set[str] = set()
    for row in history:
        names.update(flatten_metrics(row))
        names.update(key for key in row if isinstance(key, str))
    return names


def _row_epoch(row: Mapping, index: int) -> object:
    epoch = row.get("epoch", index)
    return int(epoch) if isinstance(epoch, float) and epoch.is_integer() else epoch


def replay(history: Sequence[Mapping], config: Config) -> tuple[object, list[tuple[int, tuple]]]:
    """Fold ``step`` over a history (``ckptfn.scan``): the final state and ``(epoch, actions)`` per row.

    A row's ``epoch`` entry, if present, is its epoch number; otherwise rows count 0, 1, 2, ...
    """
    epochs = [_row_epoch(row, index) for index, row in enumerate(history)]
    rows = [{key: value for key, value in row.items() if key != "epoch"} for row in history]
    final, per_row = scan(init(config), rows, epochs)
    return final, list(zip(epochs, per_row))


_LISTED = 20  # metric names an error lists before "and N more"


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


def _label(text: str) -> str:
    """A plot label: printable, and never matplotlib mathtext (a ``$`` in a metric name is a dollar)."""
    return printable(text, limit=80).replace("$", r"\$")


def plot_replay(history: Sequence[Mapping], per_row, config: Config):
    """A matplotlib Figure: one panel per monitored metric, its curve, a marker at every save."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'ckptfn[plot]'") from None
    from ckptfn.core.metrics import MISSING, lookup, metric_value

    metrics = list(dict.fromkeys(s.metric_name for s in config.strategies if isinstance(s, Strategy)))
    if not metrics:
        raise UserError("--plot: the config watches no metric (only periodic saves): nothing to plot")
    if len(metrics) > MAX_PANELS:
        raise UserError(f"--plot: the config watches {len(metrics)} metrics; a plot has at most {MAX_PANELS} panels")
    figure, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.6 * len(metrics)), squeeze=False, sharex=True)
    epochs = [epoch for epoch, _ in per_row]
    for axis, name in zip(axes[:, 0], metrics):
        values = []
        for row in history:
            raw = lookup(row, name)
            values.append(math.nan if raw is MISSING else metric_value(name, raw))
        axis.plot(epochs, values, color="0.35", linewidth=1.2, label=_label(name))
        for strategy in (s for s in config.strategies if s.metric_name == name):
            saves = [a for _, actions in per_row for a in actions if isinstance(a, Save) and a.strategy == strategy]
            axis.scatter([a.epoch for a in saves], [a.value for a in saves], zorder=3, s=28,
                         label=_label(f"{strategy.filename} ({strategy.mode})"))
        axis.set_ylabel(_label(name))
        axis.legend(loc="best", fontsize="small")
    axes[-1, 0].set_xlabel("epoch")
    figure.tight_layout()
    return figure


def _save_record(epoch: int, action: Save | Periodic) -> dict:
    if isinstance(action, Periodic):
        return {"epoch": epoch, "filename": action.filename, "every_n_epochs": action.strategy.n_epochs}
    return {"epoch": epoch, "filename": action.filename, "metric_name": action.strategy.metric_name,
            "value": action.value, "previous": action.previous}


def _best_record(strategy: object, best: object) -> dict:
    if isinstance(strategy, Strategy):
        return {"metric_name": strategy.metric_name, "mode": strategy.mode, "value": best.value, "epoch": best.epoch}
    return {"every_n_epochs": strategy.n_epochs, "epoch": best.epoch}


def _load_config(path: str) -> Config:
    data = load_config_file(path)
    try:
        return Config.from_mapping(data)
    except (ConfigError, TypeError, ValueError, OverflowError, RecursionError) as error:  # odd data is the user's
        raise UserError(f"{path}: {error}") from None


def cmd_replay(args: argparse.Namespace) -> int:
    lines = read_history(args.history)
    history = [row for _, row in lines]
    config = _load_config(args.config)
    if not config.active:
        raise UserError(f"{args.config}: checkpointing is disabled or has no strategies: nothing to replay")
    _check_metrics_exist(config, history, args.history)
    check_metric_values(lines, [s.metric_name for s in config.strategies if isinstance(s, Strategy)], args.history)
    final, per_row = replay(history, config)
    saves = [_save_record(epoch, action) for epoch, actions in per_row for action in actions
             if isinstance(action, (Save, Periodic))]
    bests = {strategy.filename: _best_record(strategy, best) for strategy, best in zip(config.strategies, final.bests)}
    if args.plot:
        _write_plot(history, per_row, config, args.plot)
    if args.json:
        print(json.dumps({"saves": saves, "bests": bests}, indent=2))
    else:
        print(f"replayed {len(history)} epochs of {printable(args.history)} with {len(config.strategies)} strategies")
        for save in saves:
            if "every_n_epochs" in save:
                what = f"every {save['every_n_epochs']} epochs"
            else:
                was = "none" if save["previous"] is None else f"{save['previous']:.6g}"
                what = f"{printable(save['metric_name'])} {save['value']:.6g} (was {was})"
            print(f"epoch {save['epoch']:>4}: {printable(save['filename']):<24} {what}")
        print("final bests:")
        for filename, best in bests.items():
            if "every_n_epochs" in best:
                last = "never saved" if best["epoch"] is None else f"last saved at epoch {best['epoch']}"
                print(f"  {printable(filename):<24} every {best['every_n_epochs']} epochs: {last}")
                continue
            value = "never saved" if best["value"] is None else f"{best['value']:.6g} at epoch {best['epoch']}"
            print(f"  {printable(filename):<24} {printable(best['metric_name'])} ({best['mode']}): {value}")
    if args.plot:
        print(f"plot written to {printable(args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _write_plot(history: Sequence[Mapping], per_row, config: Config, out: str) -> None:
    """Draw and write the plot (before anything is printed, so a bad --plot is a clean error)."""
    figure = plot_replay(history, per_row, config)
    try:
        figure.savefig(out, dpi=100)
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
