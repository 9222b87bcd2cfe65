"""``ckptfn inspect``: one row per checkpoint name (file or sharded directory), from its metadata only.

Names that are one snapshot (hard links of one file, which is how ckptfn gives a
snapshot several names) are listed together and read once; the size is shown once
per snapshot, and the total counts each snapshot once. A directory lists only what
looks like a checkpoint (``CHECKPOINT_SUFFIXES``, ``.dcp`` trees, and any other file
that holds ckptfn metadata) and says how many other entries it skipped. Plain
Lightning checkpoints show their epoch, global step and ``ModelCheckpoint`` record.

A file that cannot be read gets a row saying why; metadata of unexpected types
(``saves: null``, an int timestamp, a value of ``10**400``) gets a row showing what
is readable, with the rest marked ``?`` and listed under "odd metadata". Every
string from a file is printed escaped (``printable``): no control character or ANSI
escape from a checkpoint reaches the terminal. ``--json`` output is strict JSON:
non-finite numbers and values of unexpected types are null.

A path may be an object-store URL (``s3://bucket/run/best_loss.pt``, ``s3://bucket/run``):
a directory lists its checkpoint-like objects as a local one does (sharded trees are
local only), and each object's metadata is read by range requests (its zip directory
and ``data.pkl``, never the tensor data). In a store every name is an object of its
own (ckptfn gives a snapshot its other names by server-side copies), so each name is
a row with its own size, and the total is what the store holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import attrs

from ckptfn.cli.errors import UserError, described, human_size, printable, remote_kind, store_errors
from ckptfn.core.errors import CheckpointError
from ckptfn.core.metadata import FORMAT, decompose, flatten_metrics
from ckptfn.core.naming import DCP_SUFFIX, archived_of, member_of
from ckptfn.io.fs import open_regular
from ckptfn.io.objectstore import RemotePath, is_remote, join, location, store_for
from ckptfn.io.peek import Peek, lightning_position, metadata_of, peek_file
from ckptfn.io.read import read_metadata, scan_remote

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "Listing",
    "cmd_inspect",
    "describe_entry",
    "files_to_inspect",
    "format_table",
    "inspect_row",
    "inspect_rows",
    "list_checkpoints",
]

#: File name suffixes a directory listing shows (any other file only when it holds ckptfn metadata).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
_ENTRY_KEYS = ("metric_name", "mode", "every_n_epochs", "every_n_steps", "every_seconds", "filename", "value",
               "previous", "epoch", "global_step", "top_k", "name", "kth")
_MAX_COUNT = 2**63
_NOTES = 5  # odd fields a row lists before "and N more"
_DESCRIBED = 8  # saves the "chosen by" cell describes before "N more"
_ZIP_MAGIC = b"PK\x03\x04"
_REASON = 120  # characters of an unreadable file's reason (or a note) the table shows; --json has it all


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


def _identity(path: pathlib.Path) -> tuple[int, int] | None:
    """What makes two names one snapshot: the (device, inode) of the file, or of a sharded
    tree's ``.metadata`` (ckptfn links a tree file by file); None when it cannot be told
    (and for an object in a store: each name is an object of its own)."""
    if is_remote(path):
        return None
    try:
        probe = path / ".metadata" if path.is_dir() else path
        found = os.stat(probe)
    except (OSError, ValueError):
        return None
    return found.st_dev, found.st_ino


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


def _count(value: object, low: int = 0) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and low <= value < _MAX_COUNT else None


def _odd(notes: list[str], key: str, expected: str, value: object) -> None:
    notes.append(f"{key}: expected {expected}, got {described(value, limit=40)}")


def _entry_field(key: str, value: object) -> tuple[object, str]:
    """A ``saves`` entry's field as shown (None when of an unexpected type) and the type expected."""
    if key in ("metric_name", "mode", "filename", "name"):
        return (value if isinstance(value, str) else None), "a str"
    if key in ("every_n_epochs", "every_n_steps", "top_k"):
        return _count(value, 1), "an int >= 1"
    if key in ("epoch", "global_step"):
        return _count(value), "an int >= 0"
    if key == "every_seconds":
        seconds = _real(value)
        return (seconds if seconds is not None and seconds > 0 else None), "a number of seconds > 0"
    if value is None or isinstance(value, float):  # value, previous, kth: NaN/inf are null, as before
        return _real(value), ""
    return _real(value), "a number (a float)"


def _entry(entry: Mapping, index: int, notes: list[str]) -> dict:
    """One ``saves`` entry with every field of the expected type (others null, and noted)."""
    plain: dict = {}
    for key in _ENTRY_KEYS:
        if key not in entry:
            continue
        value = entry[key]
        good, expected = _entry_field(key, value)
        if good is None and expected and value is not None:
            _odd(notes, f"saves[{index}].{key}", expected, value)
        plain[key] = good
    return plain


def _other_metrics(metadata: Mapping) -> dict:
    metrics = metadata.get("metrics")
    if not isinstance(metrics, Mapping):
        return {}
    try:
        flat = flatten_metrics(metrics)
    except Exception:  # noqa: BLE001 - odd metrics are not worth a row's error
        return {}
    return {name: _json_number(value) for name, value in list(flat.items())[:200]}


def _base_row(path: pathlib.Path) -> dict:
    return {"path": str(path), "file": path.name, "size": None, "epoch": None, "global_step": None,
            "timestamp": None, "archived": False, "saves": [], "metrics": {}, "kind": None, "lightning": None,
            "snapshot": None, "error": None, "odd": [], "notes": []}


def _error_text(error: BaseException, path: pathlib.Path) -> str:
    if isinstance(error, CheckpointError):
        return str(error).replace(f"{path}: ", "", 1)
    if isinstance(error, OSError):
        return f"cannot be read ({error.strerror or type(error).__name__})"
    first = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"cannot be read ({type(error).__name__}{': ' + first[:200] if first else ''})"


def _peek(path: pathlib.Path):
    """``peek_file`` of a regular file; None for a directory or when it cannot be peeked
    (``read_metadata`` then says why, in its words)."""
    try:
        return None if path.is_dir() else peek_file(path)
    except Exception:  # noqa: BLE001 - read_metadata gives the documented error for the same file
        return None


def _foreign_note(foreign: Sequence[str]) -> str:
    """What a file's unknown globals mean for loading it (the names escaped and cut)."""
    listed = ", ".join(printable(name, limit=40) for name in foreign[:3])
    more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
    return f"names {listed}{more}: torch's weights_only loader refuses it unless allowed"


def _fill_metadata(row: dict, metadata: Mapping) -> None:
    """``row``'s fields from ckptfn metadata; fields of unexpected types noted in ``row["odd"]``."""
    notes: list[str] = []
    epoch = metadata.get("epoch")
    if _count(epoch) is not None:
        row["epoch"] = epoch
    elif epoch is not None:
        _odd(notes, "epoch", "an int >= 0", epoch)
    step = metadata.get("global_step")
    if _count(step) is not None:
        row["global_step"] = step
    elif step is not None:
        _odd(notes, "global_step", "an int >= 0", step)
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
    row["saves"] = entries
    row["metrics"] = _other_metrics(metadata)
    row["kind"] = "ckptfn"
    row["odd"] = notes if len(notes) <= _NOTES else [*notes[:_NOTES], f"... and {len(notes) - _NOTES} more"]


def _not_ckptfn(row: dict, peeked: Peek) -> dict:
    """``row`` for a file without ckptfn metadata: a plain Lightning checkpoint's position, else why it has none."""
    if peeked.lightning is not None:
        row.update(kind="lightning", lightning=peeked.lightning, epoch=peeked.lightning["epoch"],
                   global_step=peeked.lightning["global_step"])
        row["notes"] = [_foreign_note(peeked.foreign)] if peeked.foreign else []
    else:
        foreign = f"; {_foreign_note(peeked.foreign)}" if peeked.foreign else ""
        row["error"] = f"not a ckptfn checkpoint (a torch.save file without ckptfn metadata{foreign})"
    return row


def peek_remote(url: str) -> Peek:
    """``peek_file`` of an object in a store, by range requests only (the zip's directory and
    ``data.pkl``, vetted as every reader vets a file). A ckptfn checkpoint whose metadata only
    torch's loader can read (another format version, metadata that is not plain data) is a
    ``CheckpointError`` saying so: inspect never downloads a whole object.

    >>> import torch, ckptfn
    >>> state, actions = ckptfn.step(ckptfn.init(ckptfn.Strategy("val_loss")), {"val_loss": 0.5}, 0)
    >>> (url,) = ckptfn.execute(actions, {"w": torch.zeros(4)}, "memory://ckptfn-doc/peek", state=state)
    >>> peeked = peek_remote(url)
    >>> peeked.ckptfn, peeked.metadata["saves"][0]["value"], peeked.lightning
    (True, 0.5, None)
    """
    _, _, scanned, member = scan_remote(url)
    loaded = scanned.loaded
    record = loaded.get("metadata") if type(loaded) is dict else None
    found = record.get("format") if isinstance(record, Mapping) else None
    if not (isinstance(found, str) and found.startswith("ckptfn/")):
        return Peek(False, None, lightning_position(loaded, RemotePath(url).name), tuple(scanned.foreign))
    if found != FORMAT or decompose(loaded) is None:
        raise CheckpointError(f"{url}: written by another version of ckptfn (format {found!r}; this version reads {FORMAT!r})")
    # plain metadata is shown whatever else the pickle names (the foreign names get a note), as peek_file does
    metadata = metadata_of(dataclasses.replace(scanned, foreign=[]), f"{url}: {member}")
    if metadata is None:
        raise CheckpointError(f"{url}: its metadata is not plain data; ckptfn.read_metadata reads it (downloading the object)")
    return Peek(True, metadata, None, tuple(scanned.foreign))


def _read_remote_row(url: RemotePath) -> dict:
    """``_read_row`` of an object in a store: its size, then its metadata by range requests."""
    row = _base_row(url)
    try:
        store, key = store_for(url)
        row["size"] = store.size(key)
        if row["size"] is None:
            raise CheckpointError(f"{url}: no such object (removed meanwhile?)")
        peeked = peek_remote(url)
    except Exception as error:  # noqa: BLE001 - one unreadable object is one row, never the end of the listing
        row["error"] = _error_text(error, url)
        return row
    if not peeked.ckptfn:
        return _not_ckptfn(row, peeked)
    row["notes"] = [_foreign_note(peeked.foreign)] if peeked.foreign else []
    _fill_metadata(row, peeked.metadata)
    return row


def _read_row(path: pathlib.Path) -> dict:
    """The row of one name, from its file alone (``name``-dependent fields are set by the caller)."""
    if is_remote(path):
        return _read_remote_row(RemotePath(path))
    row = _base_row(path)
    try:
        row["size"] = _disk_size(path)
        peeked = _peek(path)
        if peeked is not None and not peeked.ckptfn:
            return _not_ckptfn(row, peeked)
        if peeked is not None and peeked.metadata is not None:
            metadata = peeked.metadata
            row["notes"] = [_foreign_note(peeked.foreign)] if peeked.foreign else []
        else:
            metadata = read_metadata(path)
    except Exception as error:  # noqa: BLE001 - one damaged file is one row, never the end of the listing
        row["error"] = _error_text(error, path)
        return row
    if not isinstance(metadata, Mapping):  # read_metadata always returns a mapping; be safe anyway
        row["error"] = f"metadata is a {type(metadata).__name__}, not a mapping"
        return row
    _fill_metadata(row, metadata)
    return row


def _archived(name: str, entries: Sequence[Mapping]) -> bool:
    return any(isinstance(e.get("filename"), str) and archived_of(name, e["filename"]) for e in entries)


def inspect_row(path: pathlib.Path) -> dict:
    """What one file is: its epoch and step, the strategies that chose it, timestamp, size; or why
    it is unreadable. ``odd`` lists the metadata fields of unexpected types (shown as null / ``?``).
    """
    row = _read_row(path)
    row["archived"] = _archived(path.name, row["saves"])
    return row


def inspect_rows(paths: Sequence[pathlib.Path]) -> list[dict]:
    """The rows of ``paths``, each snapshot read once and its names together: the current
    names before the archived ones, then alphabetically; snapshots in the order of their
    first name. Each row's ``snapshot`` numbers its snapshot from 1."""
    groups: dict[object, list[pathlib.Path]] = {}
    for index, path in enumerate(paths):
        key = _identity(path)
        groups.setdefault(index if key is None else key, []).append(path)
    read = []
    for names in groups.values():
        first = _read_row(names[0])
        order = sorted(names, key=lambda p: (_archived(p.name, first["saves"]), p.name, str(p)))
        read.append((order, first))
    read.sort(key=lambda item: (item[0][0].name, str(item[0][0])))
    rows = []
    for number, (names, first) in enumerate(read, start=1):
        for path in names:
            row = {**first, "path": str(path), "file": path.name, "snapshot": number}
            row["archived"] = _archived(path.name, row["saves"])
            rows.append(row)
    return rows


# --- which entries a directory lists --------------------------------------------------------


@attrs.frozen
class Listing:
    """What to inspect: the checkpoint-like ``paths``, and how many other entries of the
    listed directories were ``skipped``."""

    paths: tuple[pathlib.Path | RemotePath, ...]
    skipped: int = 0


def _holds_ckptfn_metadata(path: pathlib.Path) -> bool:
    """Whether a file that is not named like a checkpoint is one of ckptfn's (a torch zip with ckptfn metadata)."""
    try:
        with open_regular(path) as file:  # a FIFO swapped in must not block us
            if file.read(4) != _ZIP_MAGIC:
                return False
        return peek_file(path).ckptfn
    except Exception:  # noqa: BLE001 - not readable: not shown as a checkpoint
        return False


def _checkpoint_like(directory: pathlib.Path, entry: os.DirEntry) -> bool:
    if entry.name.endswith(DCP_SUFFIX):
        return entry.is_dir()
    if not entry.is_file():
        return False
    if entry.name.lower().endswith(CHECKPOINT_SUFFIXES):
        return True
    return _holds_ckptfn_metadata(directory / entry.name)


def _listed(directory: pathlib.Path) -> tuple[list[pathlib.Path], int]:
    """The checkpoint-like entries directly inside ``directory`` (non-hidden ``.pt``/``.pth``/
    ``.ckpt`` files, ``.dcp`` trees, files with ckptfn metadata), sorted, and how many other
    non-hidden entries there are. An entry that cannot be examined (a symlink loop) is skipped, alone."""
    try:
        with os.scandir(directory) as entries:
            entries = list(entries)
    except OSError as error:
        raise UserError(f"{directory}: cannot list the directory ({error.strerror or error})") from None
    found, skipped = [], 0
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            like = _checkpoint_like(directory, entry)
        except OSError:  # ELOOP, EACCES: not a file this listing can show
            like = False
        if like:
            found.append(directory / entry.name)
        else:
            skipped += 1
    return sorted(found), skipped


def _remote_holds_ckptfn_metadata(url: str) -> bool:
    """``_holds_ckptfn_metadata`` of an object: its first 4 bytes, then (a zip) its ``peek_remote``."""
    try:
        store, key = store_for(url)
        (magic,) = store.read_ranges(key, [(0, 4)])
        return bytes(magic) == _ZIP_MAGIC and peek_remote(url).ckptfn
    except Exception:  # noqa: BLE001 - not readable: not shown as a checkpoint
        return False


def _remote_listed(url: str) -> tuple[list[RemotePath], int]:
    """``_listed`` of a directory in an object store: its non-hidden objects named like a
    checkpoint or holding ckptfn metadata, sorted, and how many other objects it holds."""
    with store_errors(url):
        store, key = store_for(url)
        names = store.names(key)
    found, skipped = [], 0
    for name in names:
        if name.startswith("."):
            continue
        member = RemotePath(join(url, name))
        if name.lower().endswith(CHECKPOINT_SUFFIXES) or _remote_holds_ckptfn_metadata(member):
            found.append(member)
        else:
            skipped += 1
    return sorted(found), skipped


def list_checkpoints(paths: Sequence[str]) -> Listing:
    """The checkpoints to inspect: each path given (a file always gets its row), and the
    checkpoint-like entries of each directory given (a ``.dcp`` tree is one checkpoint).
    A path may be an object-store URL (an object, or a directory of them: ``remote_kind``)."""
    found, skipped = [], 0
    for name in paths:
        if is_remote(name):
            if remote_kind(name) == "object":
                found.append(RemotePath(name))
            else:
                listed, others = _remote_listed(name)
                found += listed
                skipped += others
            continue
        path = location(name)  # a file:// URL as its local path; any other path as it is
        if path.is_dir() and path.suffix != DCP_SUFFIX:
            listed, others = _listed(path)
            found += listed
            skipped += others
        elif os.path.lexists(path):  # a broken link or a link loop gets a row saying so
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    return Listing(tuple(found), skipped)


def files_to_inspect(paths: Sequence[str]) -> list[pathlib.Path]:
    """The checkpoint paths ``list_checkpoints`` finds."""
    return list(list_checkpoints(paths).paths)


# --- the table ------------------------------------------------------------------------------


def _directory_of(path: str) -> str:
    """The directory a row's path is in (a URL's parent stays a URL).

    >>> _directory_of("run/best.pt"), _directory_of("s3://bucket/run/best.pt")
    ('run', 's3://bucket/run')
    """
    return str(location(path).parent) if is_remote(path) else str(pathlib.Path(path).parent)


def _owner(entry: Mapping, names: Sequence[str]) -> str | None:
    """The name (of one snapshot's names) that holds ``entry``'s strategy: its file, an archived
    version of it, or one of its top-k members; None if no name does."""
    filename = entry.get("filename")
    if not isinstance(filename, str):
        return None
    for name in names:
        if name == filename or archived_of(name, filename) or (entry.get("top_k") and member_of(name, filename)):
            return name
    return None


def _ranks(rows: Sequence[dict]) -> dict[tuple[str, str, str], tuple[int, int]]:
    """``(directory, strategy file, name) -> (rank, members listed)`` for the top-k members listed."""
    families: dict[tuple[str, str], list[tuple[float, int, str]]] = {}
    modes: dict[tuple[str, str], str] = {}
    for row in rows:
        directory = _directory_of(row["path"])
        for entry in row["saves"]:
            filename, value = entry.get("filename"), entry.get("value")
            if not entry.get("top_k") or not isinstance(value, (int, float)) or _owner(entry, [row["file"]]) is None:
                continue
            key = (directory, filename)
            modes[key] = entry.get("mode") or "min"
            epoch = entry.get("epoch") if isinstance(entry.get("epoch"), int) else 0
            families.setdefault(key, []).append((value, epoch, row["file"]))
    ranks = {}
    for key, members in families.items():
        sign = 1 if modes[key] == "min" else -1
        members = sorted(set(members), key=lambda m: (sign * m[0], m[1]))
        for rank, (_, _, name) in enumerate(members, start=1):
            ranks[(*key, name)] = (rank, len(members))
    return ranks


def describe_entry(entry: Mapping, rank: tuple[int, int] | None = None) -> str:
    """One strategy that chose a snapshot, in words: ``val_loss=0.25``, ``every 20 steps``,
    ``val_acc=0.9 (top-3 #2)``.

    >>> describe_entry({"every_n_steps": 20}), describe_entry({"every_n_epochs": 1}), describe_entry({"every_seconds": 1800.0})
    ('every 20 steps', 'every 1 epoch', 'every 1800 seconds')
    >>> describe_entry({"metric_name": "val_acc", "value": 0.9, "top_k": 3}, (2, 3))
    'val_acc=0.9 (top-3 #2)'
    """
    for key, unit in (("every_n_epochs", "epoch"), ("every_n_steps", "step"), ("every_seconds", "second")):
        period = entry.get(key)
        if period is not None:
            shown = f"{period:g}" if isinstance(period, float) else str(period)
            return f"every {shown} {unit}" + ("" if period == 1 else "s")
    name = "?" if entry.get("metric_name") is None else printable(entry["metric_name"], limit=80)
    value = entry.get("value")
    text = f"{name}={value:.4g}" if isinstance(value, (int, float)) else name
    if entry.get("top_k"):
        text += f" (top-{entry['top_k']}" + ("" if rank is None else f" #{rank[0]}") + ")"
    return text


def _lightning_text(info: Mapping) -> str:
    """``ModelCheckpoint(monitor=val_loss): best; Lightning 2.6.6``: who chose a plain Lightning file."""
    parts = []
    for record in info.get("checkpoints", ()):
        monitor = "" if record["monitor"] is None else f"monitor={printable(record['monitor'], limit=60)}"
        parts.append(f"ModelCheckpoint({monitor})" + (f": {record['role']}" if record["role"] else ""))
    version = f"Lightning {printable(info.get('version'), limit=20)}"
    return "; ".join([*parts, version])


def _shown_entries(row: dict, group: Sequence[str], listed: set[str], first: bool) -> list[Mapping]:
    """The entries a row shows: those its name holds; on a snapshot's first row also those no
    listed name holds (a single file inspected alone, a name since deleted). An entry whose
    name now holds another snapshot is left out: that strategy has moved on."""
    shown = []
    for entry in row["saves"]:
        owner = _owner(entry, group)
        if owner == row["file"] or (owner is None and first and entry.get("filename") not in listed):
            shown.append(entry)
    return shown


def _chosen_by(row: dict, entries: Sequence[Mapping], ranks: Mapping) -> str:
    if row["error"]:
        return f"unreadable: {printable(row['error'], limit=_REASON)}"
    if row["kind"] == "lightning":
        text = _lightning_text(row["lightning"])
    else:
        directory = _directory_of(row["path"])
        described_ = [describe_entry(e, ranks.get((directory, e.get("filename"), row["file"])))
                      for e in entries[:_DESCRIBED]]
        text = ", ".join(described_) or "-"
        if len(entries) > _DESCRIBED:
            text += f", ... ({len(entries) - _DESCRIBED} more)"
    if row.get("odd"):
        text += f" (odd metadata: {printable('; '.join(row['odd']), limit=400)})"
    if row.get("notes"):
        text += f" (note: {printable('; '.join(row['notes']), limit=_REASON)})"
    return text


def _odd_field(row: dict, key: str) -> bool:
    return any(note.startswith(key + ":") for note in row.get("odd", ()))


def _count_cell(row: dict, key: str) -> str:
    if _odd_field(row, key):
        return "?"
    if row[key] is not None:
        return str(row[key])
    return "-" if row["kind"] is not None else ""


def _metrics_cell(row: dict, entries: Sequence[Mapping]) -> str:
    chosen = {e.get("metric_name") for e in row["saves"]}
    shown = [f"{printable(name, limit=60)}={value:.4g}" for name, value in row["metrics"].items()
             if name not in chosen and isinstance(value, (int, float))]
    return printable(", ".join(shown), limit=200) or "-"


def format_table(rows: Sequence[dict], *, wide: bool = False, skipped: int = 0) -> str:
    """A plain-text table, one row per name; the names of one snapshot together, the later ones
    marked ``=`` with the size shown once; a footer with the total. Every string from a file
    is escaped."""
    header = ["file", "epoch", "step", "chosen by (value)", "saved at (UTC)", "size"]
    if wide:
        header.insert(4, "other metrics")
    ranks = _ranks(rows)
    by_directory: dict[str, set[str]] = {}
    for row in rows:
        by_directory.setdefault(_directory_of(row["path"]), set()).add(row["file"])
    groups: dict[object, list[str]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row.get("snapshot") or -index - 1, []).append(row["file"])
    body, previous = [], None
    for index, row in enumerate(rows):
        key = row.get("snapshot") or -index - 1
        first = key != previous
        previous = key
        listed = by_directory[_directory_of(row["path"])]
        entries = _shown_entries(row, groups[key], listed, first)
        name = printable(row["file"], limit=120) + (" [archived]" if row["archived"] else "")
        if first:
            timestamp = printable((row["timestamp"] or "")[:19].replace("T", " "))
            cells = [name, _count_cell(row, "epoch"), _count_cell(row, "global_step"), _chosen_by(row, entries, ranks),
                     "?" if _odd_field(row, "timestamp") else timestamp,
                     "" if row["size"] is None else human_size(row["size"])]
        else:  # another name of the snapshot above
            directory = _directory_of(row["path"])
            chosen = ", ".join(describe_entry(e, ranks.get((directory, e.get("filename"), row["file"])))
                               for e in entries[:_DESCRIBED])
            cells = [f"= {name}", "", "", chosen or "(same snapshot)", "", ""]
        if wide:
            cells.insert(4, _metrics_cell(row, entries) if first and not row["error"] else "")
        body.append(cells)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    footer = _footer(rows, skipped)
    return "\n".join(lines + ([footer] if footer else []))


def _plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 name``, ``2 names``; ``nouns`` where the plural is not ``noun + "s"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {nouns or noun + 's'}"


def _footer(rows: Sequence[dict], skipped: int) -> str:
    """``5 names, 3 snapshots, 9.1 KiB on disk; 2 other entries skipped`` (nothing for one row alone;
    ``in the store`` when every row is an object in a store)."""
    sizes: dict[object, int | None] = {}
    for index, row in enumerate(rows):
        sizes.setdefault(row.get("snapshot") or -index - 1, row["size"])
    if len(rows) <= 1 and not skipped:
        return ""
    known = [size for size in sizes.values() if size is not None]
    where = "in the store" if all(is_remote(row["path"]) for row in rows) else "on disk"
    text = f"{_plural(len(rows), 'name')}, {_plural(len(sizes), 'snapshot')}, {human_size(sum(known))} {where}"
    if skipped:
        text += f"; {_plural(skipped, 'other entry', 'other entries')} skipped (not checkpoints)"
    return text


def _json_row(row: dict) -> dict:
    return {**row, "metrics": {name: _json_number(value) for name, value in row["metrics"].items()}}


def cmd_inspect(args: argparse.Namespace) -> int:
    listing = list_checkpoints(args.paths)
    rows = inspect_rows(listing.paths)
    if args.json:
        print(json.dumps([_json_row(row) for row in rows], indent=2, allow_nan=False))
    elif rows:
        print(format_table(rows, wide=getattr(args, "wide", False), skipped=listing.skipped))
    else:
        print("no checkpoint files found" + (f" ({_plural(listing.skipped, 'other entry', 'other entries')})"
                                             if listing.skipped else ""))
    return 0
