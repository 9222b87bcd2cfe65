"""Every use of torch's private names, in one place (checked with torch 2.13.0).

ckptfn needs a few things torch offers only under private names. Each is wrapped
here with what it is for and what happens where it is missing, so a torch upgrade
is checked in one module (``tests/test_purity.py`` keeps private torch names out
of every other module).
"""

from __future__ import annotations

import contextvars
import sys

__all__ = [
    "crc32_setting_is_per_context",
    "disable_crc32",
    "empty_state_dict_load_planner",
    "layout_from_name",
    "load_without_template",
    "sharded_tensor_types",
    "storage_key",
    "typed_storage",
]


def crc32_setting_is_per_context() -> bool:
    """Whether torch keeps ``save.compute_crc32`` overrides in a ``ContextVar`` (torch >= 2.13 does).

    Where it is a plain module attribute, changing it would change every other save
    in the process while ours runs, so the caller refuses the fast path.
    """
    try:
        from torch.utils.serialization import config

        entry = config._config["save.compute_crc32"]
    except (ImportError, AttributeError, KeyError):
        return False
    return isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)


def disable_crc32() -> None:
    """Turn off torch's CRC32 of zip records in the current context (see above)."""
    from torch.utils.serialization import config

    config.save.compute_crc32 = False


def storage_key(storage: object) -> int:
    """An identity of a tensor storage that tensors sharing it (views, tied weights) share."""
    return storage._cdata


def typed_storage(untyped: object, dtype: object) -> object:
    """A ``TypedStorage`` view of ``untyped`` as ``dtype``, as ``torch.save``'s own reduction makes
    them (``_internal=True`` silences torch's deprecation warning for internal use)."""
    import torch

    return torch.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def layout_from_name(name: str) -> object:
    """``torch.serialization._get_layout``: how torch pickles a layout (DCP metadata uses it)."""
    import torch.serialization

    return torch.serialization._get_layout(name)


def empty_state_dict_load_planner() -> type | None:
    """DCP's planner that loads a checkpoint without a template state dict (what torch's own
    ``dcp_to_torch_save`` uses), or None where this torch has none."""
    try:
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    except ImportError:  # pragma: no cover - depends on the torch version
        return None
    return _EmptyStateDictLoadPlanner


def load_without_template(state_dict: dict, *, reader: object, planner: object) -> None:
    """DCP's single-process load into an empty ``state_dict`` (``_load_state_dict``, no_dist)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _load_state_dict(state_dict, storage_reader=reader, planner=planner, no_dist=True)


def sharded_tensor_types() -> tuple[type, ...]:
    """Tensor classes whose data is spread over ranks, among the modules already loaded (a
    DTensor cannot exist before ``torch.distributed.tensor`` is imported)."""
    kinds = []
    tensor_module = sys.modules.get("torch.distributed.tensor")
    if tensor_module is not None:
        kinds.append(tensor_module.DTensor)
    sharded_tensor = sys.modules.get("torch.distributed._shard.sharded_tensor.api")
    if sharded_tensor is not None:
        kinds.append(sharded_tensor.ShardedTensor)
    return tuple(kinds)
