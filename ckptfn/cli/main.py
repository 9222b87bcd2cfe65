"""The ``ckptfn`` command line: ``demo``, ``inspect``, ``verify`` and ``replay`` (and ``--version``).

User mistakes (missing files, bad CSV, invalid configs) print one line to stderr
and exit with status 2; nothing here writes outside the paths it is given. Each
command lives in its own module (``inspect``, ``replay``); this one holds the demo
and the parser.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence

from ckptfn.cli.export import add_export
from ckptfn.cli.errors import UserError
from ckptfn.cli.history import HistoryError
from ckptfn.cli.inspect import cmd_inspect, format_table, inspect_rows, list_checkpoints
from ckptfn.cli.replay import cmd_replay
from ckptfn.cli.verify import cmd_verify
from ckptfn.core.errors import CheckpointError, ConfigError
from ckptfn.core.metadata import flatten_metrics
from ckptfn.io.objectstore import is_remote

__all__ = ["main"]

DEMO_CONFIG = [
    {"metric_name": "val_loss", "mode": "min", "filename": "best_loss.pt"},
    {"metric_name": "loss_components.concordance", "mode": "min", "filename": "best_concordance.pt"},
    {"metric_name": "val_residual_spearman", "mode": "max", "filename": "best_corr.pt", "overwrite": False,
     "min_delta": 0.02},
]


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
    if args.output_dir is not None and is_remote(args.output_dir):  # never a local "s3:" directory made of a URL
        raise UserError(f"--output-dir: the demo writes to a local directory, not to {args.output_dir}")
    if args.output_dir is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        output = pathlib.Path("ckpt-demo") / f"run-{stamp}"
    else:
        output = pathlib.Path(args.output_dir)
    epochs = f"{args.epochs} epoch" + ("" if args.epochs == 1 else "s")
    print(f"ckptfn demo: training a tiny regression model for {epochs} (seed {args.seed})")
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
    listing = list_checkpoints([str(output)])
    print(format_table(inspect_rows(listing.paths), skipped=listing.skipped))
    return 0


# --- entry point -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr and exit status 2, like every other error."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ckptfn",
        description="Best-checkpoint selection for PyTorch: demo, inspect checkpoints, replay a metric history.",
    )
    from ckptfn._version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="train a tiny model with three strategies and show what was saved",
                               description="Train the reference model on synthetic data with three strategies "
                               "(total loss, a loss component, a correlation in max mode), print which files were "
                               "saved when, then the inspect table.")
    demo.add_argument("--output-dir", help="where checkpoints go (default: a new ckpt-demo/run-<time>/)")
    demo.add_argument("--epochs", type=int, default=30, help="number of epochs (default: 30)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(run=cmd_demo)

    inspect = commands.add_parser("inspect", help="list checkpoints: epoch, step, strategies, values, timestamp, size",
                                  description="One row per checkpoint name; the names of one snapshot (hard links) "
                                  "together, its size once, the total at the end. A directory lists its .pt, .pth, "
                                  ".ckpt files, .dcp trees and any file with ckptfn metadata (archived versions "
                                  "marked), and counts the rest. Plain Lightning checkpoints show their epoch and "
                                  "step. Reads metadata only, so large checkpoints list instantly.")
    inspect.add_argument("paths", nargs="+", metavar="PATH",
                         help="checkpoint files or directories (local, or object-store URLs: s3://bucket/run)")
    inspect.add_argument("--wide", action="store_true", help="also the other metrics each snapshot recorded")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=cmd_inspect)

    replay_cmd = commands.add_parser("replay", help="dry-run a checkpoint config over a logged metric history",
                                     description="Which epochs (and steps) would have saved which file, and the "
                                     "final bests, without any model. HISTORY is CSV (metric-name columns, empty "
                                     "cells = missing, optional epoch and step or global_step columns; a Lightning "
                                     "CSVLogger metrics.csv as it is) or JSON Lines; a row with no watched metric is "
                                     "a training position, not a decision. CONFIG is YAML or JSON in the "
                                     "Config.from_mapping format.")
    replay_cmd.add_argument("history", metavar="HISTORY", help="metric history (.csv or .jsonl)")
    replay_cmd.add_argument("--config", required=True, metavar="CONFIG", help="checkpoint config (.yaml or .json)")
    replay_cmd.add_argument("--plot", metavar="OUT.png", help="write a PNG: each watched metric, its best so far and the saves; "
                            "the periodic saves on a timeline")
    replay_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    replay_cmd.set_defaults(run=cmd_replay)

    verify = commands.add_parser("verify", help="check that checkpoints are intact: every record's CRC32, and they load",
                                 description="Read every byte of each checkpoint (files, directories, .dcp trees) and "
                                 "compare each zip record's CRC32 (torch writes them but never checks them), then load it "
                                 "with weights_only=True, in bounded memory. Exit status 0 only when all are intact, "
                                 "1 when any is damaged.")
    verify.add_argument("paths", nargs="+", metavar="PATH",
                        help="checkpoint files, sharded trees or directories (local, or object-store URLs)")
    verify.add_argument("--structure", action="store_true",
                        help="cheap checks only: zip directory and metadata, no data read")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(run=cmd_verify)
    add_export(commands)
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
