"""The metadata stored beside the payload in every checkpoint file.

Pure: plain data in, plain data out. Everything produced here is made of
str/int/float/bool/None/list/dict, so it loads with ``torch.load(weights_only=True)``
and prints as JSON.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from ckptfn.core.actions import Periodic, Save
from ckptfn.core.errors import MetricTypeError, PayloadError
from ckptfn.core.metrics import element_count, metric_value

__all__ = [
    "FORMAT",
    "LAYOUTS",
    "RESERVED_KEYS",
    "build_metadata",
    "compose",
    "decompose",
    "entry_for",
    "flatten_metrics",
    "save_entry",
    "to_plain",
]

FORMAT = "ckptfn/1"
RESERVED_KEYS = ("format", "epoch", "timestamp", "saves", "metrics", "manager_state", "versions", "layout")
#: How a file holds its payload: ``nested`` (the default, ``{"state_dict": payload, "metadata": ...}``)
#: or ``flat`` (the payload's own keys beside ``"metadata"``, e.g. a Lightning checkpoint).
LAYOUTS = ("nested", "flat")


def flatten_metrics(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """The numeric scalars of a (nested) metrics mapping, under dotted names, as floats.

    Values that are not numbers (strings, lists, multi-element tensors) are left out.

    >>> flatten_metrics({"val_loss": 0.5, "loss_components": {"mse": 1, "note": "x"}, "ok": True})
    {'val_loss': 0.5, 'loss_components.mse': 1.0}
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "."))
            continue
        try:
            flat[name] = metric_value(name, value)
        except MetricTypeError:
            pass
    return flat


def _path(parent: str, key: object) -> str:
    return f"{parent}[{key!r}]"


def to_plain(value: object, path: str = "metadata") -> object:
    """``value`` as plain data, converting what can be converted, else ``PayloadError`` naming the key.

    Converted: numpy scalars and one-element tensors (to Python numbers),
    ``os.PathLike`` (to str), datetimes (to ISO strings), tuples (to lists).

    >>> import pathlib
    >>> to_plain({"run": {"dir": pathlib.PurePosixPath("/runs/7"), "tags": ("a", "b")}})
    {'run': {'dir': '/runs/7', 'tags': ['a', 'b']}}
    >>> to_plain({"run": {"fn": len}})
    Traceback (most recent call last):
    ...
    ckptfn.PayloadError: metadata['run']['fn']: cannot store builtin_function_or_method as plain data
    """
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, Mapping):
        plain = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise PayloadError(f"{path}: keys must be str, got {type(key).__name__} {key!r}")
            plain[str(key)] = to_plain(item, _path(path, key))
        return plain
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        return [to_plain(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if hasattr(value, "__fspath__"):
        return to_plain(value.__fspath__(), path)
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
    raise PayloadError(f"{path}: cannot store {type(value).__name__} as plain data")


def save_entry(save: Save | Periodic) -> dict:
    """What a checkpoint records about one strategy that chose it.

    >>> from ckptfn.core.strategy import Strategy
    >>> save_entry(Save(Strategy("val_corr", mode="max"), epoch=4, value=0.8, previous=0.7))["value"]
    0.8
    >>> from ckptfn.core.every import Every
    >>> save_entry(Periodic(Every(2), epoch=5))
    {'every_n_epochs': 2, 'filename': 'last.pt', 'overwrite': True, 'epoch': 5}
    """
    s = save.strategy
    if type(save) is Periodic:
        return {"every_n_epochs": s.n_epochs, "filename": s.filename, "overwrite": s.overwrite, "epoch": save.epoch}
    return {
        "metric_name": s.metric_name,
        "mode": s.mode,
        "filename": s.filename,
        "overwrite": s.overwrite,
        "min_delta": s.min_delta,
        "value": save.value,
        "previous": save.previous,
        "epoch": save.epoch,
    }


def build_metadata(
    saves: Sequence[Save | Periodic],
    *,
    epoch: int | None,
    timestamp: str,
    metrics: Mapping | None,
    manager_state: dict | None,
    versions: Mapping[str, str],
    extra: Mapping | None = None,
) -> dict:
    """The metadata dict of one snapshot. ``extra`` (user metadata) may not reuse a reserved key."""
    metadata = {
        "format": FORMAT,
        "epoch": epoch,
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
