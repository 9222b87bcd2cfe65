"""Reading a logged metric history (CSV or JSON Lines) and a checkpoint config file.

Every problem is a ``HistoryError`` (a ``ValueError``) naming the file, the line
and the column or key, so the command line can print it as one clear line.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re

import yaml

__all__ = ["HistoryError", "load_config_file", "load_history"]


class HistoryError(ValueError):
    """A history or config file cannot be read as documented."""


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise HistoryError(f"{where}: {text!r} is not a number") from None


def _read_csv(path: pathlib.Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if not header or not any(name.strip() for name in header):
            raise HistoryError(f"{path}: empty CSV (expected a header row of metric names)")
        names = [name.strip() for name in header]
        for name in names:
            if not name:
                raise HistoryError(f"{path}: line 1: a column has no name")
            if names.count(name) > 1:
                raise HistoryError(f"{path}: line 1: column {name!r} appears twice")
        rows = []
        for row in reader:
            line = reader.line_num
            if not row:  # a blank line; a row of empty cells is an epoch with every metric missing
                continue
            if len(row) != len(names):
                raise HistoryError(f"{path}: line {line}: {len(row)} cells for {len(names)} columns")
            rows.append(
                {
                    name: _number(cell.strip(), f"{path}: line {line}, column {name!r}")
                    for name, cell in zip(names, row)
                    if cell.strip()
                }
            )
    return rows


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise HistoryError(f"{path}: line {line_number}: invalid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise HistoryError(f"{path}: line {line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_history(path: str | os.PathLike) -> list[dict]:
    """The epochs of a metric history: CSV (a header of metric names; empty cells are missing)
    or JSON Lines (one metrics object per line, nested allowed), chosen by extension."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise HistoryError(f"{path}: no such history file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _read_jsonl(path)
    raise HistoryError(f"{path}: unknown history format {suffix or '(no extension)'!r}; use .csv or .jsonl")


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


def load_config_file(path: str | os.PathLike) -> object:
    """The plain data of a YAML or JSON checkpoint config; a top-level ``checkpointing`` key is unwrapped."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise HistoryError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except json.JSONDecodeError as error:
        raise HistoryError(f"{path}: invalid JSON: line {error.lineno}: {error.msg}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise HistoryError(f"{path}: invalid YAML: {where}{problem}") from None
    if isinstance(data, dict) and "checkpointing" in data:
        data = data["checkpointing"]
    return data

