"""Reading a logged metric history (CSV or JSON Lines) and a checkpoint config file.

Every problem is a ``HistoryError`` (a ``ValueError``) naming the file, the line
and the column or key, so the command line can print it as one clear line. The
readers are bounded: a file is read once, up to a size limit, as UTF-8 (a leading
byte-order mark is dropped); nesting deeper than ``MAX_DEPTH`` levels, YAML whose
aliases would expand past ``MAX_YAML_NODES`` nodes (a "billion laughs" document) or
refer to themselves, FIFOs and devices are refused with one line, never a
``RecursionError``, a hang or a traceback.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence

import yaml

from ckptfn.cli.errors import described, printable, shown
from ckptfn.core.errors import MetricTypeError
from ckptfn.core.metrics import MISSING, lookup, metric_value
from ckptfn.io.fs import open_regular

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_EPOCH",
    "MAX_HISTORY_BYTES",
    "MAX_YAML_NODES",
    "POSITION_KEYS",
    "HistoryError",
    "check_metric_values",
    "load_config_file",
    "load_history",
    "read_history",
]

MAX_HISTORY_BYTES = 256 * 1024**2
MAX_CONFIG_BYTES = 1024**2
#: How deeply a history row or a config may nest mappings and lists.
MAX_DEPTH = 32
#: How many nodes a YAML config may have once its aliases are expanded.
MAX_YAML_NODES = 100_000
#: Epochs are whole numbers 0 <= epoch < MAX_EPOCH.
MAX_EPOCH = 2**63


class HistoryError(ValueError):
    """A history or config file cannot be read as documented. Its text is one printable line."""

    def __str__(self) -> str:
        return printable(super().__str__())


# --- reading a file ------------------------------------------------------------------------


def _read_text(path: pathlib.Path, what: str, limit: int) -> str:
    """The text of a regular file: UTF-8, a byte-order mark dropped, at most ``limit`` bytes."""
    try:
        with open_regular(path) as file:  # a FIFO at the path must not block us: refused, unread
            if os.fstat(file.fileno()).st_size > limit:
                raise HistoryError(f"{path}: larger than {limit // 1024**2} MiB, more than a {what} file may be")
            data = file.read(limit + 1)
    except FileNotFoundError:
        raise HistoryError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise HistoryError(f"{path}: is a directory, not a {what} file") from None
    except OSError as error:
        if error.errno == errno.EINVAL:
            what_not = f"a FIFO, device or socket is never a {what} file"
            raise HistoryError(f"{path}: not a regular file ({what_not})") from None
        raise HistoryError(f"{path}: cannot open the {what} file ({error.strerror or error})") from None
    if len(data) > limit:
        raise HistoryError(f"{path}: larger than {limit // 1024**2} MiB, more than a {what} file may be")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise HistoryError(
            f"{path}: line {line}: byte {column} ({data[error.start:error.start + 1]!r}) is not UTF-8 text"
            + (" (a binary file?)" if b"\x00" in data[:4096] else "")
        ) from None


def _nul(text: str, path: pathlib.Path) -> None:
    index = text.find("\x00")
    if index >= 0:
        raise HistoryError(f"{path}: line {text.count(chr(10), 0, index) + 1}: a NUL character (a binary file?)")


def _too_deep(value: object, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests mappings or lists more than ``limit`` levels (stops looking there)."""
    if limit < 0:
        return True
    if isinstance(value, Mapping):
        return any(_too_deep(item, limit - 1) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_too_deep(item, limit - 1) for item in value)
    return False


# --- the history ---------------------------------------------------------------------------


_INTEGER = re.compile(r"[+-]?[0-9]+")


#: The keys of a history row that give its position, not a metric: whole numbers >= 0.
POSITION_KEYS = ("epoch", "step", "global_step")
_WHAT = {"epoch": "an epoch", "step": "a step", "global_step": "a step"}


def _epoch(value: object, where: str, what: str = "an epoch") -> int | None:
    """A row's epoch (or step): a whole number >= 0 (``2.0`` is 2); None (JSON null, empty cell) when absent.

    >>> _epoch(2.0, "x"), _epoch(None, "x")
    (2, None)
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_EPOCH:
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and 0 <= value < MAX_EPOCH:
        return int(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= MAX_EPOCH:
        raise HistoryError(f"{where}: {shown(value)} is too large for {what} (at most 2**63 - 1)")
    kind = "a string " if isinstance(value, str) else ""
    raise HistoryError(f"{where}: {kind}{shown(value)} is not a whole number >= 0")


def _csv_number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise HistoryError(f"{where}: {shown(text)} is not a number") from None


def _csv_epoch(text: str, where: str, what: str = "an epoch") -> int:
    if _INTEGER.fullmatch(text):
        if len(text) <= 30:
            value: object = int(text)
        else:  # never int() of 5000 digits (and no epoch has 30)
            value = -math.inf if text.startswith("-") else math.inf
    else:
        try:
            value = float(text)
        except ValueError:
            value = text
    if isinstance(value, str):
        raise HistoryError(f"{where}: {shown(text)} is not a whole number >= 0")
    if value >= MAX_EPOCH:  # an int or a float here
        raise HistoryError(f"{where}: {shown(text)} is too large for {what} (at most 2**63 - 1)")
    try:
        return _epoch(value, where, what)
    except HistoryError:
        raise HistoryError(f"{where}: {shown(text)} is not a whole number >= 0") from None


def _read_csv(path: pathlib.Path, text: str) -> list[tuple[int, dict]]:
    _nul(text, path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header or not any(name.strip() for name in header):
            raise HistoryError(f"{path}: empty CSV (expected a header row of metric names)")
        names = [name.strip() for name in header]
        seen: set[str] = set()
        for number, name in enumerate(names, start=1):
            if not name:
                raise HistoryError(f"{path}: line 1: column {number} has no name")
            if name in seen:
                raise HistoryError(f"{path}: line 1: column {name!r} appears twice")
            seen.add(name)
        rows = []
        for row in reader:
            line = reader.line_num
            if not row:  # a blank line; a row of empty cells is an epoch with every metric missing
                continue
            if len(row) != len(names):
                raise HistoryError(f"{path}: line {line}: {len(row)} cells for {len(names)} columns")
            values: dict = {}
            for name, cell in zip(names, row):
                cell = cell.strip()
                if not cell:
                    continue
                where = f"{path}: line {line}: column {name!r}"
                values[name] = _csv_epoch(cell, where, _WHAT[name]) if name in _WHAT else _csv_number(cell, where)
            rows.append((line, values))
    except csv.Error as error:
        raise HistoryError(f"{path}: line {reader.line_num}: not valid CSV ({error})") from None
    return rows


def _without_nulls(row: dict) -> dict:
    """JSON ``null`` is a missing value (pandas writes NaN as null): the key is left out."""
    return {key: (_without_nulls(value) if isinstance(value, dict) else value)
            for key, value in row.items() if value is not None}


def _read_jsonl(path: pathlib.Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            where = f"{path}: line {line_number}"
            raise HistoryError(f"{where}: invalid JSON ({error.msg}, column {error.colno})") from None
        except RecursionError:
            raise HistoryError(f"{path}: line {line_number}: JSON nested too deeply") from None
        except ValueError as error:  # e.g. an integer of more than 4300 digits
            raise HistoryError(f"{path}: line {line_number}: invalid JSON ({str(error).splitlines()[0]})") from None
        if not isinstance(row, dict):
            raise HistoryError(f"{path}: line {line_number}: expected a JSON object, got {type(row).__name__}")
        if _too_deep(row):
            raise HistoryError(f"{path}: line {line_number}: nested more than {MAX_DEPTH} levels deep")
        row = _without_nulls(row)
        for key in POSITION_KEYS:
            if key in row:
                row[key] = _epoch(row[key], f"{path}: line {line_number}: key {key!r}", _WHAT[key])
        rows.append((line_number, row))
    return rows


def read_history(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line number, metrics)`` per row of a metric history, CSV or JSON Lines by extension.

    CSV: a header of metric names, one row per logged line (an epoch, a validation, a
    training step), empty cells missing. JSON Lines: one metrics object per line, nested
    allowed, ``null`` missing. The position columns or keys (``POSITION_KEYS``: ``epoch``,
    ``step``, ``global_step``), where present, must hold whole numbers >= 0 (``2.0`` is 2)
    below ``MAX_EPOCH``.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson", ".json"):
        if not os.path.lexists(path):
            raise HistoryError(f"{path}: no such history file")
        raise HistoryError(f"{path}: unknown history format {suffix or '(no extension)'!r}; use .csv or .jsonl")
    text = _read_text(path, "history", MAX_HISTORY_BYTES)
    return _read_csv(path, text) if suffix == ".csv" else _read_jsonl(path, text)


def load_history(path: str | os.PathLike) -> list[dict]:
    """The epochs of a metric history: CSV (a header of metric names; empty cells are missing)
    or JSON Lines (one metrics object per line, nested allowed), chosen by extension."""
    return [row for _, row in read_history(path)]


def check_metric_values(
    history: Sequence[tuple[int, Mapping]], names: Sequence[str], path: str | os.PathLike
) -> None:
    """Every value the config watches is a number (or missing): else a ``HistoryError`` naming line and key."""
    kind = "column" if pathlib.Path(path).suffix.lower() == ".csv" else "key"
    for line, row in history:
        for name in names:
            value = lookup(row, name)
            if value is MISSING:
                continue
            try:
                metric_value(name, value)
            except MetricTypeError:
                raise HistoryError(
                    f"{path}: line {line}: {kind} {name!r}: expected a number, got {described(value)}"
                ) from None


# --- the config ----------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats, so ``min_delta: 1e-3`` is a number, not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_yaml_graph(node: yaml.Node, path: pathlib.Path) -> None:
    """Refuse a YAML node graph whose aliases expand past ``MAX_YAML_NODES`` nodes, nest past
    ``MAX_DEPTH`` levels or make a cycle (``&a [*a]``); iterative, linear in the distinct nodes."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        current, children_done = stack.pop()
        key = id(current)
        if children_done:
            on_path.discard(key)
            children = _children(current)
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
            if size[key] > MAX_YAML_NODES:
                raise HistoryError(
                    f"{path}: invalid YAML: its aliases expand to more than {MAX_YAML_NODES} nodes (refused)"
                )
            if depth[key] > MAX_DEPTH:
                raise HistoryError(f"{path}: invalid YAML: nested more than {MAX_DEPTH} levels deep")
            continue
        if key in size:
            continue
        if key in on_path:
            mark = current.start_mark
            raise HistoryError(f"{path}: invalid YAML: line {mark.line + 1}: an alias refers to its own anchor")
        on_path.add(key)
        stack.append((current, True))
        stack.extend((child, False) for child in _children(current) if id(child) not in size)


def _load_yaml(text: str, path: pathlib.Path) -> object:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_graph(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_config_file(path: str | os.PathLike) -> object:
    """The plain data of a YAML or JSON checkpoint config; a top-level ``checkpointing`` key is unwrapped."""
    path = pathlib.Path(path)
    text = _read_text(path, "config", MAX_CONFIG_BYTES)
    _nul(text, path)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = _load_yaml(text, path)
    except json.JSONDecodeError as error:
        raise HistoryError(f"{path}: invalid JSON: line {error.lineno}: {error.msg}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise HistoryError(f"{path}: invalid YAML: {where}{problem}") from None
    except RecursionError:
        raise HistoryError(f"{path}: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as error:  # e.g. an int of 5000 digits, a date 2001-13-45
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HistoryError(f"{path}: invalid {kind}: {first}") from None
    if _too_deep(data):
        raise HistoryError(f"{path}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(data, dict) and "checkpointing" in data:
        data = data["checkpointing"]
    return data
