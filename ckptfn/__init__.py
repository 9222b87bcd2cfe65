"""ckptfn: decide when a training run saves its best checkpoints, purely; save them safely.

The pure core (``init``, ``step``, ``scan``, ``improved``, the records; ``ckptfn/core/``)
decides; the I/O layer (``ckptfn/io/``: ``load_checkpoint``, ``read_metadata``) touches
the files; the shells (``execute``, ``CheckpointManager``, ``AsyncExecutor``;
``ckptfn/shells/``) run the one write recipe. ``ckptfn.kit`` is the stable kit for
writing new integrations; ``ckptfn.lightning`` is the Lightning callback.

``import ckptfn`` does not import torch: the pure core and ``read_metadata``
need none, and the names that write checkpoints (``execute``,
``CheckpointManager``, ``AsyncExecutor``, ``load_sharded``) are imported on
first use.
"""

import importlib

from ckptfn.core.actions import Enter, Periodic, Save, Skip, improved
from ckptfn.core.config import Config
from ckptfn.core.step import Action, best_values, init, new_skips, scan, step
from ckptfn.core.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ConfigError,
    MetricTypeError,
    MissingMetricError,
    MetricWarning,
    PayloadError,
)
from ckptfn.core.every import Every
from ckptfn.core.metrics import MISSING, lookup
from ckptfn.io.read import load_checkpoint, read_metadata, restore_from_directory
from ckptfn.io.verify import Verdict, verify_checkpoint
from ckptfn.core.state import Best, Last, Member, State, restore
from ckptfn.core.strategy import Strategy
from ckptfn._version import __version__

__all__ = [
    "Action",
    "AsyncExecutor",
    "Best",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "Config",
    "ConfigError",
    "Enter",
    "Every",
    "Last",
    "Member",
    "MISSING",
    "MetricTypeError",
    "MetricWarning",
    "MissingMetricError",
    "PayloadError",
    "Periodic",
    "Save",
    "Skip",
    "State",
    "Strategy",
    "Verdict",
    "__version__",
    "best_values",
    "execute",
    "improved",
    "init",
    "load_checkpoint",
    "load_sharded",
    "lookup",
    "new_skips",
    "read_metadata",
    "restore",
    "restore_from_directory",
    "scan",
    "step",
    "verify_checkpoint",
]

#: Names whose modules import torch, loaded on first access (PEP 562).
_ON_FIRST_USE = {
    "AsyncExecutor": "ckptfn.shells.background",
    "CheckpointManager": "ckptfn.shells.manager",
    "execute": "ckptfn.shells.execute",
    "load_sharded": "ckptfn.io.dcp",
}


def __getattr__(name: str) -> object:
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptfn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
