"""The metadata stored beside the payload in every checkpoint file.

Pure: plain data in, plain data out. Everything produced here is made of
str/int/float/bool/None/list/dict, so it loads with ``torch.load(weights_only=True)``
and prints as JSON.

Metadata is bounded, on the way in (``to_plain``, a ``PayloadError``) and on the way
out (``shape_problem``, which the readers turn into a ``CheckpointError``): no
container that holds itself, at most ``MAX_DEPTH`` levels of nesting and at most
``MAX_VALUES`` values counted as a tree (a list shared by two keys counts twice).
So every walk over metadata a reader returned (printing it, ``json.dumps``,
``flatten_metrics``) ends, and ends soon.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from ckptfn.core.actions import Enter, Periodic, Save
from ckptfn.core.errors import MetricTypeError, PayloadError
from ckptfn.core.metrics import element_count, metric_value

__all__ = [
    "FORMAT",
    "LAYOUTS",
    "MAX_DEPTH",
    "MAX_VALUES",
    "RESERVED_KEYS",
    "build_metadata",
    "compose",
    "decompose",
    "entry_for",
    "flatten_metrics",
    "save_entry",
    "shape_problem",
    "to_plain",
]

FORMAT = "ckptfn/1"
RESERVED_KEYS = (
    "format", "epoch", "global_step", "timestamp", "saves", "metrics", "manager_state", "versions", "layout",
)
#: How a file holds its payload: ``nested`` (the default, ``{"state_dict": payload, "metadata": ...}``)
#: or ``flat`` (the payload's own keys beside ``"metadata"``, e.g. a Lightning checkpoint).
LAYOUTS = ("nested", "flat")
#: How deeply metadata may nest dicts and lists (the top-level dict is level 1).
MAX_DEPTH = 100
#: How many values (containers and scalars) metadata may hold, counted as a tree.
MAX_VALUES = 1_000_000

_CONTAINERS = (dict, list, tuple, set, frozenset)


class _Shape(Exception):
    """Raised inside ``shape_problem``'s walk: ``labels`` is the key path, innermost last."""

    def __init__(self, message: str, labels: list) -> None:
        super().__init__(message)
        self.labels = labels


def _label(container: object, key: object) -> str:
    return f"[{key!r}]" if isinstance(container, dict) else f"[{key}]"


def shape_problem(value: object, path: str = "metadata") -> str | None:
    """Why ``value`` is not bounded metadata, located by key path; None if it is.

    Not bounded: a container that holds itself, nesting deeper than ``MAX_DEPTH``,
    or more than ``MAX_VALUES`` values counted as a tree (named at the top-level
    key that holds them). Dicts (keys and values), lists, tuples, sets and
    frozensets are walked; anything else is one value. Each distinct container is
    visited once, so lists that share lists (``L = [L', L']``, 80 levels: 2**80
    values as a tree) are judged in microseconds.

    >>> shape_problem({"a": [1, 2, {"b": None}]}) is None
    True
    >>> looped = {"a": []}
    >>> looped["a"].append(looped)
    >>> shape_problem(looped)
    "metadata['a'][0]: contains itself"
    >>> shared = [0]
    >>> for _ in range(80):
    ...     shared = [shared, shared]
    >>> shape_problem({"epoch": 3, "x": shared})
    "metadata['x']: more than 1000000 values (as a tree: a shared list counts once per place)"
    """
    sizes: dict[int, int] = {}  # id -> values in the tree under a finished container
    active: set[int] = set()  # ids of the containers on the current path

    def walk(item: object, depth: int) -> int:
        if not isinstance(item, _CONTAINERS):
            return 1
        key = id(item)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _Shape("contains itself", [])
        if depth >= MAX_DEPTH:
            raise _Shape(f"nested deeper than {MAX_DEPTH} levels", [])
        active.add(key)
        total = 1
        entries = item.items() if isinstance(item, dict) else enumerate(item)
        for name, child in entries:
            try:
                if isinstance(item, dict):
                    total += walk(name, depth + 1)
                total += walk(child, depth + 1)
            except _Shape as problem:
                problem.labels.append(_label(item, name))
                raise
            if total > MAX_VALUES:
                raise _Shape(f"more than {MAX_VALUES} values (as a tree: a shared list counts once per place)",
                             [_label(item, name)])
        active.discard(key)
        sizes[key] = total
        return total

    try:
        walk(value, 0)
    except _Shape as problem:
        labels = problem.labels[::-1]
        if str(problem).startswith("more than"):
            labels = labels[:1]  # where it starts to grow is anywhere below: name the top-level key
        return f"{path}{''.join(labels)}: {problem}"
    return None


def flatten_metrics(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """The numeric scalars of a (nested) metrics mapping, under dotted names, as floats.

    Values that are not numbers (strings, lists, multi-element tensors) are left out.
    Mappings nested deeper than ``MAX_DEPTH`` levels (or holding themselves) are a
    ``PayloadError``: they could never be stored as metadata.

    >>> flatten_metrics({"val_loss": 0.5, "loss_components": {"mse": 1, "note": "x"}, "ok": True})
    {'val_loss': 0.5, 'loss_components.mse': 1.0}
    """
    flat: dict[str, float] = {}
    _flatten(metrics, prefix, flat, 1)
    return flat


def _flatten(metrics: Mapping, prefix: str, flat: dict[str, float], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise PayloadError(
            f"metrics {prefix.rstrip('.')!r}: nested deeper than {MAX_DEPTH} levels (or the mapping holds itself)"
        )
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, name + ".", flat, depth + 1)
            continue
        try:
            flat[name] = metric_value(name, value)
        except MetricTypeError:
            pass


def _path(parent: str, key: object) -> str:
    return f"{parent}[{key!r}]"


def to_plain(value: object, path: str = "metadata") -> object:
    """``value`` as plain data, converting what can be converted, else ``PayloadError`` naming the key.

    Converted: numpy scalars and one-element tensors (to Python numbers),
    ``os.PathLike`` (to str), datetimes (to ISO strings), tuples (to lists).
    Refused, as no reader would accept them back: a container that holds itself,
    more than ``MAX_DEPTH`` levels of nesting, more than ``MAX_VALUES`` values
    (counted as a tree). A container that appears twice is converted once and
    shared, as ``torch.save`` then stores it.

    >>> import pathlib
    >>> to_plain({"run": {"dir": pathlib.PurePosixPath("/runs/7"), "tags": ("a", "b")}})
    {'run': {'dir': '/runs/7', 'tags': ['a', 'b']}}
    >>> to_plain({"run": {"fn": len}})
    Traceback (most recent call last):
    ...
    ckptfn.PayloadError: metadata['run']['fn']: cannot store builtin_function_or_method as plain data
    >>> looped = []
    >>> looped.append(looped)
    >>> to_plain({"x": looped})
    Traceback (most recent call last):
    ...
    ckptfn.PayloadError: metadata['x'][0]: contains itself
    """
    try:
        return _Converter().convert(value, path, 1)
    except _Overflow as overflow:  # named at the top-level key that holds too much
        raise PayloadError(f"{overflow.args[0] if overflow.args else path}: {_TOO_MANY}") from None


_TOO_MANY = f"more than {MAX_VALUES} values (as a tree: a shared list counts once per place)"


class _Overflow(Exception):
    """More than MAX_VALUES values; the argument (once known) is the top-level key path."""


class _Converter:
    """One ``to_plain`` walk: shared containers converted once, cycles, depth and size bounded."""

    def __init__(self) -> None:
        self.done: dict[int, tuple[object, int]] = {}  # id -> (converted, values in it as a tree)
        self.active: set[int] = set()
        self.values = 0

    def _count(self, count: int, path: str) -> None:
        self.values += count
        if self.values > MAX_VALUES:
            raise _Overflow()

    def _child(self, item: object, path: str, depth: int) -> object:
        if depth > 2:
            return self.convert(item, path, depth)
        try:
            return self.convert(item, path, depth)
        except _Overflow as overflow:
            raise overflow if overflow.args else _Overflow(path) from None

    def convert(self, value: object, path: str, depth: int) -> object:
        if value is None or type(value) in (bool, int, float, str):
            self._count(1, path)
            return value
        container = isinstance(value, Mapping) or (
            isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))
        )
        if not container:
            self._count(1, path)
            return _scalar(value, path)
        key = id(value)
        if key in self.done:
            converted, count = self.done[key]
            self._count(count, path)
            return converted
        if key in self.active:
            raise PayloadError(f"{path}: contains itself")
        if depth > MAX_DEPTH:
            raise PayloadError(f"{path}: nested deeper than {MAX_DEPTH} levels")
        self.active.add(key)
        before = self.values
        self._count(1, path)
        if isinstance(value, Mapping):
            converted: object = {}
            for name, item in value.items():
                if not isinstance(name, str):
                    raise PayloadError(f"{path}: keys must be str, got {type(name).__name__} {name!r}")
                self._count(1, path)
                converted[str(name)] = self._child(item, _path(path, name), depth + 1)
        else:
            converted = [self._child(item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value)]
        self.active.discard(key)
        self.done[key] = (converted, self.values - before)
        return converted


def _scalar(value: object, path: str) -> object:
    if hasattr(value, "__fspath__"):
        text = value.__fspath__()
        if type(text) is str:
            return text
        return _scalar(text, path) if not isinstance(text, (bytes, bytearray)) else _bad(text, path)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    for plain_type in (bool, int, float, str):  # subclasses (enums, numpy.float64) pickle by class
        if isinstance(value, plain_type):
            return plain_type(value)
    item = getattr(value, "item", None)
    if callable(item) and element_count(value) == 1:  # numpy scalars, one-element arrays/tensors
        scalar = item()
        if type(scalar) in (bool, int, float):
            return scalar
    return _bad(value, path)


def _bad(value: object, path: str):
    raise PayloadError(f"{path}: cannot store {type(value).__name__} as plain data")


def save_entry(save: Save | Enter | Periodic) -> dict:
    """What a checkpoint records about one strategy that chose it.

    ``filename`` is always the strategy's file name (what identifies the strategy); a
    top-k save also records ``top_k`` and the ``name`` it was published under.

    >>> from ckptfn.core.strategy import Strategy
    >>> save_entry(Save(Strategy("val_corr", mode="max"), epoch=4, value=0.8, previous=0.7))["value"]
    0.8
    >>> from ckptfn.core.every import Every
    >>> save_entry(Periodic(Every(n_steps=500), epoch=5, global_step=1500))
    {'every_n_steps': 500, 'filename': 'last.pt', 'overwrite': True, 'epoch': 5, 'global_step': 1500}
    """
    s = save.strategy
    if type(save) is Periodic:
        return {
            s.key: s.trigger[1], "filename": s.filename, "overwrite": s.overwrite,
            "epoch": save.epoch, "global_step": save.global_step,
        }
    entry = {
        "metric_name": s.metric_name,
        "mode": s.mode,
        "filename": s.filename,
        "overwrite": s.overwrite,
        "min_delta": s.min_delta,
        "value": save.value,
        "previous": save.previous if type(save) is Save else None,
        "epoch": save.epoch,
        "global_step": save.global_step,
    }
    if s.top_k > 1:
        entry.update(top_k=s.top_k, name=save.filename)
        if type(save) is Enter:
            entry["kth"] = save.kth
    return entry


def build_metadata(
    saves: Sequence[Save | Enter | Periodic],
    *,
    epoch: int | None,
    global_step: int | None = None,
    timestamp: str,
    metrics: Mapping | None,
    manager_state: dict | None,
    versions: Mapping[str, str],
    extra: Mapping | None = None,
) -> dict:
    """The metadata dict of one snapshot. ``extra`` (user metadata) may not reuse a reserved key, and
    the whole record must be bounded (``shape_problem``), else ``PayloadError``."""
    metadata = {
        "format": FORMAT,
        "epoch": epoch,
        "global_step": global_step,
        "timestamp": timestamp,
        "saves": [save_entry(save) for save in saves],
        "metrics": flatten_metrics(metrics) if metrics is not None else {},
        "manager_state": to_plain(manager_state, "manager_state"),
        "versions": {str(k): str(v) for k, v in versions.items()},
    }
    for key, value in (extra or {}).items():
        if key in RESERVED_KEYS:
            raise ValueError(f"metadata key {key!r} is reserved by ckptfn (reserved: {', '.join(RESERVED_KEYS)})")
        metadata[key] = to_plain(value, _path("metadata", key))
    problem = shape_problem(metadata)  # the bounds hold for the whole record, as the readers check it
    if problem is not None:
        raise PayloadError(problem)
    return metadata


def entry_for(metadata: Mapping, filename: str) -> Mapping | None:
    """The ``saves`` entry recorded for ``filename``, if the snapshot was chosen under that name.

    >>> entry_for({"saves": [{"filename": "best_loss.pt", "value": 0.3}]}, "best_loss.pt")
    {'filename': 'best_loss.pt', 'value': 0.3}
    """
    saves = metadata.get("saves")
    if not isinstance(saves, list):
        return None
    for entry in saves:
        if isinstance(entry, Mapping) and entry.get("filename") == filename:
            return entry
    return None


def compose(payload: object, metadata: Mapping) -> dict:
    """The dict a checkpoint file holds, laid out as ``metadata["layout"]`` says.

    ``nested`` (the default): ``{"state_dict": payload, "metadata": metadata}``.
    ``flat``: the payload's own keys beside ``"metadata"``, which is how a Lightning
    checkpoint must look for Lightning's loaders (they read ``checkpoint["state_dict"]``,
    ``checkpoint["optimizer_states"]``, ... at the top level).

    >>> compose({"w": 1}, {"format": FORMAT})
    {'state_dict': {'w': 1}, 'metadata': {'format': 'ckptfn/1'}}
    >>> compose({"state_dict": {"w": 1}, "epoch": 3}, {"format": FORMAT, "layout": "flat"})
    {'state_dict': {'w': 1}, 'epoch': 3, 'metadata': {'format': 'ckptfn/1', 'layout': 'flat'}}
    """
    layout = metadata.get("layout", "nested")
    if layout == "nested":
        return {"state_dict": payload, "metadata": dict(metadata)}
    if layout != "flat":
        raise ValueError(f"metadata['layout']: {layout!r} is not one of 'nested', 'flat'")
    if not isinstance(payload, Mapping):
        raise PayloadError(f"payload: the flat layout needs a mapping, got {type(payload).__name__}")
    for key in payload:
        if not isinstance(key, str):
            raise PayloadError(f"payload: keys must be str in the flat layout, got {type(key).__name__} {key!r}")
        if key == "metadata":
            raise PayloadError("payload['metadata']: this top-level key holds ckptfn's metadata in the flat layout")
    return {**payload, "metadata": dict(metadata)}


def decompose(loaded: object) -> tuple[object, Mapping] | None:
    """``(payload, metadata)`` of what a checkpoint file held; None if it is not a ckptfn checkpoint.

    >>> decompose(compose({"state_dict": {}, "epoch": 3}, {"format": FORMAT, "layout": "flat"}))[0]
    {'state_dict': {}, 'epoch': 3}
    >>> decompose({"state_dict": {}, "metadata": {"format": FORMAT}, "extra": 1}) is None
    True
    """
    if not isinstance(loaded, dict):
        return None
    metadata = loaded.get("metadata")
    if not isinstance(metadata, Mapping) or metadata.get("format") != FORMAT:
        return None
    layout = metadata.get("layout", "nested")
    if layout == "nested" and set(loaded) == {"state_dict", "metadata"}:
        return loaded["state_dict"], metadata
    if layout == "flat":
        return {key: value for key, value in loaded.items() if key != "metadata"}, metadata
    return None
