"""Make a payload storable so that it loads with ``torch.load(weights_only=True)``.

The walk visits containers, never tensor data, so its cost is the number of
objects, not their size. What can be converted is converted (numpy scalars to
Python numbers, numpy arrays to tensors, paths to str, int/float/str subclasses
to their base type); anything else is a ``PayloadError`` naming its key path,
raised before a byte is written.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch

from ckptfn.core.errors import PayloadError

__all__ = ["prepare_payload"]

_ATOMS = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Size, torch.dtype, torch.device)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _safe_globals() -> tuple[type, ...]:
    """Classes the user allowed with ``torch.serialization.add_safe_globals``."""
    allowed = []
    for entry in torch.serialization.get_safe_globals():
        entry = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(entry, type):
            allowed.append(entry)
    return tuple(allowed)


def _rebuild_mapping(original: dict, items: list) -> dict:
    new = type(original)(items)
    for name, attribute in getattr(original, "__dict__", {}).items():
        setattr(new, name, attribute)  # e.g. Module.state_dict()._metadata
    return new


class _Walker:
    def __init__(self) -> None:
        self.allowed = _safe_globals()
        self.active: set[int] = set()
        self.storages: dict[tuple[str, int], tuple[torch.dtype, str]] = {}  # storage -> (dtype, path) seen

    def convert(self, value: object, path: str) -> object:
        kind = type(value)
        if kind is bytes and not value:
            raise PayloadError(
                f"{path}: empty bytes b'' does not load with torch.load(weights_only=True) (torch pickles "
                "it as a call to bytes()); store bytearray() or None instead"
            )
        if kind in _TENSORS:
            return self._tensor(value, path)
        if kind in _ATOMS:
            return value
        if isinstance(value, torch.Tensor):
            raise PayloadError(
                f"{path}: tensor subclass {kind.__module__}.{kind.__qualname__} does not load with "
                "weights_only=True; store a plain tensor (for sharded tensors see load_sharded)"
            )
        if kind in (dict, collections.OrderedDict):
            return self._container(value, path, self._mapping)
        if kind in (list, tuple, set):
            return self._container(value, path, self._sequence)
        if self.allowed and isinstance(value, self.allowed):
            return value
        return self._scalar(value, path)

    def _tensor(self, tensor: torch.Tensor, path: str) -> torch.Tensor:
        """A tensor stores as it is, if ``torch.save`` can store it and its attributes load."""
        if tensor.is_mkldnn:
            raise PayloadError(f"{path}: an MKL-DNN tensor cannot be saved by torch.save; store tensor.to_dense()")
        for name, attribute in vars(tensor).items():
            if self.convert(attribute, f"{path}.{name}") is not attribute:
                raise PayloadError(
                    f"{path}.{name}: a tensor attribute must be plain data as it is (it is stored with the tensor)"
                )
        if tensor.layout == torch.strided and not tensor.is_meta and not tensor.is_quantized:
            storage = tensor.untyped_storage()
            if storage.nbytes():
                key = (str(storage.device), storage.data_ptr())
                seen = self.storages.setdefault(key, (tensor.dtype, path))
                if seen[0] != tensor.dtype:
                    raise PayloadError(
                        f"{path}: views the same memory as {seen[1]} as another dtype ({tensor.dtype} and {seen[0]}), "
                        "which torch.save refuses; store a copy (tensor.clone()) of one of them"
                    )
        return tensor

    def _container(self, value, path: str, walk: Callable) -> object:
        if id(value) in self.active:
            raise PayloadError(f"{path}: the payload contains itself")
        self.active.add(id(value))
        try:
            return walk(value, path)
        finally:
            self.active.discard(id(value))

    def _mapping(self, value: dict, path: str) -> dict:
        items, changed = [], False
        for key, item in value.items():
            new_key = self.convert(key, f"{path} key {key!r}")
            new_item = self.convert(item, f"{path}[{key!r}]")
            changed |= new_key is not key or new_item is not item
            items.append((new_key, new_item))
        return _rebuild_mapping(value, items) if changed else value

    def _sequence(self, value, path: str):
        items = [self.convert(item, f"{path}[{index}]") for index, item in enumerate(value)]
        changed = any(new is not old for new, old in zip(items, value))
        return type(value)(items) if changed else value

    def _scalar(self, value: object, path: str) -> object:
        kind = type(value)
        for plain in (bool, int, float, complex, str, bytes):  # subclasses pickle by class: convert
            if isinstance(value, plain):
                return plain(value)
        if kind.__module__ == "numpy":
            if kind.__name__ == "ndarray":
                try:
                    return torch.from_numpy(value.copy())
                except TypeError as error:
                    raise PayloadError(f"{path}: numpy array cannot become a tensor ({error})") from None
            item = getattr(value, "item", None)
            if callable(item):
                return self.convert(item(), path)
        if hasattr(value, "__fspath__"):
            return str(value.__fspath__())
        raise PayloadError(
            f"{path}: {kind.__module__}.{kind.__qualname__} does not load with "
            "torch.load(weights_only=True); store plain data instead (or allow the class "
            "with torch.serialization.add_safe_globals)"
        )


def prepare_payload(payload: object, path: str = "payload") -> object:
    """``payload`` ready for ``torch.save``: the same object when nothing needed converting.

    >>> import numpy as np
    >>> prepare_payload({"epoch": np.int64(3), "w": torch.zeros(2)})["epoch"]
    3
    >>> prepare_payload({"sched": {"fn": print}})
    Traceback (most recent call last):
    ...
    ckptfn.PayloadError: payload['sched']['fn']: builtins.builtin_function_or_method does not load with torch.load(weights_only=True); store plain data instead (or allow the class with torch.serialization.add_safe_globals)
    """
    return _Walker().convert(payload, path)
