"""``ckptfn inspect``: one row per checkpoint (file or sharded directory), from its metadata only.

A file that cannot be read gets a row saying why; metadata of unexpected types
(``saves: null``, an int timestamp, a value of ``10**400``) gets a row showing what
is readable, with the rest marked ``?`` and listed under "odd metadata". Every
string from a file is printed escaped (``printable``): no control character or ANSI
escape from a checkpoint reaches the terminal. ``--json`` output is strict JSON:
non-finite numbers and values of unexpected types are null.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

from ckptfn.cli.errors import UserError, described, human_size, printable
from ckptfn.core.errors import CheckpointError
from ckptfn.core.naming import DCP_SUFFIX, archived_of
from ckptfn.io.read import read_metadata

__all__ = ["cmd_inspect", "files_to_inspect", "format_table", "inspect_row"]

_ENTRY_KEYS = ("metric_name", "mode", "every_n_epochs", "filename", "value", "previous")
_MAX_EPOCH = 2**63
_NOTES = 5  # odd fields a row lists before "and N more"
_DESCRIBED = 8  # saves the "chosen by" cell describes before "N more"



def _json_number(value: object) -> object:
    return value if not isinstance(value, float) or math.isfinite(value) else None


_MAX_ENTRIES = 100_000  # the most entries a directory's size is summed over (a link to / must not walk it all)


def _disk_size(path: pathlib.Path) -> int | None:
    """A file's size, or the total size of the files in a (sharded checkpoint) directory, not
    following links below it; None past ``_MAX_ENTRIES`` entries."""
    if not path.is_dir():
        return path.stat().st_size
    total, seen, pending = 0, 0, [path]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if seen > _MAX_ENTRIES:
                        return None
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(pathlib.Path(entry.path))
                        elif entry.is_file():
                            total += entry.stat().st_size
                    except OSError:  # a link loop, a file gone meanwhile
                        continue
        except OSError:
            continue
    return total


def _real(value: object) -> float | int | None:
    """A metadata number as JSON can hold it: ints up to 2**53 as they are, others as floats; None
    for what is not a real number or is not finite (``10**400``, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        if abs(value) <= 2**53:
            return value
        try:
            value = float(value)
        except OverflowError:
            return None
    return value if math.isfinite(value) else None


def _odd(notes: list[str], key: str, expected: str, value: object) -> None:
    notes.append(f"{key}: expected {expected}, got {described(value, limit=40)}")


def _entry(entry: Mapping, index: int, notes: list[str]) -> dict:
    """One ``saves`` entry with every field of the expected type (others null, and noted)."""
    plain: dict = {}
    for key in _ENTRY_KEYS:
        if key not in entry:
            continue
        value, where = entry[key], f"saves[{index}].{key}"
        if key in ("metric_name", "mode", "filename"):
            good = value if isinstance(value, str) else None
            expected = "a str"
        elif key == "every_n_epochs":
            ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value < _MAX_EPOCH
            good, expected = (value if ok else None), "an int >= 1"
        elif value is None or isinstance(value, float):  # value, previous: NaN/inf are null, as before
            good, expected = _real(value), ""
        else:
            good, expected = _real(value), "a number (a float)"
        if good is None and expected and value is not None:
            _odd(notes, where, expected, value)
        plain[key] = good
    return plain


def inspect_row(path: pathlib.Path) -> dict:
    """What one file is: its epoch, the strategies that chose it, timestamp, size; or why it is unreadable.

    ``odd`` lists the metadata fields of unexpected types (shown as null / ``?``).
    """
    row = {"path": str(path), "file": path.name, "size": None, "epoch": None, "timestamp": None,
           "archived": False, "saves": [], "error": None, "odd": []}
    try:
        row["size"] = _disk_size(path)
        metadata = read_metadata(path)
    except CheckpointError as error:
        row["error"] = str(error).replace(f"{path}: ", "", 1)
        return row
    except OSError as error:
        row["error"] = f"cannot be read ({error.strerror or type(error).__name__})"
        return row
    except Exception as error:  # noqa: BLE001 - one damaged file is one row, never the end of the listing
        first = next((line for line in str(error).splitlines() if line.strip()), "")
        row["error"] = f"cannot be read ({type(error).__name__}{': ' + first[:200] if first else ''})"
        return row
    notes: list[str] = []
    if not isinstance(metadata, Mapping):  # read_metadata always returns a mapping; be safe anyway
        row["error"] = f"metadata is a {type(metadata).__name__}, not a mapping"
        return row
    epoch = metadata.get("epoch")
    if isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch < _MAX_EPOCH:
        row["epoch"] = epoch
    elif epoch is not None:
        _odd(notes, "epoch", "an int >= 0", epoch)
    timestamp = metadata.get("timestamp")
    if isinstance(timestamp, str):
        row["timestamp"] = timestamp
    elif timestamp is not None:
        _odd(notes, "timestamp", "an ISO date string", timestamp)
    saves = metadata.get("saves", [])
    if not isinstance(saves, list):
        _odd(notes, "saves", "a list", saves)
        saves = []
    entries, strange = [], 0
    for index, entry in enumerate(saves):
        if isinstance(entry, Mapping):
            entries.append(_entry(entry, index, notes))
        else:
            strange += 1
            if strange == 1:
                _odd(notes, f"saves[{index}]", "a mapping", entry)
    if strange > 1:
        notes.append(f"saves: {strange} entries are not mappings")
    row["archived"] = any(isinstance(e.get("filename"), str) and archived_of(path.name, e["filename"]) for e in entries)
    row["saves"] = entries
    row["odd"] = notes if len(notes) <= _NOTES else [*notes[:_NOTES], f"... and {len(notes) - _NOTES} more"]
    return row


def _describe_entry(entry: Mapping) -> str:
    if entry.get("every_n_epochs") is not None:
        return f"every {entry['every_n_epochs']} epochs"
    name = "?" if entry.get("metric_name") is None else printable(entry["metric_name"], limit=80)
    value = entry.get("value")
    return f"{name}={value:.4g}" if isinstance(value, (int, float)) else name


def _listed(directory: pathlib.Path) -> list[pathlib.Path]:
    """The non-hidden regular files and sharded checkpoint directories (``*.dcp``) directly inside
    ``directory``, sorted. An entry that cannot be examined (a symlink loop) is left out, alone."""
    try:
        with os.scandir(directory) as entries:
            entries = list(entries)
    except OSError as error:
        raise UserError(f"{directory}: cannot list the directory ({error.strerror or error})") from None
    found = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_file() or (entry.name.endswith(DCP_SUFFIX) and entry.is_dir()):
                found.append(directory / entry.name)
        except OSError:  # ELOOP, EACCES: not a file this listing can show
            continue
    return sorted(found)


def files_to_inspect(paths: Sequence[str]) -> list[pathlib.Path]:
    found = []
    for name in paths:
        path = pathlib.Path(name)
        if path.is_dir() and path.suffix != DCP_SUFFIX:
            found += _listed(path)
        elif os.path.lexists(path):  # a broken link or a link loop gets a row saying so
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    return found


def _chosen_by(row: dict) -> str:
    if row["error"]:
        return f"unreadable: {printable(row['error'], limit=300)}"
    saves = row["saves"]
    text = ", ".join(_describe_entry(entry) for entry in saves[:_DESCRIBED]) or "-"
    if len(saves) > _DESCRIBED:
        text += f", ... ({len(saves) - _DESCRIBED} more)"
    if row.get("odd"):
        text += f" (odd metadata: {printable('; '.join(row['odd']), limit=400)})"
    return text


def _odd_field(row: dict, key: str) -> bool:
    return any(note.startswith(key + ":") for note in row.get("odd", ()))


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table, one row per checkpoint; every string from a file is escaped."""
    header = ("file", "epoch", "chosen by (value)", "saved at (UTC)", "size")
    body = [
        (
            printable(row["file"], limit=120) + (" [archived]" if row["archived"] else ""),
            "?" if _odd_field(row, "epoch") else "" if row["epoch"] is None else str(row["epoch"]),
            _chosen_by(row),
            "?" if _odd_field(row, "timestamp") else printable((row["timestamp"] or "")[:19].replace("T", " ")),
            "" if row["size"] is None else human_size(row["size"]),
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
        print(json.dumps(rows, indent=2, allow_nan=False))
    elif rows:
        print(format_table(rows))
    else:
        print("no checkpoint files found")
    return 0
