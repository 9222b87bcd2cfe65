"""The ``ckptfn`` command line: ``demo``, ``inspect`` and ``replay``.

User mistakes (missing files, bad CSV, invalid configs) print one line to stderr
and exit with status 2; nothing here writes outside the paths it is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import json
import logging
import math
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence

from ckptfn.core.config import Config
from ckptfn.core.step import best_values, init, step
from ckptfn.core.errors import CheckpointError, ConfigError
from ckptfn.cli.history import HistoryError, load_config_file, load_history
from ckptfn.core.metadata import flatten_metrics
from ckptfn.core.naming import archived_of
from ckptfn.io.read import read_metadata, visible_files
from ckptfn.core.naming import DCP_SUFFIX
from ckptfn.core.actions import Periodic, Save
from ckptfn.core.strategy import Strategy

__all__ = ["main"]

DEMO_CONFIG = [
    {"metric_name": "val_loss", "mode": "min", "filename": "best_loss.pt"},
    {"metric_name": "loss_components.concordance", "mode": "min", "filename": "best_concordance.pt"},
    {"metric_name": "val_residual_spearman", "mode": "max", "filename": "best_corr.pt", "overwrite": False,
     "min_delta": 0.02},
]


class UserError(Exception):
    """A mistake in the command's input: reported as one line, no traceback."""


# --- inspect -----------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _json_number(value: object) -> object:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _disk_size(path: pathlib.Path) -> int:
    """A file's size, or the total size of the files in a (sharded checkpoint) directory."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def inspect_row(path: pathlib.Path) -> dict:
    """What one file is: its epoch, the strategies that chose it, timestamp, size; or why it is unreadable."""
    row = {"path": str(path), "file": path.name, "size": None, "epoch": None, "timestamp": None,
           "archived": False, "saves": [], "error": None}
    try:
        row["size"] = _disk_size(path)
        metadata = read_metadata(path)
    except (CheckpointError, OSError) as error:
        row["error"] = str(error).replace(f"{path}: ", "", 1)
        return row
    saves = [entry for entry in metadata.get("saves", []) if isinstance(entry, Mapping)]
    row.update(
        epoch=metadata.get("epoch"),
        timestamp=metadata.get("timestamp"),
        archived=any(archived_of(path.name, str(entry.get("filename", ""))) for entry in saves),
        saves=[
            {key: _json_number(entry.get(key)) for key in _ENTRY_KEYS if key in entry}
            for entry in saves
        ],
    )
    return row


_ENTRY_KEYS = ("metric_name", "mode", "every_n_epochs", "filename", "value", "previous")


def _describe_entry(entry: Mapping) -> str:
    if entry.get("every_n_epochs") is not None:
        return f"every {entry['every_n_epochs']} epochs"
    value = entry.get("value")
    return f"{entry.get('metric_name')}={value:.4g}" if isinstance(value, (int, float)) else str(entry.get("metric_name"))


def _sharded_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
    """The sharded checkpoint directories (``*.dcp``) directly inside ``directory``."""
    return sorted(p for p in directory.glob("*" + DCP_SUFFIX) if p.is_dir() and not p.name.startswith("."))


def _files(paths: Sequence[str]) -> list[pathlib.Path]:
    found = []
    for name in paths:
        path = pathlib.Path(name)
        if path.is_dir() and path.suffix != DCP_SUFFIX:
            found += sorted([path / child for child in visible_files(path)] + _sharded_dirs(path))
        elif path.exists():
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    return found


def _chosen_by(row: dict) -> str:
    if row["error"]:
        return f"unreadable: {row['error']}"
    if not row["saves"]:
        return "-"
    return ", ".join(_describe_entry(entry) for entry in row["saves"])


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table, one row per checkpoint."""
    header = ("file", "epoch", "chosen by (value)", "saved at (UTC)", "size")
    body = [
        (
            row["file"] + (" [archived]" if row["archived"] else ""),
            "" if row["epoch"] is None else str(row["epoch"]),
            _chosen_by(row),
            (row["timestamp"] or "")[:19].replace("T", " "),
            "" if row["size"] is None else _size(row["size"]),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    rows = [inspect_row(path) for path in _files(args.paths)]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_table(rows))
    else:
        print("no checkpoint files found")
    return 0


# --- replay ------------------------------------------------------------------------------


def _metric_names(history: Sequence[Mapping]) -> set[str]:
    names: set[str] = set()
    for row in history:
        names.update(flatten_metrics(row))
        names.update(key for key in row if isinstance(key, str))
    return names


def replay(history: Sequence[Mapping], config: Config) -> tuple[object, list[tuple[int, tuple]]]:
    """Fold ``step`` over a history: the final state and ``(epoch, actions)`` per row.

    A row's ``epoch`` entry, if present, is its epoch number; otherwise rows count 0, 1, 2, ...
    """
    state, per_row = init(config), []
    for index, row in enumerate(history):
        epoch = row.get("epoch", index)
        if isinstance(epoch, float) and epoch.is_integer():
            epoch = int(epoch)
        metrics = {key: value for key, value in row.items() if key != "epoch"}
        state, actions = step(state, metrics, epoch)
        per_row.append((epoch, actions))
    return state, per_row


def _check_metrics_exist(config: Config, history: Sequence[Mapping], source: str) -> None:
    present = _metric_names(history)
    for index, strategy in enumerate(config.strategies):
        if isinstance(strategy, Strategy) and strategy.metric_name not in present:
            close = difflib.get_close_matches(strategy.metric_name, sorted(present), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"strategies[{index}].metric_name: {strategy.metric_name!r} never appears in {source}{hint}; "
                f"it has: {', '.join(sorted(present)) or 'no metrics'}"
            )


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
    figure, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.6 * len(metrics)), squeeze=False, sharex=True)
    epochs = [epoch for epoch, _ in per_row]
    for axis, name in zip(axes[:, 0], metrics):
        values = []
        for row in history:
            raw = lookup(row, name)
            values.append(math.nan if raw is MISSING else metric_value(name, raw))
        axis.plot(epochs, values, color="0.35", linewidth=1.2, label=name)
        for strategy in (s for s in config.strategies if s.metric_name == name):
            saves = [a for _, actions in per_row for a in actions if isinstance(a, Save) and a.strategy == strategy]
            axis.scatter([a.epoch for a in saves], [a.value for a in saves], zorder=3, s=28,
                         label=f"{strategy.filename} ({strategy.mode})")
        axis.set_ylabel(name)
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


def cmd_replay(args: argparse.Namespace) -> int:
    history = load_history(args.history)
    try:
        config = Config.from_mapping(load_config_file(args.config))
    except ConfigError as error:
        raise UserError(f"{args.config}: {error}") from None
    if not config.active:
        raise UserError(f"{args.config}: checkpointing is disabled or has no strategies: nothing to replay")
    _check_metrics_exist(config, history, args.history)
    final, per_row = replay(history, config)
    saves = [_save_record(epoch, action) for epoch, actions in per_row for action in actions
             if isinstance(action, (Save, Periodic))]
    bests = {strategy.filename: _best_record(strategy, best) for strategy, best in zip(config.strategies, final.bests)}
    if args.json:
        print(json.dumps({"saves": saves, "bests": bests}, indent=2))
    else:
        print(f"replayed {len(history)} epochs of {args.history} with {len(config.strategies)} strategies")
        for save in saves:
            if "every_n_epochs" in save:
                what = f"every {save['every_n_epochs']} epochs"
            else:
                was = "none" if save["previous"] is None else f"{save['previous']:.6g}"
                what = f"{save['metric_name']} {save['value']:.6g} (was {was})"
            print(f"epoch {save['epoch']:>4}: {save['filename']:<24} {what}")
        print("final bests:")
        for filename, best in bests.items():
            if "every_n_epochs" in best:
                last = "never saved" if best["epoch"] is None else f"last saved at epoch {best['epoch']}"
                print(f"  {filename:<24} every {best['every_n_epochs']} epochs: {last}")
                continue
            value = "never saved" if best["value"] is None else f"{best['value']:.6g} at epoch {best['epoch']}"
            print(f"  {filename:<24} {best['metric_name']} ({best['mode']}): {value}")
    if args.plot:
        figure = plot_replay(history, per_row, config)
        figure.savefig(args.plot, dpi=100)
        print(f"plot written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


# --- demo --------------------------------------------------------------------------------


class _Progress:
    """A progress bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.stream = total, stream or sys.stdout
        self.tty = self.stream.isatty()

    def line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")

    def bar(self, done: int) -> None:
        if self.tty:
            filled = round(30 * done / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] epoch {done}/{self.total}")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def cmd_demo(args: argparse.Namespace) -> int:
    from ckptfn.demo import Trainer

    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if args.output_dir is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        output = pathlib.Path("ckpt-demo") / f"run-{stamp}"
    else:
        output = pathlib.Path(args.output_dir)
    print(f"ckptfn demo: training a tiny regression model for {args.epochs} epochs (seed {args.seed})")
    print(f"checkpoints go to {output}/ with three strategies:")
    for entry in DEMO_CONFIG:
        policy = "keep every version" if entry.get("overwrite") is False else "overwrite"
        delta = f", min_delta {entry['min_delta']}" if entry.get("min_delta") else ""
        print(f"  {entry['filename']:<22} {entry['metric_name']} ({entry['mode']}, {policy}{delta})")
    progress = _Progress(args.epochs)

    def on_epoch(epoch: int, metrics: Mapping, written: list) -> None:
        flat = flatten_metrics(metrics)
        saved = ", ".join(path.name for path in written) or "-"
        progress.line(
            f"epoch {epoch:>3}  val_loss {flat['val_loss']:.4f}  concordance {flat['loss_components.concordance']:.4f}"
            f"  spearman {flat['val_residual_spearman']:+.4f}  saved: {saved}"
        )
        progress.bar(epoch + 1)

    trainer = Trainer(output, DEMO_CONFIG, epochs=args.epochs, seed=args.seed)
    bests = trainer.fit(on_epoch=on_epoch)
    progress.finish()
    print("\nbest values:")
    for filename, value in bests.items():
        print(f"  {filename:<22} {value:.4f}")
    print(f"\n$ ckptfn inspect {output}")
    print(format_table([inspect_row(path) for path in _files([str(output)])]))
    return 0


# --- entry point -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptfn",
        description="Best-checkpoint selection for PyTorch: demo, inspect checkpoints, replay a metric history.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="train a tiny model with three strategies and show what was saved",
                               description="Train the reference model on synthetic data with three strategies "
                               "(total loss, a loss component, a correlation in max mode), print which files were "
                               "saved when, then the inspect table.")
    demo.add_argument("--output-dir", help="where checkpoints go (default: a new ckpt-demo/run-<time>/)")
    demo.add_argument("--epochs", type=int, default=30, help="number of epochs (default: 30)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(run=cmd_demo)

    inspect = commands.add_parser("inspect", help="list checkpoints: epoch, strategies, values, timestamp, size",
                                  description="One row per checkpoint file (directories are listed; archived "
                                  "versions are marked). Reads metadata only, so large checkpoints list instantly.")
    inspect.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint files or directories")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=cmd_inspect)

    replay_cmd = commands.add_parser("replay", help="dry-run a checkpoint config over a logged metric history",
                                     description="Which epochs would have saved which file, and the final bests, "
                                     "without any model. HISTORY is CSV (one row per epoch, metric-name columns, "
                                     "empty cells = missing) or JSON Lines; CONFIG is YAML or JSON in the "
                                     "Config.from_mapping format.")
    replay_cmd.add_argument("history", metavar="HISTORY", help="metric history (.csv or .jsonl)")
    replay_cmd.add_argument("--config", required=True, metavar="CONFIG", help="checkpoint config (.yaml or .json)")
    replay_cmd.add_argument("--plot", metavar="OUT.png", help="write a PNG: one panel per metric with save markers")
    replay_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    replay_cmd.set_defaults(run=cmd_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (UserError, HistoryError, ConfigError, CheckpointError) as error:
        print(f"ckptfn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `ckptfn inspect dir | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
