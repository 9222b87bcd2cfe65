"""``ckptfn inspect``: one row per checkpoint (file or sharded directory), from its metadata only."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections.abc import Mapping, Sequence

from ckptfn.cli.errors import UserError
from ckptfn.core.errors import CheckpointError
from ckptfn.core.naming import DCP_SUFFIX, archived_of
from ckptfn.io.read import read_metadata, visible_files

__all__ = ["cmd_inspect", "files_to_inspect", "format_table", "inspect_row"]


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


def files_to_inspect(paths: Sequence[str]) -> list[pathlib.Path]:
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
    rows = [inspect_row(path) for path in files_to_inspect(args.paths)]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_table(rows))
    else:
        print("no checkpoint files found")
    return 0
